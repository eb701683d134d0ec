"""Cached decoding inside one jitted loop: greedy, sampling (temperature / top-k / top-p), beams.

The prompt batch comes from ``data.collate.collate(..., padding_side="left", buckets=...)`` so
every prompt ends at the same slot and the prompt length is one of a few bucket sizes (use
:data:`PROMPT_BUCKETS` / :func:`prompt_buckets`): a new prompt length then reuses a compiled
program instead of compiling another. Prefill runs the whole model once (vision tower,
projector, merge, LLM) and fills the KV cache; each new token is one LLM call on ``[B, 1]``
inside ``jax.lax.while_loop``, which stops as soon as every sequence has produced EOS.

Sharding: call the jitted functions inside ``sharding.mesh_context(mesh)`` with parameters
placed by ``sharding.param_shardings`` and the batch by ``sharding.shard_batch``. The KV cache
``[L, B, S_max, K, H]`` carries the logical names ``llama.CACHE_AXES`` (batch over
``data`` x ``fsdp``, KV heads over ``tensor``), exactly like training's activations, so a
checkpoint trained on a mesh decodes on the same mesh. :func:`make_generate` does the wiring.

The model must provide two methods (``PPLLaVA`` does):
    prefill(batch, cache) -> (logits float32[B, V] at the last prompt slot, cache)
    decode_step(ids int32[B, 1], positions int32[B, 1], attention_mask int32[B, S_max],
                cache, cache_index) -> (logits float32[B, V], cache)
and an ``init_cache(batch, max_len)`` helper.

For streaming (the chat command), :class:`StepDecoder` runs the same prefill and decode step as
two jitted functions driven by a Python loop, yielding each token as soon as it exists; with
the same key it produces the same tokens as :func:`generate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.models import layers
from ppllava_jax.models.llama import CACHE_AXES

Array = jax.Array

PROMPT_BUCKETS: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 2048, 3072, 4096)
"""Default left-padded prompt lengths (text buckets; see :func:`prompt_buckets`)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (hashable: a static argument of the jitted functions).

    max_new_tokens: tokens generated at most (SPEC §8: 200).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass (1.0 = all).
    num_beams: > 1 runs beam search (ranked by summed log-probs / length**length_penalty).
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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]")
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be >= 1")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")


def prompt_buckets(visual_tokens: int = 0, text: Sequence[int] = PROMPT_BUCKETS) -> list[int]:
    """Merged-length buckets for ``collate(..., buckets=...)``: each text bucket plus the fixed
    number of visual tokens of one video (``Planner(cfg).item_grid('video', T)`` product), so
    the buckets sit where the merged lengths of a benchmark actually fall."""
    return sorted({int(visual_tokens) + int(b) for b in text})


def _filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """Mask (to -inf) tokens outside top-k / the top-p nucleus. ``logits`` float32[B, V]."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
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


def _constrain_cache(cache: dict[str, Array]) -> dict[str, Array]:
    """The KV cache's logical sharding (a no-op outside a mesh context)."""
    return {k: layers.constrain(v, CACHE_AXES) for k, v in cache.items()}


def _start(model: nn.Module, params: Any, batch: dict[str, Array], n: int):
    """Prefill: (logits float32[B, V], cache, full mask int32[B, Lp + n], next position [B])."""
    mask = batch["attention_mask"]
    b, lp = mask.shape
    variables = {"params": params}
    cache = _constrain_cache(model.apply(variables, b, lp + n, method="init_cache"))
    logits, cache = model.apply(variables, batch, cache, method="prefill")
    full_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1)
    next_pos = (batch["positions"][:, -1] + 1).astype(jnp.int32)
    return logits, _constrain_cache(cache), full_mask, next_pos


def _step(model, params, tok, t, lp, next_pos, full_mask, cache):
    """Write ``tok`` int32[B] at slot ``lp + t`` and run it: (logits, cache, full_mask)."""
    full_mask = full_mask.at[:, lp + t].set(1)
    pos = (next_pos + t)[:, None].astype(jnp.int32)
    logits, cache = model.apply(
        {"params": params}, tok[:, None], pos, full_mask, cache, lp + t, method="decode_step"
    )
    return logits, _constrain_cache(cache), full_mask


