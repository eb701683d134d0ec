"""A run whose loss or gradient norm is no longer finite stops instead of saving it.

The step returns ``loss`` and ``grad_norm`` as device scalars; ``FiniteGuard`` keeps them and
fetches them only where the loop fetches anyway (a metrics line) and before every save, so no
step waits for the host. A non-finite value stops the run with the first step it appeared at;
before a save the state itself is checked too (a finite gradient may still overflow the
update), so no non-finite state is saved, and ``checkpoint.keep`` never drops the last finite
checkpoints for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

WATCHED = (("loss", "loss"), ("grad_norm", "gradient norm"))  # (metric, what the message says)


class NonFiniteError(ValueError):
    """The loss, the gradient norm or the state became NaN or infinite (said in one line)."""


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """bool[]: every float leaf of ``tree`` holds finite values only."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves] or [jnp.bool_(True)]))


class FiniteGuard:
    """The watched metrics of the steps since the last check (device scalars).

    Args:
      config: the run's config (its ``optimizer`` section is quoted in the message).
      last_saved: ``() -> str`` naming the newest checkpoint on disk, for the message.
    """

    def __init__(self, config: ml_collections.ConfigDict, last_saved: Callable[[], str]):
        self.optimizer = config.get("optimizer", ml_collections.ConfigDict())
        self.last_saved = last_saved
        self.pending: list[tuple[int, dict[str, Any]]] = []

    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep step ``step``'s watched metrics (not fetched)."""
        self.pending.append((step, {k: metrics[k] for k, _ in WATCHED if k in metrics}))

    def check(self, state: Any = None) -> None:
        """Raise ``NonFiniteError`` at the first pending step with a non-finite watched metric,
        or, with ``state`` (a ``TrainState`` about to be saved), when its parameters or
        optimizer state hold a non-finite value."""
        pending, self.pending = self.pending, []
        for (step, _), values in zip(pending, jax.device_get([m for _, m in pending])):
            bad = [(what, v) for k, what in WATCHED if not np.isfinite(v := values.get(k, 0.0))]
            if bad:
                found = " and ".join(f"the {what} is {float(v)}" for what, v in bad)
                raise NonFiniteError(self._message(f"{found} at step {step}"))
        if state is not None and not bool(all_finite((state.params, state.opt_state))):
            step = int(jax.device_get(state.step))
            raise NonFiniteError(
                self._message(
                    f"the parameters or the optimizer state hold NaN or infinite values after "
                    f"step {step} (the loss and gradient norm were still finite)"
                )
            )

    def _message(self, found: str) -> str:
        opt = self.optimizer
        return (
            f"training diverged: {found}; stopped without saving or exporting it "
            f"({self.last_saved()}). Lower optimizer.lr (now {opt.get('lr')}), lengthen the "
            f"warmup (optimizer.warmup_steps, now {opt.get('warmup_steps')}) or clip the "
            f"gradients harder (optimizer.grad_clip_norm, now {opt.get('grad_clip_norm')}), "
            "then run the command again: it resumes from that checkpoint"
        )
