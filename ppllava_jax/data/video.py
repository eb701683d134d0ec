"""Video decoding and frame sampling (host side, numpy).

Sources: video files through PyAV (mp4, webm, avi, mkv, mov, ...), animated GIFs through
Pillow, and folders of frame images. Frames are sampled over T equal segments of the
(optionally bounded) video, as in the original (SPEC §1):

- ``middle`` (evaluation): the centre frame of each segment;
- ``rand`` (training): a uniformly random frame of each segment, from a seeded
  ``numpy.random.Generator``;
- when the video has fewer than T frames, each frame is one segment and the last sampled
  frame is repeated up to T.

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


def sample_indices(
    num_frames: int,
    num_segments: int,
    mode: str = "middle",
    rng: np.random.Generator | int | None = None,
    first: int = 0,
    last: int | None = None,
) -> np.ndarray:
    """Frame indices of T = ``num_segments`` samples over frames [first, last] (inclusive).

    The range is cut into min(T, n) equal segments (integer boundaries as
    ``linspace(0, n, k + 1).astype(int)``); ``middle`` takes ``(start + end) // 2`` of each
    (``end`` inclusive), ``rand`` a uniform frame of each. Shorter videos repeat the last
    index. Returns int64[T], non-decreasing.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
    if num_segments <= 0:
        raise ValueError("num_segments must be positive")
    last = num_frames - 1 if last is None else last
    if num_frames <= 0 or last < first:
        raise ValueError(f"empty frame range [{first}, {last}] of {num_frames} frames")
    n = last - first + 1
    k = min(num_segments, n)
    bounds = np.linspace(0, n, k + 1).astype(np.int64)
    starts, ends = bounds[:-1], bounds[1:] - 1
    if mode == "middle":
        idx = (starts + ends) // 2
    else:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        idx = rng.integers(starts, ends + 1)
    idx = idx + first
    if k < num_segments:
        idx = np.concatenate([idx, np.full(num_segments - k, idx[-1], dtype=np.int64)])
    return idx.astype(np.int64)


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
) -> Clip:
    """Decode T sampled frames from a video file, GIF or folder of frames.

    Args:
      path: a video file (PyAV), a ``.gif`` (Pillow), or a directory of frame images
        (sorted by the numbers in their names).
      num_frames: T, the number of frames returned.
      sample: ``middle`` or ``rand``.
      rng: Generator or seed for ``rand``.
      bound: optional (start, end) in seconds; sampling is restricted to it.
      fps: frame rate of a frame folder (default 1.0); ignored for files that store one.

    Returns:
      a :class:`Clip` with uint8[T, H, W, 3] frames.

    Raises:
      MediaError: missing, unreadable, empty or truncated input (the message names it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_frame_folder(path, num_frames, sample, rng, bound, fps=fps or 1.0)
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


def list_frame_files(path: str | os.PathLike) -> list[str]:
    """Image files of a frame folder, in natural order (frame_2 before frame_10)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MediaError(path, "frame folder not found")
    names = [n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise MediaError(path, "frame folder holds no images")
    return [os.path.join(path, n) for n in sorted(names, key=_natural_key)]


def load_frame_folder(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "middle",
    rng: np.random.Generator | int | None = None,
    bound: tuple[float, float] | None = None,
    fps: float = 1.0,
) -> Clip:
    """Sample T frames from a folder of images (only those are read). See :func:`load_video`."""
    from ppllava_jax.data.image import load_image

    files = list_frame_files(path)
    n = len(files)
    first, last = bound_to_range(n, fps, bound)
    idx = sample_indices(n, num_frames, sample, rng, first, last)
    decoded = {int(i): load_image(files[int(i)]) for i in np.unique(idx)}
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) > 1:
        raise MediaError(os.fspath(path), f"frames of different sizes {sorted(shapes)}")
    frames = np.stack([decoded[int(i)] for i in idx])
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
