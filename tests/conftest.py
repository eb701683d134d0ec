"""Test set-up: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before JAX is imported anywhere, so it is done here, at collection.
"""

import os

# 8 simulated devices; the CPU collectives of those 8 threads share 2 cores in CI, and a slow
# rendezvous must not abort the process (XLA's default terminate timeout is far shorter).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
    " --xla_cpu_collective_timeout_seconds=1800"
    " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# XLA's CPU thread pool sized for the simulated devices (PJRT_NPROC; with max(cores, devices) = 8
# threads, 8 devices deadlocked: see ppllava_jax.launch.size_cpu_thread_pool); child processes of
# the tests inherit it
from ppllava_jax.launch import size_cpu_thread_pool  # noqa: E402

size_cpu_thread_pool()

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("PPLLAVA_JAX_CACHE", os.path.expanduser("~/.cache/ppllava_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
