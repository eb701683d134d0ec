"""Image loading and CLIP / LLaVA-NeXT / LLaVA-OneVision preprocessing (host side, numpy +
Pillow).

The preprocessors (SPEC §1), all channels-last:

- :func:`preprocess_frames`: each frame squashed (no crop) to S x S, bicubic, scaled to
  [0, 1], normalized with the CLIP mean/std -> float32[T, S, S, 3]. Used for the Vicuna
  family's video frames and for each image of its multi-image samples.
- :func:`fit_pad_frames`: the Qwen family's video frames (and multi-image images), as the
  original's ``LlavaOnevisionVidProcessor``: each frame resized into S x S keeping its aspect
  ratio, padded black on both sides, one S x S view per frame -> uint8[T, S, S, 3].
  :func:`tower_frames` picks the family's rule (``PPLLaVAConfig.qwen``).
- :func:`preprocess_anyres`: LLaVA-NeXT any-resolution, numerically equal to transformers'
  ``LlavaNextImageProcessor`` (checked in tests): the best-fit pinpoint, resize keeping the
  aspect ratio + centred zero padding, a base view squashed to S x S followed by the
  row-major S x S crops of the grid -> float32[1 + rows * cols, S, S, 3], the grid
  (rows, cols) and the original (height, width).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from ppllava_jax.data.errors import MediaError
from ppllava_jax.layout import select_best_resolution

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# per vision tower: (mean, std) of its image processor (CLIP for the Vicuna family, SigLIP for
# the Qwen family)
PIXEL_STATS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


def pixel_stats(qwen: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a model family's vision tower (``PPLLaVAConfig.qwen``)."""
    return PIXEL_STATS["siglip" if qwen else "clip"]


DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8[H, W, 3] RGB; raises MediaError naming the file."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise MediaError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8[H, W, 3] with Pillow (as transformers' PIL backend does)."""
    from PIL import Image

    if image.shape[0] == height and image.shape[1] == width:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((width, height), resample=Image.Resampling.BICUBIC))


