"""Frame folders annotated with ``total_frames``, read as the original's raw-frame reader does.

An annotation of a frame folder may give its frame count (``"total_frames": 20``, as the
original's LLaVA-Hound annotations do). The original's ``read_frames_rawframes`` then lists
nothing: it samples from ``total_frames`` frames (``get_frame_indices``) and reads frame ``i``
from the file ``'{:0>6}.jpg'.format(i + 1)`` (files numbered from 1); a file that cannot be read
is replaced by the next number's (``i + 2``), and a sample whose replacement is missing too
fails (the original skips it). Without ``total_frames`` a folder is listed
(``video.load_video``).
"""

from __future__ import annotations

import os

import numpy as np

from ppllava_jax.data.errors import MediaError
from ppllava_jax.data.frame_index import bound_to_range, sample_indices
from ppllava_jax.data.image import load_image
from ppllava_jax.data.video import Clip

FILE_PATTERN = "{:0>6}.jpg"  # the original's filename_tmpl with total_frames
FIRST_NUMBER = 1  # the file of frame 0 (the original's offset)


def check_total_frames(value) -> int:
    """``total_frames`` of an annotation as an int; ValueError unless a positive whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"total_frames must be a positive whole number, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"total_frames must be positive, got {value!r}")
    return int(value)


def frame_file(path: str, index: int) -> tuple[str, tuple[str, ...]]:
    """The file the original reads for frame ``index`` of folder ``path`` and the names it asks
    for (the missing first choice, then its replacement); MediaError when both are missing."""
    tried = []
    for number in (index + FIRST_NUMBER, index + FIRST_NUMBER + 1):
        name = FILE_PATTERN.format(number)
        tried.append(name)
        if os.path.isfile(os.path.join(path, name)):
            return name, tuple(tried)
    raise MediaError(
        os.path.join(path, tried[0]),
        f"frame {index} of a folder of total_frames frames: neither {tried[0]} nor its "
        f"replacement {tried[1]} exists (files are named {FILE_PATTERN!r} from "
        f"{FIRST_NUMBER}); fix the annotation's total_frames or the folder",
    )


def load_numbered_frames(
    path: str | os.PathLike,
    total_frames: int,
    num_frames: int,
    sample: str = "rand",
    rng: np.random.Generator | int | None = None,
    bound: tuple[float, float] | None = None,
    fps: float = 1.0,
) -> Clip:
    """T = ``num_frames`` frames of a folder of ``total_frames`` numbered files.

    Indices are ``frame_index.sample_indices(total_frames, T, sample, rng)`` (the original's
    ``get_frame_indices``; ``bound`` in seconds at ``fps`` restricts them, which the original
    never does in training), each frame read from :func:`frame_file`. Returns a
    :class:`~ppllava_jax.data.video.Clip` (uint8[T, H, W, 3], repeats included; ``files`` =
    the file read for each frame). Raises MediaError naming a missing folder or file.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MediaError(path, "frame folder not found")
    total = check_total_frames(total_frames)
    first, last = bound_to_range(total, fps, bound)
    idx = sample_indices(total, num_frames, sample, rng, first, last)
    decoded: dict[int, np.ndarray] = {}
    names: dict[int, str] = {}
    for i in dict.fromkeys(int(k) for k in idx):
        names[i] = frame_file(path, i)[0]
        decoded[i] = load_image(os.path.join(path, names[i]))
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) > 1:
        raise MediaError(path, f"frames of different sizes {sorted(shapes)}")
    frames = np.stack([decoded[int(i)] for i in idx])
    files = tuple(names[int(i)] for i in idx)
    return Clip(frames, idx, idx / fps, fps, total, files)
