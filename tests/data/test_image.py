"""CLIP frame preprocessing and LLaVA-NeXT any-resolution, against transformers' processors."""

import warnings

import numpy as np
import pytest

from ppllava_jax.data import image as I
from ppllava_jax.data.errors import MediaError
from ppllava_jax.layout import anyres_grid_shape

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

S = 24
PINS = [[24, 48], [48, 24], [48, 48], [72, 24], [24, 72]]


@pytest.mark.parametrize(
    "hw", [(24, 24), (40, 44), (17, 90), (100, 31), (50, 50), (13, 7), (300, 200)]
)
def test_anyres_equals_transformers(hw):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_grid_pinpoints=PINS
    )
    ref = proc(images=[image], return_tensors="np")
    ours = I.preprocess_anyres(image, S, PINS)
    expected = ref["pixel_values"][0].transpose(0, 2, 3, 1)
    assert ours.pixel_values.shape == expected.shape and ours.pixel_values.dtype == np.float32
    np.testing.assert_allclose(ours.pixel_values, expected, atol=1e-5)
    assert ours.image_size == tuple(ref["image_sizes"][0])
    rows, cols = ours.grid
    assert 1 + rows * cols == len(expected)
    assert (rows, cols) == anyres_grid_shape(hw, PINS, S)


def test_select_best_resolution_matches():
    from transformers.image_processing_utils import select_best_resolution

    for hw in [(10, 10), (336, 1000), (1000, 336), (700, 640), (5, 3000)]:
        assert I.select_best_resolution(hw, I.DEFAULT_PINPOINTS) == tuple(
            select_best_resolution(hw, [list(p) for p in I.DEFAULT_PINPOINTS])
        )


def test_preprocess_frames_squash_and_normalize():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 20, 50, 3), dtype=np.uint8)
    out = I.preprocess_frames(frames, size=S)
    assert out.shape == (3, S, S, 3) and out.dtype == np.float32
    # squash = the any-res base view (a plain S x S bicubic resize), same normalization
    for f, o in zip(frames, out):
        np.testing.assert_allclose(o, I.preprocess_anyres(f, S, PINS).pixel_values[0], atol=1e-6)
    flat = np.full((1, S, S, 3), 255, np.uint8)
    np.testing.assert_allclose(
        I.preprocess_frames(flat, S)[0, 0, 0],
        (1 - np.array(I.CLIP_MEAN)) / np.array(I.CLIP_STD),
        rtol=1e-6,
    )


def test_load_image_errors(tmp_path):
    from PIL import Image

    p = tmp_path / "a.png"
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(p)  # grey -> RGB
    assert I.load_image(p).shape == (5, 6, 3)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    for path in (bad, tmp_path / "missing.png"):
        with pytest.raises(MediaError, match=str(path)):
            I.load_image(path)


def test_pixel_stats_match_each_towers_image_processor():
    """Each family normalises with its own tower's processor constants (transformers' defaults)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    for qwen, proc in ((False, CLIPImageProcessor()), (True, SiglipImageProcessor())):
        mean, std = I.pixel_stats(qwen)
        np.testing.assert_allclose(mean, proc.image_mean, rtol=0, atol=1e-7)
        np.testing.assert_allclose(std, proc.image_std, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ the Qwen family's frames
# (tests/evaluate/protocol_qwen/video_processor_cases.py compares with the original's processor)

FIT_PAD_SHAPES = [(24, 24), (7, 30), (30, 7), (10, 16), (16, 10), (9, 24), (100, 60), (5, 3)]


def _onevision(size: int):
    """transformers' LLaVA-OneVision image processor (PIL backend) whose only grid is S x S:
    its views are [the frame squashed, the frame resized to fit and padded]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

    mean, std = I.pixel_stats(True)
    return LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_grid_pinpoints=[[size, size]],
        image_mean=list(mean),
        image_std=list(std),
    )


@pytest.mark.parametrize("hw", FIT_PAD_SHAPES)
def test_fit_pad_frame_equals_onevision_views(hw):
    """Even differences: the fitted, padded view of transformers' processor. Odd ones: the
    original (transformers 4.45) pads (S - side) // 2 on both sides and its ``_preprocess``
    stretches the S - 1 result to S; transformers' own resize of its resized view, padded so,
    then stretched, is the reference (transformers today pads the odd row on one side)."""
    from transformers.image_utils import SizeDict

    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    frame = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    proc = _onevision(S)
    ours = I.normalize(I.tower_frames(frame[None], S, qwen=True), *I.pixel_stats(True))[0]
    views = proc(images=[frame], return_tensors="np")["pixel_values"][0]
    assert views.shape == (2, 3, S, S) and ours.shape == (S, S, 3) and ours.dtype == np.float32
    squashed = I.normalize(I.tower_frames(frame[None], S, qwen=False), *I.pixel_stats(True))[0]
    np.testing.assert_allclose(squashed, views[0].transpose(1, 2, 0), rtol=0, atol=1e-6)
    g = I.fit_pad_geometry(hw, S)
    if not g.stretched:
        np.testing.assert_allclose(ours, views[1].transpose(1, 2, 0), rtol=0, atol=1e-6)
        return
    resized = proc._resize_for_patching(frame.transpose(2, 0, 1), (S, S), proc.resample)
    assert resized.shape[1:] == g.resized_hw
    py, px = (S - resized.shape[1]) // 2, (S - resized.shape[2]) // 2
    assert (py, px) == (g.pad_rows, g.pad_cols) and g.padded_hw != (S, S)
    padded = np.pad(resized, ((0, 0), (py, py), (px, px)))
    stretched = proc.resize(padded, SizeDict(height=S, width=S), proc.resample)
    expected = I.normalize(np.asarray(stretched).transpose(1, 2, 0), *I.pixel_stats(True))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert np.abs(ours - views[1].transpose(1, 2, 0)).max() > 1e-3  # not today's one-sided pad


def test_tower_frames_picks_the_family_rule_and_keeps_lists():
    """Vicuna squashes, Qwen fits and pads; differently sized images (multi-image) each."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((8, 20), (30, 12))]
    squash, fit = I.tower_frames(images, S, qwen=False), I.tower_frames(images, S, qwen=True)
    assert squash.shape == fit.shape == (2, S, S, 3) and fit.dtype == np.uint8
    np.testing.assert_array_equal(squash, I.resize_frames(images, S))
    for i, image in enumerate(images):
        np.testing.assert_array_equal(fit[i], I.fit_pad_frame(image, S))
        g = I.fit_pad_geometry(image.shape[:2], S)
        assert (fit[i, : g.pad_rows] == 0).all() and (fit[i, :, : g.pad_cols] == 0).all()
    with pytest.raises(ValueError, match="H, W, 3"):
        I.fit_pad_frame(np.zeros((4, 4), np.uint8), S)
