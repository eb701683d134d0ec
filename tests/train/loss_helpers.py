"""Loss reductions only tests use, written over the training losses (``train/losses.py``):
the summed next-token loss with its token count, and the batch-mean sigmoid DPO loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppllava_jax.train.losses import dpo_terms, token_logps


def next_token_loss(
    logits: jax.Array, labels: jax.Array, attention_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy and the number of supervised tokens.

    Args:
      logits: float[B, L, V].
      labels: int32[B, L] (``IGNORE_INDEX`` = not supervised).
      attention_mask: int[B, L].

    Returns:
      ``(sum_loss float32[], num_tokens int32[])``; the mean loss is ``sum_loss / num_tokens``.
    """
    logp, mask = token_logps(logits, labels, attention_mask)
    return -jnp.sum(logp), jnp.sum(mask, dtype=jnp.int32)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid DPO (Rafailov et al. 2023), as TRL's ``loss_type="sigmoid"``: the batch means
    of ``dpo_terms``, ``(loss float32[], {rewards/chosen, rewards/rejected,
    rewards/accuracies, rewards/margins})``."""
    terms = dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    means = {k: jnp.mean(v) for k, v in terms.items()}
    return means.pop("loss"), means


def llm_only_state(params, mode: str):
    """A train state of ``params`` training the LLM only (DPO: with a reference, and the policy
    moved away from it so the DPO loss has a slope)."""
    from ppllava_jax.train.optimizer import (
        default_optimizer_config,
        make_optimizer,
        trainable_predicate,
    )
    from ppllava_jax.train.state import create_train_state

    opt = default_optimizer_config()
    opt.trainable = "llm_only"
    tx, _ = make_optimizer(opt, 10)
    state = create_train_state(params, tx, trainable_predicate(opt), with_reference=mode == "dpo")
    if mode == "dpo":
        state = state.replace(params=jax.tree.map(lambda p: p * 1.05, state.params))
    return state
