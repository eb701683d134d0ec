"""The data package keeps transformers' "PyTorch was not found" notice from JAX users."""

import subprocess
import sys

HIDE_TORCH = """
import importlib.util, sys
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "torch" else find(name, *a)
"""


def _stderr(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", HIDE_TORCH + code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stderr


def test_no_pytorch_notice_once_the_data_package_is_imported():
    # without the data package, transformers (torch hidden) prints it: the check can fail
    assert "PyTorch was not found" in _stderr("import transformers")
    quiet = _stderr(
        "import ppllava_jax.data\nimport transformers\n"
        "import logging\nlogging.getLogger('transformers').warning('another warning')"
    )
    assert "PyTorch was not found" not in quiet
    assert "another warning" in quiet  # only that notice is filtered
