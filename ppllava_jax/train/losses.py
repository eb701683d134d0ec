"""Training losses: next-token cross entropy (SFT) and sigmoid DPO.

Conventions: logits at position ``l`` predict the label at ``l + 1``; a label of
``IGNORE_INDEX`` (-100) is not supervised; a target whose ``attention_mask`` is 0 is not
supervised either. Everything is computed in float32 whatever the logits' dtype.

The SFT loss returns a *sum* and a *count* so that the mean is taken once over the whole
global batch (all micro-batches and devices): ``sum(all nll) / count(all tokens)``, never a
mean of per-micro-batch means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IGNORE_INDEX = -100


def _shifted_targets(labels: Array, attention_mask: Array) -> tuple[Array, Array]:
    """Targets ``labels[:, 1:]`` and their mask (supervised and attended), both ``[B, L-1]``."""
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX) & (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    return jnp.where(mask, targets, 0), mask


def token_logps(logits: Array, labels: Array, attention_mask: Array) -> tuple[Array, Array]:
    """Log-probability of each next token.

    Args:
      logits: float[B, L, V] (any float dtype; computed in float32).
      labels: int32[B, L], ``IGNORE_INDEX`` where not supervised.
      attention_mask: int[B, L], 1 on real tokens.

    Returns:
      ``(logp float32[B, L-1], mask bool[B, L-1])``; ``logp`` is 0 where ``mask`` is False.
    """
    targets, mask = _shifted_targets(labels, attention_mask)
    logits = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask, picked - lse, 0.0), mask


def next_token_loss(logits: Array, labels: Array, attention_mask: Array) -> tuple[Array, Array]:
    """Summed next-token cross entropy and the number of supervised tokens.

    Args:
      logits: float[B, L, V].
      labels: int32[B, L] (-100 = not supervised).
      attention_mask: int[B, L].

    Returns:
      ``(sum_loss float32[], num_tokens int32[])``; the mean loss is ``sum_loss / num_tokens``
      taken over the global batch.
    """
    logp, mask = token_logps(logits, labels, attention_mask)
    return -jnp.sum(logp), jnp.sum(mask, dtype=jnp.int32)


def sequence_logps(logits: Array, labels: Array, attention_mask: Array) -> Array:
    """Summed log-probabilities of the supervised tokens of each row: float32[B]."""
    logp, _ = token_logps(logits, labels, attention_mask)
    return jnp.sum(logp, axis=-1)


def dpo_terms(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    beta: float,
) -> dict[str, Array]:
    """Per-pair sigmoid-DPO quantities (float32[B] each): loss, rewards, accuracy, margin."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    chosen_rewards = beta * (f32(policy_chosen) - f32(ref_chosen))
    rejected_rewards = beta * (f32(policy_rejected) - f32(ref_rejected))
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": -jax.nn.log_sigmoid(margins),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": margins,
    }


def dpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    beta: float,
) -> tuple[Array, dict[str, Array]]:
    """Sigmoid DPO (Rafailov et al. 2023), as TRL's ``loss_type="sigmoid"``.

    ``loss = mean(-log sigmoid(beta * ((pc - rc) - (pr - rr))))`` with ``pc``/``pr`` the policy's
    summed log-probabilities of the chosen/rejected answers and ``rc``/``rr`` the reference's
    (all float[B]).

    Returns:
      ``(loss float32[], metrics)`` with the means of ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/accuracies`` (chosen reward > rejected reward) and ``rewards/margins``.
    """
    terms = dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    means = {k: jnp.mean(v) for k, v in terms.items()}
    return means.pop("loss"), means
