"""One training run per work directory: ``<workdir>/train.lock``.

A second ``train.py`` on a work directory in use would write the same checkpoints,
``metrics.jsonl`` and ``config.json`` as the first. ``hold(workdir)`` takes the lock for the
whole run: an exclusive ``fcntl.flock`` on ``train.lock``, which records the holder's pid, host
and start time. A run that finds it held stops with one line naming that process. The operating
system drops the lock of a process that ended in any way (a crash, SIGKILL), so a lock file whose
lock nobody holds is stale: the next run takes it over and says whose it was. The file is removed
when the run ends (finished, preempted with exit status 75, or failed).

Several processes of one run (``ppllava_jax.launch``, one per host) share the work directory:
process 0 takes the lock and the others learn whether it could.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator

import jax

LOCK_NAME = "train.lock"


class WorkdirInUseError(ValueError):
    """Another training run holds the work directory (said in one line)."""


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


class WorkdirLock:
    """The lock of ``workdir`` for this process (``acquire`` / ``release``).

    Args:
      workdir: the run's work directory (it must exist).
      log: where the take-over of a stale lock is said.
    """

    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.log = log
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``WorkdirInUseError`` naming its holder."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise WorkdirInUseError(
                    f"{os.path.dirname(self.path)} is in use by another training run "
                    f"({_describe(holder)}; lock file {self.path}): wait for it to end or stop "
                    "it, or give this run another --workdir"
                ) from None
            except OSError as e:  # a file system without locks
                os.close(fd)
                self.log(f"[train] cannot lock {self.path} ({e}): not guarding the work directory")
                return
            # the holder may have removed the file between our open and flock: lock the new one
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous:
                self.log(
                    f"[train] taking over the lock of a run that ended without releasing it "
                    f"({_describe(previous)})"
                )
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold(workdir: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``workdir``'s lock for the ``with`` block (process 0 takes it; every process
    raises ``WorkdirInUseError`` when it is held by another run)."""
    lock = WorkdirLock(workdir, log)
    refused: WorkdirInUseError | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirInUseError as e:
            refused = e
    if jax.process_count() > 1:
        from ppllava_jax.sharding import max_over_processes

        if max_over_processes(int(refused is not None), "workdir_lock") and refused is None:
            refused = WorkdirInUseError(
                f"{workdir} is in use by another training run (process 0 says which)"
            )
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        lock.release()
