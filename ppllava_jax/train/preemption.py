"""Stopping a run cleanly on a signal: SIGTERM (a scheduler's preemption) or Ctrl-C (SIGINT).

``PreemptionWatcher`` installs handlers that only set a flag; the loop asks
``watcher.should_stop(step)`` before each step, saves a checkpoint and returns. On several
processes the decision is taken at a step all processes agree on (the flag is all-gathered each
step), so a signal to any one process makes every process save the same step.

Ctrl-C behaves like SIGTERM (save, stop); the first one gives SIGINT back to the operating
system's default action, so a second Ctrl-C kills the process at once, without saving (orbax
ignores a checkpoint whose commit was not written).

A run stopped this way ends with exit status ``REQUEUE_EXIT_CODE`` = 75 (``EX_TEMPFAIL`` of
``sysexits.h``: a temporary failure, retry later), so a scheduler can requeue it and the rerun
resumes from the checkpoint: SLURM with ``RequeueExit=75`` in ``slurm.conf`` (or a batch script
that runs ``scontrol requeue $SLURM_JOB_ID`` on 75), Kubernetes with a Job
``podFailurePolicy`` rule ``{action: Ignore, onExitCodes: {operator: In, values: [75]}}``
(the pod is recreated without counting against ``backoffLimit``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun to resume


def requeue_message(step: int, signal_name: str, checkpoints: str) -> str:
    """What the command line prints when a signal stopped the run at ``step``."""
    return (
        f"[train] stopped by {signal_name} after step {step}; its checkpoint is in {checkpoints}. "
        f"Run the same command again to resume. Exit status {REQUEUE_EXIT_CODE} (EX_TEMPFAIL) "
        "tells a scheduler to requeue the job."
    )


class PreemptionWatcher:
    """SIGTERM / SIGINT set a flag; ``should_stop(step)`` tells the loop to save and leave.

    Use as a context manager (the previous handlers come back on exit, except SIGTERM's once
    a signal arrived or ``should_stop`` said stop: SIGTERM is then ignored while the process
    finishes its checkpoint and exits, so every process of a stopped job exits 75). Signal
    handlers can only be installed from the main thread; elsewhere the watcher never fires. A
    signal that is ignored when the watcher starts (e.g. SIGINT of a background job) stays
    ignored.

    Attributes:
      requested: a signal arrived.
      signal_name: the first one's name (``SIGTERM`` / ``SIGINT``), "" before.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.stopping = False  # should_stop said so: this process saves and exits 75
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        again, self.requested = self.requested, True
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if again and signum != signal.SIGINT:
            return  # stopping already (see __exit__)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends it at once
            print(
                "[train] Ctrl-C: saving a checkpoint after this step and stopping "
                "(Ctrl-C again aborts at once, without saving)",
                flush=True,
            )
        else:
            print(
                f"[train] received {signal.Signals(signum).name}: saving a checkpoint and stopping",
                flush=True,
            )

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            if (self.requested or self.stopping) and s == signal.SIGTERM:
                # stopping already: the process still waits for its checkpoint (and, with
                # several processes, for the others'); a further SIGTERM (the launcher or the
                # scheduler stopping the others of the job) must not cut that short. Ignored,
                # not left to the handler: Python's finalisation resets a Python handler to
                # the default (a SIGTERM during the exit would end the process with -15), an
                # ignored signal stays ignored.
                signal.signal(s, signal.SIG_IGN)
                continue
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop before ``step``: on one process the local flag; on several,
        whether *any* process got the signal (one flag per process and step exchanged
        through the coordination service, ``sharding.max_over_processes``), so every process
        stops at the same step and saves the same checkpoint. Every process
        must call it once per step. (JAX's own preemption service is switched off by
        ``sharding.maybe_initialize_distributed``: it would swallow SIGTERM outside this
        watcher; the exchange here also covers a signal sent to one process only.)"""
        del step
        if jax.process_count() > 1:
            from ppllava_jax.sharding import max_over_processes

            stop = bool(max_over_processes(int(self.requested), "stop"))
            if stop and not self.signal_name:
                self.signal_name = "a signal to another process"
            self.stopping = stop
            return stop
        self.stopping = self.requested
        return self.requested
