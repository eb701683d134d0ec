"""Video-MME's subtitles as the original reads them (``ppllava/test/video_mme/utils.py``):
``load_subtitles`` / ``extract_subtitles`` and the selection of ``VideoMME_dataset.__getitem__``
(see ``evaluate/videomme.py``). Host-side, pure Python."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from ppllava_jax.data.frame_index import segment_indices

FONT_PATTERN = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def _srt_time(text: str) -> float:
    h, m, s_ms = text.split(":")
    s, ms = s_ms.split(",")
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str, source: str = "<srt>") -> list[tuple[float, float, str]]:
    """The original's ``load_subtitles``: ``(start_s, end_s, text)`` per block, in the order
    of a dict keyed by ``(start, end)`` (a repeated time range keeps its first position and
    its last text). Blocks are split on ``'\\n\\n'``; blocks of fewer than 3 lines are
    dropped; a block's text is its lines from the third on, joined with a space. ``text`` is
    the file read in text mode (universal newlines). Raises ValueError naming ``source``
    on a time line the original cannot parse."""
    subs: dict[tuple[float, float], str] = {}
    for section in text.split("\n\n"):
        if not section.strip():
            continue
        lines = section.split("\n")
        if len(lines) < 3:
            continue
        try:
            start_s, end_s = lines[1].split(" --> ")[:2]
            key = (_srt_time(start_s), _srt_time(end_s))
        except ValueError as e:
            raise ValueError(
                f"{source}: cannot read the subtitle time line {lines[1]!r} of block "
                f"{section[:80]!r} (expected 'HH:MM:SS,mmm --> HH:MM:SS,mmm' on the block's "
                "second line, blocks separated by one blank line)"
            ) from e
        subs[key] = " ".join(lines[2:])
    return [(s, e, t) for (s, e), t in subs.items()]


def subtitle_frames(
    subtitles: Sequence[tuple[float, float, str]], fps: float
) -> list[tuple[int, int, str]]:
    """``extract_subtitles``: times to frame numbers, ``int(t * fps)``."""
    return [(int(s * fps), int(e * fps), t) for s, e, t in subtitles]


def select_subtitles(
    frames: Sequence[tuple[int, int, str]], frame_indices: Iterable[int]
) -> tuple[str, list[int]]:
    """The subtitle text of ``VideoMME_dataset.__getitem__`` and the subtitle indices it joins.

    For each read frame ``f`` (in order) and each subtitle ``i`` with ``start <= f < end``,
    ``i`` is collected; ``list(set(...))`` of those (CPython's set order, not always sorted);
    for each, the first ``<font color="white" size=".72c">(.*?)</font>`` match (subtitles
    without one are dropped); joined with one space. Returns (text, indices joined)."""
    hits: list[int] = []
    for f in frame_indices:
        for i, (start, end, _) in enumerate(frames):
            if f < end and f >= start:
                hits.append(i)
    texts, order = [], []
    for i in list(set(hits)):
        found = FONT_PATTERN.findall(frames[i][2])
        if found:
            texts.append(found[0])
            order.append(i)
    return " ".join(texts), order


def subtitles_for(
    srt_path: str, video_frames: int, fps: float, num_segments: int
) -> tuple[str | None, list[int]]:
    """Subtitles of a video of ``video_frames`` frames at ``fps`` read with ``num_segments``
    frames (``segment_indices(video_frames - 1, fps, num_segments)``, as the pipeline reads
    it): (joined text, subtitle indices joined), or (None, []) when there is no .srt file."""
    if not os.path.exists(srt_path):
        return None, []
    with open(srt_path, encoding="utf-8") as f:
        subs = parse_srt(f.read(), srt_path)
    idx = segment_indices(video_frames - 1, fps, num_segments)
    return select_subtitles(subtitle_frames(subs, fps), idx.tolist())