def normalize(
    images: np.ndarray,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """uint8[..., 3] -> float32[..., 3]: x / 255, then (x - mean) / std per channel."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_frames(frames: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 frames (an array, or a list of differently sized images) squashed (no crop) to the
    tower size: uint8[T, S, S, 3], before normalization."""
    return np.stack([resize(np.asarray(f, np.uint8), size, size) for f in frames])


def preprocess_frames(
    frames: np.ndarray | Sequence[np.ndarray],
    size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """Squash-resize frames to the tower size and CLIP-normalize.

    Args:
      frames: uint8[T, H, W, 3] (or a list of uint8[H_i, W_i, 3], e.g. multi-image).
      size: S, the vision tower's input size.

    Returns:
      float32[T, S, S, 3].
    """
    return normalize(resize_frames(frames, size), mean, std)


def fit_size(original_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size after resizing into ``target`` keeping the aspect ratio (transformers' rounding)."""
    oh, ow = original_size
    th, tw = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


@dataclasses.dataclass(frozen=True)
class FitPad:
    """Where one frame lands in the S x S view of LLaVA-OneVision's video processor.

    Attributes:
      resized_hw: (height, width) after the aspect-preserving resize (the limiting side S).
      pad_rows: black rows added above AND below; pad_cols: black columns left AND right.
      padded_hw: (height, width) after padding; one short of S where the difference is odd.
      stretched: True when ``padded_hw`` is not S x S, so the padded frame is then stretched
        to S x S (bicubic).
    """

    resized_hw: tuple[int, int]
    pad_rows: int
    pad_cols: int
    padded_hw: tuple[int, int]
    stretched: bool


def fit_pad_geometry(hw: tuple[int, int], size: int) -> FitPad:
    """The :class:`FitPad` of a frame of (height, width) ``hw`` in an S x S view."""
    nh, nw = fit_size((int(hw[0]), int(hw[1])), (size, size))
    # the original pads (S - side) // 2 on both sides, so an odd difference leaves S - 1
    py, px = (size - nh) // 2, (size - nw) // 2
    padded = (nh + 2 * py, nw + 2 * px)
    return FitPad((nh, nw), py, px, padded, padded != (size, size))


def fit_pad_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[S, S, 3] as LLaVA-OneVision's video processor (the original's
    ``LlavaOnevisionVidProcessor``): resized from the full frame to fit S x S keeping the
    aspect ratio (:func:`fit_size`, Pillow bicubic on uint8), padded with 0 by
    :func:`fit_pad_geometry`, then stretched to S x S when one row or column short."""
    frame = np.asarray(frame, np.uint8)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected uint8[H, W, 3], got {frame.shape}")
    g = fit_pad_geometry(frame.shape[:2], size)
    resized = resize(frame, *g.resized_hw)
    padded = np.pad(resized, ((g.pad_rows, g.pad_rows), (g.pad_cols, g.pad_cols), (0, 0)))
    return resize(padded, size, size)


def fit_pad_frames(frames: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 frames (an array, or a list of differently sized images) -> uint8[T, S, S, 3] by
    :func:`fit_pad_frame` each, before normalization."""
    return np.stack([fit_pad_frame(f, size) for f in frames])


def tower_frames(frames: np.ndarray | Sequence[np.ndarray], size: int, qwen: bool) -> np.ndarray:
    """Video frames (or a multi-image sample's images) as the model family's video processor
    turns them into S x S views, before normalization: uint8[T, H, W, 3] (or a list of
    uint8[H_i, W_i, 3]) -> uint8[T, S, S, 3]. ``qwen`` (``PPLLaVAConfig.qwen``): resized
    keeping the aspect ratio and padded (:func:`fit_pad_frames`); else squashed
    (:func:`resize_frames`)."""
    return fit_pad_frames(frames, size) if qwen else resize_frames(frames, size)


@dataclasses.dataclass(frozen=True)
class AnyResImage:
    """Any-resolution views of one image.

    Attributes:
      pixel_values: float32[1 + rows * cols, S, S, 3]: the base view, then the crops row-major.
      grid: (rows, cols) of the crop grid.
      image_size: (height, width) of the original image (for unpadding, SPEC §5).
    """

    pixel_values: np.ndarray
    grid: tuple[int, int]
    image_size: tuple[int, int]


def anyres_views_uint8(
    image: np.ndarray, size: int = 336, pinpoints: Sequence[Sequence[int]] = DEFAULT_PINPOINTS
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """The any-resolution views of uint8[H, W, 3] before normalization (module docstring).

    Returns (uint8[1 + rows * cols, S, S, 3]: the base view, then the crops row-major;
    the grid (rows, cols); the original (height, width)).
    """
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8[H, W, 3], got {image.shape}")
    oh, ow = image.shape[:2]
    th, tw = select_best_resolution((oh, ow), pinpoints)
    if th % size or tw % size:
        raise ValueError(f"pinpoint {(th, tw)} is not a multiple of the tower size {size}")
    nh, nw = fit_size((oh, ow), (th, tw))
    resized = resize(image, nh, nw)
    py, ry = divmod(th - nh, 2)
    px, rx = divmod(tw - nw, 2)
    padded = np.pad(resized, ((py, py + ry), (px, px + rx), (0, 0)))
    rows, cols = th // size, tw // size
    crops = (
        padded.reshape(rows, size, cols, size, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(-1, size, size, 3)
    )
    base = resize(image, size, size)[None]
    return np.concatenate([base, crops], axis=0), (rows, cols), (int(oh), int(ow))


def preprocess_anyres(
    image: np.ndarray,
    size: int = 336,
    pinpoints: Sequence[Sequence[int]] = DEFAULT_PINPOINTS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> AnyResImage:
    """LLaVA-NeXT any-resolution preprocessing of uint8[H, W, 3] (see module docstring):
    :func:`anyres_views_uint8`, normalized."""
    views, grid, hw = anyres_views_uint8(image, size, pinpoints)
    return AnyResImage(normalize(views, mean, std), grid, hw)
