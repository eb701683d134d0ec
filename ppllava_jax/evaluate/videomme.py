"""Video-MME: multiple choice, 32 frames for short videos and 64 for medium/long ones,
optional subtitles aligned to the sampled frames; accuracy per duration and overall.

``--data`` is the question file (or a directory holding one: ``*.json``, ``*.jsonl`` or
``*.parquet``). Both published shapes are read: one record per question
(``videoID, duration, question, options, answer``, optional ``question_id``, ``domain``,
``task_type``, ``sub_category``) or one record per video with a ``questions`` list.
Options are ``["A. ...", "B. ...", ...]`` (the letters are stripped and re-written as
``(A) ...``); ``answer`` is the letter. Videos: ``<video_dir>/<videoID>.mp4`` (default
``<root>/data``, else ``<root>/videos``); subtitles: ``<subtitle_dir>/<videoID>.srt``
(default ``<root>/subtitle``), used with ``--subtitles``.

Subtitles: the frames the pipeline will sample (centres of T equal segments) are computed
here from the video's frame count and fps; every subtitle line shown at one of those
timestamps is kept, in order and without repeats, and written before the first ``USER:``
turn ("This video's subtitles are listed below: ..."), so the CLIP prompt (the question) is
not crowded out by them.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from ppllava_jax.data import video as vid
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import MC_PREFIX, Question, find_video, mc_prompt
from ppllava_jax.evaluate.extract import letter_of_answer, strip_option_letter

DURATIONS = ("short", "medium", "long")


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """``(start_s, end_s, text)`` of each SRT cue (tags removed, lines joined)."""
    cues = []
    t = r"(\d+):(\d+):(\d+)[,.](\d+)"
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip()):
        lines = block.strip().split("\n")
        for j, line in enumerate(lines):
            m = re.match(rf"\s*{t}\s*-->\s*{t}", line)
            if m:
                g = [int(x) for x in m.groups()]
                start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
                end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
                body = " ".join(s.strip() for s in lines[j + 1 :] if s.strip())
                body = re.sub(r"<[^>]+>", "", body).strip()
                if body:
                    cues.append((start, end, body))
                break
    return cues


def subtitles_at(cues: list[tuple[float, float, str]], times: np.ndarray) -> list[str]:
    """Cue texts shown at any of ``times`` (seconds), in time order, each once."""
    out: list[str] = []
    for s, e, body in cues:
        if np.any((times >= s) & (times <= e)) and body not in out:
            out.append(body)
    return out


def frame_times(path: str, num_frames: int) -> np.ndarray:
    """Timestamps (s) of the frames the evaluation pipeline samples ('middle')."""
    n, fps = vid.video_info(path)
    return vid.sample_indices(n, num_frames, "middle") / fps


def _load_records(path: str) -> list[dict]:
    if os.path.isdir(path):
        files = sorted(
            f
            for ext in ("json", "jsonl", "parquet")
            for f in glob.glob(os.path.join(path, f"**/*.{ext}"), recursive=True)
        )
        if not files:
            raise FileNotFoundError(f"no Video-MME question file (json/jsonl/parquet) in {path}")
        path = files[0]
    if path.endswith(".parquet"):
        import pandas as pd  # optional: only for the parquet release

        rows = pd.read_parquet(path).to_dict("records")
    elif path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    else:
        with open(path) as f:
            rows = json.load(f)
    flat = []
    for r in rows:
        if "questions" in r:
            for q in r["questions"]:
                flat.append({**{k: v for k, v in r.items() if k != "questions"}, **q})
        else:
            flat.append(dict(r))
    return flat


class VideoMME(Benchmark):
    name = "videomme"
    group_key = "duration"

    def __init__(
        self,
        data: str,
        num_frames: int = 32,
        num_frames_long: int = 64,
        video_dir: str = "",
        subtitle_dir: str = "",
        subtitles: bool = False,
    ):
        self.path = os.fspath(data)
        root = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        if not video_dir:
            video_dir = next(
                (
                    d
                    for d in (os.path.join(root, "data"), os.path.join(root, "videos"))
                    if os.path.isdir(d)
                ),
                os.path.join(root, "data"),
            )
        self.video_dir = video_dir
        self.subtitle_dir = subtitle_dir or os.path.join(root, "subtitle")
        self.subtitles = subtitles
        self.frames = {"short": int(num_frames or 32)}
        self.frames.update(medium=int(num_frames_long or 64), long=int(num_frames_long or 64))

    def _system(self, video: str, vid_id: str, n: int) -> str | None:
        if not self.subtitles:
            return None
        srt = os.path.join(self.subtitle_dir, f"{vid_id}.srt")
        if not os.path.exists(srt) or not os.path.exists(video):
            return None
        with open(srt, encoding="utf-8", errors="replace") as f:
            cues = parse_srt(f.read())
        lines = subtitles_at(cues, frame_times(video, n))
        if not lines:
            return None
        return "This video's subtitles are listed below:\n" + "\n".join(lines)

    def questions(self) -> list[Question]:
        qs = []
        systems: dict[tuple[str, int], str | None] = {}
        for i, r in enumerate(_load_records(self.path)):
            vid_id = str(r.get("videoID") or r.get("video_id") or r.get("video"))
            duration = str(r.get("duration", "short")).lower()
            n = self.frames.get(duration, self.frames["medium"])
            options = [strip_option_letter(str(o)) for o in list(r["options"])]
            video = find_video(self.video_dir, vid_id, (".mp4", ".mkv", ".webm", ".avi"))
            key = (vid_id, n)
            if key not in systems:
                systems[key] = self._system(video, vid_id, n)
            qid = str(r.get("question_id") or f"{vid_id}:{i}")
            qs.append(
                Question(
                    qid=qid,
                    video=video,
                    prompt=mc_prompt(str(r["question"]), options),
                    answer=letter_of_answer(str(r["answer"]), options),
                    num_frames=n,
                    group=f"frames{n}",
                    answer_prefix=MC_PREFIX,
                    system=systems[key],
                    candidates=tuple(options),
                    info={
                        "duration": duration,
                        "videoID": vid_id,
                        "task_type": r.get("task_type", ""),
                        "domain": r.get("domain", ""),
                        "question": str(r["question"]),
                        "subtitles": systems[key] is not None,
                    },
                )
            )
        return qs
