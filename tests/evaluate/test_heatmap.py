"""``evaluate/heatmap.py``: the relevance pictures (colours, sizes, captions, file names)."""

import os

import numpy as np
from PIL import Image

from ppllava_jax.evaluate import heatmap


def test_heatmap_png(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    rel = np.zeros((3, 4, 4), np.float32)
    rel[1, 0, 0] = 1.0
    paths = heatmap.save_heatmaps(tmp_path, frames, rel, caption="where?")
    assert [os.path.basename(p) for p in paths] == [f"frame_{i:03d}.png" for i in range(3)]
    im = np.asarray(Image.open(paths[1]))
    assert im.shape == (48, 48, 3)
    assert (tmp_path / "prompt.txt").read_text().strip() == "where?"
    assert heatmap.save_heatmaps(tmp_path / "big", frames, rel, size=96)
    assert Image.open(tmp_path / "big" / "frame_000.png").size == (96, 96)
    lo, hi = heatmap.colormap(np.array([0.0, 1.0]))
    assert lo.sum() < 20 and hi.sum() > 600
    px = heatmap.denormalize(
        (np.zeros((1, 1, 3)) - np.array(heatmap.CLIP_MEAN)) / np.array(heatmap.CLIP_STD)
    )
    assert px.max() == 0


def test_safe_name():
    assert heatmap.safe_name("action_sequence:12") == "action_sequence_12"
    assert heatmap.safe_name("a/b c..d-e") == "a_b_c..d-e"
    assert len(heatmap.safe_name("x" * 300)) == 120


def _clip(frames=8, size=32, seed=0):
    """Grey-ish frames with a saturated red square (content colour the map must not hide)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(60, 200, (frames, size, size, 3), dtype=np.uint8)
    x[:, 8:16, 8:16] = (255, 0, 0)
    return x


def test_colours_are_inferno_over_a_greyed_frame():
    from matplotlib import colormaps

    want = (colormaps["inferno"](np.linspace(0, 1, 5))[:, :3] * 255).round()
    np.testing.assert_array_equal(heatmap.colormap(np.linspace(0, 1, 5)), want)
    frame = _clip(1)[0]
    rel = np.zeros((4, 4), np.float32)
    rel[0, 0] = 1.0  # the top-left patch relevant, the rest not
    out = np.asarray(heatmap.overlay(frame, rel), np.float32)
    top, rest = out[:4, :4].mean((0, 1)), out[-6:, -6:].mean((0, 1))
    assert top.sum() > rest.sum() + 150  # bright yellow where relevant, dark elsewhere
    # the red square is greyed: no pure red left
    sq = out[9:15, 9:15]
    assert np.abs(sq[..., 0] - sq[..., 1]).max() < 130 and sq[..., 0].max() < 230


def test_question_picture(tmp_path):
    frames, rng = _clip(8), np.random.default_rng(1)
    rel = rng.normal(size=(8, 4, 4)).astype(np.float32)
    path = tmp_path / "pics" / "eval_3.png"
    info = heatmap.save_question_heatmap(
        path, frames, rel, question="What colour is the square?", answer="red", qid="eval:3"
    )
    assert os.listdir(tmp_path / "pics") == ["eval_3.png"]  # no temporary file left
    im = Image.open(path)
    # 8 frames: a 2 x 4 grid; the width: 4 cells and the colour bar column
    assert info["grid"] == (2, 4) and [t for t, _ in info["frames"]] == list(range(8))
    assert im.size == info["size"]
    assert im.size[0] == round((4 * heatmap.CELL + heatmap.COLORBAR) * heatmap.DPI)
    assert im.size[1] > 2 * heatmap.CELL * heatmap.DPI  # two rows and the caption
    # the caption: drawn (its lines) and in the PNG's text chunks
    assert info["caption"] == ["Q: What colour is the square?", "A: red"]
    assert im.text["Question"] == "What colour is the square?" and im.text["Answer"] == "red"
    assert im.text["Id"] == "eval:3"
    px = np.asarray(im.convert("RGB"), np.float32)
    # the colour bar: inferno from black (bottom) to pale yellow (top)
    x0, y0, x1, y1 = info["colorbar"]
    col = px[y0 + 2 : y1 - 2, (x0 + x1) // 2]
    lum = col.sum(-1)
    assert lum[0] > 600 and lum[-1] < 40  # top pale yellow, bottom near black
    assert np.all(np.diff(lum[:: max(1, len(lum) // 20)]) <= 1)  # darker going down
    # each frame cell holds a picture (not the white page); the caption strip has dark text
    for _, (a, b, c, d) in info["frames"]:
        assert px[b:d, a:c].std() > 10 and px[b:d, a:c].mean() < 230
    caption = px[2 * int(heatmap.CELL * heatmap.DPI) :, : im.size[0] // 2]
    assert caption.min() < 100 and np.median(caption) > 240


def test_question_picture_leaves_padded_frames_out(tmp_path):
    frames = _clip(4)
    rel = np.random.default_rng(2).normal(size=(4, 4, 4)).astype(np.float32)
    valid = [True, True, True, False]
    info = heatmap.save_question_heatmap(
        tmp_path / "q.png", frames, rel, question="Which?", answer="", valid=valid
    )
    assert info["grid"] == (1, 3) and [t for t, _ in info["frames"]] == [0, 1, 2]
    assert info["caption"] == ["Q: Which?", "A: (none)"]
    assert Image.open(tmp_path / "q.png").size == info["size"]


def test_long_captions_wrap_to_the_picture():
    lines = heatmap.caption_lines("why " * 80, "because " * 50, columns=2)
    width = max(len(x) for x in lines)
    assert len(lines) > 4 and width <= int((2 * heatmap.CELL + heatmap.COLORBAR - 0.2) * 13)
    assert lines[0].startswith("Q: why") and any(x.startswith("A: because") for x in lines)
    assert heatmap.grid_shape(1) == (1, 1) and heatmap.grid_shape(9) == (3, 4)
