"""ppllava-jax: PPLLaVA in JAX/Flax.

Importing the package has no side effects. Simulated CPU devices (tests, ``plan``, ``launch``)
are requested through ``ppllava_jax.launch.simulate_cpu_devices``, which also sizes XLA's CPU
thread pool for them.
"""
