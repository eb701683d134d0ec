"""Training failures that lose nothing: a diverged loss, a second run on a work directory, a
damaged checkpoint, a failed save, a refused resume.

The runs are ``train.py`` on the small demo (``tests.test_demo._small``: a tiny model, 24 clips)
as a user types it, sharing one synthetic dataset; ``trained`` is a finished 3-step run (a
checkpoint each step) that the resume tests copy. Every run has 3 steps, so that the compiled
step (the schedule is part of it) comes from the compilation cache after the first. The failed
save is the trainer on the toy model with orbax's background commit made to fail (a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

from ppllava_jax.train import resume_check
from ppllava_jax.train.checkpoint import CheckpointSaveError
from ppllava_jax.train.trainer import train
from ppllava_jax.train.workdir_lock import LOCK_NAME, WorkdirLock, hold
from tests.train.test_trainer import _config
from tests.train.toy_model import CountingIterator, make_toy

ROOT = Path(__file__).resolve().parents[2]
SMALL_CONFIG = """
from configs import demo
from tests.test_demo import _small


def get_config():
    return _small(demo.get_config(), 3)
"""


def _train(tmp_path: Path, work: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``train.py`` on the small demo in ``work`` (the synthetic set in ``data``, a checkpoint
    every step, the last 3 kept, no scoring at the end)."""
    config = tmp_path / "small_demo.py"
    config.write_text(SMALL_CONFIG)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
    cmd = [
        sys.executable, "train.py", "--config", str(config), "--workdir", str(work),
        f"--config.synthetic.dir={data}", "--config.eval.split=",
        "--config.checkpoint.save_every=1", "--config.checkpoint.keep=3", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def _error(res: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed run (no traceback)."""
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-5000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def _steps(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "checkpoints").iterdir())


def _truncate_arrays(step_dir: Path) -> None:
    """Cut every array data file of a checkpoint step to half its size."""
    files = list((step_dir / "state").glob("ocdbt.process_*/d/*"))
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(tmp, data, work)``: a finished 3-step run with checkpoints 1, 2 and 3."""
    tmp = tmp_path_factory.mktemp("failures")
    data, work = tmp / "data", tmp / "run"
    res = _train(tmp, work, data)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _steps(work) == ["1", "2", "3"] and not (work / LOCK_NAME).exists()
    return tmp, data, work


def test_non_finite_loss_stops_the_run(trained, tmp_path):
    _, data, _ = trained
    work = tmp_path / "run"
    res = _train(tmp_path, work, data, "--config.optimizer.lr=1e6")
    line = _error(res)
    assert line.startswith("error: training diverged: the loss is nan"), line
    step = int(line.split(" at step ")[1].split(";")[0])
    assert 2 <= step <= 3, line
    assert "optimizer.lr (now 1000000.0)" in line
    assert "optimizer.warmup_steps" in line and "optimizer.grad_clip_norm" in line
    # the finite checkpoints before that step are kept, nothing non-finite is saved or exported
    assert _steps(work) == [str(s) for s in range(1, step)]
    assert f"the last checkpoint is {work / 'checkpoints' / str(step - 1)}" in line
    saved = ocp.StandardCheckpointer().restore(work / "checkpoints" / str(step - 1) / "state")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))
    assert not (work / "final").exists() and not (work / LOCK_NAME).exists()


