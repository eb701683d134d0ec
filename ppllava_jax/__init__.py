"""ppllava-jax: PPLLaVA in JAX/Flax."""

import os as _os
import re as _re


def _guard_simulated_cpu_collectives() -> None:
    """Simulated CPU devices (``--xla_force_host_platform_device_count=N``) run their
    collectives on XLA's CPU thread pool, which has max(cores, N) threads. A device's program
    may block a pool thread in one collective while its other ready collective waits for a free
    thread; with every thread blocked that way the N devices deadlock (seen with 8 devices on 2
    cores: 7 devices inside a scanned layer's all-gather, 1 in another). A larger pool (PJRT_NPROC,
    read when the CPU client starts) removes the shortage; idle threads cost nothing."""
    m = _re.search(r"xla_force_host_platform_device_count=(\d+)", _os.environ.get("XLA_FLAGS", ""))
    if m and int(m.group(1)) > 1:
        _os.environ.setdefault("PJRT_NPROC", str(max(64, 8 * int(m.group(1)))))


_guard_simulated_cpu_collectives()
