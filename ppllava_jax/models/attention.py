"""Attention kernels behind ``layers.attention`` (``cfg.attention_impl``).

Every tower of the project (CLIP vision and causal text, the BT-Adapter, LLaMA/Qwen2 with GQA,
padding masks and the KV cache, SigLIP) calls ``dot_product_attention`` below through
``layers.attention``; the implementations compute the same function:

- ``xla``: ``jax.nn.dot_product_attention(implementation='xla')``, the reference. Materialises
  float32 scores ``[B, N, T, S]`` (and the backward keeps the probabilities).
- ``blockwise``: online-softmax attention in pure JAX (any backend, the CPU planner included).
  Queries and keys are processed in blocks of ``block_q`` x ``block_k``; blocks the mask rules out
  entirely are skipped; a custom VJP recomputes the blocks in the backward, so neither pass
  stores more than one ``[block_q, block_k]`` score tile per head and batch row. Residuals are
  ``q, k, v``, the output and the float32 log-sum-exp of each row: O(S), not O(S^2).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``, NVIDIA flash attention
  (bf16/fp16 inputs, head dim <= 128 and a multiple of 8; JAX raises otherwise).
- ``splash``: the Pallas TPU splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``). Takes the causal flag and a key padding
  mask (``key_mask``, as segment ids), not a dense ``mask``; TPU only.
- ``auto``: per backend and shape (``choose_impl``).

Conventions shared by all paths: ``q[B, T, N, H]``, ``k, v[B, S, K, H]`` with ``N % K == 0``
(grouped-query attention: query head ``n`` reads kv head ``n // (N // K)``); scores are float32
``q.k * scale`` (default ``H ** -0.5``); ``is_causal`` is the top-left aligned lower triangle
(query ``i`` sees keys ``j <= i``, as ``jax.nn.dot_product_attention``); a query row with no
visible key gets, as the reference's ``-0.7 * float32.max`` fill does, the uniform average of all
``S`` values (only padding rows are like that; what they hold is never read).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLS = ("xla", "blockwise", "cudnn", "splash", "auto")
"""Values of ``attention_impl`` (model configs' runtime field)."""

NEG = float(-0.7 * np.finfo(np.float32).max)
"""Fill of masked float32 scores (the reference's, so masked rows behave identically)."""

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512

AUTO_XLA_MAX_SCORE_BYTES = 256 * 2**20
"""``auto`` keeps the reference XLA path while its float32 scores ``B*N*T*S*4`` stay below this
(off TPU/GPU kernels); above, it takes ``blockwise``."""


def check_impl(impl: str) -> str:
    """``impl`` if it is one of ``IMPLS``, else a ValueError naming the setting."""
    if impl not in IMPLS:
        raise ValueError(
            f"attention_impl={impl!r} is not one of {', '.join(IMPLS)} (set the model config's "
            "runtime field, e.g. --config.model.attention_impl=blockwise)"
        )
    return impl


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    key_mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    impl: str = "xla",
    block_q: int | None = None,
    block_k: int | None = None,
) -> Array:
    """Scaled dot-product attention.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]``, ``N % K == 0``; all one float dtype.
      mask: bool broadcastable to ``[B, N, T, S]`` (True = may attend), or None.
      key_mask: bool/int ``[B, S]`` key padding (nonzero = real key), or None; the same as
        ``mask=key_mask[:, None, None, :]`` but usable by the TPU kernel.
      is_causal: also apply the (top-left aligned) causal mask.
      scale: score scale, default ``H ** -0.5``.
      impl: one of ``IMPLS``.
      block_q, block_k: ``blockwise`` tile sizes (need not divide T and S); default
        ``DEFAULT_BLOCK_Q`` / ``DEFAULT_BLOCK_K``.
    Returns:
      ``[B, T, N, H]`` in q's dtype.
    """
    impl = check_impl(impl)
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads are not a multiple of {kh} key/value heads")
    scale = float(h**-0.5 if scale is None else scale)
    if impl == "auto":
        impl = choose_impl(q, k, mask=mask, key_mask=key_mask, is_causal=is_causal)
    if impl == "splash":
        if mask is not None:
            raise ValueError(
                "attention_impl='splash' takes is_causal and key_mask, not a dense mask; "
                "use attention_impl='blockwise' or 'auto' for this layer"
            )
        return splash_attention(q, k, v, key_mask=key_mask, is_causal=is_causal, scale=scale)
    if key_mask is not None:
        km = key_mask.astype(bool)[:, None, None, :]
        mask = km if mask is None else jnp.logical_and(mask, km)
    if impl == "blockwise":
        return blockwise_attention(
            q, k, v, mask=mask, is_causal=is_causal, scale=scale, block_q=block_q, block_k=block_k
        )
    if mask is not None and mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=impl
    )


