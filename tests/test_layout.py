"""``ppllava_jax/layout.py``: pooling windows, pooled grids and the any-resolution geometry.

The any-resolution functions are compared with transformers' LLaVA-NeXT code
(``select_best_resolution``, ``get_anyres_image_grid_shape``, ``unpad_image``,
``LlavaNextModel.pack_image_features``). One documented difference: the installed transformers
rounds the unpadded size (``int(round(x, 7))``) where 4.45, the version the released PPLLaVA and
the fixtures were made with, truncates (``int(x)``); layout follows 4.45, so the comparison runs
where both agree and the truncation is pinned separately.
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    get_anyres_image_grid_shape,
    unpad_image,
)

from ppllava_jax import layout

TILE = 336
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIZES = [(480, 640), (640, 480), (336, 336), (100, 1000), (1000, 100), (720, 1280), (55, 176)]
SIZES += [(h, w) for h, w in itertools.product((37, 300, 512, 999), (41, 333, 700, 1500))]


# -- pooling windows -------------------------------------------------------------------------


def test_window_arithmetic() -> None:
    assert layout.pool_windows((32, 24, 24), kernel=(2, 3, 3), stride=(2, 3, 3)) == (
        (2, 3, 3),
        (2, 3, 3),
        (16, 8, 8),
    )
    assert layout.pool_windows((7, 6, 6), kernel=(2, 2, 2), stride=(2, 2, 2))[2] == (3, 3, 3)
    # output size alone: stride = I // O, kernel = I - (O-1)*stride
    assert layout.pool_windows((6, 6, 6), output_size=(2, 3, 3)) == (
        (3, 2, 2),
        (3, 2, 2),
        (2, 3, 3),
    )
    assert layout.pool_windows((5, 5, 5), kernel=(3, 3, 3), output_size=(2, 2, 2))[1] == (2, 2, 2)
    # output and stride: kernel = I - (O-1)*stride; overlapping windows allowed
    assert layout.pool_windows((8, 24, 24), stride=(2, 4, 4), output_size=(3, 4, 4)) == (
        (4, 12, 12),
        (2, 4, 4),
        (3, 4, 4),
    )
    # one output along an axis with a kernel: the stride is the kernel
    assert layout.pool_windows((4, 6, 6), kernel=(4, 3, 3), output_size=(1, 2, 2))[1] == (4, 3, 3)
    # one int means all three axes
    assert layout.pool_windows(6, kernel=2, stride=2) == ((2, 2, 2), (2, 2, 2), (3, 3, 3))


@pytest.mark.parametrize("size", [1, 2, 5, 7, 12, 24])
def test_output_size_alone_gives_that_output(size: int) -> None:
    for out in range(1, size + 1):
        k, s, o = layout.pool_windows((size, size, size), output_size=(out, 1, size))
        assert o == (out, 1, size)
        for kk, ss, oo in zip(k, s, o):  # the windows cover the input exactly to its end
            assert (oo - 1) * ss + kk == size


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="along time.*larger than the input size 1"):
        layout.pool_windows((1, 24, 24), kernel=(2, 3, 3), stride=(2, 3, 3))
    with pytest.raises(ValueError, match="needs a kernel and stride, or an output size"):
        layout.pool_windows((4, 4, 4))
    with pytest.raises(ValueError, match="output size 5 along height is larger than the input"):
        layout.pool_windows((4, 4, 4), output_size=(1, 5, 1))
    with pytest.raises(ValueError, match="lower the stride or the output size"):
        layout.pool_windows((4, 4, 4), stride=(3, 1, 1), output_size=(3, 1, 1))
    with pytest.raises(ValueError, match="must be positive"):
        layout.pool_windows((4, 4, 4), kernel=(0, 1, 1), stride=(1, 1, 1))
    with pytest.raises(ValueError, match="3 entries"):
        layout.pool_windows((4, 4), kernel=2, stride=2)


@dataclasses.dataclass
class _Cfg:
    """The fields of ``PPLLaVAConfig`` that ``num_pooled`` reads."""

    pooling: str = "ppllava"
    frame_shape: tuple[int, int] = (24, 24)
    pllava_pooling_shape: tuple[int, int, int] | None = None
    video_ks: tuple = ((2, 3, 3), (2, 3, 3))
    image_ks: tuple = ((1, 3, 3), (1, 3, 3))

    def pool_kernel_stride(self, video: bool):
        return self.video_ks if video else self.image_ks


def test_num_pooled() -> None:
    cfg = _Cfg()
    assert layout.num_pooled(cfg, 32, True) == (16, 8, 8)
    assert layout.num_pooled(cfg, 5, True) == (2, 8, 8)  # the fifth frame fills no window
    assert layout.num_pooled(cfg, 5, False) == (5, 8, 8)  # image kernel: one view per output
    assert layout.num_pooled(_Cfg(video_ks=((4, 2, 2), (2, 2, 2))), 8, True) == (3, 12, 12)
    assert layout.num_pooled(_Cfg(pooling="none"), 4, True) == (4, 24, 24)
    assert layout.num_pooled(_Cfg(pooling="avp"), 4, True) == (1, 24, 24)
    assert layout.num_pooled(_Cfg(pooling="avp"), 4, False) == (4, 24, 24)
    shape = (4, 12, 12)
    assert layout.num_pooled(_Cfg(pooling="pllava", pllava_pooling_shape=shape), 16, True) == shape


# -- any-resolution geometry against transformers' LLaVA-NeXT --------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_best_resolution_and_grid_match_transformers(size) -> None:
    assert layout.select_best_resolution(size, PINPOINTS) == tuple(hf_best(size, PINPOINTS))
    assert layout.anyres_grid_shape(size, PINPOINTS, TILE) == tuple(
        get_anyres_image_grid_shape(list(size), PINPOINTS, TILE)
    )


def test_best_resolution_needs_pinpoints() -> None:
    with pytest.raises(ValueError, match="no image_grid_pinpoints"):
        layout.select_best_resolution((10, 10), [])


def _truncation_agrees(size, current) -> bool:
    """Whether transformers' rounding and 4.45's truncation give the same unpadded size."""
    (oh, ow), (ch, cw) = size, current
    v = oh * (cw / ow) if ow / oh > cw / ch else ow * (ch / oh)
    return int(v) == int(round(v, 7))


@pytest.mark.parametrize("current", [(48, 48), (24, 48), (48, 24), (72, 24), (24, 72), (16, 16)])
def test_unpad_slices_match_transformers(current) -> None:
    grid = torch.arange(current[0] * current[1]).reshape(1, *current)
    compared = 0
    for size in SIZES:
        if not _truncation_agrees(size, current):
            continue
        rs, cs = layout.unpad_slices(size, current)
        want = unpad_image(grid, list(size))[0].numpy()
        np.testing.assert_array_equal(grid[0].numpy()[rs, cs], want, err_msg=str(size))
        compared += 1
    assert compared >= len(SIZES) - 2


def test_unpad_truncates_as_transformers_4_45() -> None:
    # 55 * (48 / 176) = 14.999999999999998: 4.45 keeps 14 rows (pad 17), later versions 15 (16)
    assert not _truncation_agrees((55, 176), (48, 48))
    assert layout.unpad_slices((55, 176), (48, 48)) == (slice(17, 31), slice(0, 48))


def _hf_order(size, ph: int, views: int) -> np.ndarray:
    """transformers' ``pack_image_features`` applied to the token indices (embed dim 1, newline
    -1): the merged order of an image's base view, unpadded crop grid and newlines."""
    vision = SimpleNamespace(image_size=TILE, patch_size=TILE // ph)
    assert vision.image_size // vision.patch_size == ph
    fake = SimpleNamespace(
        config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=PINPOINTS)
    )
    feats = torch.arange(views * ph * ph, dtype=torch.float64).reshape(views, ph * ph, 1)
    out, lens = LlavaNextModel.pack_image_features(
        fake, [feats], torch.tensor([size]), "default", torch.tensor([-1.0], dtype=torch.float64)
    )
    assert int(lens[0]) == out[0].shape[0]
    return out[0][:, 0].numpy().astype(np.int64)


