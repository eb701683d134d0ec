"""Any-resolution image geometry (LLaVA-NeXT), host side, NumPy only.

One copy of the rules every part of the project uses: which pinpoint an image is resized to,
its crop grid, which rows/cols of the pooled crop grid survive unpadding (transformers 4.45's
``unpad_image``, the version the released PPLLaVA and the fixtures were made with: plain ``int()``
truncation), and the order of an image's merged tokens with its ``image_newline`` markers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
