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
size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ppllava_jax.train.losses import dpo_terms, sequence_logps, token_logps
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


def make_loss_fn(apply_fn: ApplyFn, mode: str, beta: float = 0.1) -> Callable:
    """``loss_fn(trainable, frozen, ref, micro_batch, rng) -> (loss_sum, aux_sums)``.

    ``loss_sum`` is a numerator: the global loss is ``sum(loss_sum) / sum(aux[denominator])``
    with the denominator ``num_tokens`` (SFT) or ``num_pairs`` (DPO).
    """
    if mode not in ("sft", "dpo"):
        raise ValueError(f"mode={mode!r}: use 'sft' or 'dpo'")

    def sft(trainable, frozen, ref, mb, rng):
        del ref
        logits, labels, mask = _outputs(apply_fn, merge_params(trainable, frozen), mb, True, rng)
        logp, m = token_logps(logits, labels, mask)
        loss_sum = -jnp.sum(logp)
        return loss_sum, {"loss_sum": loss_sum, "num_tokens": jnp.sum(m, dtype=jnp.int32)}

    def dpo(trainable, frozen, ref, mb, rng):
        if ref is None:
            raise ValueError("DPO needs state.ref_params (create_train_state(with_reference=True))")
        logits, labels, mask = _outputs(apply_fn, merge_params(trainable, frozen), mb, True, rng)
        logp, m = token_logps(logits, labels, mask)
        logps = jnp.sum(logp, axis=-1)
        r_logits, r_labels, r_mask = _outputs(apply_fn, merge_params(ref, frozen), mb, False, rng)
        ref_logps = jax.lax.stop_gradient(sequence_logps(r_logits, r_labels, r_mask))
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
):
    """``grad_fn(state, batch, rng) -> (grads, aux)``: mean gradients over the global batch
    (float32, cast to the parameters' dtypes) and the summed aux of all micro-batches.

    ``grad_shardings`` (the trainable parameters' shardings) pins the float32 gradient
    accumulator to the parameters' layout, so it is never replicated (at 7B it is 28 GB).
    """
    pin = (
        (lambda t: t)
        if grad_shardings is None
        else (lambda t: jax.lax.with_sharding_constraint(t, grad_shardings))
    )
    loss_fn = make_loss_fn(apply_fn, mode, beta)
    vg = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(state: TrainState, batch: Batch, rng: jax.Array):
        if batch["labels"].ndim == 2:
            batch = microbatch(batch, accum_steps)
        n = batch["labels"].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
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
        denom = aux["num_tokens"] if mode == "sft" else aux["num_pairs"]
        denom = jnp.maximum(denom, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), g, state.params)
        aux["num_samples"] = jnp.asarray(
            batch["labels"].shape[0] * batch["labels"].shape[1], jnp.int32
        )
        aux["num_input_tokens"] = jnp.sum(batch["attention_mask"] != 0, dtype=jnp.int32)
        return grads, aux

    return grad_fn


def make_train_step(
    apply_fn: ApplyFn,
    config,
    mode: str = "sft",
    *,
    tx: optax.GradientTransformation | None = None,
    schedule: optax.Schedule | None = None,
    param_shardings: PyTree | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The train step ``(state, batch, rng) -> (state, metrics)``; pure, jit it yourself.

    Args:
      apply_fn: the model (see module doc).
      config: uses ``config.optimizer`` (unless ``tx`` is given), ``config.train.total_steps``,
        ``config.train.grad_accum_steps`` and, for DPO, ``config.dpo.beta``.
      mode: ``"sft"`` (next-token loss) or ``"dpo"`` (batch = B chosen rows then B rejected).
      tx, schedule: override the optimizer built from the config (``schedule`` is only used
        for the ``lr`` metric).
      param_shardings: shardings of the *trainable* tree (``state_shardings(...).params``);
        pins the gradient accumulator's layout (see ``make_grad_fn``).

    Metrics (scalars): loss, lr (the rate of this update), grad_norm (before clipping),
    num_tokens (supervised), num_samples (rows), num_input_tokens (attended); DPO adds
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected (means over pairs) and num_pairs.
    """
    if tx is None:
        tx, schedule = make_optimizer(config.optimizer, int(config.train.total_steps))
    beta = float(config.get("dpo", {}).get("beta", 0.1)) if mode == "dpo" else 0.1
    grad_fn = make_grad_fn(
        apply_fn,
        mode,
        beta=beta,
        accum_steps=int(config.train.get("grad_accum_steps", 1)),
        grad_shardings=param_shardings,
    )

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        grads, aux = grad_fn(state, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        denom_key = "num_tokens" if mode == "sft" else "num_pairs"
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