def generate(
    model: nn.Module,
    params: Any,
    batch: dict[str, Array],
    sc: SamplingConfig = SamplingConfig(),
    rng: Array | None = None,
) -> dict[str, Array]:
    """Generate up to ``sc.max_new_tokens`` tokens for a left-padded prompt batch.

    Args:
      batch: ``collate(..., padding_side='left')`` arrays (no ``labels``/``valid``/``meta``).
      rng: PRNG key for sampling (ignored by greedy and beam search; default key 0).
    Returns:
      ``dict(tokens=int32[B, N], lengths=int32[B], scores=float32[B], logits=float32[B, N, V]
      or None)``; tokens after EOS are ``pad_token_id``, ``lengths`` counts tokens up to and
      including EOS, ``scores`` is the summed log-probability (temperature 1, unfiltered) of
      those ``lengths`` tokens.
    Jit it with ``sc`` static: ``jax.jit(generate, static_argnums=(0, 3))``, or use
    :func:`make_generate`.
    """
    if sc.num_beams > 1:
        return beam_search(model, params, batch, sc)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    b, lp = batch["attention_mask"].shape
    n = sc.max_new_tokens
    logits, cache, full_mask, next_pos = _start(model, params, batch, n)
    vocab = logits.shape[-1]

    def cond(state):
        t, _, _, _, done, *_ = state
        return (t < n) & ~jnp.all(done)

    def body(state):
        t, logits, cache, full_mask, done, tokens, lengths, scores, all_logits, rng = state
        rng, sub = jax.random.split(rng)
        tok = choose_token(logits, sub, sc)
        tok = jnp.where(done, sc.pad_token_id, tok)
        tokens = tokens.at[:, t].set(tok)
        if sc.return_logits:
            all_logits = all_logits.at[:, t].set(logits)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=1)
        scores = scores + jnp.where(done, 0.0, logp[:, 0])
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | (tok == sc.eos_token_id)
        logits, cache, full_mask = _step(model, params, tok, t, lp, next_pos, full_mask, cache)
        return t + 1, logits, cache, full_mask, done, tokens, lengths, scores, all_logits, rng

    init = (
        jnp.int32(0),
        logits,
        cache,
        full_mask,
        jnp.zeros((b,), bool),
        jnp.full((b, n), sc.pad_token_id, jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), jnp.float32),
        jnp.zeros((b, n, vocab) if sc.return_logits else (b, 0, 0), jnp.float32),
        rng,
    )
    state = jax.lax.while_loop(cond, body, init)
    tokens, lengths, scores, all_logits = state[5], state[6], state[7], state[8]
    return {
        "tokens": tokens,
        "lengths": lengths,
        "scores": scores,
        "logits": all_logits if sc.return_logits else None,
    }


def beam_search(
    model: nn.Module, params: Any, batch: dict[str, Array], sc: SamplingConfig
) -> dict[str, Array]:
    """Beam search with ``sc.num_beams`` beams per prompt (deterministic).

    Each prompt is prefilled once and its cache copied to the beams. A finished beam keeps its
    summed log-prob and extends with padding at no cost; beams are ranked by
    ``sum / length**length_penalty``. Returns the best beam per prompt in the format of
    :func:`generate` (``scores``: the best beam's summed log-probability).
    """
    k = sc.num_beams
    b, lp = batch["attention_mask"].shape
    n = sc.max_new_tokens
    logits, cache, full_mask, next_pos = _start(model, params, batch, n)
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  [B, ...] -> [B*k, ...]
    cache = _constrain_cache(jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), cache))
    logits, full_mask, next_pos = rep(logits), rep(full_mask), rep(next_pos)
    neg = jnp.float32(-1e9)
    # only beam 0 is live at the start so the k beams do not start identical
    scores = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), neg)]), (b,))
    tokens = jnp.full((b * k, n), sc.pad_token_id, jnp.int32)
    done = jnp.zeros((b * k,), bool)
    lengths = jnp.zeros((b * k,), jnp.int32)

    def cond(state):
        t, *_, done = state
        return (t < n) & ~jnp.all(done)

    def body(state):
        t, logits, cache, full_mask, scores, tokens, lengths, done = state
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
        tok = (top % vocab).astype(jnp.int32).reshape(-1)
        src = (jnp.arange(b)[:, None] * k + src_beam).reshape(-1)
        scores = jnp.take_along_axis(cand, top, axis=1).reshape(-1)
        tokens = tokens[src].at[:, t].set(tok)
        was_done = done[src]
        lengths = lengths[src] + (~was_done).astype(jnp.int32)
        done = was_done | (tok == sc.eos_token_id)
        cache = jax.tree.map(lambda c: c[:, src], cache)
        logits, cache, full_mask = _step(model, params, tok, t, lp, next_pos, full_mask[src], cache)
        return t + 1, logits, cache, full_mask, scores, tokens, lengths, done

    init = (jnp.int32(0), logits, cache, full_mask, scores, tokens, lengths, done)
    _, _, _, _, scores, tokens, lengths, _ = jax.lax.while_loop(cond, body, init)
    norm = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** sc.length_penalty
    best = jnp.argmax(norm.reshape(b, k), axis=1) + jnp.arange(b) * k
    return {
        "tokens": tokens[best],
        "lengths": lengths[best],
        "scores": scores[best],
        "logits": None,
    }


