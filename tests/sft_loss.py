"""The mean next-token loss of a model's logits, for tests that train or compare through it.

The model returns logits only (the losses live in ``ppllava_jax.train.losses``); this is the
token mean over the batch's supervised tokens that ``PPLLaVA.__call__`` returned as ``loss``
before issue 12, computed with ``tests.train.loss_helpers.next_token_loss``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tests.train.loss_helpers import next_token_loss


def mean_loss(logits: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """``float32[]``: summed next-token cross entropy of ``logits float[B, L, V]`` against
    ``batch['labels']`` over ``batch['attention_mask']``, divided by the supervised-token count
    (at least 1)."""
    total, count = next_token_loss(logits, batch["labels"], batch["attention_mask"])
    return total / jnp.maximum(count, 1)
