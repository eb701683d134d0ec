"""Test set-up: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before JAX is imported anywhere, so it is done here, at collection.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("PPLLAVA_JAX_CACHE", os.path.expanduser("~/.cache/ppllava_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