def make_generate(
    model: nn.Module, sc: SamplingConfig, mesh: Any = None
) -> Callable[[Any, dict[str, Array], Array | None], dict[str, Array]]:
    """``fn(params, batch, rng=None) -> generate(...)`` jitted once per (batch shape, bucket).

    With ``mesh``, the call runs inside ``sharding.mesh_context(mesh)`` (activation and cache
    constraints active); place ``params`` and ``batch`` on the mesh first
    (``sharding.param_shardings`` / ``sharding.shard_batch``). Non-array entries of ``batch``
    (``meta``) and ``valid`` / ``labels`` are dropped.
    """
    jitted = jax.jit(lambda p, b, r: generate(model, p, b, sc, r))

    def fn(params: Any, batch: dict[str, Any], rng: Array | None = None) -> dict[str, Array]:
        batch = {k: v for k, v in batch.items() if k not in ("meta", "valid", "labels")}
        rng = jax.random.PRNGKey(0) if rng is None else rng
        if mesh is None:
            return jitted(params, batch, rng)
        from ppllava_jax import sharding

        with sharding.mesh_context(mesh):
            return jitted(params, batch, rng)

    return fn


class StepDecoder:
    """Token-by-token decoding for streaming: jitted prefill and decode step, Python loop.

    ``for tok in StepDecoder(model, sc).stream(params, batch, rng): ...`` yields ``int32[B]``
    numpy arrays, one per step, until every row has produced EOS or ``max_new_tokens`` (rows
    that finished yield ``pad_token_id``). Greedy and sampling only (no beams). One compile per
    prompt bucket; the same key gives the same tokens as :func:`generate`.
    """

    def __init__(self, model: nn.Module, sc: SamplingConfig, mesh: Any = None):
        if sc.num_beams > 1:
            raise ValueError("StepDecoder streams greedy or sampled tokens; num_beams must be 1")
        self.model, self.sc, self.mesh = model, sc, mesh

        def prefill(params, batch):
            return _start(model, params, batch, sc.max_new_tokens)

        def step(params, logits, rng, done, t, lp, next_pos, full_mask, cache):
            rng, sub = jax.random.split(rng)
            tok = choose_token(logits, sub, sc)
            tok = jnp.where(done, sc.pad_token_id, tok)
            done = done | (tok == sc.eos_token_id)
            logits, cache, full_mask = _step(model, params, tok, t, lp, next_pos, full_mask, cache)
            return tok, logits, rng, done, full_mask, cache

        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step, static_argnums=(5,), donate_argnums=(7, 8))

    def _ctx(self):
        import contextlib

        if self.mesh is None:
            return contextlib.nullcontext()
        from ppllava_jax import sharding

        return sharding.mesh_context(self.mesh)

    def stream(
        self, params: Any, batch: dict[str, Any], rng: Array | None = None
    ) -> Iterator[np.ndarray]:
        batch = {k: v for k, v in batch.items() if k not in ("meta", "valid", "labels")}
        rng = jax.random.PRNGKey(0) if rng is None else rng
        b, lp = np.shape(batch["attention_mask"])
        with self._ctx():
            logits, cache, full_mask, next_pos = self._prefill(params, batch)
            done = jnp.zeros((b,), bool)
            for t in range(self.sc.max_new_tokens):
                tok, logits, rng, done, full_mask, cache = self._step(
                    params, logits, rng, done, jnp.int32(t), lp, next_pos, full_mask, cache
                )
                yield np.asarray(tok)
                if bool(np.all(np.asarray(done))):
                    break
