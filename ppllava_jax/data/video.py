"""Video decoding and frame sampling (host side, numpy).

Sources: video files through PyAV (mp4, webm, avi, mkv, mov, ...), animated GIFs through
Pillow, and folders of frame images. Frames are sampled over T equal segments of the
(optionally bounded) video, as in the original (SPEC §1):

- ``middle`` (evaluation): the centre frame of each segment;
- ``rand`` (training): a uniformly random frame of each segment but its last one, from a
  seeded ``numpy.random.Generator``; when a segment has one frame (videos shorter than 2T),
  a sorted random subset of min(T, n) frames instead (the original's ``get_frame_indices``);
- when the video has fewer than T frames, the last sampled frame is repeated up to T.

Only the sampled frames are converted to RGB and kept; the decoder seeks over long gaps and
otherwise decodes and drops, so a long video never sits in memory. Any problem with a file
raises :class:`~ppllava_jax.data.errors.MediaError` naming it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from ppllava_jax.data.errors import MediaError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SAMPLING_MODES = ("middle", "rand")
# Seek instead of decoding through a gap longer than this many frames.
SEEK_GAP_FRAMES = 300


@dataclasses.dataclass(frozen=True)
class Clip:
    """Sampled frames of one video.

    Attributes:
      frames: uint8[T, H, W, 3] RGB.
      indices: int64[T] frame index of each sampled frame in the whole video.
      timestamps: float64[T] seconds of each sampled frame (index / fps).
      fps: frames per second used to convert between seconds and indices.
      num_frames: number of frames of the whole video.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    num_frames: int
    files: tuple[str, ...] = ()  # frame folders read by a FrameRule: the file names read


