"""Prompt-to-patch relevance as pictures.

The projector's ``visual_attention`` (raw cosine between the prompt encoder's text and every
patch, ``float32[T, h, w]`` per video) is normalised over the whole video (min -> 0, max -> 1
over the frames shown, so frames can be compared) and coloured with matplotlib's ``inferno``,
a perceptually uniform map (black -> purple -> orange -> pale yellow) drawn over a greyed
frame, so the relevance stands out from the picture's own colours.

- :func:`save_question_heatmap`: one PNG per question (``eval.py --save_attention``): the
  sampled frames in a grid, the relevance over each, one colour bar, and the question and the
  answer as a caption (drawn, and kept in the PNG's text chunks ``Id``, ``Question``,
  ``Answer``). Written atomically (a temporary name, then renamed).
- :func:`frame_overlays` / :func:`save_heatmaps`: one picture per frame (the web demo's
  gallery; ``ppllava_jax.chat --save-attention``).
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ppllava_jax.data.image import CLIP_MEAN, CLIP_STD

CMAP = "inferno"
# question pictures: inches per frame cell, colour bar column, caption line; pixels per inch
CELL, COLORBAR, LINE, DPI = 2.4, 1.0, 0.22, 100
MAX_COLUMNS = 4
ALPHA = 0.6  # weight of the colour over the greyed frame


def safe_name(name: str) -> str:
    """``name`` (e.g. a question id) as a file name: runs of other characters than letters,
    digits, ``.``, ``_`` and ``-`` become ``_``; at most 120 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def colormap(x: np.ndarray) -> np.ndarray:
    """float[...] in [0, 1] -> uint8[..., 3] through :data:`CMAP` (values outside clipped)."""
    from matplotlib import colormaps

    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    return (colormaps[CMAP](x)[..., :3] * 255.0).round().astype(np.uint8)


