"""Frame indices of the original's evaluation drivers (``EvalDataset.get_index``).

Every benchmark driver of the original (MVBench, Video-MME, open-ended QA, VCGBench) picks
``T`` frames as follows, over a video of ``max_frame + 1`` frames (decoded videos:
``max_frame = len - 1``, ``first_idx = 0``, ``fps`` = the container's average rate) or a
folder of frame files (``max_frame`` = the number of files, ``first_idx = 1``, a fixed
``fps``, files numbered from 1)::

    start, end = bound or (-100000, 100000)             # seconds
    start_idx = max(first_idx, round(start * fps))       # Python round: half to even
    end_idx = min(round(end * fps), max_frame)
    seg = (end_idx - start_idx) / T
    idx_i = int(start_idx + seg / 2 + np.round(seg * i))  # np.round: half to even

A video shorter than ``T`` frames repeats frames spread evenly over it (the rule gives
repeats by itself). Pure NumPy; the fixture ``reference_protocols`` pins it.
"""

from __future__ import annotations

import numpy as np

NO_BOUND = (-100000.0, 100000.0)


def segment_indices(
    max_frame: int,
    fps: float,
    num_segments: int,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> np.ndarray:
    """The original's ``get_index``: int64[num_segments] frame indices (see module docstring).

    Args:
      max_frame: the largest readable index (``len(video) - 1``; a frame folder: its count).
      fps: frames per second used to turn ``bound`` into indices.
      num_segments: T, the number of frames read.
      bound: (start_s, end_s) or None for the whole video.
      first_idx: 0 for decoded videos, 1 for frame folders.
    """
    if num_segments <= 0:
        raise ValueError(f"num_segments must be positive, got {num_segments}")
    start, end = NO_BOUND if bound is None else (float(bound[0]), float(bound[1]))
    start_idx = max(int(first_idx), round(start * fps))
    end_idx = min(round(end * fps), int(max_frame))
    seg = float(end_idx - start_idx) / num_segments
    return np.asarray(
        [int(start_idx + seg / 2 + np.round(seg * i)) for i in range(num_segments)], np.int64
    )