@dataclasses.dataclass(frozen=True)
class FrameRule:
    """The frames an evaluation question reads, as the original's benchmark drivers pick them
    (``EvalDataset.get_index`` and its readers; :func:`load_frames_by_rule`).

    Attributes:
      num_segments: T, the frames read (``frame_index.segment_indices``).
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


# --------------------------------------------------------------------------------------
# PyAV videos


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # av.error.* and OSError: unreadable or not a media file
        raise MediaError(path, f"cannot open video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise MediaError(path, "no video stream")
    return container


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return 25.0


def _count_frames(path: str) -> int:
    """Exact frame count by demuxing (no decoding), for containers that do not store it."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.size > 0)
    except Exception as e:
        raise MediaError(path, f"cannot read packets ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(number of frames, fps) of a video file, without decoding it."""
    path = os.fspath(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        n = int(stream.frames or 0)
    finally:
        container.close()
    if n <= 0:
        n = _count_frames(path)
    if n <= 0:
        raise MediaError(path, "video has no frames")
    return n, fps


def _decode_selected(path: str, wanted: np.ndarray, fps: float) -> dict[int, np.ndarray]:
    """Decode the frames at sorted unique indices ``wanted``; returns {index: uint8[H,W,3]}."""
    container = _open(path)
    out: dict[int, np.ndarray] = {}
    targets = sorted(int(i) for i in wanted)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base) if stream.time_base else 1.0 / fps
        t0 = stream.start_time if stream.start_time is not None else None
        can_seek = t0 is not None and stream.time_base is not None
        pos = 0  # index of the next frame the decoder yields (None: unknown after a seek)
        ti = 0
        need_seek = can_seek and targets[0] > SEEK_GAP_FRAMES
        while ti < len(targets):
            if need_seek:
                # Seek to a keyframe at or before the target; the index is recovered from pts.
                ts = int(t0 + (targets[ti] / fps) / tb)
                container.seek(ts, stream=stream, backward=True, any_frame=False)
                pos = None
                need_seek = False
            ended = True
            for frame in container.decode(stream):
                if pos is None:
                    if frame.pts is None:
                        raise MediaError(path, "frames without timestamps; cannot seek")
                    pos = int(round((frame.pts - t0) * tb * fps))
                if targets[ti] <= pos:  # the target, or one a seek or pts gap jumped past
                    rgb = frame.to_ndarray(format="rgb24")
                    while ti < len(targets) and targets[ti] <= pos:
                        out[targets[ti]] = rgb
                        ti += 1
                pos += 1
                if ti == len(targets):
                    ended = False
                    break
                if can_seek and targets[ti] - pos > SEEK_GAP_FRAMES:
                    need_seek, ended = True, False
                    break
            if ended:
                break
    except MediaError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends
        raise MediaError(path, f"decoding failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    missing = [t for t in targets if t not in out]
    if missing:
        raise MediaError(
            path,
            f"truncated or corrupt: frame {missing[0]} (and {len(missing) - 1} more) could not "
            f"be decoded",
        )
    return out


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "middle",
    rng: np.random.Generator | int | None = None,
    bound: tuple[float, float] | None = None,
    fps: float | None = None,
    folder_order: str = "natural",
) -> Clip:
    """Decode T sampled frames from a video file, GIF or folder of frames.

    Args:
      path: a video file (PyAV), a ``.gif`` (Pillow), or a directory of frame images
        (ordered by ``folder_order``).
      num_frames: T, the number of frames returned.
      sample: ``middle`` or ``rand``.
      rng: Generator or seed for ``rand``.
      bound: optional (start, end) in seconds; sampling is restricted to it.
      fps: frame rate of a frame folder (default 1.0); ignored for files that store one.
      folder_order: how a frame folder's files are ordered (:func:`list_frame_files`).

    Returns:
      a :class:`Clip` with uint8[T, H, W, 3] frames.

    Raises:
      MediaError: missing, unreadable, empty or truncated input (the message names it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_frame_folder(
            path, num_frames, sample, rng, bound, fps=fps or 1.0, order=folder_order
        )
    if path.lower().endswith(".gif"):
        return load_gif(path, num_frames, sample, rng, bound)
    n, vfps = video_info(path)
    first, last = bound_to_range(n, vfps, bound)
    idx = sample_indices(n, num_frames, sample, rng, first, last)
    decoded = _decode_selected(path, np.unique(idx), vfps)
    frames = np.stack([decoded[int(i)] for i in idx])
    return Clip(frames, idx, idx / vfps, vfps, n)


# --------------------------------------------------------------------------------------
# GIFs and frame folders


def load_gif(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "middle",
    rng: np.random.Generator | int | None = None,
    bound: tuple[float, float] | None = None,
) -> Clip:
    """Sample T frames of an animated GIF (Pillow composes each frame). See :func:`load_video`."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    try:
        with Image.open(path) as im:
            n = int(getattr(im, "n_frames", 1))
            duration_ms = im.info.get("duration") or 100
            fps = 1000.0 / float(duration_ms)
            first, last = bound_to_range(n, fps, bound)
            idx = sample_indices(n, num_frames, sample, rng, first, last)
            decoded = {}
            for i in np.unique(idx):
                im.seek(int(i))
                decoded[int(i)] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(path, f"cannot read GIF ({type(e).__name__}: {e})") from e
    frames = np.stack([decoded[int(i)] for i in idx])
    return Clip(frames, idx, idx / fps, fps, n)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


FOLDER_ORDERS = ("natural", "name")


def list_frame_files(path: str | os.PathLike, order: str = "natural") -> list[str]:
    """Image files of a frame folder: ``natural`` order (frame_2 before frame_10) or ``name``
    order (``sorted`` file names, as the original's raw-frame reader lists a folder)."""
    path = os.fspath(path)
    if order not in FOLDER_ORDERS:
        raise ValueError(f"unknown frame folder order {order!r}; use one of {FOLDER_ORDERS}")
    if not os.path.isdir(path):
        raise MediaError(path, "frame folder not found")
    names = [n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise MediaError(path, "frame folder holds no images")
    names = sorted(names, key=_natural_key) if order == "natural" else sorted(names)
    return [os.path.join(path, n) for n in names]


def load_frame_folder(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "middle",
    rng: np.random.Generator | int | None = None,
    bound: tuple[float, float] | None = None,
    fps: float = 1.0,
    order: str = "natural",
) -> Clip:
    """Sample T frames from a folder of images (only those are read), listed in ``order``
    (:func:`list_frame_files`); ``Clip.files`` names the file of each frame. See
    :func:`load_video`."""
    from ppllava_jax.data.image import load_image

    files = list_frame_files(path, order)
    n = len(files)
    first, last = bound_to_range(n, fps, bound)
    idx = sample_indices(n, num_frames, sample, rng, first, last)
    decoded = {int(i): load_image(files[int(i)]) for i in np.unique(idx)}
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) > 1:
        raise MediaError(os.fspath(path), f"frames of different sizes {sorted(shapes)}")
    frames = np.stack([decoded[int(i)] for i in idx])
    names = tuple(os.path.basename(files[int(i)]) for i in idx)
    return Clip(frames, idx, idx / fps, fps, n, names)


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
    from ppllava_jax.data.frame_index import segment_indices

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


def load_frames_by_rule(path: str | os.PathLike, rule: FrameRule) -> Clip:
    """Read exactly the frames of ``rule`` (see :class:`FrameRule`) from a video file (PyAV),
    an animated GIF (Pillow, 25 fps as the original's ``read_gif``) or a frame folder.

    Returns a :class:`Clip` (uint8[T, H, W, 3], repeats included); ``files`` holds the file
    names read from a folder. Raises MediaError naming the file that is missing or unreadable.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from ppllava_jax.data.image import load_image

        n = len(os.listdir(path))
        if n == 0:
            raise MediaError(path, "frame folder holds no files")
        fps = float(rule.folder_fps)
        idx, files = frame_rule_indices(rule, n, folder=True)
        decoded = {}
        for name in dict.fromkeys(files):
            f = os.path.join(path, name)
            if not os.path.isfile(f):
                raise MediaError(
                    f,
                    f"file not found (frame folder of {n} files read with pattern "
                    f"{rule.file_pattern!r}, first index {idx.min()})",
                )
            decoded[name] = load_image(f)
        shapes = {a.shape for a in decoded.values()}
        if len(shapes) > 1:
            raise MediaError(path, f"frames of different sizes {sorted(shapes)}")
        frames = np.stack([decoded[name] for name in files])
        return Clip(frames, idx, idx / fps, fps, n, files)
    if path.lower().endswith(".gif"):
        from PIL import Image

        if not os.path.exists(path):
            raise MediaError(path, "file not found")
        try:
            with Image.open(path) as im:
                n, fps = int(getattr(im, "n_frames", 1)), 25.0
                idx, _ = frame_rule_indices(rule, n, fps)
                got = {}
                for i in np.unique(idx):
                    im.seek(int(i))
                    got[int(i)] = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:
            raise MediaError(path, f"cannot read GIF ({type(e).__name__}: {e})") from e
    else:
        n, fps = video_info(path)
        idx, _ = frame_rule_indices(rule, n, fps)
        if idx.min() < 0 or idx.max() > n - 1:
            raise MediaError(path, f"frame indices {idx.tolist()} outside the {n} frames")
        got = _decode_selected(path, np.unique(idx), fps)
    frames = np.stack([got[int(i)] for i in idx])
    return Clip(frames, idx, idx / fps, fps, n)


# --------------------------------------------------------------------------------------
# Writing (tests and the synthetic dataset)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float = 8.0,
    codec: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Encode uint8[T, H, W, 3] frames (H, W even) to a video file with PyAV.

    ``codec`` defaults to libx264 for .mp4/.mkv/.mov (mpeg4 when libx264 is missing), libvpx
    for .webm and mpeg4 for .avi. Encoding is single-threaded, hence deterministic.
    """
    import fractions

    import av

    path = os.fspath(path)
    frames = np.asarray(frames, dtype=np.uint8)
    ext = os.path.splitext(path)[1].lower()
    if codec is None:
        if ext == ".webm":
            codec = "libvpx"
        elif ext == ".avi":
            codec = "mpeg4"
        else:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    if options is None:
        options = {"crf": "12", "preset": "ultrafast"} if codec == "libx264" else {}
    rate = fractions.Fraction(fps).limit_denominator(1000)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000  # near-lossless for small frames
            stream.codec_context.gop_size = 12
        if options:
            stream.options = dict(options)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
