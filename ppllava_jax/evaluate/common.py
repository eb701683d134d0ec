"""What every benchmark shares: questions, answer records, multiple-choice scoring, tables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from ppllava_jax.evaluate.extract import LETTERS, extract_letter

MC_PREFIX = "Best option:("  # SPEC §8: the answer is the first letter after it


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of a benchmark.

    qid: unique id (the resume key). video: a video file, GIF or frame folder.
    prompt: the user turn (``<image>`` is prepended by the template). answer: the reference
    (the letter for multiple choice). group: questions of one group share the frame count and
    the answer prefix (one pipeline each). bound: (start, end) seconds or None.
    system: a system text written before the first USER turn (e.g. Video-MME subtitles).
    candidates: the options' texts (multiple choice). info: copied into the answer record.
    """

    qid: str
    video: str
    prompt: str
    answer: str
    num_frames: int
    group: str = "default"
    answer_prefix: str = ""
    bound: tuple[float, float] | None = None
    system: str | None = None
    candidates: tuple[str, ...] = ()
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def mc_prompt(question: str, candidates: Sequence[str]) -> str:
    """SPEC §8: ``Question: {q}\\nOptions:\\n(A) {a}\\n...\\nOnly give the best option.``"""
    if len(candidates) > len(LETTERS):
        raise ValueError(f"{len(candidates)} options; at most {len(LETTERS)}")
    opts = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{opts}\nOnly give the best option."


def mc_record(q: Question, prediction: str) -> dict[str, Any]:
    """The answer record of a multiple-choice question (what the JSONL keeps)."""
    letter = extract_letter(prediction, list(q.candidates) or None)
    return {
        "id": q.qid,
        "prediction": prediction,
        "pred_letter": letter,
        "answer": q.answer,
        "correct": letter == q.answer,
        **q.info,
    }


def accuracy_by(records: Sequence[dict], key: str | None) -> dict[str, dict[str, float]]:
    """``{group: {"accuracy", "correct", "total"}}`` over records (key None: one group 'all')."""
    out: dict[str, list[int]] = {}
    for r in records:
        g = "all" if key is None else str(r.get(key, "?"))
        c = out.setdefault(g, [0, 0])
        c[0] += bool(r.get("correct"))
        c[1] += 1
    return {
        g: {"accuracy": c / n if n else 0.0, "correct": c, "total": n}
        for g, (c, n) in sorted(out.items())
    }


def mc_summary(records: Sequence[dict], key: str | None, num_questions: int) -> dict[str, Any]:
    """Overall and per-``key`` accuracy; ``num_missing`` counts questions never answered
    (unreadable videos)."""
    overall = accuracy_by(records, None).get("all", {"accuracy": 0.0, "correct": 0, "total": 0})
    out: dict[str, Any] = {
        "accuracy": overall["accuracy"],
        "correct": overall["correct"],
        "answered": overall["total"],
        "num_questions": num_questions,
        "num_missing": num_questions - overall["total"],
        "unparsed": sum(r.get("pred_letter") is None for r in records),
    }
    if key is not None:
        out[f"by_{key}"] = accuracy_by(records, key)
    return out


def format_table(summary: dict[str, Any], title: str) -> str:
    """A printable table of a summary (per-group accuracies, then the overall line)."""
    lines = [title, f"{'group':<32} {'correct':>8} {'total':>7} {'accuracy':>9}"]
    for k, v in summary.items():
        if k.startswith("by_") and isinstance(v, dict):
            for g, row in v.items():
                lines.append(
                    f"{g:<32} {row['correct']:>8} {row['total']:>7} {100 * row['accuracy']:>8.2f}%"
                )
    if "accuracy" in summary:
        lines.append(
            f"{'overall':<32} {summary['correct']:>8} {summary['answered']:>7} "
            f"{100 * summary['accuracy']:>8.2f}%"
        )
    for k in ("num_questions", "num_missing", "unparsed", "answered"):
        if k in summary and not ("accuracy" in summary and k == "answered"):
            lines.append(f"{k}: {summary[k]}")
    for k, v in summary.items():
        if k.endswith("_file"):
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


def find_video(root: str, name: str, exts: Sequence[str] = ()) -> str:
    """``root/name``, or with one of ``exts`` appended, or a frame folder of that name; the
    first that exists (else ``root/name`` so the pipeline reports it missing)."""
    base = os.path.join(root, name) if root else name
    if os.path.exists(base):
        return base
    for e in exts:
        if os.path.exists(base + e):
            return base + e
    return base


VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif")