@pytest.mark.parametrize("ph", [3, 6, 8])
def test_token_order_matches_pack_image_features(ph: int) -> None:
    compared = 0
    for size in SIZES:
        rows, cols = layout.anyres_grid_shape(size, PINPOINTS, TILE)
        if not _truncation_agrees(size, (rows * ph, cols * ph)):
            continue
        got = layout.anyres_token_order(size, PINPOINTS, TILE, (ph, ph))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, _hf_order(size, ph, 1 + rows * cols), str(size))
        compared += 1
    assert compared >= len(SIZES) - 2


def test_token_order_of_one_view_and_view_count_check() -> None:
    order = layout.anyres_token_order((480, 640), PINPOINTS, TILE, (2, 3), num_views=1)
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 4, 5, layout.NEWLINE])
    one = layout.anyres_token_order((480, 640), PINPOINTS, TILE, (3, 3), num_views=1)
    np.testing.assert_array_equal(one, _hf_order((480, 640), 3, 1))
    with pytest.raises(ValueError, match=r"2x2 crop grid \(1 \+ 4 views\) but 3 views"):
        layout.anyres_token_order((640, 480), PINPOINTS, TILE, (2, 2), num_views=3)


def test_constants() -> None:
    assert layout.IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
    assert set(layout.FRAME_MASK) == set(layout.GROUPS)
    assert layout.NEWLINE < 0