HOLD = """
import sys, time
from ppllava_jax.train.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_run_on_a_workdir_is_refused(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _train(tmp_path, work, tmp_path / "data")
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind
        holder.wait()
    line = _error(res)
    assert f"{work} is in use by another training run (pid {holder.pid} on host " in line
    assert f"{socket.gethostname()}, started {time.strftime('%Y-%m-%d')}" in line
    assert "--workdir" in line
    assert sorted(p.name for p in work.iterdir()) == [LOCK_NAME]  # nothing written
    assert not (tmp_path / "data").exists()

    # the holder is gone: its lock is stale and the next run takes it over, saying whose it was
    said: list[str] = []
    lock = WorkdirLock(str(work), log=said.append)
    lock.acquire()
    assert len(said) == 1 and f"pid {holder.pid} on host {socket.gethostname()}" in said[0]
    assert json.loads((work / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (work / LOCK_NAME).exists()
    # released when the run ends with an error too
    with pytest.raises(RuntimeError), hold(str(work)):
        assert (work / LOCK_NAME).exists()
        raise RuntimeError
    assert not (work / LOCK_NAME).exists()


def test_damaged_checkpoint_falls_back_to_an_intact_one(trained, tmp_path):
    _, data, done = trained
    work = tmp_path / "run"
    shutil.copytree(done, work)
    _truncate_arrays(work / "checkpoints" / "3")
    res = _train(tmp_path, work, data)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-5000:]
    said = [x for x in res.stdout.splitlines() if " is damaged " in x]
    assert len(said) == 1, res.stdout
    assert said[0].startswith("[train] checkpoint step 3 is damaged ("), said[0]
    assert said[0].endswith(
        f": resuming from step 2 instead (the damaged one is kept as {work}/checkpoints/3.damaged)"
    )
    assert f"resumed from step 2 in {work / 'checkpoints'}" in res.stdout
    assert "step 3/3 | loss " in res.stdout
    assert _steps(work) == ["1", "2", "3", "3.damaged"]  # step 3 trained and saved again
    assert (work / "final").is_dir()


def test_no_intact_checkpoint_stops_with_one_line(trained, tmp_path):
    _, data, done = trained
    work = tmp_path / "run"
    shutil.copytree(done, work)
    for step in ("1", "2", "3"):
        _truncate_arrays(work / "checkpoints" / step)
    res = _train(tmp_path, work, data)
    line = _error(res)
    assert line.startswith(f"error: no checkpoint in {work / 'checkpoints'} restores (step 3: ")
    assert "; step 2: " in line and "; step 1: " in line and "another --workdir" in line
    assert _steps(work) == ["1", "2", "3"]  # nothing set aside: there was nothing to resume from


def test_refused_resume_changes_nothing(trained, tmp_path):
    _, data, done = trained
    work = tmp_path / "run"
    shutil.copytree(done, work)
    shutil.rmtree(work / "checkpoints" / "3")  # the run stopped after step 2
    before = (work / "config.json").read_bytes()

    # another model: refused before anything is restored, config.json as it was
    wider = "--config.model.llm.intermediate_size=96"
    res = _train(tmp_path, work, data, wider)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"error: cannot resume from {work / 'checkpoints' / '2'}: " in res.stderr
    assert (work / "config.json").read_bytes() == before

    # the same annotation file, four samples fewer: its saved data position means nothing now
    other = tmp_path / "data"
    shutil.copytree(data, other)
    samples = json.loads((other / "train.json").read_text())
    (other / "train.json").write_text(json.dumps(samples[:-4]))
    res = _train(tmp_path, work, other)
    line = _error(res)
    assert f"data.sources file {other / 'train.json'} (the checkpoint's run read " in line
    assert f"{data / 'train.json'}) changed (size " in line and "its content differs" in line
    assert "--config.train.allow_data_change=True" in line
    assert (work / "config.json").read_bytes() == before
    assert _steps(work) == ["1", "2"]

    # said how to go on anyway: weights and optimizer kept, the data order restarted
    allow = "--config.train.allow_data_change=True"
    res = _train(tmp_path, work, other, allow)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the data order starts from the beginning" in res.stdout
    assert "resumed from step 2" in res.stdout and "step 3/3 | loss " in res.stdout
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["data"]["sources"][0]["path"] == str(other / "train.json")
    assert cfg["train"]["allow_data_change"] is True


def test_data_identity_follows_the_content(tmp_path):
    """The same files elsewhere are the same data; other content or weights are not."""
    from ml_collections import ConfigDict

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("[1, 2, 3]")
    b.write_text("[1, 2, 3]")

    def ident(path, weight=1.0):
        return resume_check.data_identity(ConfigDict({"data": {"sources": [
            {"path": str(path), "weight": weight}]}}))  # fmt: skip

    saved = ident(a)
    assert not resume_check.check_data(saved, ident(b), "ckpt/2", False)  # moved: same data
    assert resume_check.check_data(None, ident(b), "ckpt/2", False) is False  # nothing recorded
    with pytest.raises(resume_check.DataChangedError, match=r"weight 1.0 -> 2.0\)"):
        resume_check.check_data(saved, ident(a, 2.0), "ckpt/2", False)
    b.write_text("[1, 2]")
    with pytest.raises(resume_check.DataChangedError) as e:
        resume_check.check_data(saved, ident(b), "ckpt/2", False)
    assert f"file {b} (the checkpoint's run read {a}) changed (size 9 -> 6 bytes, its " in str(
        e.value
    )
    with pytest.raises(resume_check.DataChangedError, match=r"lists \['.*a.json', '.*b.json'\]"):
        resume_check.check_data(saved, resume_check.data_identity(ConfigDict({"data": {
            "sources": [str(a), str(b)]}})), "ckpt/2", False)  # fmt: skip
    assert resume_check.check_data(saved, ident(b), "ckpt/2", True)  # allow_data_change


class _WaitsForTheSave(CountingIterator):
    """Batches; the one of step 5 only once the background save of step 4 has ended (so the
    step after it is the first that can see its failure)."""

    def __next__(self):
        while self.pos == 4 and any(
            t.name in ("async_save", "save_finalize") for t in threading.enumerate()
        ):
            time.sleep(0.05)
        return super().__next__()


def test_failed_background_save_stops_at_the_next_step(tmp_path, monkeypatch, caplog):
    wait_for_commit = async_checkpointer._background_wait_for_commit_futures
    saves: list[str] = []

    def disk_full_at_second_save(directory, commit_futures, *args, **kwargs):
        saves.append(str(directory))
        if len(saves) == 2:
            for f in commit_futures:  # the arrays are written, the commit fails
                f.result()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return wait_for_commit(directory, commit_futures, *args, **kwargs)

    monkeypatch.setattr(
        async_checkpointer, "_background_wait_for_commit_futures", disk_full_at_second_save
    )
    cfg = _config()
    cfg.train.total_steps = 10
    cfg.checkpoint.save_every = 2
    apply_fn, init = make_toy()
    it = _WaitsForTheSave()
    with pytest.raises(CheckpointSaveError) as e:
        train(cfg, str(tmp_path), model_apply=apply_fn, init_params=init, data_iterator=it,
              log=lambda s: None)  # fmt: skip
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"writing checkpoint step 4 to {tmp_path / 'checkpoints'} failed (")
    assert "No space left on device" in msg and "the newest complete one is step 2" in msg
    assert it.seen == [0, 1, 2, 3, 4]  # stopped before step 6, not at the next save or the end
    assert _steps(tmp_path) == ["2"]  # no temporary step directory left
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "orbax" in r.pathname]


_LATE_CALLBACKS = """
import asyncio, sys, threading
import tensorstore as ts
from ppllava_jax.train.checkpoint_failures import quiet_late_read_callbacks

