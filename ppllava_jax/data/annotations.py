"""The original annotation format, validated; the sources of a mixture; exact evaluation samples.

An annotation file is a JSON list of samples::

    [{"video": "clips/00001.mp4",            # or "image": "a.jpg", or "image": ["a.jpg", "b.jpg"]
      "media_type": "video",                  # optional: video | image | multi-image | text
      "QA": [{"i": "system instruction (optional, first turn)", "q": "...", "a": "..."}, ...],
      "start": 3.0, "end": 9.5,               # optional bound in seconds (MVBench style)
      "total_frames": 120,                    # optional: a frame folder of numbered files
      ...}]                                   # any other field is kept in Sample.extra

Multi-image samples may also come as the original writes them, under the key named by their
media type (the original reads ``ann[media_type]``): ``{"multi-image": ["a.jpg", "b.jpg"],
...}``. ``total_frames`` (a frame folder read as the original's raw-frame reader reads one
with it: :mod:`ppllava_jax.data.numbered_frames`) is kept in ``Sample.extra``.

Media paths are relative to the file's data root (absolute paths are kept). A file's
``media_type`` is the default for its samples. A malformed sample raises
:class:`AnnotationError` naming the file and the sample index; when loading with
``on_error="skip"`` it is skipped, counted and logged instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ppllava_jax.data.errors import AnnotationError
from ppllava_jax.data.frame_index import FrameRule
from ppllava_jax.data.numbered_frames import check_total_frames
from ppllava_jax.data.templates import Turn

log = logging.getLogger(__name__)

MEDIA_TYPES = ("video", "image", "multi-image", "text")
ON_ERROR = ("skip", "raise")
MULTI_IMAGE_KEY = "multi-image"  # the original's key of a multi-image sample's paths
_KNOWN_KEYS = {"video", "image", MULTI_IMAGE_KEY, "media_type", "QA", "start", "end", "bound"}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One validated sample.

    Attributes:
      media_type: video | image | multi-image | text.
      media: paths (data root applied): one for a video or an image, N for multi-image, none
        for text.
      turns: the QA turns.
      system: the first turn's ``"i"`` as written (None when absent or ""; the original's
        training text uses it verbatim, the offset-based templates strip it).
      bound: optional (start, end) seconds within the video.
      source: the annotation file.
      index: the sample's index in that file.
      extra: the sample's other fields (e.g. the synthetic set's answer metadata).
    """

    media_type: str
    media: tuple[str, ...]
    turns: tuple[Turn, ...]
    system: str | None
    bound: tuple[float, float] | None
    source: str
    index: int
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def num_images(self) -> int:
        """Image tokens in the prompt: 1 for a video or image, N for multi-image, 0 for text."""
        return {"video": 1, "image": 1, "text": 0}.get(self.media_type, len(self.media))


def _join(root: str, p: str) -> str:
    return p if os.path.isabs(p) or not root else os.path.join(root, p)


def parse_sample(
    raw: Any,
    source: str,
    index: int,
    data_root: str = "",
    media_type: str | None = None,
) -> Sample:
    """Validate one raw JSON sample; raises AnnotationError(source, index, reason)."""

    def bad(reason: str) -> AnnotationError:
        return AnnotationError(source, index, reason)

    if not isinstance(raw, Mapping):
        raise bad(f"a sample must be an object, got {type(raw).__name__}")
    mt = raw.get("media_type", media_type)
    if mt is not None and mt not in MEDIA_TYPES:
        raise bad(f"media_type {mt!r} is not one of {MEDIA_TYPES}")
    given = [k for k in ("video", "image", MULTI_IMAGE_KEY) if k in raw]
    if len(given) > 1:
        raise bad(f"more than one media key given ({' and '.join(repr(k) for k in given)})")
    has_video, has_image = "video" in raw, "image" in raw
    media: tuple[str, ...]
    if MULTI_IMAGE_KEY in raw:
        v = raw[MULTI_IMAGE_KEY]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise bad(f"'{MULTI_IMAGE_KEY}' must be a non-empty list of image paths")
        media, inferred = tuple(_join(data_root, x) for x in v), "multi-image"
    elif has_video:
        v = raw["video"]
        if not isinstance(v, str) or not v:
            raise bad("'video' must be a non-empty path string")
        media = (_join(data_root, v),)
        inferred = "video"
    elif has_image:
        v = raw["image"]
        if isinstance(v, str) and v:
            media, inferred = (_join(data_root, v),), "image"
        elif isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
            media, inferred = tuple(_join(data_root, x) for x in v), "multi-image"
        else:
            raise bad("'image' must be a path or a non-empty list of paths")
    else:
        media, inferred = (), "text"
    if mt is None:
        mt = inferred
    elif mt != inferred:
        if {mt, inferred} != {"image", "multi-image"}:
            raise bad(f"media_type {mt!r} does not match the sample's media ({inferred})")
        mt = "multi-image"  # a list under media_type "image", or one image as multi-image
    qa = raw.get("QA")
    if not isinstance(qa, list) or not qa:
        raise bad("'QA' must be a non-empty list of {'q', 'a'} turns")
    turns = []
    system = None
    for j, t in enumerate(qa):
        if not isinstance(t, Mapping):
            raise bad(f"QA[{j}] must be an object")
        q, a = t.get("q", ""), t.get("a")
        if not isinstance(q, str):
            raise bad(f"QA[{j}]['q'] must be a string")
        if not isinstance(a, str) or not a.strip():
            raise bad(f"QA[{j}]['a'] must be a non-empty string")
        if not q.strip() and j > 0:
            raise bad(f"QA[{j}]['q'] is empty (only the first question may be)")
        if j == 0 and isinstance(t.get("i"), str) and t["i"] != "":
            system = t["i"]  # verbatim, as the original's process_qa uses it
        turns.append(Turn(q, a))
    bound = None
    if "bound" in raw or "start" in raw or "end" in raw:
        b = raw.get("bound", (raw.get("start"), raw.get("end")))
        if (
            not isinstance(b, (list, tuple))
            or len(b) != 2
            or not all(isinstance(x, (int, float)) for x in b)
            or b[1] < b[0]
        ):
            raise bad(f"bound must be [start, end] seconds with start <= end, got {b!r}")
        bound = (float(b[0]), float(b[1]))
    if "total_frames" in raw:
        try:
            check_total_frames(raw["total_frames"])
        except ValueError as e:
            raise bad(str(e)) from None
        if mt != "video":
            raise bad(f"total_frames applies to a video's frame folder, not to a {mt} sample")
    extra = {k: v for k, v in raw.items() if k not in _KNOWN_KEYS}
    return Sample(mt, media, tuple(turns), system, bound, source, index, extra)


