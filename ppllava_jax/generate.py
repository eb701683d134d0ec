"""Cached decoding inside one jitted loop: greedy, sampling (temperature / top-k / top-p), beams.

The prompt batch comes from ``data.collate.collate(..., padding_side="left")`` so every prompt
ends at the same slot. Prefill runs the whole model once (vision tower, projector, merge, LLM)
and fills the KV cache; each new token is one LLM call on ``[B, 1]`` inside
``jax.lax.while_loop``, which stops as soon as every sequence has produced EOS.

The model must provide two methods (``PPLLaVA`` does):
    prefill(batch, cache) -> (logits float32[B, V] at the last prompt slot, cache)
    decode_step(ids int32[B, 1], positions int32[B, 1], attention_mask int32[B, S_max],
                cache, cache_index) -> (logits float32[B, V], cache)
and an ``init_cache(batch, max_len)`` helper.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    max_new_tokens: tokens generated at most (SPEC §8: 200).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass (1.0 = all).
    num_beams: > 1 runs beam search (greedy scoring by summed log-probs, length_penalty).
    eos_token_id / pad_token_id: stop token and the filler written after it.
    return_logits: also return the logits that chose each token ``float32[B, N, V]``.
    """

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    return_logits: bool = False


def _filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """Mask (to -inf) tokens outside top-k / the top-p nucleus. ``logits`` float32[B, V]."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cum - probs) < top_p
        thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < thresh, neg, logits)
    return logits


def choose_token(logits: Array, rng: Array, sc: SamplingConfig) -> Array:
    """int32[B] from float32[B, V]."""
    if sc.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _filter_logits(logits / sc.temperature, sc.top_k, sc.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    model: nn.Module,
    params: Any,
    batch: dict[str, Array],
    sc: SamplingConfig = SamplingConfig(),
    rng: Array | None = None,
) -> dict[str, Array]:
    """Generate up to ``sc.max_new_tokens`` tokens for a left-padded prompt batch.

    Returns ``dict(tokens=int32[B, N], lengths=int32[B], logits=float32[B, N, V] or None)``;
    tokens after EOS are ``pad_token_id`` and ``lengths`` counts tokens up to and including EOS.
    Jit it with ``sc`` static: ``jax.jit(generate, static_argnums=(0, 3))``.
    """
    if sc.num_beams > 1:
        return beam_search(model, params, batch, sc)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    mask = batch["attention_mask"]
    b, lp = mask.shape
    n = sc.max_new_tokens
    s_max = lp + n
    variables = {"params": params}
    cache = model.apply(variables, b, s_max, method="init_cache")
    logits, cache = model.apply(variables, batch, cache, method="prefill")
    full_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1)
    next_pos = batch["positions"][:, -1] + 1
    vocab = logits.shape[-1]

    def cond(state):
        t, _, _, _, done, *_ = state
        return (t < n) & ~jnp.all(done)

    def body(state):
        t, logits, cache, full_mask, done, tokens, lengths, all_logits, rng = state
        rng, sub = jax.random.split(rng)
        tok = choose_token(logits, sub, sc)
        tok = jnp.where(done, sc.pad_token_id, tok)
        tokens = tokens.at[:, t].set(tok)
        if sc.return_logits:
            all_logits = all_logits.at[:, t].set(logits)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | (tok == sc.eos_token_id)
        full_mask = full_mask.at[:, lp + t].set(1)
        pos = (next_pos + t)[:, None].astype(jnp.int32)
        logits, cache = model.apply(
            variables, tok[:, None], pos, full_mask, cache, lp + t, method="decode_step"
        )
        return t + 1, logits, cache, full_mask, done, tokens, lengths, all_logits, rng

    init = (
        jnp.int32(0),
        logits,
        cache,
        full_mask,
        jnp.zeros((b,), bool),
        jnp.full((b, n), sc.pad_token_id, jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, n, vocab) if sc.return_logits else (b, 0, 0), jnp.float32),
        rng,
    )
    state = jax.lax.while_loop(cond, body, init)
    _, _, _, _, _, tokens, lengths, all_logits, _ = state
    return {
        "tokens": tokens,
        "lengths": lengths,
        "logits": all_logits if sc.return_logits else None,
    }


def beam_search(
    model: nn.Module, params: Any, batch: dict[str, Array], sc: SamplingConfig
) -> dict[str, Array]:
    """Beam search with ``sc.num_beams`` beams per prompt (deterministic).

    Each prompt is prefilled once and its cache copied to the beams. A finished beam keeps its
    score (summed log-probs / length**length_penalty) and extends with padding at no cost. Returns
    the best beam per prompt in the format of ``generate``.
    """
    k = sc.num_beams
    mask = batch["attention_mask"]
    b, lp = mask.shape
    n = sc.max_new_tokens
    s_max = lp + n
    variables = {"params": params}
    cache = model.apply(variables, b, s_max, method="init_cache")
    logits, cache = model.apply(variables, batch, cache, method="prefill")
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  [B, ...] -> [B*k, ...]
    cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), cache)  # cache is [L, B, ...]
    logits = rep(logits)
    full_mask = rep(jnp.concatenate([mask.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1))
    next_pos = rep(batch["positions"][:, -1] + 1)
    neg = jnp.float32(-1e9)
    # only beam 0 is live at the start so the k beams do not start identical
    scores = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), neg)]), (b,))
    tokens = jnp.full((b * k, n), sc.pad_token_id, jnp.int32)
    done = jnp.zeros((b * k,), bool)
    lengths = jnp.zeros((b * k,), jnp.int32)

    def cond(state):
        t, *_, done, _ = state
        return (t < n) & ~jnp.all(done)

    def body(state):
        t, logits, cache, full_mask, scores, tokens, lengths, done, _ = state
        logp = jax.nn.log_softmax(logits, axis=-1)
        vocab = logp.shape[-1]
        # a finished beam may only extend with pad, at no cost
        pad_row = jnp.full((vocab,), neg).at[sc.pad_token_id].set(0.0)
        logp = jnp.where(done[:, None], pad_row[None], logp)
        cand = (scores[:, None] + logp).reshape(b, k * vocab)
        new_len = lengths + (~done).astype(jnp.int32)
        norm_len = jnp.maximum(new_len, 1).astype(jnp.float32) ** sc.length_penalty
        # rank by length-normalised score; carry the raw sum
        norm = (cand.reshape(b * k, vocab) / norm_len[:, None]).reshape(b, k * vocab)
        _, top = jax.lax.top_k(norm, k)
        src_beam = top // vocab
        tok = (top % vocab).astype(jnp.int32)
        src = (jnp.arange(b)[:, None] * k + src_beam).reshape(-1)
        scores = jnp.take_along_axis(cand, top, axis=1).reshape(-1)
        tok = tok.reshape(-1)
        tokens = tokens[src].at[:, t].set(tok)
        was_done = done[src]
        lengths = lengths[src] + (~was_done).astype(jnp.int32)
        done = was_done | (tok == sc.eos_token_id)
        cache = jax.tree.map(lambda c: c[:, src], cache)
        full_mask = full_mask[src].at[:, lp + t].set(1)
        pos = (next_pos + t)[:, None].astype(jnp.int32)
        logits, cache = model.apply(
            variables, tok[:, None], pos, full_mask, cache, lp + t, method="decode_step"
        )
        return t + 1, logits, cache, full_mask, scores, tokens, lengths, done, None

    init = (jnp.int32(0), logits, cache, full_mask, scores, tokens, lengths, done, None)
    _, _, _, _, scores, tokens, lengths, _, _ = jax.lax.while_loop(cond, body, init)
    final = (scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** sc.length_penalty).reshape(
        b, k
    )
    best = jnp.argmax(final, axis=1) + jnp.arange(b) * k
    return {"tokens": tokens[best], "lengths": lengths[best], "logits": None}


def decode_tokens(
    tokenizer: Any, tokens: np.ndarray, lengths: np.ndarray, eos_id: int
) -> list[str]:
    """Text of each generated row, EOS and padding removed."""
    out = []
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
        ids = [int(t) for t in row[: int(n)] if int(t) != eos_id]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out
