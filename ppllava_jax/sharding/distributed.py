"""Multi-process runs: ``jax.distributed`` set-up from the environment, and host-side
synchronisation (a barrier through the coordination service, a max over processes)."""

from __future__ import annotations

import faulthandler
import os
import signal
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
    collective that may be reached at different times. A ``name`` may be used again: each call
    is its own barrier (``name``'s call number is part of it), so every process must make the
    same sequence of calls for each ``name``."""
    if jax.process_count() == 1:
        return
    name = f"{name}:{_next_call('barrier', name)}"
    client = _client()
    if client is None:  # not started by jax.distributed (cannot happen with process_count > 1)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def _client() -> Any:
    """The coordination-service client of ``jax.distributed.initialize`` (None: not started)."""
    from jax._src import distributed  # the client of jax.distributed.initialize

    return distributed.global_state.client


_calls: dict[tuple[str, str], int] = {}  # calls so far, by (kind, name)


def _next_call(kind: str, name: str) -> int:
    """This process's call number (0, 1, ...) of ``kind`` under ``name``."""
    k = _calls.get((kind, name), 0)
    _calls[(kind, name)] = k + 1
    return k


def max_over_processes(value: int, name: str = "max", timeout_s: float = 3600.0) -> int:
    """The largest ``value`` of all processes (``value`` on one process).

    Exchanged through the coordination service's key-value store (gRPC), not a device
    collective: each process publishes ``value`` under ``name``'s next call number and reads
    the others'. So no gloo context is involved (gloo gives up when processes reach a first
    collective more than 30 s apart, e.g. one still compiling), and calls under different
    names may come in any order. Every process must make the same sequence of calls for each
    ``name``. A process that died is reported by the coordination service (heartbeat timeout):
    the wait ends with an error instead of hanging."""
    if jax.process_count() == 1:
        return int(value)
    client = _client()
    if client is None:  # not started by jax.distributed (cannot happen with process_count > 1)
        from jax.experimental import multihost_utils

        return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))
    k = _next_call("max", name)
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"ppllava/{name}/{k}/{me}", str(int(value)))
    values = [
        int(client.blocking_key_value_get(f"ppllava/{name}/{k}/{i}", int(timeout_s * 1000)))
        for i in range(n)
    ]
    if k >= 2:  # every process has read call k - 2 (it published call k - 1 after reading it)
        client.key_value_delete(f"ppllava/{name}/{k - 2}/{me}")
    return max(values)


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
    # JAX's preemption service would catch SIGTERM in C++ from here on: a SIGTERM before the
    # training loop's own handler (train/preemption.py) is installed, or during evaluation,
    # would be swallowed and the process would run on; without it SIGTERM ends the process
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**kw)
    sys.excepthook = _exit_on_error(sys.excepthook)
    _orbax_barriers_through_coordinator()
    if _cpu_only(jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")):
        _share_cpu_compilations()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack on stderr
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    return True


def _cpu_only(platforms: str) -> bool:
    return [p.strip() for p in platforms.split(",") if p.strip()] == ["cpu"]


def _share_cpu_compilations() -> None:
    """CPU processes (``launch --devices-per-process``): compile each program once, on process
    0, and hand the binary to the others, as JAX does on GPU and TPU hosts.

    JAX writes persistent-cache entries only from process 0, and on CPU each process's cache
    key differs (the key hashes the PJRT topology's fingerprint, which differs per CPU process):
    process 1.. recompiled every program from scratch on every run, a minute behind process 0,
    which loaded it from the cache. Processes then reached a first collective minutes apart
    (gloo gives up after 30 s) and spent twice the CPU. Hashing the CPU devices' global ids
    instead (the same on every process, still distinct per device assignment) makes the keys
    agree; with ``jax_share_binary_between_hosts`` process 0 compiles (or loads from the cache)
    and publishes the binary in the coordination service, the others load it. Only the CPU
    devices' key changes; other platforms keep JAX's own."""
    from jax._src import cache_key  # no public hook replaces a key component

    original = getattr(cache_key, "_hash_accelerator_config", None)
    if original is None or getattr(original, "ppllava_cpu", False):
        return

    def hash_accelerator_config(hash_obj: Any, accelerators: np.ndarray) -> None:
        devices = list(np.asarray(accelerators).flat)
        if not devices or any(d.platform != "cpu" for d in devices):
            return original(hash_obj, accelerators)
        hash_obj.update(",".join(f"cpu:{d.id}" for d in devices).encode())

    hash_accelerator_config.ppllava_cpu = True  # type: ignore[attr-defined]
    cache_key._hash_accelerator_config = hash_accelerator_config
    jax.config.update("jax_share_binary_between_hosts", True)


def _orbax_barriers_through_coordinator() -> None:
    """Make orbax wait for the other processes at the coordination service (gRPC, with
    timeouts) instead of its default device all-gather (``sync_global_devices``): a device
    collective runs over gloo, which gives up when processes arrive more than 30 s apart, and
    is one more collective every process has to issue in the same order as the training
    step's. Orbax reads its absl flag ``experimental_orbax_use_distributed_barrier``; it only
    takes effect once absl flags are parsed (``train.py``, ``eval.py``)."""
    from absl import flags
    from orbax.checkpoint._src.multihost import multihost  # defines the flag

    name = multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name
    flags.FLAGS[name].value = True


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