if sys.argv[1] == "quiet":
    quiet_late_read_callbacks()
    quiet_late_read_callbacks()
loop = asyncio.new_event_loop()
loop.close()
for callback in (lambda f: loop.call_soon_threadsafe(print), lambda f: 1 / 0):
    promise, future = ts.Promise.new()
    future.add_done_callback(callback)
    t = threading.Thread(target=promise.set_result, args=(1,))
    t.start()
    t.join()
    future.result()


class Pending:
    def __await__(self):
        yield


async def _read_array_index_and_device_put():  # orbax's read, abandoned mid-way
    try:
        await Pending()
    finally:
        raise Exception("Encountered error while reading array index")


async def other_coroutine():
    try:
        await Pending()
    finally:
        raise KeyError("not a read")


for make in (_read_array_index_and_device_put, other_coroutine):
    c = make()
    c.send(None)
    del c

import logging
logging.basicConfig()
for error in ("ValueError('OUT_OF_RANGE: Error reading \\"a/0.0\\"')", "KeyError('unread')"):
    logging.getLogger("asyncio").error(
        "Future exception was never retrieved\\nfuture: <Future finished exception=%s>", error
    )
"""


def test_late_read_callbacks_are_quiet():
    """TensorStore reports a read finishing after orbax closed its event loop, and orbax's
    abandoned read coroutines their read errors, through ``sys.unraisablehook``: those are
    dropped, anything else still printed."""

    def stderr(mode):
        cmd = [sys.executable, "-c", _LATE_CALLBACKS, mode]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stderr

    loud = stderr("loud")
    dropped = ("Event loop is closed", "reading array index", "OUT_OF_RANGE")
    kept = ("ZeroDivisionError", "not a read", "unread")
    for said in dropped + kept:
        assert said in loud, loud
    quiet = stderr("quiet")
    assert not [x for x in dropped if x in quiet] and all(x in quiet for x in kept), quiet
