"""Scaled dot-product attention and its implementations (``cfg.attention_impl``).

Every tower of the project (CLIP vision and causal text, the BT-Adapter, LLaMA/Qwen2 with GQA,
padding masks and the KV cache, SigLIP) calls ``dot_product_attention`` below; the
implementations compute the same function:

- ``xla``: ``jax.nn.dot_product_attention(implementation='xla')``, the reference. Materialises
  float32 scores ``[B, N, T, S]`` (and the backward keeps the probabilities).
- ``blockwise``: online-softmax attention in pure JAX with a custom VJP, O(S) memory
  (``models/blockwise.py``).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``, NVIDIA flash attention
  (bf16/fp16 inputs, head dim <= 128 and a multiple of 8; JAX raises otherwise), at any length
  and with any mask (``cudnn_attention``: the kernel's backward takes only even lengths, its
  mask only the full ``[., ., T, S]`` shape).
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

import jax
import jax.numpy as jnp

from ppllava_jax.models.blockwise import blockwise_attention
from ppllava_jax.models.layers import widen_f16_on_cpu

Array = jax.Array

IMPLS = ("xla", "blockwise", "cudnn", "splash", "auto")
"""Values of ``attention_impl`` (model configs' runtime field)."""

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
        ``blockwise.default_blocks`` (at most 512, one float32 score tile <= 32 MiB).
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
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
    dtype = q.dtype
    q, k, v = widen_f16_on_cpu(q, k, v)  # the reference's float32 scores of float16 inputs
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=impl
    )
    return out.astype(dtype)


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


# -- cuDNN flash attention (NVIDIA) ---------------------------------------------------------------


def cudnn_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str = "cudnn",
) -> Array:
    """cuDNN's fused attention at any sequence length and with any mask (shapes as
    ``dot_product_attention``; ``mask`` 4-d, broadcastable to ``[B, N, T, S]``).

    JAX's cuDNN kernel trains only even query and key lengths (``Unsupported sequence length``:
    577 CLIP tokens, one decoded token) and takes a mask only with the full query and key
    lengths (a key mask ``[B, 1, 1, S]`` fails). So an odd ``T`` gets one zero query row (its
    output sliced off, its mask row that of a query seeing every real key), an odd ``S`` one zero
    key that nothing sees (masked out, or without a mask by the kernel's own padding,
    ``key_value_seq_lengths``), and the mask is broadcast to ``[B|1, N|1, T, S]``. Each real
    query attends to exactly its keys: same outputs and gradients. A query row that sees no
    key at all (left padding) is given every key (not the reference's uniform average: such
    rows are never read, and no row of the kernel is then fully masked). ``implementation='xla'``
    runs the same padding through the reference kernel (how the CPU tests check it)."""
    b, t, n, h = q.shape
    s = k.shape[1]
    pt, ps = t % 2, s % 2
    q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0))) if pt else q
    if ps:
        k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
    lengths = {}
    if mask is not None:
        mask = jnp.broadcast_to(mask.astype(bool), (*mask.shape[:2], t, s))
        if is_causal:
            mask, is_causal = mask & jnp.tril(jnp.ones((t, s), bool)), False
        # a row that sees no key (left padding) sees every key: the kernel's masked scores are
        # never all of a row, and that row's output is never read
        mask = mask | ~jnp.any(mask, -1, keepdims=True)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pt), (0, 0)), constant_values=True)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, ps)), constant_values=False)
    elif ps:
        lengths = dict(
            query_seq_lengths=jnp.full((b,), t + pt, jnp.int32),
            key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
        )
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        implementation=implementation,
        **lengths,
    )
    return out[:, :t] if pt else out


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
