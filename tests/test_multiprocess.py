"""Multi-process training and evaluation: real JAX processes on localhost, started through
``python -m ppllava_jax.launch`` (coordinator on 127.0.0.1, gloo CPU collectives, simulated CPU
devices per process). Nothing here simulates several hosts inside one process.

The demo model (configs/demo.py) on a 32-clip synthetic set: a global batch of 8 rows (one
process x 8, two x 4, four x 2 rows), 6 steps (an epoch is 4 steps), a checkpoint every 2
steps. Runs (each one launch; module-scoped, shared by the tests):

- ``pair_preempted`` + ``pair_resumed``: 2 processes x 2 devices; SIGTERM to
  the launcher after step 2 (both processes save the same step and exit 75, requeue); the
  rerun resumes from that checkpoint to the end.
- ``reference``: 1 process x 4 devices, straight through.
- ``killed`` + ``killed_rerun``: 2 processes x 2 devices; process 1 is SIGKILLed once
  checkpoint 2 exists; the survivor must stop on its own with an error (heartbeat timeout);
  the rerun resumes from the last complete checkpoint.
- ``preempted`` + ``resharded``: 4 processes x 1 device; one process gets SIGTERM; all save
  the same step and exit 75 (requeue); the rerun on 2 processes x 2 devices resumes from it.
- evaluation of the reference's export: 1 process, then 2 processes killed after a batch of
  answers, then the 2-process rerun.

Every subprocess runs under a deadline and is killed (its whole process group) in ``finally``.

By default: the launcher tests. Opt-in (``PPLLAVA_MULTIPROCESS=1``): the 2-process run above
(data shares, shapes, one checkpoint, resume) and its comparison with ``reference`` (3 runs in a
row green, 3.5-5.5 minutes on the loaded 2-core development machine, but one hang of the
2-process start in a fresh-clone CI run: 600 s after "starting from scratch"), SIGKILL,
4 processes and resharding, parameter comparisons, evaluation; 15-20 minutes on a loaded 2-core
machine, not yet reliable there (gloo gives up when processes reach a first collective more than
30 s apart; a 4-process run hung once in state creation). Each 2-process launch spends ~1 minute
starting and compiling: JAX writes persistent-cache entries only from process 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ppllava_jax.train.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
real_runs = pytest.mark.skipif(
    os.environ.get("PPLLAVA_MULTIPROCESS") != "1",
    reason="multi-process training/eval runs are opt-in (PPLLAVA_MULTIPROCESS=1): slow and "
    "not yet reliable on a loaded 2-core machine (issue 14)",
)
STEPS, GLOBAL_BATCH, NUM_TRAIN, NUM_EVAL = 6, 8, 32, 12
LR = 2e-4  # small: from scratch at the demo's 2e-3, reduction-order noise grows step by step
CACHE = os.environ.get("PPLLAVA_JAX_CACHE", os.path.expanduser("~/.cache/ppllava_jax/xla"))


# ----------------------------------------------------------------------------- launching


class Run:
    """A launcher subprocess whose output lines are collected (and watched) in a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def child_pids(self) -> dict[int, int]:
        out = {}
        for line in list(self.lines):
            m = re.match(r"\[launch\] process (\d+) pid (\d+)", line)
            if m:
                out[int(m.group(1))] = int(m.group(2))
        return out

    def kill(self) -> None:
        for pid in [*self.child_pids().values(), self.proc.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def launch(
    processes: int,
    devices: int,
    command: list[str],
    *,
    timeout: float = 600,
    watch: Callable[[Run], bool] | None = None,
    launcher_args: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Run ``command`` in ``processes`` processes; ``watch(run)`` is polled until it returns
    True (it may signal children). Returns (launcher exit status, output)."""
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    args = [sys.executable, "-m", "ppllava_jax.launch", "--processes", str(processes)]
    args += ["--devices-per-process", str(devices), *launcher_args, "--", *command]
    run = Run(args, env)
    deadline = time.monotonic() + timeout
    try:
        while run.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"launch timed out after {timeout}s:\n{run.text[-6000:]}")
            if watch is not None and watch(run):
                watch = None
            time.sleep(0.2)
        run._t.join(timeout=10)
        return run.proc.returncode, run.text
    finally:
        run.kill()


def train_cmd(data: Path, workdir: Path, rows_per_host: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs' / 'demo.py'}",
        f"--workdir={workdir}",
        f"--config.synthetic.dir={data}",
        f"--config.synthetic.num_train={NUM_TRAIN}",
        f"--config.synthetic.num_eval={NUM_EVAL}",
        "--config.synthetic.frames=8",
        f"--config.data.batch_size={rows_per_host}",
        f"--config.train.total_steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.data_trace=True",
        "--config.optimizer.warmup_steps=2",
        # a small step size: from-scratch training at the demo's 2e-3 amplifies float32
        # reduction-order differences into a visibly different trajectory within a few steps
        f"--config.optimizer.lr={LR}",
        "--config.checkpoint.save_every=2",
        "--config.checkpoint.keep=10",
        "--config.eval.split=",
    ]


def eval_cmd(data: Path, checkpoint: Path, out: Path, batch: int = 2) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "eval.py"),
        f"--checkpoint={checkpoint}",
        "--benchmark=synthetic",
        f"--data={data}",
        f"--out={out}",
        f"--batch_size={batch}",
        "--max_new_tokens=4",
        "--no_progress",
    ]


def ok(rc: int, text: str) -> None:
    assert rc == 0, f"launcher exit status {rc}:\n{text[-8000:]}"


def logged_step(run: Run, step: int) -> bool:
    """Process 0 printed its log line of ``step`` (``step N/TOTAL | loss ...``)."""
    return any(re.match(rf"\[0\] step {step}\b", x) for x in list(run.lines))


# ----------------------------------------------------------------------------- reading runs


def losses(workdir: Path) -> dict[int, float]:
    """Step -> loss of metrics.jsonl (a rerun's line for a step wins)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[int(r["step"])] = float(r["loss"])
    return out


def trace(workdir: Path) -> dict[tuple[int, int], dict]:
    """(step, process) -> the batch record of train.data_trace (the last read wins: a step
    redone after a resume replaces the killed run's)."""
    out = {}
    for f in sorted((workdir / "data_trace").glob("process_*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[(int(r["step"]), int(r["process"]))] = r
    return out


def global_batches(tr: dict[tuple[int, int], dict]) -> dict[int, list[str]]:
    """Step -> the sample ids of the global batch (all processes' rows)."""
    out: dict[int, list[str]] = {}
    for (step, _), r in sorted(tr.items()):
        out.setdefault(step, []).extend(r["ids"])
    return out


def load_final(workdir: Path) -> dict[str, np.ndarray]:
    """The exported parameters as flat numpy arrays (read in a fresh process: the test
    process's devices differ from the writers')."""
    code = (
        "import sys, numpy as np, jax, orbax.checkpoint as ocp\n"
        "from ppllava_jax.convert import params_io\n"
        "path = sys.argv[1]\n"
        "with ocp.StandardCheckpointer() as c:\n"
        "    meta = c.metadata(path + '/params')\n"
        "tree = getattr(meta, 'item_metadata', None) or meta\n"
        "dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])\n"
        "target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),"
        " dict(tree))\n"
        "p = params_io.load_params(path, target)\n"
        "flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in"
        " jax.tree_util.tree_flatten_with_path(p)[0]}\n"
        "np.savez(sys.argv[2], **flat)\n"
    )
    out = workdir / "final_params.npz"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [sys.executable, "-c", code, str(workdir / "final"), str(out)],
        check=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def assert_params_close(a: dict, b: dict) -> None:
    """Adam turns float32 reduction-order noise in near-zero gradients into whole steps of
    +-lr for single elements, so elements may differ by up to ~lr per step; each tensor as a
    whole must agree to 1% (a lost or doubled host's rows would move every tensor by far more)."""
    assert sorted(a) == sorted(b)
    for k in a:
        diff = np.abs(a[k] - b[k])
        assert diff.max() <= 2 * LR * STEPS, (k, float(diff.max()))
        # a tensor that starts at zero (a bias) is only as large as the steps it took
        scale = max(float(np.linalg.norm(b[k])), LR * STEPS * np.sqrt(b[k].size))
        rel = np.linalg.norm(a[k] - b[k]) / scale
        assert rel <= 1e-2, (k, rel)


def assert_losses_close(a: dict[int, float], b: dict[int, float]) -> None:
    """Step 1 (the same parameters and samples): forward numerics only; later steps within
    float32 reduction-order drift, which Adam amplifies step by step (measured, 1 process x 4
    devices against 2 x 2: 8e-7 at step 1, 5e-5 at step 4, 3.6e-4 at step 5, the same with or
    without a preemption and resume in between). A lost or doubled host's rows change step 1's
    loss by far more."""
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-3)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ppllava_jax.data import synthetic

    out = tmp_path_factory.mktemp("mp") / "data"
    synthetic.ensure_dataset(out, num_train=NUM_TRAIN, num_eval=NUM_EVAL, frames=8, size=48)
    return out


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    w = data.parent / "reference"
    ok(*launch(1, 4, train_cmd(data, w, GLOBAL_BATCH)))
    return w


@pytest.fixture(scope="module")
def pair_preempted(data: Path) -> tuple[Path, int, str]:
    """2 processes x 2 devices; SIGTERM to the launcher (forwarded to both, as a scheduler
    stopping the job) once process 0 logged step 2: both save the same step, exit 75."""
    w = data.parent / "pair"

    def watch(run: Run) -> bool:
        if not logged_step(run, 2):
            return False
        run.proc.send_signal(signal.SIGTERM)
        return True

    rc, text = launch(2, 2, train_cmd(data, w, GLOBAL_BATCH // 2), watch=watch)
    return w, rc, text


@pytest.fixture(scope="module")
def pair_resumed(data: Path, pair_preempted) -> tuple[Path, str]:
    w = pair_preempted[0]
    rc, text = launch(2, 2, train_cmd(data, w, GLOBAL_BATCH // 2))
    ok(rc, text)
    return w, text


@pytest.fixture(scope="module")
def killed(data: Path) -> tuple[Path, int, str]:
    """2 processes; process 1 SIGKILLed once checkpoint 2 is complete."""
    w = data.parent / "killed"

    def watch(run: Run) -> bool:
        if not (w / "checkpoints" / "2").is_dir():  # renamed into place once complete
            return False
        os.kill(run.child_pids()[1], signal.SIGKILL)
        return True

    rc, text = launch(
        2,
        2,
        train_cmd(data, w, GLOBAL_BATCH // 2),
        watch=watch,
        launcher_args=("--grace", "240", "--heartbeat-timeout", "10"),
    )
    return w, rc, text


@pytest.fixture(scope="module")
def killed_rerun(data: Path, killed) -> tuple[Path, str]:
    w = killed[0]
    rc, text = launch(2, 2, train_cmd(data, w, GLOBAL_BATCH // 2))
    ok(rc, text)
    return w, text


@pytest.fixture(scope="module")
def preempted(data: Path) -> tuple[Path, int, str]:
    """4 processes x 1 device; process 2 gets SIGTERM once process 0 logged step 2."""
    w = data.parent / "preempted"

    def watch(run: Run) -> bool:
        if not logged_step(run, 2):
            return False
        os.kill(run.child_pids()[2], signal.SIGTERM)
        return True

    rc, text = launch(4, 1, train_cmd(data, w, GLOBAL_BATCH // 4), watch=watch)
    return w, rc, text


@pytest.fixture(scope="module")
def resharded(data: Path, preempted) -> tuple[Path, str]:
    w = preempted[0]
    rc, text = launch(2, 2, train_cmd(data, w, GLOBAL_BATCH // 2))
    ok(rc, text)
    return w, text


# ----------------------------------------------------------------------------- training


def test_launcher_environment_and_failure_status(tmp_path):
    """The children see the coordinator, their id, the count and the devices; a failing child
    ends the others and its status is the launcher's."""
    code = (
        "import os, sys, time\n"
        "from ppllava_jax import sharding\n"
        "import jax\n"
        "sharding.maybe_initialize_distributed()\n"
        "print('ID', jax.process_index(), jax.process_count(), jax.local_device_count(),"
        " jax.device_count(), flush=True)\n"
        "if jax.process_index() == 1: raise RuntimeError('process 1 fails')\n"
        "time.sleep(600)\n"
    )
    rc, text = launch(2, 3, [sys.executable, "-c", code], timeout=300)
    assert rc == 1, text
    assert "[0] ID 0 2 3 6" in text and "[1] ID 1 2 3 6" in text, text
    assert "RuntimeError: process 1 fails" in text, text
    assert "process 1 failed (status 1); stopping the others" in text, text


def test_child_environment_and_simulated_devices():
    """Each child's environment: its place in the job, the simulated devices replacing any
    count (other XLA flags kept), a CPU thread pool sized for them (PJRT_NPROC, not inherited),
    and nothing of the kind when no devices are asked for."""
    from ppllava_jax.launch import child_env, simulate_cpu_devices, size_cpu_thread_pool

    base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "PJRT_NPROC": "9"}
    env = child_env(
        base, process_id=1, num_processes=2, coordinator="127.0.0.1:5", heartbeat_timeout=7
    )
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_PROCESSES"] == "2"
    assert (
        env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:5" and env["PPLLAVA_HEARTBEAT_TIMEOUT"] == "7"
    )
    assert env["XLA_FLAGS"] == base["XLA_FLAGS"] and env["PJRT_NPROC"] == "9"  # left alone
    env = child_env(base, process_id=0, num_processes=2, coordinator="c", devices_per_process=16)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=16"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PJRT_NPROC"] == "128"
    assert "PPLLAVA_HEARTBEAT_TIMEOUT" not in env and base["PJRT_NPROC"] == "9"
    one: dict[str, str] = {"PJRT_NPROC": "9"}
    simulate_cpu_devices(1, one)  # one device: no collectives, XLA's own pool
    assert one == {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    size_cpu_thread_pool(two)
    assert two["PJRT_NPROC"] == "64"
    kept = {**two, "PJRT_NPROC": "16"}
    size_cpu_thread_pool(kept)  # a pool size set by hand is kept
    assert kept["PJRT_NPROC"] == "16"


def test_launcher_names_a_requeue():
    from ppllava_jax import launch

    assert launch.REQUEUE_EXIT_CODE == REQUEUE_EXIT_CODE  # train.preemption's
    assert launch.ended(REQUEUE_EXIT_CODE).startswith("saved and stopped to be requeued")
    assert launch.ended(1) == "failed (status 1)" and launch.ended(-9) == "failed (signal 9)"


def test_launcher_arguments():
    from ppllava_jax.launch import parse_args

    args, command = parse_args(["--processes", "2", "--grace", "1.5", "--", "python", "-V"])
    assert (args.processes, args.grace, args.kill_after, args.devices_per_process) == (
        2,
        1.5,
        10,
        0,
    )
    assert command == ["python", "-V"]
    with pytest.raises(SystemExit):
        parse_args(["--processes", "2"])  # no command


def test_launcher_prefixes_output_and_stops_the_others(tmp_path):
    """Without JAX: every line is prefixed with its process id; a child ended by a signal makes
    the launcher's status 128 + signal and the sleeping child is stopped."""
    import io

    from ppllava_jax.launch import Launcher

    code = (
        "import os, signal, sys, time\n"
        "i = int(os.environ['JAX_PROCESS_ID'])\n"
        "print('hello from', i, os.environ['JAX_NUM_PROCESSES'], flush=True)\n"
        "if i == 1: os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )
    out = io.BytesIO()
    launcher = Launcher([sys.executable, "-c", code], 2, kill_after=5, out=out)
    t0 = time.monotonic()
    launcher.start()
    assert launcher.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 30
    text = out.getvalue().decode()
    assert "[0] hello from 0 2" in text and "[1] hello from 1 2" in text, text
    assert "process 1 failed (signal 15); stopping the others" in text, text
    assert all(p.returncode is not None for p in launcher.procs)


@real_runs
def test_two_processes_share_the_data_save_once_and_resume(pair_preempted, pair_resumed):
    """2 processes x 2 devices, stopped by SIGTERM after step 2 and rerun: each process reads
    its own rows (none twice, none left out in the epoch), both agree on every step's shapes,
    both save the same step into one checkpoint, and the rerun resumes from it to the end."""
    w, rc, text = pair_preempted
    assert rc == REQUEUE_EXIT_CODE, f"launcher exit status {rc}:\n{text[-8000:]}"
    saved = {
        int(re.search(rf"\[{i}\] \[train\] .*saving step (\d+)", text).group(1)) for i in (0, 1)
    }
    assert len(saved) == 1, saved
    (step,) = saved
    assert 2 <= step < STEPS
    ck = w / "checkpoints" / str(step)
    assert sorted(p.name for p in (ck / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    _, text2 = pair_resumed
    for i in (0, 1):
        m = re.search(rf"\[{i}\] \[train\] resumed from step (\d+)", text2)
        assert m and int(m.group(1)) == step, text2[-4000:]
    assert (w / "final").is_dir()
    records = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    steps = [int(r["step"]) for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: cut back on resume
    tr = trace(w)
    got = global_batches(tr)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        a, b = tr[(s, 0)], tr[(s, 1)]
        assert not set(a["ids"]) & set(b["ids"]), s
        assert a["shapes"] == b["shapes"] and a["shapes"]["input_ids"][0] == 4, s
    per_epoch = NUM_TRAIN // GLOBAL_BATCH
    epoch0 = [i for s in range(1, per_epoch + 1) for i in got[s]]
    assert sorted(epoch0) == sorted(f"train.json:{i}" for i in range(NUM_TRAIN))


@real_runs
def test_two_processes_equal_one_after_preemption(reference, pair_resumed):
    """The preempted-and-resumed 2-process run has the losses and global batches of 1 process
    x 4 devices."""
    w, _ = pair_resumed
    assert_losses_close(losses(w), losses(reference))
    ref, got = global_batches(trace(reference)), global_batches(trace(w))
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v) for s, v in ref.items()}


@real_runs
def test_two_processes_equal_one(reference, killed_rerun):
    """2 processes x 2 devices (with a SIGKILL and a resume on the way) end with the loss of
    every step and the parameters of 1 process x 4 devices on the same global batches; each
    step's global batch holds the same samples, every process reads its own share of each
    epoch (no sample twice, none left out) and the processes agree on every step's shapes."""
    w, _ = killed_rerun
    assert_losses_close(losses(w), losses(reference))
    ref_batches, tr = global_batches(trace(reference)), trace(w)
    got = global_batches(tr)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert sorted(got[step]) == sorted(ref_batches[step]), step
        a, b = tr[(step, 0)], tr[(step, 1)]
        assert not set(a["ids"]) & set(b["ids"]), step
        assert a["shapes"] == b["shapes"] and a["shapes"]["input_ids"][0] == 4, step
    per_epoch = NUM_TRAIN // GLOBAL_BATCH
    epoch0 = [i for s in range(1, per_epoch + 1) for i in got[s]]
    assert sorted(epoch0) == sorted(f"train.json:{i}" for i in range(NUM_TRAIN))
    assert_params_close(load_final(w), load_final(reference))


@real_runs
def test_sigkill_survivor_stops_with_error_and_rerun_resumes(killed, killed_rerun):
    w, rc, text = killed
    assert rc == 128 + signal.SIGKILL, text[-4000:]
    # the survivor ended by itself (the launcher's --grace 240 never ran out) with an error
    assert "killing the remaining processes" not in text, text[-4000:]
    m = re.search(r"\[launch\] process 0 exited with (-?\d+)", text)
    assert m and int(m.group(1)) != 0, text[-4000:]
    survivor = "\n".join(x for x in text.splitlines() if x.startswith("[0]"))
    assert re.search(r"(?i)heartbeat|unavailable|connection|peer|task.*(died|dead|fail)", survivor)
    _, text2 = killed_rerun
    m = re.search(r"\[0\] \[train\] resumed from step (\d+)", text2)
    assert m and int(m.group(1)) >= 2, text2[-4000:]
    assert "final" in {p.name for p in w.iterdir()}


@real_runs
def test_sigterm_to_one_process_all_save_the_same_step(preempted):
    w, rc, text = preempted
    assert rc == REQUEUE_EXIT_CODE, f"launcher exit status {rc}:\n{text[-8000:]}"
    saved = set()
    for i in range(4):
        m = re.search(rf"\[{i}\] \[train\] .*saving step (\d+)", text)
        assert m, f"process {i} did not stop on the preemption:\n{text[-6000:]}"
        saved.add(int(m.group(1)))
    assert len(saved) == 1, saved
    (step,) = saved
    assert step < STEPS
    ck = w / "checkpoints" / str(step)
    assert sorted(p.name for p in (ck / "data").glob("process_*.json")) == [
        f"process_{i}-of-4.json" for i in range(4)
    ]
    assert not (w / "final").exists()


@real_runs
def test_restart_on_fewer_processes_resumes(reference, preempted, resharded):
    """The 4-process checkpoint resumes on 2 processes: data position included (every step's
    global batch as in the straight run), parameters equal at the end."""
    w, text = resharded
    step = int(re.search(r"\[0\] \[train\] resumed from step (\d+)", text).group(1))
    assert 2 <= step < STEPS
    tr = trace(w)
    assert {p for (s, p) in tr if s <= step} == {0, 1, 2, 3}
    assert {p for (s, p) in tr if s > step} == {0, 1}
    got, ref = global_batches(tr), global_batches(trace(reference))
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v) for s, v in ref.items()}
    assert_losses_close(losses(w), losses(reference))
    assert_params_close(load_final(w), load_final(reference))


# ----------------------------------------------------------------------------- evaluation


def _answer_ids(out: Path) -> list[str]:
    ids = []
    for f in sorted(out.parent.glob(out.stem + ".answers*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                ids.append(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut by the kill
    return ids


@real_runs
def test_evaluation_on_two_processes_equals_one_and_resumes(data, reference):
    final = reference / "final"
    one = data.parent / "eval1" / "synthetic.json"
    ok(*launch(1, 2, eval_cmd(data, final, one)))
    two = data.parent / "eval2" / "synthetic.json"
    host1 = two.parent / "synthetic.answers.host1.jsonl"

    def watch(run: Run) -> bool:
        if not host1.exists() or not host1.read_text().strip():
            return False
        os.kill(run.child_pids()[1], signal.SIGKILL)
        return True

    # one question per batch: 6 batches per host, so the kill lands mid-run
    rc, text = launch(2, 1, eval_cmd(data, final, two, batch=1), watch=watch)
    assert rc == 128 + signal.SIGKILL, text[-4000:]
    assert not two.exists()
    before = _answer_ids(two)
    assert 0 < len(before) < NUM_EVAL
    ok(*launch(2, 1, eval_cmd(data, final, two, batch=1)))
    ids = _answer_ids(two)
    assert sorted(ids) == sorted(set(ids)), "a question was answered twice"
    assert len(ids) == NUM_EVAL
    assert json.loads(two.read_text()) == json.loads(one.read_text())
