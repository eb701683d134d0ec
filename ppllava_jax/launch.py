"""Start N local JAX processes of one command, as a pod's hosts would run it.

    python -m ppllava_jax.launch --processes 4 --devices-per-process 2 -- \\
        python train.py --config configs/demo.py --workdir runs/mp

Each child gets the environment that ``sharding.maybe_initialize_distributed`` reads (the same
call ``train.py`` and ``eval.py`` make on a TPU pod, under SLURM or on Kubernetes)::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>   process 0 runs the coordinator there
    JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i           this child's place in the job
    XLA_FLAGS=--xla_force_host_platform_device_count=D, JAX_PLATFORMS=cpu, PJRT_NPROC
                                                    (with --devices-per-process: D simulated
                                                    CPU devices, see ``simulate_cpu_devices``;
                                                    cross-process CPU collectives go through
                                                    gloo)
    PPLLAVA_HEARTBEAT_TIMEOUT=S                      (with --heartbeat-timeout) seconds after
                                                    which a silent (killed) process is declared
                                                    dead and the others stop with an error

The launcher prefixes every output line of child ``i`` with ``[i]``, forwards SIGTERM and
SIGINT to every child (each then saves and stops with status 75, "requeue": see
``train/preemption.py``), and when a child fails (or stops to be requeued) it gives the others
``--grace`` seconds to end on their own, then sends them SIGTERM and, ``--kill-after`` seconds
later, SIGKILL (to each child's whole process group, data workers included). Children die with
the launcher (``PR_SET_PDEATHSIG``) so nothing outlives it. The exit status is the first
failure's (75 for a requeue, 128 + signal for a child ended by a signal), 0 if all succeed;
of several children found ended at the same check (every 0.1 s), one ended by a signal counts
as first: a killed process's peers fail within milliseconds of it (their connections close).
Lines ``[launch] process i pid P`` name the children's process ids.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import MutableMapping, Sequence

from ppllava_jax import command_line

_PR_SET_PDEATHSIG = 1
_DEVICE_COUNT = "--xla_force_host_platform_device_count="
# a run stopped by a signal after saving (train.preemption.REQUEUE_EXIT_CODE, not imported here:
# that module imports JAX; tests/test_multiprocess.py checks they agree)
REQUEUE_EXIT_CODE = 75


def size_cpu_thread_pool(env: MutableMapping[str, str] | None = None) -> None:
    """Enlarge XLA's CPU thread pool when ``env`` (default ``os.environ``) asks for simulated
    CPU devices; call it before JAX starts its CPU client.

    Simulated CPU devices (``--xla_force_host_platform_device_count=N``) run their collectives
    on XLA's CPU thread pool, which has max(cores, N) threads. A device's program may block a
    pool thread in one collective while its other ready collective waits for a free thread; with
    every thread blocked that way the N devices deadlock (seen with 8 devices on 2 cores: 7
    devices inside a scanned layer's all-gather, 1 in another). A larger pool (``PJRT_NPROC``,
    read when the CPU client starts: max(64, 8 N) threads) removes the shortage; idle threads
    cost nothing. A ``PJRT_NPROC`` already set is kept.
    """
    env = os.environ if env is None else env
    m = re.search(re.escape(_DEVICE_COUNT) + r"(\d+)", env.get("XLA_FLAGS", ""))
    if m and int(m.group(1)) > 1:
        env.setdefault("PJRT_NPROC", str(max(64, 8 * int(m.group(1)))))


def simulate_cpu_devices(n: int, env: MutableMapping[str, str] | None = None) -> None:
    """Ask for ``n`` simulated CPU devices in ``env`` (default ``os.environ``; before JAX is
    imported): ``XLA_FLAGS`` gets ``--xla_force_host_platform_device_count=n`` (replacing any
    count, keeping the other flags), ``JAX_PLATFORMS=cpu``, and the CPU thread pool is sized for
    ``n`` devices (``size_cpu_thread_pool``)."""
    env = os.environ if env is None else env
    flags = re.sub(re.escape(_DEVICE_COUNT) + r"\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT}{n}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PJRT_NPROC", None)  # sized for this count, not an inherited one
    size_cpu_thread_pool(env)


def ended(code: int) -> str:
    """How a child with exit status ``code`` (``Popen.returncode``) ended, in words."""
    if code == REQUEUE_EXIT_CODE:
        return f"saved and stopped to be requeued (status {code}: rerun the command to resume)"
    return f"failed ({f'signal {-code}' if code < 0 else f'status {code}'})"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_env(
    base: dict[str, str],
    *,
    process_id: int,
    num_processes: int,
    coordinator: str,
    devices_per_process: int = 0,
    heartbeat_timeout: int = 0,
) -> dict[str, str]:
    """The environment of child ``process_id`` (module docstring)."""
    env = dict(base)
    env["JAX_COORDINATOR_ADDRESS"] = coordinator
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    if devices_per_process > 0:
        simulate_cpu_devices(devices_per_process, env)
    if heartbeat_timeout > 0:
        env["PPLLAVA_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: children may outlive a killed launcher
        pass


class Launcher:
    """Runs the children and supervises them (see the module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        devices_per_process: int = 0,
        port: int = 0,
        grace: float = 0.0,
        kill_after: float = 10.0,
        heartbeat_timeout: int = 0,
        out=None,
    ):
        if processes < 1:
            raise ValueError(f"--processes {processes}: need at least 1")
        if not command:
            raise ValueError("no command given: put it after --")
        self.command = list(command)
        self.n = processes
        self.devices = devices_per_process
        self.port = port or free_port()
        self.grace, self.kill_after = float(grace), float(kill_after)
        self.heartbeat = heartbeat_timeout
        self.out = out or sys.stdout.buffer
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def say(self, text: str) -> None:
        with self._lock:
            self.out.write(f"[launch] {text}\n".encode())
            self.out.flush()

    def _pump(self, i: int, stream) -> None:
        prefix = f"[{i}] ".encode()
        for line in iter(stream.readline, b""):
            with self._lock:
                self.out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                self.out.flush()
        stream.close()

    def start(self) -> None:
        coordinator = f"127.0.0.1:{self.port}"
        self.say(f"{self.n} processes, coordinator {coordinator}: {' '.join(self.command)}")
        for i in range(self.n):
            env = child_env(
                dict(os.environ),
                process_id=i,
                num_processes=self.n,
                coordinator=coordinator,
                devices_per_process=self.devices,
                heartbeat_timeout=self.heartbeat,
            )
            p = subprocess.Popen(
                self.command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # signals reach a child only through the launcher
                preexec_fn=_die_with_parent,
            )
            self.procs.append(p)
            self.say(f"process {i} pid {p.pid}")
            t = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
            t.start()
            self._threads.append(t)

    def signal_all(self, signum: int, *, group: bool = False) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    if group:
                        os.killpg(p.pid, signum)
                    else:
                        p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        """Supervise until every child has ended; returns the exit status."""
        first: tuple[int, int] | None = None  # (process, return code)
        failed_at = 0.0
        termed = False
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(c >= 0, i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and first is None:
                _, i, c = min(failed)
                first, failed_at = (i, c), time.monotonic()
                self.say(f"process {i} {ended(c)}; stopping the others")
            if all(c is not None for c in codes):
                break
            if first is not None:
                waited = time.monotonic() - failed_at
                if not termed and waited >= self.grace:
                    self.signal_all(signal.SIGTERM)
                    termed = True
                elif termed and waited >= self.grace + self.kill_after:
                    self.say("killing the remaining processes")
                    self.signal_all(signal.SIGKILL, group=True)
            time.sleep(0.1)
        for t in self._threads:
            t.join(timeout=5)
        for i, p in enumerate(self.procs):  # leftover data workers of a finished child
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.say(f"process {i} exited with {p.returncode}")
        if first is None:
            return 0
        code = first[1]
        return 128 - code if code < 0 else code


# (flag, type, default, help) of the launcher's options besides --processes
_OPTIONS = (
    (
        "--devices-per-process",
        int,
        0,
        "simulated CPU devices per process (0: leave the platform and devices alone)",
    ),
    ("--port", int, 0, "coordinator port (0: a free one)"),
    (
        "--grace",
        float,
        0.0,
        "seconds the others get to end on their own after a failure before SIGTERM",
    ),
    ("--kill-after", float, 10.0, "seconds from SIGTERM to SIGKILL"),
    (
        "--heartbeat-timeout",
        int,
        0,
        "seconds of silence after which a process counts as dead (0: JAX's default, 100)",
    ),
)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, command = argv[:k], argv[k + 1 :]
    p = command_line.argument_parser(
        __doc__,
        "python -m ppllava_jax.launch",
        usage="%(prog)s --processes N [--devices-per-process D] [flags] -- COMMAND ...",
    )
    p.add_argument("--processes", type=int, required=True, help="number of processes")
    for flag, kind, default, text in _OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)
    args = p.parse_args(argv)
    if not command:
        p.error("no command: put it after --, e.g. -- python train.py --config ...")
    return args, command


def main(argv: Sequence[str] | None = None) -> int:
    args, command = parse_args(argv)
    launcher = Launcher(
        command,
        args.processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        grace=args.grace,
        kill_after=args.kill_after,
        heartbeat_timeout=args.heartbeat_timeout,
    )

    def forward(signum, frame):
        del frame
        launcher.say(f"received signal {signum}: forwarding it to every process")
        launcher.signal_all(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    launcher.start()
    return launcher.wait()


if __name__ == "__main__":
    sys.exit(main())
