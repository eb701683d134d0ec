"""Blockwise attention: online softmax in pure JAX with a custom VJP (``attention_impl=
'blockwise'``, any backend, the CPU planner included).

Queries and keys are processed in tiles of ``block_q`` x ``block_k``; tiles the mask rules out
entirely are skipped; the backward recomputes the tiles, so neither pass stores more than one
``[block_q, block_k]`` float32 score tile per head and batch row. Residuals are ``q, k, v``, the
output and the float32 log-sum-exp of each row: O(S), not O(S^2). Same function as the reference
``jax.nn.dot_product_attention`` (conventions in ``models/attention.py``), masked rows included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.models.layers import widen_f16_on_cpu

Array = jax.Array

NEG = float(-0.7 * np.finfo(np.float32).max)
"""Fill of masked float32 scores (the reference's, so masked rows behave identically)."""

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
"""Largest tile sizes when the caller gives none (they need not divide the lengths)."""

TILE_BYTES = 32 * 2**20
"""Default tiles are halved (down to ``MIN_BLOCK``) until one float32 score tile
``[B, N, block_q, block_k]`` fits this: a 32-frame CLIP layer (B x N = 32 x 16) gets 128 x 128
tiles (evened out to 120 for its 577 tokens), a 2048-token LLaMA-7B row (1 x 32 heads) 512."""

MIN_BLOCK = 128


def default_blocks(rows: int, t: int, s: int) -> tuple[int, int]:
    """Tile sizes ``(block_q, block_k)`` for ``rows = B x N`` score rows over ``t`` queries and
    ``s`` keys: ``DEFAULT_BLOCK_Q/K`` halved while a float32 tile exceeds ``TILE_BYTES``, then
    evened out over the blocks (multiples of 8) so that little padding is added (577 CLIP
    tokens: 5 blocks of 120, not 2 of 512)."""
    bq, bk = DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K
    while rows * bq * bk * 4 > TILE_BYTES and max(bq, bk) > MIN_BLOCK:
        if bq >= bk:
            bq //= 2
        else:
            bk //= 2

    def even(n: int, b: int) -> int:
        if n <= b:
            return n
        per_block = -(-n // -(-n // b))  # ceil(n / number of blocks)
        return min(b, -(-per_block // 8) * 8)

    return even(t, bq), even(s, bk)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Memory-efficient attention; same arguments and result as ``dot_product_attention``
    (``mask`` bool broadcastable to ``[B, N, T, S]``). Peak extra memory per pass is one float32
    ``[B, N, block_q, block_k]`` tile (plus the dense ``mask`` itself if one is given)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = float(h**-0.5 if scale is None else scale)
    auto_q, auto_k = default_blocks(b * n, t, s)
    block_q = auto_q if block_q is None else block_q
    block_k = auto_k if block_k is None else block_k
    bq, bk = max(1, min(block_q, t)), max(1, min(block_k, s))
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk

    # [B, K, G, T, H] queries, [B, K, S, H] keys/values, padded to whole blocks
    qg = jnp.moveaxis(q.reshape(b, t, kh, g, h), 1, 3)
    kk, vv = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    qg = jnp.pad(qg, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    kk = jnp.pad(kk, ((0, 0),) * 2 + ((0, sp - s), (0, 0)))
    vv = jnp.pad(vv, ((0, 0),) * 2 + ((0, sp - s), (0, 0)))

    m5 = None
    if mask is not None:  # [Bm, Km, Gm, Tm, Sm], singleton axes kept singleton
        mask = mask.astype(bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mb, mn, mt, ms = mask.shape
        if mn == n and n > 1:
            m5 = mask.reshape(mb, kh, g, mt, ms)
        else:
            m5 = mask.reshape(mb, 1, 1, mt, ms)
        m5 = jnp.pad(
            m5,
            ((0, 0),) * 3 + ((0, tp - t if mt > 1 else 0), (0, sp - s if ms > 1 else 0)),
        )
    out, lse = _blockwise(qg, kk, vv, m5, (is_causal, scale, bq, bk, s))
    # rows without a visible key: the reference's uniform average over all S keys
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, K, H]
    valid = (lse > NEG / 2)[..., None]  # [B, K, G, T, 1]
    out = jnp.where(valid, out, mean_v[:, :, None, None, :].astype(out.dtype))
    out = out[:, :, :, :t]  # [B, K, G, T, H]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n, h).astype(q.dtype)


def _block_mask(m5, qi, ki, bq, bk, causal, s_real):
    """bool mask of the tile (query block qi, key block ki), broadcastable to
    ``[B, K, G, bq, bk]``: the dense mask's slice, causal, and the padding past ``s_real``."""
    q_pos = qi * bq + jnp.arange(bq)[:, None]
    k_pos = ki * bk + jnp.arange(bk)[None, :]
    allowed = k_pos < s_real
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    allowed = allowed[None, None, None]
    if m5 is not None:
        tile = m5
        if m5.shape[3] > 1:
            tile = jax.lax.dynamic_slice_in_dim(tile, qi * bq, bq, axis=3)
        if m5.shape[4] > 1:
            tile = jax.lax.dynamic_slice_in_dim(tile, ki * bk, bk, axis=4)
        allowed = allowed & tile
    return allowed


def _tie(qg, kk, vv, m5):
    """The inputs through one ``optimization_barrier``, so the mask (and every tile computed
    from it) depends on the data. Without it, when this attention sits in a differentiated
    ``lax.scan`` over layers, JAX's scan partial evaluation hoists what depends only on
    loop-invariant inputs (the mask, the block indices) out of the layer loop and stacks its
    per-tile values: ``[nq, nk, B, K, G, bq, bk]`` bool and float32 tiles, the O(S^2) memory
    this module exists to avoid. (Each tile's block indices go through a barrier with its
    query block for the same reason: the causal / padding tile depends on them alone.)"""
    return jax.lax.optimization_barrier((qg, kk, vv, m5))


def _tile_scores(qb, kb, scale):
    """float32 scores ``[B, K, G, bq, bk]`` of query block ``[B,K,G,bq,H]`` and keys
    ``[B,K,bk,H]``."""
    qb, kb = widen_f16_on_cpu(qb, kb)
    s = jnp.einsum("bkgqh,bksh->bkgqs", qb, kb, preferred_element_type=jnp.float32)
    return s * jnp.float32(scale)


def _forward(qg, kk, vv, m5, static):
    causal, scale, bq, bk, s_real = static
    qg, kk, vv, m5 = _tie(qg, kk, vv, m5)
    b, kh, g, tp, h = qg.shape
    nq, nk = tp // bq, kk.shape[2] // bk

    def q_block(qi):
        qb = jax.lax.dynamic_slice_in_dim(qg, qi * bq, bq, axis=3)

        def k_step(carry, ki):
            def compute(carry):
                m, den, acc = carry
                qi_, ki_, qb_ = jax.lax.optimization_barrier((qi, ki, qb))  # see _tie
                kb = jax.lax.dynamic_slice_in_dim(kk, ki_ * bk, bk, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(vv, ki_ * bk, bk, axis=2)
                allowed = _block_mask(m5, qi_, ki_, bq, bk, causal, s_real)
                sc = _tile_scores(qb_, kb, scale)
                sc = jnp.where(allowed, sc, jnp.minimum(sc, NEG))  # NEG fill; see _tie
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(sc - m_new[..., None])
                den = alpha * den + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bksh->bkgqh",
                    *widen_f16_on_cpu(p.astype(vv.dtype), vb),
                    preferred_element_type=jnp.float32,
                )
                return m_new, den, alpha[..., None] * acc + pv

            visible = _any_visible(m5, qi, ki, bq, bk, causal, s_real)
            return jax.lax.cond(visible, compute, lambda c: c, carry), None

        init = (
            jnp.full((b, kh, g, bq), NEG, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32),
        )
        (m, den, acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
        safe = jnp.where(den > 0, den, 1.0)
        out = acc / safe[..., None]
        lse = jnp.where(den > 0, m + jnp.log(safe), NEG)
        return out.astype(qg.dtype), lse

    outs, lses = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, ...]
    out = jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, tp, h)
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, tp)
    return out, lse


def _any_visible(m5, qi, ki, bq, bk, causal, s_real):
    """Whether any (query, key) pair of the tile may attend (else the tile is skipped)."""
    visible = ki * bk < s_real
    if causal:
        visible = visible & (ki * bk <= qi * bq + bq - 1)
    if m5 is not None:
        visible = visible & jnp.any(_block_mask(m5, qi, ki, bq, bk, False, s_real))
    return visible


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(qg, kk, vv, m5, static):
    return _forward(qg, kk, vv, m5, static)


def _blockwise_fwd(qg, kk, vv, m5, static):
    out, lse = _forward(qg, kk, vv, m5, static)
    return (out, lse), (qg, kk, vv, m5, out, lse)


def _blockwise_bwd(static, res, cts):
    causal, scale, bq, bk, s_real = static
    qg, kk, vv, m5, out, lse = res
    qg, kk, vv, m5 = _tie(qg, kk, vv, m5)
    dout = cts[0]  # the lse output is only compared, never differentiated
    b, kh, g, tp, h = qg.shape
    sp = kk.shape[2]
    nq, nk = tp // bq, sp // bk
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,K,G,T]

    def q_block(carry, qi):
        dk_acc, dv_acc = carry
        sl = lambda x, axis=3: jax.lax.dynamic_slice_in_dim(x, qi * bq, bq, axis=axis)  # noqa: E731
        qb, dob, lse_b, delta_b = sl(qg), sl(dout), sl(lse), sl(delta)

        def k_step(dq, ki):
            def compute(dq):
                qi_, ki_, qb_ = jax.lax.optimization_barrier((qi, ki, qb))  # see _tie
                kb = jax.lax.dynamic_slice_in_dim(kk, ki_ * bk, bk, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(vv, ki_ * bk, bk, axis=2)
                allowed = _block_mask(m5, qi_, ki_, bq, bk, causal, s_real)
                sc = _tile_scores(qb_, kb, scale)
                # 0 where masked: exp(<= NEG), a fill computed from the tile (see _tie)
                p = jnp.exp(jnp.where(allowed, sc - lse_b[..., None], jnp.minimum(sc, NEG)))
                f32 = jnp.float32
                dv = jnp.einsum(
                    "bkgqs,bkgqh->bksh", p.astype(dob.dtype), dob, preferred_element_type=f32
                )
                dp = jnp.einsum("bkgqh,bksh->bkgqs", dob, vb, preferred_element_type=f32)
                ds = p * (dp - delta_b[..., None]) * f32(scale)
                dq = dq + jnp.einsum(
                    "bkgqs,bksh->bkgqh", ds.astype(kb.dtype), kb, preferred_element_type=f32
                )
                dk = jnp.einsum(
                    "bkgqs,bkgqh->bksh", ds.astype(qb.dtype), qb, preferred_element_type=f32
                )
                return dq, (dk, dv)

            def skip(dq):
                z = jnp.zeros((b, kh, bk, h), jnp.float32)
                return dq, (z, z)

            visible = _any_visible(m5, qi, ki, bq, bk, causal, s_real)
            return jax.lax.cond(visible, compute, skip, dq)

        dq, (dks, dvs) = jax.lax.scan(
            k_step, jnp.zeros((b, kh, g, bq, h), jnp.float32), jnp.arange(nk)
        )
        # [nk, B, K, bk, H] -> [B, K, S, H]
        dk_acc = dk_acc + jnp.moveaxis(dks, 0, 2).reshape(b, kh, sp, h)
        dv_acc = dv_acc + jnp.moveaxis(dvs, 0, 2).reshape(b, kh, sp, h)
        return (dk_acc, dv_acc), dq

    zeros = jnp.zeros((b, kh, sp, h), jnp.float32)
    (dk, dv), dqs = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nq))
    dq = jnp.moveaxis(dqs, 0, 3).reshape(b, kh, g, tp, h)
    return dq.astype(qg.dtype), dk.astype(kk.dtype), dv.astype(vv.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
