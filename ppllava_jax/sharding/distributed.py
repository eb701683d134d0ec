"""Multi-process runs: ``jax.distributed`` set-up from the environment, and host-side
synchronisation (a barrier through the coordination service, a max over processes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def process_barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process gets here (no-op on one process), through the coordination
    service (gRPC, ``timeout_s``) rather than a device collective: gloo creates its context for
    a set of devices on their first collective and gives up when the processes arrive more
    than 30 s apart (one still compiling, loading or decoding), so call this before a first
    collective that may be reached at different times. Each ``name`` is used once per run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client of jax.distributed.initialize

    client = distributed.global_state.client
    if client is None:  # not started by jax.distributed (cannot happen with process_count > 1)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def max_over_processes(value: int) -> int:
    """The largest ``value`` of all processes (a host-side all-gather; ``value`` on one)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def distributed_settings(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for ``jax.distributed.initialize`` from the environment, or None for a
    single-process run.

    A multi-process job is recognised by ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``: what ``python -m ppllava_jax.launch`` sets, and what a Kubernetes
    pod spec sets, e.g. ``JAX_PROCESS_ID`` from the indexed Job's completion index), by SLURM
    (``SLURM_NTASKS`` > 1: JAX reads the rest from ``srun``'s variables) or by a multi-host TPU
    slice (``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_COORDINATOR_ADDRESS``: JAX asks the TPU
    metadata). Values left out are auto-detected by JAX. ``PPLLAVA_HEARTBEAT_TIMEOUT`` (seconds,
    JAX's default 100) bounds how long the others wait for a process that died without a word
    (SIGKILL, a lost host) before they stop with an error; ``PPLLAVA_INIT_TIMEOUT`` how long
    processes wait for each other at start-up (default 300).
    """
    env = dict(os.environ if env is None else env)
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )
    if not multi:
        return None
    kw: dict[str, Any] = {}
    for name, key in (
        ("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
        ("num_processes", "JAX_NUM_PROCESSES"),
        ("process_id", "JAX_PROCESS_ID"),
        ("heartbeat_timeout_seconds", "PPLLAVA_HEARTBEAT_TIMEOUT"),
        ("initialization_timeout", "PPLLAVA_INIT_TIMEOUT"),
    ):
        value = env.get(key, "")
        if value == "":
            continue
        if name == "coordinator_address":
            kw[name] = value
            continue
        try:
            kw[name] = int(value)
        except ValueError:
            raise ValueError(f"environment variable {key}={value!r} must be an integer") from None
    n, i = kw.get("num_processes"), kw.get("process_id")
    if n is not None and i is not None and not 0 <= i < n:
        raise ValueError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
    return kw


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when the environment describes a multi-process job
    (``distributed_settings``); CPU collectives across processes go through gloo. Must run
    before anything touches a JAX device. Returns True when it initialised."""
    kw = distributed_settings()
    if kw is None or jax.distributed.is_initialized():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    sys.excepthook = _exit_on_error(sys.excepthook)
    return True


def _exit_on_error(previous: Callable[..., Any]) -> Callable[..., None]:
    """An uncaught exception in one process of a multi-process job: print it and exit at once.
    The normal exit would first wait (up to JAX's shutdown timeout, 5 minutes) in a shutdown
    barrier the other processes, still running, never reach; a launcher or scheduler that stops
    the job when one process fails needs that process to end."""

    def hook(kind, value, tb) -> None:
        previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return hook
