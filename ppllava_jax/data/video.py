"""Video decoding (host side, numpy): video files, animated GIFs and frame folders.

Sources: video files through PyAV (mp4, webm, avi, mkv, mov, ...), animated GIFs through
Pillow, and folders of frame images. Which frames are read is the original's rule
(:mod:`ppllava_jax.data.frame_index`): :func:`load_video` samples T frames over T equal
segments (``middle`` / seeded ``rand``), :func:`load_frames_by_rule` reads exactly the frames
of an evaluation question's :class:`~ppllava_jax.data.frame_index.FrameRule`.

Only the sampled frames are converted to RGB and kept; the decoder seeks over long gaps and
otherwise decodes and drops, so a long video never sits in memory. Any problem with a file
raises :class:`~ppllava_jax.data.errors.MediaError` naming it, before anything is decoded when
the file is no video at all: a text file (FFmpeg would draw it as ANSI art), a still image, an
audio file with or without a cover picture.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from ppllava_jax.data.errors import MediaError
from ppllava_jax.data.frame_index import (
    FrameRule,
    bound_to_range,
    frame_rule_indices,
    sample_indices,
)
from ppllava_jax.data.image import load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FOLDER_ORDERS = ("natural", "name")
# Seek instead of decoding through a gap longer than this many frames.
SEEK_GAP_FRAMES = 300
GIF_RULE_FPS = 25.0  # the frame rate the original's read_gif assumes (FrameRule reads)

# (frame count, fps) -> int64[T] frame indices to read
Chooser = Callable[[int, float], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Clip:
    """Sampled frames of one video.

    Attributes:
      frames: uint8[T, H, W, 3] RGB.
      indices: int64[T] frame index of each sampled frame in the whole video.
      timestamps: float64[T] seconds of each sampled frame (index / fps).
      fps: frames per second used to convert between seconds and indices.
      num_frames: number of frames of the whole video.
      files: frame folders: the file name of each frame read.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    num_frames: int
    files: tuple[str, ...] = ()


def _stack(path: str, decoded: dict, keys: Sequence) -> np.ndarray:
    """uint8[T, H, W, 3] of ``decoded[k]`` for each k (repeats included); frames of different
    sizes are a MediaError naming ``path``."""
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) > 1:
        raise MediaError(path, f"frames of different sizes {sorted(shapes)}")
    return np.stack([decoded[k] for k in keys])


# --------------------------------------------------------------------------------------
# PyAV videos


# FFmpeg demuxers that draw a text file as pictures (ANSI art, BBS art): a ``.txt`` would be
# "decoded" frame by frame
TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
# demuxers of one still picture (``jpeg_pipe``, ``png_pipe``, ...; ``image2`` for patterns)
STILL_IMAGE_DEMUXERS = ("image2", "_pipe")
_ATTACHED_PIC = 1024  # AV_DISPOSITION_ATTACHED_PIC: an audio file's cover picture


def _check_video(container) -> str:
    """The reason ``container`` holds no real video (text drawn as pictures, a still image, a
    cover picture alone, no picture at all), else ""."""
    names = set(container.format.name.split(","))
    if names & TEXT_DEMUXERS:
        return (
            f"not a video but a text file (FFmpeg's {container.format.name!r} demuxer would "
            "draw its characters as pictures); give a video file, GIF or frame folder"
        )
    streams = [s for s in container.streams.video if not int(s.disposition) & _ATTACHED_PIC]
    if not streams:
        what = "only a cover picture" if container.streams.video else "no video stream"
        kinds = sorted({s.type for s in container.streams})
        return f"not a video: {container.format.name} file with {what} (streams: {kinds or 'none'})"
    if any(n == STILL_IMAGE_DEMUXERS[0] or n.endswith(STILL_IMAGE_DEMUXERS[1]) for n in names):
        codec = streams[0].codec_context.name
        return f"not a video but a still image ({codec}); give it as an image, not a video"
    return ""


def _open(path: str):
    """(PyAV container, its first real video stream) of a video file; MediaError naming the
    file when it is missing, unreadable or not a video (:func:`_check_video`)."""
    import av

    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # av.error.* and OSError: unreadable or not a media file
        raise MediaError(path, f"cannot open video ({type(e).__name__}: {e})") from e
    why = _check_video(container)
    if why:
        container.close()
        raise MediaError(path, why)
    stream = next(s for s in container.streams.video if not int(s.disposition) & _ATTACHED_PIC)
    return container, stream


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return 25.0


