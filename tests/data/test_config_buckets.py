"""``data.buckets`` that are no token lengths are named in one line (issue 22, item 3):
``--config.data.buckets=abc`` reached ``int('abc')`` and printed only
``invalid literal for int() with base 10: 'abc'``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppllava_jax.data import config as C
from tests.data.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = tiny_model(7)


@pytest.mark.parametrize("buckets", [["abc"], [64, "96"], [True], [64, 0], [96.5], []])
def test_buckets_that_are_no_lengths_are_named(buckets):
    cfg = C.resolve_config(dict(sources=["a.json"], num_frames=4, max_length=96, buckets=[96]))
    cfg.buckets = buckets
    with pytest.raises(ValueError) as e:
        C.validate_config(cfg, MODEL)
    msg = str(e.value)
    assert msg.startswith("data.buckets: ") and "positive whole token lengths" in msg
    assert "--config.data.buckets='[512, 1024, 2048]'" in msg and "\n" not in msg


def test_train_py_names_the_buckets_field(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("PPLLAVA_TRACEBACK", None)
    res = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir",
         str(tmp_path / "w"), "--config.data.buckets=abc",
         # a small demo set: the error comes once the data pipeline is built
         "--config.synthetic.num_train=4", "--config.synthetic.num_eval=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        "error: data.buckets: ['abc']: give positive whole token lengths, e.g. "
        "--config.data.buckets='[512, 1024, 2048]'"
    ]