def denormalize(
    pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
    """Normalised float32[..., 3] (the model's input, ``data.image.normalize`` with the
    tower's ``pixel_stats``) -> uint8[..., 3] RGB."""
    x = np.asarray(pixels, np.float32) * np.asarray(std, np.float32)
    x = x + np.asarray(mean, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def normalise(relevance: np.ndarray) -> np.ndarray:
    """Min-max over the whole array (a constant map -> zeros)."""
    r = np.asarray(relevance, np.float32)
    lo, hi = float(r.min()), float(r.max())
    return (r - lo) / (hi - lo) if hi > lo else np.zeros_like(r)


def greyed(frame: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] -> float32[H, W] luminance in [0, 1], dimmed to [0.15, 0.85] so the colour
    over it reads at both ends."""
    lum = np.asarray(frame, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return 0.15 + 0.7 * lum / 255.0


def overlay(frame: np.ndarray, relevance01: np.ndarray, size: int | None = None) -> Image.Image:
    """One frame uint8[H, W, 3] greyed, with the colour of ``relevance01`` float[h, w] (in
    [0, 1], upsampled bilinearly) over it. ``size``: output width = height (default: the
    frame's size)."""
    img = Image.fromarray(np.asarray(frame, np.uint8))
    if size:
        img = img.resize((size, size), Image.BICUBIC)
    w, h = img.size
    heat = Image.fromarray((np.clip(relevance01, 0, 1) * 255).astype(np.uint8), mode="L")
    heat = np.asarray(heat.resize((w, h), Image.BILINEAR), np.float32) / 255.0
    grey = greyed(np.asarray(img))[..., None] * 255.0
    out = (1 - ALPHA) * grey + ALPHA * colormap(heat).astype(np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _shown(
    frames: np.ndarray, relevance: np.ndarray, valid: Sequence[bool] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the frames shown, their relevance normalised over them)."""
    rel = np.asarray(relevance, np.float32)
    t = min(len(frames), len(rel))
    keep = np.ones(t, bool) if valid is None else np.asarray(valid[:t], bool)
    idx = np.flatnonzero(keep)
    return idx, (normalise(rel[idx]) if len(idx) else rel[:0])


def frame_overlays(
    frames: np.ndarray, relevance: np.ndarray, *, size: int | None = None
) -> list[Image.Image]:
    """One heatmap picture per frame, in memory (the web demo's gallery).

    frames: uint8[T, H, W, 3]; relevance: float[T, h, w] (raw cosine, normalised over the whole
    video here). ``size``: output width = height."""
    idx, norm = _shown(frames, relevance, None)
    return [overlay(frames[i], n, size=size) for i, n in zip(idx, norm)]


def save_heatmaps(
    out_dir: str | os.PathLike,
    frames: np.ndarray,
    relevance: np.ndarray,
    *,
    size: int | None = None,
    caption: str | None = None,
    valid: Sequence[bool] | None = None,
) -> list[str]:
    """Write ``frame_{t:03d}.png`` for each frame; returns the paths.

    frames: uint8[T, H, W, 3] (``denormalize`` the model's pixels); relevance: float[T, h, w]
    (raw cosine; normalised over the video here). ``valid`` skips padded frames. ``caption``
    is written to ``prompt.txt`` beside the images.
    """
    os.makedirs(out_dir, exist_ok=True)
    idx, norm = _shown(frames, relevance, valid)
    paths = []
    for i, n in zip(idx, norm):
        p = os.path.join(os.fspath(out_dir), f"frame_{i:03d}.png")
        overlay(frames[i], n, size=size).save(p)
        paths.append(p)
    if caption is not None:
        with open(os.path.join(os.fspath(out_dir), "prompt.txt"), "w") as f:
            f.write(caption + "\n")
    return paths


def grid_shape(num_frames: int) -> tuple[int, int]:
    """(rows, columns) of a question picture's frame grid: at most :data:`MAX_COLUMNS` wide."""
    cols = max(1, min(int(num_frames), MAX_COLUMNS))
    return -(-max(int(num_frames), 1) // cols), cols


def caption_lines(question: str, answer: str, columns: int) -> list[str]:
    """The caption of a question picture ``columns`` frames wide, wrapped to its width."""
    # 9 pt monospace: ~13 characters per inch of the picture's width
    width = max(40, int((columns * CELL + COLORBAR - 0.2) * 13))
    lines: list[str] = []
    for head, text in (("Q: ", question), ("A: ", answer)):
        body = " ".join(str(text).split()) or "(none)"
        lines += textwrap.wrap(head + body, width, subsequent_indent="    ") or [head]
    return lines


def save_question_heatmap(
    path: str | os.PathLike,
    frames: np.ndarray,
    relevance: np.ndarray,
    *,
    question: str,
    answer: str,
    qid: str = "",
    valid: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """One picture of a question: its frames, the relevance over each, a colour bar, the
    question and the answer as a caption (module docstring). Written to ``path`` (PNG) through
    a temporary name.

    frames: uint8[T, H, W, 3]; relevance: float[T, h, w] (raw cosine; normalised over the
    frames shown); valid: bool[T], False for padded frames (not shown).
    Returns the layout in pixels of the saved image (origin top left): ``size`` (w, h),
    ``grid`` (rows, columns), ``frames`` [(t, (x0, y0, x1, y1))...], ``colorbar`` (x0, y0,
    x1, y1), ``caption`` (the lines drawn)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    idx, norm = _shown(frames, relevance, valid)
    rows, cols = grid_shape(len(idx))
    lines = caption_lines(question, answer, cols)
    cap_h = LINE * (len(lines) + 1)
    fw, fh = cols * CELL + COLORBAR, rows * CELL + cap_h
    fig = Figure(figsize=(fw, fh), dpi=DPI)
    FigureCanvasAgg(fig)

    def box(x: float, y: float, w: float, h: float) -> tuple[int, ...]:
        """inches from the bottom left -> pixels from the top left."""
        return tuple(round(v * DPI) for v in (x, fh - y - h, x + w, fh - y))

    pad = 0.08
    boxes = []
    for k, (t, rel) in enumerate(zip(idx, norm)):
        r, c = divmod(k, cols)
        # a square cell: the frame, its title above (0.25 in)
        x, y, w, h = c * CELL + pad, fh - (r + 1) * CELL + pad, CELL - 2 * pad, CELL - 0.25 - pad
        ax = fig.add_axes((x / fw, y / fh, w / fw, h / fh))
        f = frames[t]
        ext = (-0.5, f.shape[1] - 0.5, f.shape[0] - 0.5, -0.5)
        ax.imshow(greyed(f), cmap="gray", vmin=0.0, vmax=1.0, extent=ext)
        ax.imshow(rel, cmap=CMAP, norm=Normalize(0, 1), alpha=ALPHA, extent=ext,
                  interpolation="bilinear")  # fmt: skip
        ax.set_axis_off()
        ax.set_title(f"frame {t}", fontsize=8, pad=2)
        boxes.append((int(t), box(x, y, w, h)))
    cx, cy, cw, ch = cols * CELL + 0.25, fh - rows * CELL + 0.3, 0.2, rows * CELL - 0.6
    cax = fig.add_axes((cx / fw, cy / fh, cw / fw, ch / fh))
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[CMAP]), cax=cax)
    bar.set_label("relevance (min-max over the frames)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.text(0.1 / fw, (cap_h - LINE * 0.6) / fh, "\n".join(lines), fontsize=9, va="top",
             ha="left", family="monospace", parse_math=False)  # fmt: skip
    meta = {"Id": qid, "Question": question, "Answer": answer, "Software": "ppllava_jax"}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white", metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {
        "path": path,
        "size": (round(fw * DPI), round(fh * DPI)),
        "grid": (rows, cols),
        "frames": boxes,
        "colorbar": box(cx, cy, cw, ch),
        "caption": lines,
    }
