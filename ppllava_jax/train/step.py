"""The SFT and DPO train steps with gradient accumulation.

``make_train_step(apply_fn, config, mode)`` returns a pure ``(state, batch, rng) ->
(state, metrics)`` for the caller to ``jax.jit`` with its shardings (nothing here places
data). The model is opaque::

    apply_fn(params, batch: dict[str, Array], *, train: bool, rng) -> dict

with at least ``logits: float[B, L, V]``; if the output also holds ``labels`` /
``attention_mask`` (e.g. after merging visual tokens into the sequence) those are used for
the loss instead of the batch's.

Gradient accumulation: a batch ``[B, ...]`` is split into ``k = train.grad_accum_steps``
micro-batches ``[k, B/k, ...]`` (rows ``j, j+k, j+2k, ...`` go to micro-batch ``j``: with the
batch axis sharded in contiguous blocks over devices this moves no data, and a DPO batch
keeps its "chosen rows first, then the matching rejected rows" layout in every
micro-batch). A batch that already has the micro-batch axis (``labels`` is 3-D) is used as
is. The step scans over micro-batches summing loss numerators, token (or pair) counts and
gradients, and divides once at the end, so k micro-batches equal one batch of k times the
size. With one micro-batch there is no accumulator: the backward pass is seeded with
1 / denominator, so the gradients come out as means.

Loss normalisation (SFT; ``train.loss_normalization``):

- ``global_token_mean`` (default): numerator = summed token NLL, denominator = supervised tokens
  of the whole global batch.
- ``per_device_mean`` (the original's, HF Trainer + DeepSpeed): numerator = the sum over groups
  of each group's token mean, denominator = the number of groups. A group is
  ``train.loss_group_size`` consecutive rows of one micro-batch (0: the rows one device holds,
  micro-batch rows / (``data`` x ``fsdp``): the batch axis is split over those mesh axes in
  contiguous blocks, and so is each micro-batch of the layout above). The 7B recipes use groups
  of 8 rows, the original's ``per_device_train_batch_size``, whatever the mesh. The two agree
  when every group holds the same number of supervised tokens.

DPO averages over pairs; every device holds the same number of pairs, so the per-device mean
of the original and the global pair mean are the same quantity (the setting changes nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ppllava_jax.data.collate import TARGET_POSITIONS
from ppllava_jax.sharding import BATCH_AXES
from ppllava_jax.train.losses import (
    LOSS_NORMALIZATIONS,
    chunked_token_logps,
    dpo_terms,
    gathered_token_logps,
    group_token_means,
    token_logps,
)
from ppllava_jax.train.optimizer import make_optimizer, merge_params
from ppllava_jax.train.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[..., dict]


def microbatch(batch: Batch, k: int) -> Batch:
    """``[B, ...] -> [k, B/k, ...]``, micro-batch ``j`` = rows ``j, j+k, ...`` (see module doc)."""

    def one(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch of {b} rows does not split into {k} micro-batches")
        return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def _outputs(apply_fn: ApplyFn, params, mb: Batch, train: bool, rng) -> tuple[Any, Any, Any]:
    out = apply_fn(params, mb, train=train, rng=rng)
    labels = out.get("labels", mb["labels"])
    mask = out.get("attention_mask", mb["attention_mask"])
    return out["logits"], labels, mask


def _token_logps(
    apply_fn: ApplyFn, params, mb: Batch, train: bool, rng, chunk_size: int
) -> tuple[Any, Any]:
    """Per-token log-probabilities ``(float32[B, L-1], bool[B, L-1])`` of the model's output:
    from its logits, or (``chunk_size`` > 0) from ``apply_fn(..., return_logits=False)``'s
    ``hidden`` and ``lm_head`` chunk by chunk (``losses.chunked_token_logps``). A micro-batch
    holding ``target_positions`` (``int32[B, K]``, ``data.collate.target_positions``) gets
    ``float32[B, K]`` at those positions only (``losses.gathered_token_logps``): the LM head
    runs over K positions, not L (same loss sums and gradients)."""
    positions = mb.get(TARGET_POSITIONS)
    mb = {k: v for k, v in mb.items() if k != TARGET_POSITIONS}
    if chunk_size <= 0 and positions is None:
        return token_logps(*_outputs(apply_fn, params, mb, train, rng))
    out = apply_fn(params, mb, train=train, rng=rng, return_logits=False)
    if out.get("hidden") is None or out.get("lm_head") is None:
        raise ValueError(
            f"train.loss_chunk_size > 0 or a batch with {TARGET_POSITIONS!r} needs a model whose "
            "apply_fn(..., return_logits=False) returns 'hidden' and 'lm_head' (PPLLaVA does); "
            f"set train.loss_chunk_size=0 and leave {TARGET_POSITIONS!r} out of the batch"
        )
    labels = out.get("labels", mb["labels"])
    mask = out.get("attention_mask", mb["attention_mask"])
    if positions is not None:
        return gathered_token_logps(out["hidden"], out["lm_head"], labels, mask, positions)
    return chunked_token_logps(out["hidden"], out["lm_head"], labels, mask, chunk_size)


def check_loss_normalization(name: str) -> str:
    """``name`` if it is one of ``LOSS_NORMALIZATIONS``, else a ValueError naming the setting."""
    if name not in LOSS_NORMALIZATIONS:
        raise ValueError(
            f"train.loss_normalization={name!r}; use one of {', '.join(LOSS_NORMALIZATIONS)}"
        )
    return name


def denominator_key(mode: str, loss_normalization: str = "global_token_mean") -> str:
    """The aux count the summed loss numerator is divided by."""
    if mode == "dpo":
        return "num_pairs"
    return "num_groups" if loss_normalization == "per_device_mean" else "num_tokens"


def make_loss_fn(
    apply_fn: ApplyFn,
    mode: str,
    beta: float = 0.1,
    *,
    loss_normalization: str = "global_token_mean",
    loss_group_size: int = 0,
    batch_shards: int = 1,
    loss_chunk_size: int = 0,
) -> Callable:
    """``loss_fn(trainable, frozen, ref, micro_batch, rng) -> (loss_sum, aux_sums)``.

    ``loss_sum`` is a numerator: the global loss is ``sum(loss_sum) / sum(aux[denominator])``
    with the denominator (``denominator_key``) ``num_tokens`` (SFT, ``global_token_mean``),
    ``num_groups`` (SFT, ``per_device_mean``: ``loss_sum`` is then the sum of the groups' token
    means, a group ``loss_group_size`` rows, or 0: micro-batch rows / ``batch_shards``) or
    ``num_pairs`` (DPO). ``loss_chunk_size`` > 0: the LM head and cross entropy run over chunks
    of that many positions and never materialise ``[B, L, V]`` logits (same values).
    """
    if mode not in ("sft", "dpo"):
        raise ValueError(f"mode={mode!r}: use 'sft' or 'dpo'")
    per_device = check_loss_normalization(loss_normalization) == "per_device_mean"

    def group_size(rows: int) -> int:
        if loss_group_size > 0:
            return int(loss_group_size)
        if rows % batch_shards:
            raise ValueError(
                f"a micro-batch of {rows} rows does not split over {batch_shards} devices "
                "(data x fsdp); set train.loss_group_size or a batch divisible by the devices"
            )
        return rows // batch_shards

    def sft(trainable, frozen, ref, mb, rng):
        del ref
        params = merge_params(trainable, frozen)
        logp, m = _token_logps(apply_fn, params, mb, True, rng, loss_chunk_size)
        aux = {"num_tokens": jnp.sum(m, dtype=jnp.int32)}
        if per_device:
            means, _ = group_token_means(logp, m, group_size(logp.shape[0]))
            loss_sum = jnp.sum(means)
            aux["num_groups"] = jnp.asarray(means.shape[0], jnp.int32)
        else:
            loss_sum = -jnp.sum(logp)
        return loss_sum, {"loss_sum": loss_sum, **aux}

    def dpo(trainable, frozen, ref, mb, rng):
        if ref is None:
            raise ValueError("DPO needs state.ref_params (create_train_state(with_reference=True))")
        params = merge_params(trainable, frozen)
        logp, m = _token_logps(apply_fn, params, mb, True, rng, loss_chunk_size)
        logps = jnp.sum(logp, axis=-1)
        r_params = merge_params(ref, frozen)
        r_logp, _ = _token_logps(apply_fn, r_params, mb, False, rng, loss_chunk_size)
        ref_logps = jax.lax.stop_gradient(jnp.sum(r_logp, axis=-1))
        b = logps.shape[0] // 2
        terms = dpo_terms(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta)
        sums = {k: jnp.sum(v) for k, v in terms.items()}
        loss_sum = sums.pop("loss")
        aux = {
            "loss_sum": loss_sum,
            "num_pairs": jnp.asarray(b, jnp.int32),
            "num_tokens": jnp.sum(m, dtype=jnp.int32),
            "logps/chosen": jnp.sum(logps[:b]),
            "logps/rejected": jnp.sum(logps[b:]),
            **sums,
        }
        return loss_sum, aux

    return sft if mode == "sft" else dpo


def make_grad_fn(
    apply_fn: ApplyFn,
    mode: str = "sft",
    *,
    beta: float = 0.1,
    accum_steps: int = 1,
    grad_shardings: PyTree | None = None,
    loss_normalization: str = "global_token_mean",
    loss_group_size: int = 0,
    batch_shards: int = 1,
    loss_chunk_size: int = 0,
):
    """``grad_fn(state, batch, rng) -> (grads, aux)``: mean gradients over the global batch
    (float32, cast to the parameters' dtypes) and the summed aux of all micro-batches.

    ``loss_normalization`` / ``loss_group_size`` / ``batch_shards``: how the SFT loss is
    normalised (module doc, ``make_loss_fn``); ``loss_chunk_size``: chunked loss (ibid.).

    ``grad_shardings`` (the trainable parameters' shardings) pins the float32 gradient
    accumulator to the parameters' layout, so it is never replicated (at 7B it is 28 GB).
    """
    pin = (
        (lambda t: t)
        if grad_shardings is None
        else (lambda t: jax.lax.with_sharding_constraint(t, grad_shardings))
    )
    loss_fn = make_loss_fn(
        apply_fn,
        mode,
        beta,
        loss_normalization=loss_normalization,
        loss_group_size=loss_group_size,
        batch_shards=batch_shards,
        loss_chunk_size=loss_chunk_size,
    )
    denom_key = denominator_key(mode, loss_normalization)
    vg = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(state: TrainState, batch: Batch, rng: jax.Array):
        if batch["labels"].ndim == 2:
            batch = microbatch(batch, accum_steps)
        n = batch["labels"].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        if n == 1:  # one micro-batch: no accumulators (same values: 0 + g is g)
            # the backward is seeded with 1 / denominator (known after the forward), so the
            # gradients come out as means: no division pass over every gradient afterwards
            _, pullback, aux = jax.vjp(
                lambda p: loss_fn(
                    p, state.frozen, state.ref_params, first, jax.random.fold_in(rng, 0)
                ),
                state.params,
                has_aux=True,
            )
            denom = jnp.maximum(aux[denom_key], 1).astype(jnp.float32)
            (g,) = pullback(jnp.asarray(1.0, jnp.float32) / denom)
            return pin(g), _counts(aux, batch)
        aux_shape = jax.eval_shape(
            loss_fn, state.params, state.frozen, state.ref_params, first, rng
        )[1]
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        g0 = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))

        def body(carry, xs):
            g_acc, aux_acc = carry
            mb, i = xs
            (_, aux), g = vg(
                state.params, state.frozen, state.ref_params, mb, jax.random.fold_in(rng, i)
            )
            g_acc = pin(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g))
            aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
            return (g_acc, aux_acc), None

        (g, aux), _ = jax.lax.scan(body, (g0, aux0), (batch, jnp.arange(n)))
        return _finish(g, aux, batch, state.params)

    def _finish(g, aux, batch, params):
        denom = jnp.maximum(aux[denom_key], 1).astype(jnp.float32)
        grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), g, params)
        return grads, _counts(aux, batch)

    def _counts(aux, batch):
        aux = dict(aux)
        aux["num_samples"] = jnp.asarray(
            batch["labels"].shape[0] * batch["labels"].shape[1], jnp.int32
        )
        aux["num_input_tokens"] = jnp.sum(batch["attention_mask"] != 0, dtype=jnp.int32)
        return aux

    return grad_fn


def _batch_shards(param_shardings: PyTree | None) -> int:
    """Devices the batch axis is split over (``data`` x ``fsdp``) on the mesh of
    ``param_shardings``; 1 without a mesh."""
    leaves = jax.tree.leaves(param_shardings) if param_shardings is not None else []
    mesh = getattr(leaves[0], "mesh", None) if leaves else None
    if mesh is None:
        return 1
    return int(math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES))


def make_train_step(
    apply_fn: ApplyFn,
    config,
    mode: str = "sft",
    *,
    tx: optax.GradientTransformation | None = None,
    schedule: optax.Schedule | None = None,
    param_shardings: PyTree | None = None,
    batch_shards: int | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The train step ``(state, batch, rng) -> (state, metrics)``; pure, jit it yourself.

    Args:
      apply_fn: the model (see module doc).
      config: uses ``config.optimizer`` (unless ``tx`` is given), ``config.train.total_steps``,
        ``config.train.grad_accum_steps``, ``config.train.loss_normalization`` /
        ``loss_group_size`` (module doc; default ``global_token_mean``),
        ``config.train.loss_chunk_size`` (0, the default: the model's logits; > 0: the LM head
        and cross entropy in chunks of that many positions, ``apply_fn`` then called with
        ``return_logits=False``; see ``_token_logps``) and, for DPO, ``config.dpo.beta``.
      mode: ``"sft"`` (next-token loss) or ``"dpo"`` (batch = B chosen rows then B rejected).
      tx, schedule: override the optimizer built from the config (``schedule`` is only used
        for the ``lr`` metric).
      param_shardings: shardings of the *trainable* tree (``state_shardings(...).params``);
        pins the gradient accumulator's layout (see ``make_grad_fn``); its mesh also gives
        the devices the batch is split over (``data`` x ``fsdp``) for ``per_device_mean`` with
        ``loss_group_size`` 0.
      batch_shards: that device count, overriding the mesh's (1 without shardings).

    Metrics (scalars): loss, lr (the rate of this update), grad_norm (before clipping),
    num_tokens (supervised), num_samples (rows), num_input_tokens (attended); DPO adds
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected (means over pairs) and num_pairs.
    """
    if tx is None:
        tx, schedule = make_optimizer(config.optimizer, int(config.train.total_steps))
    beta = float(config.get("dpo", {}).get("beta", 0.1)) if mode == "dpo" else 0.1
    norm = check_loss_normalization(config.train.get("loss_normalization", "global_token_mean"))
    if batch_shards is None:
        batch_shards = _batch_shards(param_shardings)
    grad_fn = make_grad_fn(
        apply_fn,
        mode,
        beta=beta,
        accum_steps=int(config.train.get("grad_accum_steps", 1)),
        grad_shardings=param_shardings,
        loss_normalization=norm,
        loss_group_size=int(config.train.get("loss_group_size", 0)),
        batch_shards=batch_shards,
        loss_chunk_size=int(config.train.get("loss_chunk_size", 0)),
    )
    denom_key = denominator_key(mode, norm)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        grads, aux = grad_fn(state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        denom = jnp.maximum(aux[denom_key], 1).astype(jnp.float32)
        metrics = {
            "loss": aux["loss_sum"] / denom,
            "grad_norm": optax.tree.norm(grads),
            "num_tokens": aux["num_tokens"],
            "num_samples": aux["num_samples"],
            "num_input_tokens": aux["num_input_tokens"],
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        if mode == "dpo":
            pairs = aux["num_pairs"]
            metrics["num_pairs"] = pairs
            metrics["num_samples"] = pairs
            for k in (
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
            ):
                metrics[k] = aux[k] / denom
            for k in ("logps/chosen", "logps/rejected"):
                metrics[k] = aux[k] / denom
        return new_state, metrics

    return train_step
