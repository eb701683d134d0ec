"""Host-side layout facts shared by ``data/`` and ``models/``: NumPy and plain Python only.

Everything here is decided before a batch reaches ``jit`` and is needed on both sides of it: the
visual groups and their frame-mask keys, the ignore index of labels, the ``image_newline``
marker, the pooling windows and pooled grid of a sample, and the any-resolution image geometry
of LLaVA-NeXT.

Pooling windows (SPEC section 3.5, the original's ``get_size``), per axis with input size I:

- kernel k and stride s given: output O = (I - k) // s + 1 (trailing elements that do not fill a
  window are dropped);
- output O only: s = I // O, k = I - (O - 1) * s;
- output O and stride s: k = I - (O - 1) * s;
- output O and kernel k: s = (I - k) // (O - 1) (any s when O = 1; we use s = k).

Any-resolution geometry: which pinpoint an image is resized to, its crop grid, which rows/cols
of the pooled crop grid survive unpadding (transformers 4.45's ``unpad_image``, the version the
released PPLLaVA and the fixtures were made with: plain ``int()`` truncation), and the order of an
image's merged tokens with its ``image_newline`` markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GROUPS = ("video", "image", "multi")
"""Visual groups of a batch, in the order their tokens are pooled and merged."""
FRAME_MASK = {"video": "video_frames", "image": "image_views", "multi": "multi_frames"}
"""Batch key of each group's ``bool[N, F]`` frame / view mask."""
IGNORE_INDEX = -100
"""Label of a position that is not supervised."""
NEWLINE = -1
"""Marks an ``image_newline`` token in a local token order."""

Triple = tuple[int, int, int]
_AXES = ("time", "height", "width")


def as_triple(v: Sequence[int] | int | None, what: str) -> Triple | None:
    """``v`` as (time, height, width): one int for all three, or three ints; None stays None."""
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
    inp = as_triple(input_size, "input_size")
    k, s, o = (
        as_triple(kernel, "kernel"),
        as_triple(stride, "stride"),
        as_triple(output_size, "output_size"),
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


def select_best_resolution(
    original_size: Sequence[int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps the most of an image of ``(height, width)``
    (ties: the least wasted area), as transformers' LLaVA-NeXT picks it."""
    oh, ow = (int(v) for v in original_size)
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in possible_resolutions:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError(f"no image_grid_pinpoints to choose from: {possible_resolutions!r}")
    return best


def anyres_grid_shape(
    image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile: int
) -> tuple[int, int]:
    """(rows, cols) of crops for an image of ``(height, width)``; ``tile`` = vision image_size."""
    h, w = select_best_resolution(image_size, grid_pinpoints)
    return h // tile, w // tile


def unpad_slices(original_size: Sequence[int], current: tuple[int, int]) -> tuple[slice, slice]:
    """Rows/cols of a ``current = (H, W)`` grid kept by transformers 4.45's ``unpad_image`` for
    an image of ``original_size = (height, width)`` (``int()`` truncation, as 4.45 does)."""
    oh, ow = (int(v) for v in original_size)
    ch, cw = current
    if ow / oh > cw / ch:
        new_h = int(oh * (cw / ow))
        pad = (ch - new_h) // 2
        return slice(pad, ch - pad), slice(0, cw)
    new_w = int(ow * (ch / oh))
    pad = (cw - new_w) // 2
    return slice(0, ch), slice(pad, cw - pad)


def anyres_token_order(
    image_size: Sequence[int],
    grid_pinpoints: Sequence[Sequence[int]],
    tile: int,
    pooled_hw: tuple[int, int],
    num_views: int | None = None,
) -> np.ndarray:
    """Host-side plan of an any-resolution image's merged tokens.

    ``image_size``: (height, width) of the original image; ``tile``: vision ``image_size``;
    ``pooled_hw``: per-view pooled grid ``(h', w')``; ``num_views``: views actually given (1 for
    a plain image, else ``1 + rows*cols``; checked).

    Returns ``int32[L]``: indices into the views' tokens flattened (view, row, col), ``-1`` for
    ``image_newline``. With crops: base view, then the unpadded crop grid row by row, each row
    followed by -1. A single view: its tokens, then one -1.
    """
    ph, pw = pooled_hw
    per = ph * pw
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile)
    if num_views is None:
        num_views = 1 + rows * cols
    if num_views == 1:
        return np.concatenate([np.arange(per), [-1]]).astype(np.int32)
    if num_views != 1 + rows * cols:
        raise ValueError(
            f"image of size {tuple(image_size)} has a {rows}x{cols} crop grid "
            f"(1 + {rows * cols} views) but {num_views} views were given"
        )
    r = np.arange(rows * ph)[:, None]
    c = np.arange(cols * pw)[None, :]
    view = 1 + (r // ph) * cols + (c // pw)
    grid = view * per + (r % ph) * pw + (c % pw)
    rs, cs = unpad_slices(image_size, grid.shape)
    grid = grid[rs, cs]
    grid = np.concatenate([grid, np.full((grid.shape[0], 1), -1)], axis=1)
    return np.concatenate([np.arange(per), grid.reshape(-1)]).astype(np.int32)


def num_pooled(cfg: Any, frames: int, video: bool) -> Triple:
    """Pooled grid ``(T', h', w')`` of a sample with ``frames`` frames/views.

    ``cfg``: a ``models.config.PPLLaVAConfig`` (read for ``pooling``, ``frame_shape``,
    ``pllava_pooling_shape`` and ``pool_kernel_stride``)."""
    if cfg.pooling != "ppllava":
        t = 1 if (cfg.pooling == "avp" and video) else frames
        if cfg.pooling == "pllava":
            return tuple(cfg.pllava_pooling_shape)  # type: ignore[return-value]
        return (t, *cfg.frame_shape)
    k, s = cfg.pool_kernel_stride(video)
    return pool_windows((frames, *cfg.frame_shape), kernel=k, stride=s)[2]
