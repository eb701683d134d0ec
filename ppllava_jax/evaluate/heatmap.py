"""Prompt-to-patch relevance as pictures: a colour heatmap over each sampled frame (Pillow).

The projector's ``visual_attention`` (raw cosine between the CLIP prompt and every patch,
``float32[T, h, w]`` per video) is normalised over the whole video (min -> 0, max -> 1, so
frames can be compared), coloured with a perceptual ramp (dark blue -> red -> yellow),
upsampled bilinearly to the frame size and blended over the frame. One PNG per frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ppllava_jax.data.image import CLIP_MEAN, CLIP_STD

# (position, r, g, b): an "inferno"-like ramp
_RAMP = np.array(
    [
        (0.00, 0, 0, 4),
        (0.15, 31, 12, 72),
        (0.30, 85, 15, 109),
        (0.45, 136, 34, 106),
        (0.60, 186, 54, 85),
        (0.75, 227, 89, 51),
        (0.88, 249, 140, 10),
        (1.00, 252, 255, 164),
    ],
    np.float32,
)


def colormap(x: np.ndarray) -> np.ndarray:
    """float[...] in [0, 1] -> uint8[..., 3] (values outside are clipped)."""
    x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    chans = [np.interp(x, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)]
    return np.stack(chans, axis=-1).round().astype(np.uint8)


def denormalize(pixels: np.ndarray) -> np.ndarray:
    """CLIP-normalised float32[..., 3] (the model's input) -> uint8[..., 3] RGB."""
    x = np.asarray(pixels, np.float32) * np.asarray(CLIP_STD, np.float32)
    x = x + np.asarray(CLIP_MEAN, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def normalise(relevance: np.ndarray) -> np.ndarray:
    """Min-max over the whole array (a constant map -> zeros)."""
    r = np.asarray(relevance, np.float32)
    lo, hi = float(r.min()), float(r.max())
    return (r - lo) / (hi - lo) if hi > lo else np.zeros_like(r)


def overlay(
    frame: np.ndarray, relevance01: np.ndarray, alpha: float = 0.55, size: int | None = None
) -> Image.Image:
    """One frame uint8[H, W, 3] with the heatmap of ``relevance01`` float[h, w] (in [0, 1])
    over it. ``size``: output width = height (default: the frame's size)."""
    img = Image.fromarray(np.asarray(frame, np.uint8))
    if size:
        img = img.resize((size, size), Image.BICUBIC)
    w, h = img.size
    heat = Image.fromarray((np.clip(relevance01, 0, 1) * 255).astype(np.uint8), mode="L")
    heat = np.asarray(heat.resize((w, h), Image.BILINEAR), np.float32) / 255.0
    colour = colormap(heat).astype(np.float32)
    a = alpha * (0.35 + 0.65 * heat[..., None])  # stronger where relevance is high
    out = (1 - a) * np.asarray(img, np.float32) + a * colour
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def frame_overlays(
    frames: np.ndarray, relevance: np.ndarray, *, size: int | None = None
) -> list[Image.Image]:
    """One heatmap picture per frame, in memory (the web demo's gallery).

    frames: uint8[T, H, W, 3]; relevance: float[T, h, w] (raw cosine, normalised over the whole
    video here, as :func:`save_heatmaps` does). ``size``: output width = height."""
    rel = np.asarray(relevance, np.float32)
    t = min(len(frames), len(rel))
    norm = normalise(rel[:t]) if t else rel[:0]
    return [overlay(frames[i], norm[i], size=size) for i in range(t)]


def save_heatmaps(
    out_dir: str | os.PathLike,
    frames: np.ndarray,
    relevance: np.ndarray,
    *,
    prefix: str = "frame",
    size: int | None = None,
    caption: str | None = None,
    valid: Sequence[bool] | None = None,
) -> list[str]:
    """Write ``{prefix}_{t:03d}.png`` for each frame; returns the paths.

    frames: uint8[T, H, W, 3] (``denormalize`` the model's pixels) ; relevance: float[T, h, w]
    (raw cosine; normalised over the video here). ``valid`` skips padded frames. ``caption``
    is written to ``prompt.txt`` beside the images.
    """
    os.makedirs(out_dir, exist_ok=True)
    rel = np.asarray(relevance, np.float32)
    t = min(len(frames), len(rel))
    keep = np.ones(t, bool) if valid is None else np.asarray(valid[:t], bool)
    norm = np.zeros_like(rel[:t])
    if keep.any():
        norm[keep] = normalise(rel[:t][keep])
    paths = []
    for i in np.flatnonzero(keep):
        p = os.path.join(os.fspath(out_dir), f"{prefix}_{i:03d}.png")
        overlay(frames[i], norm[i], size=size).save(p)
        paths.append(p)
    if caption is not None:
        with open(os.path.join(os.fspath(out_dir), "prompt.txt"), "w") as f:
            f.write(caption + "\n")
    return paths


def contact_sheet(paths: Sequence[str], out: str | os.PathLike, columns: int = 4) -> str:
    """All frames' heatmaps side by side in one PNG (for the README)."""
    ims = [Image.open(p).convert("RGB") for p in paths]
    if not ims:
        raise ValueError("no images")
    w, h = ims[0].size
    rows = -(-len(ims) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(ims):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    sheet.save(out)
    return os.fspath(out)