def _count_frames(path: str) -> int:
    """Exact frame count by demuxing (no decoding), for containers that do not store it."""
    container, stream = _open(path)
    try:
        return sum(1 for p in container.demux(stream) if p.size > 0)
    except Exception as e:
        raise MediaError(path, f"cannot read packets ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(number of frames, fps) of a video file, without decoding it."""
    path = os.fspath(path)
    container, stream = _open(path)
    try:
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
    container, stream = _open(path)
    out: dict[int, np.ndarray] = {}
    targets = sorted(int(i) for i in wanted)
    try:
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


def _video_clip(path: str, choose: Chooser) -> Clip:
    """The frames ``choose(frame count, fps)`` picks from a video file (PyAV)."""
    n, fps = video_info(path)
    idx = np.asarray(choose(n, fps), np.int64)
    if idx.min() < 0 or idx.max() > n - 1:
        raise MediaError(path, f"frame indices {idx.tolist()} outside the {n} frames")
    decoded = _decode_selected(path, np.unique(idx), fps)
    return Clip(_stack(path, decoded, idx.tolist()), idx, idx / fps, fps, n)


def _gif_clip(path: str, choose: Chooser, fps: float | None = None) -> Clip:
    """The frames ``choose(frame count, fps)`` picks from an animated GIF (Pillow composes
    each frame); ``fps`` None: the GIF's own frame duration (100 ms when it has none)."""
    from PIL import Image

    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    try:
        with Image.open(path) as im:
            n = int(getattr(im, "n_frames", 1))
            if fps is None:
                fps = 1000.0 / float(im.info.get("duration") or 100)
            idx = np.asarray(choose(n, fps), np.int64)
            decoded = {}
            for i in np.unique(idx):
                im.seek(int(i))
                decoded[int(i)] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(path, f"cannot read GIF ({type(e).__name__}: {e})") from e
    return Clip(_stack(path, decoded, idx.tolist()), idx, idx / fps, fps, n)


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "middle",
    rng: np.random.Generator | int | None = None,
    bound: tuple[float, float] | None = None,
    fps: float | None = None,
    folder_order: str = "natural",
) -> Clip:
    """Decode T sampled frames (``frame_index.sample_indices``) from a video file, GIF or
    folder of frames.

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

    def choose(n: int, rate: float) -> np.ndarray:
        return sample_indices(n, num_frames, sample, rng, *bound_to_range(n, rate, bound))

    if os.path.isdir(path):
        files = list_frame_files(path, folder_order)
        idx = choose(len(files), fps or 1.0)
        decoded = {int(i): load_image(files[int(i)]) for i in np.unique(idx)}
        names = tuple(os.path.basename(files[int(i)]) for i in idx)
        frames = _stack(path, decoded, idx.tolist())
        return Clip(frames, idx, idx / (fps or 1.0), fps or 1.0, len(files), names)
    if path.lower().endswith(".gif"):
        return _gif_clip(path, choose)
    return _video_clip(path, choose)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


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


def load_frames_by_rule(path: str | os.PathLike, rule: FrameRule) -> Clip:
    """Read exactly the frames of ``rule`` (see :class:`FrameRule`) from a video file (PyAV),
    an animated GIF (Pillow, 25 fps as the original's ``read_gif``) or a frame folder.

    Returns a :class:`Clip` (uint8[T, H, W, 3], repeats included); ``files`` holds the file
    names read from a folder. Raises MediaError naming the file that is missing or unreadable.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
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
        return Clip(_stack(path, decoded, files), idx, idx / fps, fps, n, files)

    def choose(n: int, fps: float) -> np.ndarray:
        return frame_rule_indices(rule, n, fps)[0]

    if path.lower().endswith(".gif"):
        return _gif_clip(path, choose, GIF_RULE_FPS)
    return _video_clip(path, choose)


# --------------------------------------------------------------------------------------
# Writing (tests and the synthetic dataset)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float = 8.0,
    codec: str | None = None,
    options: dict[str, str] | None = None,
    pix_fmt: str = "yuv420p",
) -> None:
    """Encode uint8[T, H, W, 3] frames (H, W even for yuv420p) to a video file with PyAV.

    ``codec`` defaults to libx264 for .mp4/.mkv/.mov (mpeg4 when libx264 is missing), libvpx
    for .webm and mpeg4 for .avi. Encoding is single-threaded, hence deterministic.
    ``codec="ffv1", pix_fmt="bgr0"`` (in .mkv) is lossless: decoding gives the frames back.
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
        stream.pix_fmt = pix_fmt
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
