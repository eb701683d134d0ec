"""Weighted 3D pooling over (time, rows, cols): the pooling step of the prompt-guided projector.

Pure functions, no Flax. Channels-last: ``x`` is ``float[N, T, H, W, C]``.

Window arithmetic: ``layout.pool_windows`` (SPEC section 3.5, the original's ``get_size``).

Pooling: in each window, ``w = softmax(weights[window] / temperature)`` (float32), output
``sum(w * x[window])``; without weights a plain average. Windows may overlap (s < k) or leave a
remainder (non-tiling).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.layout import as_triple, pool_windows
from ppllava_jax.models.layers import widen_f16_on_cpu

Array = jax.Array


def _windows(x: Array, axis: int, k: int, s: int, o: int) -> Array:
    """Split ``axis`` of ``x`` into ``(o, k)`` windows (two axes). Tiling windows are a reshape;
    overlapping or gapped ones a static gather."""
    if k == s:
        x = jax.lax.slice_in_dim(x, 0, o * k, axis=axis)
        return x.reshape(*x.shape[:axis], o, k, *x.shape[axis + 1 :])
    idx = np.arange(o)[:, None] * s + np.arange(k)[None, :]
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def weighted_pool3d(
    x: Array,
    weights: Array | None,
    kernel: Sequence[int],
    stride: Sequence[int],
    temperature: float = 0.01,
) -> Array:
    """Weighted 3D pooling.

    Args:
      x: ``float[N, T, H, W, C]``.
      weights: ``float[N, T, H, W]`` or None (plain average).
      kernel, stride: 3 ints each (time, height, width); see ``pool_windows``.
      temperature: the window softmax is ``softmax(weights / temperature)``.
    Returns:
      ``float[N, T', H', W', C]`` in x's dtype, ``T' = (T - kt) // st + 1`` etc.
    """
    n, t, h, w, c = x.shape
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = pool_windows((t, h, w), kernel=kernel, stride=stride)
    # [N, ot, kt, oh, kh, ow, kw, C]
    xw = _windows(_windows(_windows(x, 1, kt, st, ot), 3, kh, sh, oh), 5, kw, sw, ow)
    if weights is None:
        out = jnp.mean(xw.astype(jnp.float32), axis=(2, 4, 6))
        return out.astype(x.dtype)
    if weights.shape != (n, t, h, w):
        raise ValueError(f"weights shape {weights.shape} does not match x {x.shape[:4]}")
    ww = _windows(_windows(_windows(weights, 1, kt, st, ot), 3, kh, sh, oh), 5, kw, sw, ow)
    ww = ww.astype(jnp.float32)
    # A true division, as PyTorch does it: XLA rewrites division by a (broadcast) scalar into a
    # multiplication by its reciprocal, which is off by an ulp and, at temperature 0.01, moves the
    # window softmax by ~1e-5. The barrier hides the constant from that rewrite.
    ww = ww / jax.lax.optimization_barrier(jnp.full(ww.shape, temperature, jnp.float32))
    ww = ww.transpose(0, 1, 3, 5, 2, 4, 6).reshape(n, ot, oh, ow, kt * kh * kw)
    p = jax.nn.softmax(ww, axis=-1).reshape(n, ot, oh, ow, kt, kh, kw)
    out = jnp.einsum(
        "nabcijk,naibjckd->nabcd",
        *widen_f16_on_cpu(p.astype(x.dtype), xw),
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(x.dtype)


def adaptive_avg_pool3d(x: Array, output_size: Sequence[int]) -> Array:
    """``torch.nn.AdaptiveAvgPool3d`` on channels-last ``x[N, T, H, W, C]``: output cell ``i``
    along an axis of size I averages ``[floor(i*I/O), ceil((i+1)*I/O))``. Used by the ``pllava``
    pooling mode. Built from static averaging matrices (one einsum per axis)."""
    _, t, h, w, _ = x.shape
    o = as_triple(output_size, "output_size")
    assert o is not None
    mats = [jnp.asarray(_adaptive_matrix(i, oo)) for i, oo in zip((t, h, w), o)]
    xf = x.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    xf = jnp.einsum("nthwc,at->nahwc", xf, mats[0], precision=hp)
    xf = jnp.einsum("nahwc,bh->nabwc", xf, mats[1], precision=hp)
    xf = jnp.einsum("nabwc,dw->nabdc", xf, mats[2], precision=hp)
    return xf.astype(x.dtype)


def _adaptive_matrix(i: int, o: int) -> np.ndarray:
    m = np.zeros((o, i), np.float32)
    for a in range(o):
        lo, hi = (a * i) // o, -((-(a + 1) * i) // o)
        m[a, lo:hi] = 1.0 / (hi - lo)
    return m
