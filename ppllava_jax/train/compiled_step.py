"""The jitted train step of ``trainer.train``, compiled ahead of time once per batch shape.

Each new batch signature (keys, shapes, dtypes) is lowered and compiled before it runs, so the
compile time is known (and left out of the step time) and the FLOPs of the compiled program are
at hand for MFU. The state is donated: each step reuses its buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ppllava_jax.sharding import process_barrier
from ppllava_jax.train.metrics import compiled_flops
from ppllava_jax.train.start import Setup
from ppllava_jax.train.state import TrainState
from ppllava_jax.train.step import make_train_step

FlopsPerStep = float | Callable[[Mapping[str, Any]], float] | None


def batch_signature(batch: Mapping[str, Any]) -> tuple:
    """``((key, shape, dtype), ...)`` sorted by key: one compiled program per signature."""
    return tuple(sorted((k, tuple(np.shape(v)), str(v.dtype)) for k, v in batch.items()))


class CompiledStep:
    """``(state, batch, rng) -> (state, metrics)`` compiled per batch signature.

    Args:
      model_apply, config: as ``step.make_train_step`` takes them.
      setup: the optimizer, mode and state shardings (``start.make_setup``); with shardings
        the new state keeps them and the metrics are replicated.
      flops_per_step: per-device FLOPs of one step, a function of the host batch giving them
        (called once per signature), or None: XLA's ``cost_analysis()`` of the compiled step
        times the micro-batches (it counts a scanned body once).
      log: where the compile line goes.
    """

    def __init__(
        self,
        model_apply: Callable[..., dict],
        config: ml_collections.ConfigDict,
        setup: Setup,
        flops_per_step: FlopsPerStep,
        log: Callable[[str], None],
    ):
        sh = setup.shardings
        step_fn = make_train_step(
            model_apply,
            config,
            setup.mode,
            tx=setup.tx,
            schedule=setup.schedule,
            param_shardings=None if sh is None else sh.params,
        )
        self.step_fn = step_fn  # the pure step, unjitted (benchmarks jit it without donation)
        if sh is not None:
            first = jax.tree.leaves(sh)[0]
            rep = (
                NamedSharding(first.mesh, PartitionSpec())
                if isinstance(first, NamedSharding)
                else None
            )
            self.jitted = jax.jit(step_fn, out_shardings=(sh, rep), donate_argnums=(0,))
        else:
            self.jitted = jax.jit(step_fn, donate_argnums=(0,))
        self.accum = int(config.train.get("grad_accum_steps", 1))
        self.flops_per_step = flops_per_step
        self.log = log
        self.programs: dict[tuple, tuple[Any, float | None]] = {}

    def get(
        self,
        state: TrainState,
        batch: Mapping[str, Any],
        rng: jax.Array,
        host_batch: Mapping[str, Any],
        step: int,
    ) -> tuple[Any, float | None, float]:
        """``(program, flops_per_step, seconds spent compiling now)`` for ``batch``'s signature
        (0 seconds when it was compiled before); ``step``: the steps done (names the barrier)."""
        sig = batch_signature(batch)
        if sig in self.programs:
            return (*self.programs[sig], 0.0)
        t = time.perf_counter()
        exe = self.jitted.lower(state, batch, rng).compile()
        # several processes: start the new program together (gloo's first collective on a set
        # of devices fails when they arrive >30 s apart)
        process_barrier(f"train_compiled_{step}_{len(self.programs)}")
        self.programs[sig] = (exe, self._flops(exe, batch, host_batch))
        seconds = time.perf_counter() - t
        shapes = {k: shape for k, shape, _ in sig}
        self.log(f"[train] compiled the step for {shapes} in {seconds:.1f}s")
        return (*self.programs[sig], seconds)

    def _flops(self, exe: Any, batch: Mapping[str, Any], host_batch: Mapping) -> float | None:
        if callable(self.flops_per_step):
            return self.flops_per_step(host_batch)
        if self.flops_per_step:
            return self.flops_per_step
        labels = batch["labels"]
        n_micro = labels.shape[0] if labels.ndim == 3 else self.accum
        return (compiled_flops(exe) or 0.0) * n_micro or None
