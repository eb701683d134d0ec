"""Weighted 3D pooling over (time, rows, cols): the pooling step of the prompt-guided projector.

Pure functions, no Flax. Channels-last: ``x`` is ``float[N, T, H, W, C]``.

Window arithmetic (SPEC section 3.5, the original's ``get_size``), per axis with input size I:

- kernel k and stride s given: output O = (I - k) // s + 1 (trailing elements that do not fill a
  window are dropped);
- output O only: s = I // O, k = I - (O - 1) * s;
- output O and stride s: k = I - (O - 1) * s;
- output O and kernel k: s = (I - k) // (O - 1) (any s when O = 1; we use s = k).

Pooling: in each window, ``w = softmax(weights[window] / temperature)`` (float32), output
``sum(w * x[window])``; without weights a plain average. Windows may overlap (s < k) or leave a
remainder (non-tiling).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Triple = tuple[int, int, int]
_AXES = ("time", "height", "width")


def _triple(v: Sequence[int] | int | None, what: str) -> Triple | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{what} must have 3 entries (time, height, width), got {v!r}")
    return t  # type: ignore[return-value]


def pool_windows(
    input_size: Sequence[int],
    *,
    kernel: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    output_size: Sequence[int] | None = None,
) -> tuple[Triple, Triple, Triple]:
    """Resolve the pooling windows for an input of size ``(T, H, W)``.

    Any two of kernel / stride / output_size (or output_size alone) determine the third; see the
    module docstring. Returns ``(kernel, stride, output_size)``, each a tuple of 3 ints; the output
    size is always the one the windows actually produce, ``(I - k) // s + 1``.
    """
    inp = _triple(input_size, "input_size")
    k, s, o = (
        _triple(kernel, "kernel"),
        _triple(stride, "stride"),
        _triple(output_size, "output_size"),
    )
    assert inp is not None
    if k is None and s is None:
        if o is None:
            raise ValueError("pooling needs a kernel and stride, or an output size")
        _check_positive(o, "output_size")
        s = tuple(i // oo for i, oo in zip(inp, o))
        for a, (i, oo) in enumerate(zip(inp, o)):
            if oo > i:
                raise ValueError(
                    f"pooling output size {oo} along {_AXES[a]} is larger than the input ({i}); "
                    f"ask for an output size <= {i} along that axis"
                )
        k = tuple(i - (oo - 1) * ss for i, oo, ss in zip(inp, o, s))
    elif k is None:
        if o is None:
            raise ValueError(f"pooling with stride {s} needs a kernel or an output size")
        _check_positive(o, "output_size")
        k = tuple(i - (oo - 1) * ss for i, oo, ss in zip(inp, o, s))
        for a, kk in enumerate(k):
            if kk <= 0:
                raise ValueError(
                    f"pooling output size {o[a]} with stride {s[a]} along {_AXES[a]} needs more "
                    f"than the {inp[a]} input elements; lower the stride or the output size"
                )
    elif s is None:
        if o is None:
            raise ValueError(f"pooling with kernel {k} needs a stride or an output size")
        _check_positive(o, "output_size")
        s = tuple((i - kk) // (oo - 1) if oo > 1 else max(kk, 1) for i, kk, oo in zip(inp, k, o))
        for a, ss in enumerate(s):
            if ss <= 0:
                raise ValueError(
                    f"pooling kernel {k[a]} cannot give {o[a]} outputs from {inp[a]} inputs along "
                    f"{_AXES[a]}; use a smaller kernel or output size"
                )
    _check_positive(k, "kernel")
    _check_positive(s, "stride")
    for a, (i, kk) in enumerate(zip(inp, k)):
        if kk > i:
            raise ValueError(
                f"pooling kernel {kk} along {_AXES[a]} is larger than the input size {i}; use a "
                f"kernel <= {i} along that axis (e.g. fewer frames per window, or more frames)"
            )
    out = tuple((i - kk) // ss + 1 for i, kk, ss in zip(inp, k, s))
    return k, s, out  # type: ignore[return-value]


def _check_positive(v: Triple, what: str) -> None:
    if any(a <= 0 for a in v):
        raise ValueError(f"pooling {what} must be positive along every axis, got {v}")


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
        p.astype(x.dtype),
        xw,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(x.dtype)


def adaptive_avg_pool3d(x: Array, output_size: Sequence[int]) -> Array:
    """``torch.nn.AdaptiveAvgPool3d`` on channels-last ``x[N, T, H, W, C]``: output cell ``i``
    along an axis of size I averages ``[floor(i*I/O), ceil((i+1)*I/O))``. Used by the ``pllava``
    pooling mode. Built from static averaging matrices (one einsum per axis)."""
    _, t, h, w, _ = x.shape
    o = _triple(output_size, "output_size")
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
