"""Training losses: next-token cross entropy (SFT) and sigmoid DPO.

Conventions: logits at position ``l`` predict the label at ``l + 1``; a label of
``IGNORE_INDEX`` is not supervised; a target whose ``attention_mask`` is 0 is not
supervised either. Everything is computed in float32 whatever the logits' dtype.

The SFT loss is normalised one of two ways (``train.loss_normalization``, see
``LOSS_NORMALIZATIONS``):

- ``global_token_mean``: a *sum* and a *count*, the mean taken once over the whole global batch
  (all micro-batches and devices): ``sum(all nll) / count(all tokens)``;
- ``per_device_mean``: the original's (HF Trainer + DeepSpeed): each device's micro-batch takes
  its own token mean (``nn.CrossEntropyLoss``), and the gradients of those means are averaged
  over devices and accumulation steps: ``mean over groups g of (sum_g nll / count_g)``, a group
  being a device's rows of one micro-batch (``group_token_means``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppllava_jax.layout import IGNORE_INDEX

Array = jax.Array


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


LOSS_NORMALIZATIONS = ("global_token_mean", "per_device_mean")


def group_token_means(logp: Array, mask: Array, group_size: int) -> tuple[Array, Array]:
    """Token-mean negative log-likelihood of each group of ``group_size`` consecutive rows.

    Args:
      logp: float32[B, L-1], per-token log-probabilities (``token_logps``), 0 where not
        supervised.
      mask: bool[B, L-1], supervised targets.
      group_size: rows per group; must divide B.

    Returns:
      ``(means float32[B // group_size], counts int32[B // group_size])``: ``sum(-logp) /
      count`` per group and its supervised-token count. A group without supervised tokens has
      mean 0 (the original's ``CrossEntropyLoss`` would give NaN there).
    """
    b = logp.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(
            f"a micro-batch of {b} rows does not split into loss groups of {group_size} rows "
            "(train.loss_group_size must divide the rows of one micro-batch: data.batch_size x "
            "hosts / train.grad_accum_steps)"
        )
    g = b // group_size
    nll = -jnp.sum(logp, axis=-1).reshape(g, group_size).sum(-1)
    counts = jnp.sum(mask, axis=-1, dtype=jnp.int32).reshape(g, group_size).sum(-1)
    return nll / jnp.maximum(counts, 1).astype(jnp.float32), counts


def chunked_token_logps(
    hidden: Array,
    head: Array,
    labels: Array,
    attention_mask: Array,
    chunk_size: int,
) -> tuple[Array, Array]:
    """``token_logps`` of ``logits = hidden @ head`` without materialising the logits.

    Each row's supervised targets are moved to its front (stable, so in order); the LM head and
    the log-softmax then run over sequence chunks of ``chunk_size`` positions (``[B, chunk, V]``
    logits at a time), chunks past the longest row's supervised count are skipped, and the
    backward recomputes each chunk's logits (``jax.checkpoint``), so neither pass holds
    ``[B, L, V]``. Same values and gradients as ``token_logps(hidden @ head, ...)`` up to float
    rounding (the head is applied as the model's ``nn.Dense``: both operands in
    ``hidden.dtype``, then float32).

    Args:
      hidden: float[B, L, D] final-norm hidden states (the model's ``return_logits=False``).
      head: float[D, V] the LM head's kernel.
      labels: int32[B, L], ``IGNORE_INDEX`` where not supervised.
      attention_mask: int[B, L], 1 on real tokens.
      chunk_size: positions per chunk (> 0; need not divide L - 1).

    Returns:
      ``(logp float32[B, L-1], mask bool[B, L-1])`` as ``token_logps``.
    """
    if chunk_size < 1:
        raise ValueError(f"train.loss_chunk_size={chunk_size}: use a positive chunk size")
    targets, mask = _shifted_targets(labels, attention_mask)
    h = hidden[:, :-1]
    b, n = mask.shape
    c = min(int(chunk_size), n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int8), axis=1, stable=True)
    hs = jnp.pad(jnp.take_along_axis(h, order[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))
    ts = jnp.pad(jnp.take_along_axis(targets, order, axis=1), ((0, 0), (0, pad)))
    longest = jnp.max(jnp.sum(mask, axis=1))
    w = head.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_logp(hc: Array, tc: Array, w: Array) -> Array:
        logits = jax.lax.dot_general(hc, w, (((2,), (0,)), ((), ()))).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    def body(carry: None, i: Array) -> tuple[None, Array]:
        hc = jax.lax.dynamic_slice_in_dim(hs, i * c, c, axis=1)
        tc = jax.lax.dynamic_slice_in_dim(ts, i * c, c, axis=1)
        lp = jax.lax.cond(
            i * c < longest,
            chunk_logp,
            lambda hc, tc, w: jnp.zeros(tc.shape, jnp.float32),
            hc,
            tc,
            w,
        )
        return carry, lp

    _, lps = jax.lax.scan(body, None, jnp.arange(n_chunks))  # [n_chunks, B, c]
    lp_sorted = jnp.moveaxis(lps, 0, 1).reshape(b, n_chunks * c)[:, :n]
    logp = jnp.take_along_axis(lp_sorted, jnp.argsort(order, axis=1), axis=1)
    return jnp.where(mask, logp, 0.0), mask


def gathered_token_logps(
    hidden: Array,
    head: Array,
    labels: Array,
    attention_mask: Array,
    target_positions: Array,
) -> tuple[Array, Array]:
    """``token_logps`` of ``logits = hidden @ head`` at the given positions only.

    The LM head and the log-softmax run over ``[B, K, V]`` logits, ``K`` the static count of
    ``target_positions`` (planned on the host, ``data.collate.target_positions``), not over
    every position: the sum of the result over positions equals the sum of ``token_logps`` as
    long as every supervised position is listed (others, listed or not, contribute 0). The
    head is applied as the model's ``nn.Dense`` (both operands in ``hidden.dtype``, then
    float32).

    Args:
      hidden: float[B, L, D] final-norm hidden states (the model's ``return_logits=False``).
      head: float[D, V] the LM head's kernel.
      labels: int32[B, L], ``IGNORE_INDEX`` where not supervised.
      attention_mask: int[B, L], 1 on real tokens.
      target_positions: int32[B, K], positions ``l`` in ``[0, L-1)`` whose next token is a
        target (logits at ``l`` predict ``labels[l + 1]``); -1 pads.

    Returns:
      ``(logp float32[B, K], mask bool[B, K])``: the log-probability at each listed position, 0
      where the position is padding or not supervised.
    """
    targets, mask = _shifted_targets(labels, attention_mask)
    pos = jnp.maximum(target_positions, 0)
    m = jnp.take_along_axis(mask, pos, axis=1) & (target_positions >= 0)
    t = jnp.take_along_axis(targets, pos, axis=1)
    with jax.named_scope("gathered_lm_head"):  # profile_step.py maps it to the LM head
        h = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # [B, K, D]
        w = head.astype(hidden.dtype)
        logits = jax.lax.dot_general(h, w, (((2,), (0,)), ((), ()))).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(m, logp, 0.0), m


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
