"""A ``--config`` file that is missing or does not load (issue 22, item 3): one error line
naming it, before the command runs, so ``train.py`` leaves no empty workdir behind (the config
flag deferred its error to the first use of the config, after ``run.main`` had made it)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("PPLLAVA_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def _errors(res: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return [x for x in res.stderr.splitlines() if x.strip()]


def test_missing_recipe_one_line_and_no_workdir(tmp_path):
    work = tmp_path / "W"
    res = _run("train.py", "--config", "configs/nope.py", "--workdir", str(work))
    assert res.returncode == 2
    assert _errors(res) == [
        "error: --config configs/nope.py: no such config file (the recipes are configs/*.py) "
        "(see train.py --help)"
    ]
    assert not work.exists()
    # with an override of a field of it, too (absl failed on the override, with a traceback)
    res = _run("train.py", "--config=configs/nope.py", f"--workdir={work}", "--config.seed=1")
    assert res.returncode == 2 and len(_errors(res)) == 1 and "configs/nope.py" in res.stderr
    assert not work.exists()


def test_recipe_that_does_not_load_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(:\n")
    work = tmp_path / "W"
    res = _run("train.py", "--config", str(bad), "--workdir", str(work))
    assert res.returncode == 2
    (line,) = _errors(res)
    assert line.startswith(f"error: --config {bad}: cannot load it (SyntaxError: ")
    assert not work.exists()
    res = _run("eval.py", "--config", "configs/nope.py", "--checkpoint", "c", "--benchmark",
               "synthetic", "--data", "d", "--out", str(tmp_path / "o.json"))  # fmt: skip
    assert res.returncode == 2 and len(_errors(res)) == 1 and "no such config file" in res.stderr