@dataclasses.dataclass
class SkipCounter:
    """Counts of skipped samples (by reason class) and the first few messages."""

    total: int = 0
    by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)
    max_messages: int = 20

    def add(self, err: Exception) -> None:
        self.total += 1
        kind = type(err).__name__
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if len(self.messages) < self.max_messages:
            self.messages.append(str(err))
        log.warning("skipping sample: %s", err)


def read_json_list(path: str | os.PathLike) -> list:
    """The JSON list in ``path``; AnnotationError naming the file when it is missing, is no
    JSON or holds something else than a list (the evaluation readers use it too)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(path, None, "annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise AnnotationError(path, None, f"cannot parse JSON ({e})") from e
    if not isinstance(raw, list):
        raise AnnotationError(path, None, f"expected a JSON list, got {type(raw).__name__}")
    return raw


def load_annotation_file(
    path: str | os.PathLike,
    data_root: str = "",
    media_type: str | None = None,
    on_error: str = "skip",
    skipped: SkipCounter | None = None,
    parse: Callable[..., Sample] | None = None,
) -> list[Sample]:
    """Read and validate one annotation file (each entry through ``parse``, default
    ``parse_sample``; the DPO reader passes its own).

    A missing or unparsable file, or one that is not a JSON list, always raises
    AnnotationError. Bad samples are skipped and counted in ``skipped`` (or raise when
    ``on_error="raise"``).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = os.fspath(path)
    raw = read_json_list(path)
    out = []
    for i, r in enumerate(raw):
        try:
            out.append((parse or parse_sample)(r, path, i, data_root, media_type))
        except AnnotationError as e:
            if on_error == "raise":
                raise
            (skipped if skipped is not None else SkipCounter()).add(e)
    return out


@dataclasses.dataclass(frozen=True)
class AnnotationSource:
    """One annotation file of a mixture (the config's ``data.sources`` entries).

    Attributes:
      path: the JSON file.
      data_root: prefix of its media paths ("" = paths as written, absolute or relative to
        the working directory).
      media_type: default media type of its samples (None: inferred per sample).
      weight: how many times each sample is used per epoch on average (1.0 = once, 0.5 = a
        random half, 2.0 = twice).
      name: a short name for logs (default: the file name).
    """

    path: str
    data_root: str = ""
    media_type: str | None = None
    weight: float = 1.0
    name: str | None = None

    @classmethod
    def from_config(cls, c: Mapping[str, Any] | Sequence[Any] | str) -> AnnotationSource:
        """From a mapping (unknown keys rejected), a (path, root, media_type[, weight]) list
        as in the original configs, or a bare path."""
        if isinstance(c, str):
            return cls(path=c)
        if isinstance(c, Mapping) or hasattr(c, "to_dict"):
            d = dict(c.to_dict() if hasattr(c, "to_dict") else c)
            unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(
                    f"unknown annotation source fields {sorted(unknown)}; allowed: "
                    f"{[f.name for f in dataclasses.fields(cls)]}"
                )
            if "path" not in d:
                raise ValueError(f"annotation source {d} has no 'path'")
            return cls(**d)
        c = list(c)
        if not 1 <= len(c) <= 4:
            raise ValueError(f"annotation source {c!r}: use [path, data_root, media_type, weight]")
        return cls(*c)

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"{self.path}: weight must be >= 0, got {self.weight}")
        if self.media_type is not None and self.media_type not in MEDIA_TYPES:
            raise ValueError(f"{self.path}: media_type {self.media_type!r} not in {MEDIA_TYPES}")


# exact evaluation samples: the keys of Sample.extra that hold the prompt, CLIP text and frames
EVAL_PROMPT, EVAL_CLIP, EVAL_FRAMES = "eval_prompt_text", "eval_clip_text", "eval_frame_rule"


def eval_sample(
    video: str,
    prompt_text: str,
    clip_text: str,
    frame_rule: FrameRule,
    *,
    source: str = "eval",
    index: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Sample:
    """An evaluation sample given exactly (no template): the full prompt text (no BOS),
    the CLIP text and the frame rule (kept in ``Sample.extra`` under ``EVAL_PROMPT``,
    ``EVAL_CLIP``, ``EVAL_FRAMES``), fed to ``Pipeline(..., samples=[[...]])``. ``extra``
    (e.g. the question id) is kept in ``Sample.extra`` too."""
    ex = {**(extra or {}), EVAL_PROMPT: prompt_text, EVAL_CLIP: clip_text, EVAL_FRAMES: frame_rule}
    return Sample("video", (video,), (), None, frame_rule.bound, source, index, ex)
