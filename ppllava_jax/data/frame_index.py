"""The original's frame rules: which frame indices a video gives (pure NumPy, no decoding).

Training (:func:`frame_indices`, the original's ``get_frame_indices``) samples T frames over
T equal segments of the (optionally bounded) video:

- ``middle`` (evaluation): the centre frame of each segment;
- ``rand`` (training): a uniformly random frame of each segment but its last one, from a
  seeded ``numpy.random.Generator``; when a segment has one frame (videos shorter than 2T),
  a sorted random subset of min(T, n) frames instead;
- when the video has fewer than T frames, the last sampled frame is repeated up to T.

Evaluation (:func:`segment_indices`, the original's ``EvalDataset.get_index`` that every
benchmark driver uses: MVBench, Video-MME, open-ended QA, VCGBench) picks ``T`` frames over a
video of ``max_frame + 1`` frames (decoded videos: ``max_frame = len - 1``, ``first_idx = 0``,
``fps`` = the container's average rate) or a folder of frame files (``max_frame`` = the number
of files, ``first_idx = 1``, a fixed ``fps``, files numbered from 1)::

    start, end = bound or (-100000, 100000)             # seconds
    start_idx = max(first_idx, round(start * fps))       # Python round: half to even
    end_idx = min(round(end * fps), max_frame)
    seg = (end_idx - start_idx) / T
    idx_i = int(start_idx + seg / 2 + np.round(seg * i))  # np.round: half to even

A video shorter than ``T`` frames repeats frames spread evenly over it (the rule gives
repeats by itself). :class:`FrameRule` names the rule of one evaluation question; the fixture
``reference_protocols`` pins it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SAMPLING_MODES = ("middle", "rand")
NO_BOUND = (-100000.0, 100000.0)


def eval_num_segments(
    num_segments: int,
    max_frame: int,
    fps: float,
    bound: tuple[float, float] | None = None,
    assigned_frame: int = 16,
) -> int:
    """T of the original's ``get_index`` for a driver's ``num_segments``: itself when > 0,
    ``assigned_frame`` when 0 (Video-MME: 32 for short videos, 64 otherwise), and when < 0
    ("fps 1") 32 if the clip's seconds (``end - start`` of the bound, else ``max_frame / fps``)
    divided by ``|num_segments|`` are at most 32, else 64."""
    if num_segments > 0:
        return int(num_segments)
    if num_segments == 0:
        return int(assigned_frame)
    length = float(bound[1]) - float(bound[0]) if bound else int(max_frame) / float(fps)
    return 32 if length / abs(int(num_segments)) <= 32 else 64


def segment_indices(
    max_frame: int,
    fps: float,
    num_segments: int,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
    assigned_frame: int = 16,
) -> np.ndarray:
    """The original's ``get_index``: int64[T] frame indices (see module docstring).

    Args:
      max_frame: the largest readable index (``len(video) - 1``; a frame folder: its count).
      fps: frames per second used to turn ``bound`` into indices.
      num_segments: the driver's ``num_segments``; T = :func:`eval_num_segments` (itself when
        positive, ``assigned_frame`` when 0, 32 or 64 by the clip's length when negative).
      bound: (start_s, end_s) or None for the whole video.
      first_idx: 0 for decoded videos, 1 for frame folders.
    """
    num_segments = eval_num_segments(num_segments, max_frame, fps, bound, assigned_frame)
    start, end = NO_BOUND if bound is None else (float(bound[0]), float(bound[1]))
    start_idx = max(int(first_idx), round(start * fps))
    end_idx = min(round(end * fps), int(max_frame))
    seg = float(end_idx - start_idx) / num_segments
    return np.asarray(
        [int(start_idx + seg / 2 + np.round(seg * i)) for i in range(num_segments)], np.int64
    )


@dataclasses.dataclass(frozen=True)
class FrameRule:
    """The frames an evaluation question reads, as the original's benchmark drivers pick them
    (``EvalDataset.get_index`` and its readers; :func:`load_frames_by_rule`).

    Attributes:
      num_segments: T, the frames read (:func:`segment_indices`).
      bound: (start_s, end_s) of the question, or None for the whole video.
      folder_fps: frame rate of a frame folder (3 for MVBench tvqa and ActivityNet QA);
        a video file uses its container's average rate.
      file_pattern: file name of frame ``i`` of a folder, ``file_pattern.format(i)``
        (``'{:0>5}.jpg'`` MVBench, ``'{:0>6}.jpg'`` ActivityNet QA).
      first_idx: the first frame index (None: 0 for video files, 1 for frame folders).

    Video files: ``max_frame = frames - 1``; frame folders: ``max_frame`` = the number of
    entries in the folder (``len(os.listdir)``), files numbered from ``first_idx``.
    """

    num_segments: int
    bound: tuple[float, float] | None = None
    folder_fps: float = 3.0
    file_pattern: str = "{:0>5}.jpg"
    first_idx: int | None = None


def bound_to_range(
    num_frames: int, fps: float, bound: tuple[float, float] | None
) -> tuple[int, int]:
    """Frame range [first, last] (inclusive) for an optional (start_s, end_s) bound."""
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    if bound is None:
        return 0, num_frames - 1
    start_s, end_s = bound
    first = max(0, int(round(start_s * fps)))
    last = min(num_frames - 1, int(round(end_s * fps)))
    if last < first:  # a bound past the end or inverted: keep the nearest frame
        first = last = min(first, num_frames - 1)
    return first, last


def segment_ranges(num_segments: int, num_frames: int) -> list[tuple[int, int]]:
    """The ranges ``[lo, hi)`` the original's ``rand`` draws from (``get_frame_indices``).

    ``acc = min(num_segments, num_frames)``, ``b = linspace(0, num_frames, acc + 1)
    .astype(int)``; segment i is ``range(b[i], b[i+1] - 1)``: a segment's last frame is never
    drawn, a 2-frame segment always gives its first frame, a 1-frame segment is empty (the
    original's ``random.choice`` raises there and it falls back to a random permutation).
    """
    acc = min(int(num_segments), int(num_frames))
    b = np.linspace(0, int(num_frames), acc + 1).astype(int)
    return [(int(b[i]), int(b[i + 1]) - 1) for i in range(acc)]


def frame_indices(
    num_segments: int,
    num_frames: int,
    sample: str = "rand",
    rng: np.random.Generator | int | None = None,
    fix_start: int | None = None,
    input_fps: float = 1.0,
    max_num_frames: int = -1,
) -> np.ndarray:
    """The original's ``get_frame_indices(num_frames=num_segments, vlen=num_frames, ...)``.

    ``rand`` / ``middle``: ``acc = min(T, n)`` segments with integer bounds
    ``b = linspace(0, n, acc + 1).astype(int)`` and inclusive ranges ``(b[i], b[i+1] - 1)``;
    ``fix_start`` (any mode but ``rand``) takes ``b[i] + fix_start``, ``middle`` takes
    ``(lo + hi) // 2``, ``rand`` draws uniformly from each of :func:`segment_ranges` (never a
    segment's last frame) and, when any of them is empty, takes
    ``sorted(permutation(n)[:acc])`` instead; with fewer than T indices the last one is
    repeated up to T. ``fpsX`` (e.g. ``fps0.5``): one frame every 1/X s from the middle of the
    first interval at ``input_fps``, cut to ``max_num_frames`` (> 0); its length varies.
    Randomness comes from the seeded NumPy ``rng`` (Generator or seed), not Python's
    ``random``, so a pipeline sample is reproducible from its seed.

    Returns int64[T] (``fpsX``: int64[k]).
    """
    t, n = int(num_segments), int(num_frames)
    if sample in ("rand", "middle"):
        ranges = segment_ranges(t, n)
        if sample == "rand":
            if not isinstance(rng, np.random.Generator):
                rng = np.random.default_rng(rng)
            lo = np.array([r[0] for r in ranges], np.int64)
            hi = np.array([r[1] for r in ranges], np.int64)
            if (hi > lo).all():
                idx = rng.integers(lo, hi)
            else:
                idx = np.sort(rng.permutation(n)[: len(ranges)])
        elif fix_start is not None:
            idx = np.array([r[0] + int(fix_start) for r in ranges], np.int64)
        else:
            idx = np.array([(r[0] + r[1]) // 2 for r in ranges], np.int64)
        idx = np.asarray(idx, np.int64)
        if len(idx) < t:  # padded with the last frame
            idx = np.concatenate([idx, np.full(t - len(idx), idx[-1], np.int64)])
        return idx
    if sample.startswith("fps"):
        output_fps = float(sample[3:])
        duration = float(n) / float(input_fps)
        delta = 1 / output_fps
        seconds = np.arange(0 + delta / 2, duration + delta / 2, delta)
        idx = np.around(seconds * float(input_fps)).astype(np.int64)
        idx = idx[idx < n]
        if max_num_frames > 0 and len(idx) > max_num_frames:
            idx = idx[:max_num_frames]
        return idx
    raise ValueError(f"unknown sampling mode {sample!r}; use rand, middle or fpsX")


def sample_indices(
    num_frames: int,
    num_segments: int,
    mode: str = "middle",
    rng: np.random.Generator | int | None = None,
    first: int = 0,
    last: int | None = None,
    fix_start: int | None = None,
) -> np.ndarray:
    """Frame indices of T = ``num_segments`` samples over frames [first, last] (inclusive).

    :func:`frame_indices` (the original's ``get_frame_indices``) over the n = last - first + 1
    frames of the range, shifted by ``first``: ``middle`` the centre ``(lo + hi) // 2`` of
    each of min(T, n) segments, ``rand`` a uniform frame of each segment but its last (the
    fallback for short videos: a sorted random subset), shorter videos repeat the last
    index. Returns int64[T].
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
    if num_segments <= 0:
        raise ValueError("num_segments must be positive")
    last = num_frames - 1 if last is None else last
    if num_frames <= 0 or last < first:
        raise ValueError(f"empty frame range [{first}, {last}] of {num_frames} frames")
    n = last - first + 1
    idx = frame_indices(num_segments, n, mode, rng, fix_start=fix_start)
    return (idx + first).astype(np.int64)


def frame_rule_indices(
    rule: FrameRule, count: int, fps: float | None = None, folder: bool = False
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The frame indices (int64[T]) a :class:`FrameRule` reads, and for a frame folder the
    file names, from the media's size alone.

    Args:
      count: frames in the video file, or entries in the frame folder.
      fps: the video's average frame rate (ignored for folders: ``rule.folder_fps``).
      folder: True for a frame folder (``max_frame = count``, ``first_idx`` 1 by default),
        False for a video file (``max_frame = count - 1``, ``first_idx`` 0 by default).
    """
    if folder:
        first = 1 if rule.first_idx is None else int(rule.first_idx)
        idx = segment_indices(
            int(count), float(rule.folder_fps), rule.num_segments, rule.bound, first
        )
        return idx, tuple(rule.file_pattern.format(int(i)) for i in idx)
    if fps is None:
        raise ValueError("frame_rule_indices: a video file needs its fps")
    first = 0 if rule.first_idx is None else int(rule.first_idx)
    idx = segment_indices(int(count) - 1, float(fps), rule.num_segments, rule.bound, first)
    return idx, ()