def choose_impl(
    q: Array,
    k: Array,
    *,
    mask: Array | None = None,
    key_mask: Array | None = None,
    is_causal: bool = False,
    backend: str | None = None,
) -> str:
    """What ``auto`` runs for these shapes on ``backend`` (default: JAX's default backend).

    TPU: ``splash`` when the mask is structured (causal / key padding, no dense ``mask``) and
    T, S, H are multiples of 128; GPU: ``cudnn`` for bf16/fp16 with a head dim the kernel takes
    (<= 128, multiple of 8). Otherwise ``xla`` while its float32 scores stay under
    ``AUTO_XLA_MAX_SCORE_BYTES``, else ``blockwise``."""
    del is_causal, key_mask  # both supported by every kernel below
    backend = backend or jax.default_backend()
    b, t, n, h = q.shape
    s = k.shape[1]
    if backend == "tpu" and mask is None and t % 128 == 0 and s % 128 == 0 and h % 128 == 0:
        return "splash"
    if (
        backend in ("gpu", "cuda")
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and h <= 128
        and h % 8 == 0
    ):
        return "cudnn"
    return "xla" if b * n * t * s * 4 <= AUTO_XLA_MAX_SCORE_BYTES else "blockwise"


# -- blockwise (online softmax, custom VJP) -------------------------------------------------------


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
    block_q = DEFAULT_BLOCK_Q if block_q is None else block_q
    block_k = DEFAULT_BLOCK_K if block_k is None else block_k
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


def _tile_scores(qb, kb, scale):
    """float32 scores ``[B, K, G, bq, bk]`` of query block ``[B,K,G,bq,H]`` and keys
    ``[B,K,bk,H]``."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", qb, kb, preferred_element_type=jnp.float32)
    return s * jnp.float32(scale)


def _forward(qg, kk, vv, m5, static):
    causal, scale, bq, bk, s_real = static
    b, kh, g, tp, h = qg.shape
    nq, nk = tp // bq, kk.shape[2] // bk

    def q_block(qi):
        qb = jax.lax.dynamic_slice_in_dim(qg, qi * bq, bq, axis=3)

        def k_step(carry, ki):
            def compute(carry):
                m, den, acc = carry
                kb = jax.lax.dynamic_slice_in_dim(kk, ki * bk, bk, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(vv, ki * bk, bk, axis=2)
                allowed = _block_mask(m5, qi, ki, bq, bk, causal, s_real)
                sc = jnp.where(allowed, _tile_scores(qb, kb, scale), NEG)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(sc - m_new[..., None])
                den = alpha * den + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bksh->bkgqh",
                    p.astype(vv.dtype),
                    vb,
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
                kb = jax.lax.dynamic_slice_in_dim(kk, ki * bk, bk, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(vv, ki * bk, bk, axis=2)
                allowed = _block_mask(m5, qi, ki, bq, bk, causal, s_real)
                sc = _tile_scores(qb, kb, scale)
                p = jnp.where(allowed, jnp.exp(sc - lse_b[..., None]), 0.0)
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


# -- Pallas TPU splash attention -----------------------------------------------------------------


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    key_mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    interpret: bool = False,
) -> Array:
    """The Pallas TPU splash-attention kernel (``make_splash_mqa``, vmapped over batch and kv
    heads, so GQA reads each kv head once). Shapes as ``dot_product_attention``; T, S, H must be
    multiples of 128. Key padding becomes segment ids (query rows of a self-attention carry their
    own key's id, so padding rows attend padding and stay finite). ``interpret`` runs the kernel
    in the Pallas interpreter (any backend; for tests)."""
    if jax.default_backend() != "tpu" and not interpret:
        raise ValueError(
            f"attention_impl='splash' runs only on TPU (this is {jax.default_backend()!r}); "
            "use attention_impl='blockwise' (any backend), 'cudnn' (NVIDIA) or 'auto'"
        )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    if t % 128 or s % 128:
        raise ValueError(
            f"attention_impl='splash' needs sequence lengths that are multiples of 128 "
            f"(got queries {t}, keys {s}); pad the inputs or use attention_impl='blockwise'"
        )
    scale = float(h**-0.5 if scale is None else scale)
    base = sm.CausalMask((t, s)) if is_causal else sm.FullMask((t, s))
    block = sk.BlockSizes(
        block_q=min(512, t),
        block_kv=min(512, s),
        block_kv_compute=min(512, s),
        block_q_dkv=min(512, t),
        block_kv_dkv=min(512, s),
        block_kv_dkv_compute=min(512, s),
        block_q_dq=min(512, t),
        block_kv_dq=min(512, s),
    )
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([base] * g), block_sizes=block, interpret=interpret
    )
    qh = jnp.moveaxis((q * jnp.asarray(scale, q.dtype)).reshape(b, t, kh, g, h), 1, 3)
    kh_, vh_ = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [B, K, S, H]
    if key_mask is None:
        fn = jax.vmap(jax.vmap(kernel))  # over batch, kv heads
        out = fn(qh, kh_, vh_)
    else:
        kv_ids = key_mask.astype(jnp.int32)
        q_ids = kv_ids if t == s else jnp.ones((b, t), jnp.int32)
        ids = sk.SegmentIds(q=q_ids, kv=kv_ids)
        one = lambda qq, kk, vv, sid: kernel(qq, kk, vv, segment_ids=sid)  # noqa: E731
        fn = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))
        out = fn(qh, kh_, vh_, ids)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n, h).astype(q.dtype)


def score_bytes(b: int, n: int, t: int, s: int) -> int:
    """Bytes of the float32 scores the reference path materialises (for planners)."""
    return int(math.prod((b, n, t, s, 4)))
