"""What every benchmark shares: questions (the evaluation contract), malformed annotation items
(skipped and named), answer records, multiple-choice scoring, tables."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ppllava_jax.data.video import FrameRule
from ppllava_jax.evaluate.extract import extract_letter

# frames read when a per-video count (negative --num_frames) meets media that cannot be read:
# the pipeline then reports the video as unreadable
UNREADABLE_FRAMES = 32

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of a benchmark: what the model is given, and how its reply is scored.

    The contract of an exact protocol (every reproduced benchmark; see
    ``evaluate/mvbench.py``): the benchmark builds the texts the original passes to its
    tokenizers and the original's frame rule, and the runner feeds them as they are.

    Attributes:
      qid: unique id (the resume key).
      video: a video file, GIF or frame folder.
      answer: the reference (MVBench: the ``gt`` string ``'(B) text'``; Video-MME: the
        letter; open-ended: the answer text), given to :meth:`Benchmark.record`.
      prompt_text: the full LLM prompt exactly as the original passes it to the tokenizer,
        answer prefix included, no BOS (the tokenizer adds it): e.g.
        ``'USER: <image>\\n...Only give the best option. ASSISTANT: Best option:('``. The
        pipeline encodes it with ``tok(prompt_text).input_ids`` (the tokenizer of
        ``load_llm_tokenizer(dir, legacy=...)``; ``<image>`` = the image token, once).
      clip_text: the text given to the CLIP tokenizer (padded / truncated to the model's
        CLIP length, 248 with the extended text tower).
      frames: the frame rule (``data.video.FrameRule``: ``num_segments``, ``bound`` or None,
        for frame folders ``folder_fps``, ``file_pattern``, ``first_idx``), read exactly by
        ``data.video.load_frames_by_rule``.
      answer_prefix: the text the original splits the decoded sequence on (MVBench
        ``'Best option:('``); informative for the runner (groups), used by the benchmark.
      group: questions of one group share one pipeline (with the frame count and prefix).
      candidates: the options' texts (multiple choice).
      info: copied into the answer record (task, duration, ...).

    Template questions (the project's own ``synthetic`` benchmark, or any benchmark not yet
    made exact) leave ``prompt_text`` empty and give ``prompt`` (the user turn, rendered with
    the checkpoint's conversation template and tokenized as in training), optional
    ``system`` and ``answer_prefix``, ``num_frames`` and ``bound`` (frames at segment
    centres, ``video.sample_indices(mode='middle')``); the CLIP text is then the question.
    ``history`` holds a template question's earlier turns, ``(question, answer)`` pairs, which
    stand before ``prompt`` as the chat renders a conversation (``ppllava_jax.chat``).

    The runner calls ``bench.record(q, reply, decoded=...)`` for exact questions, where
    ``reply`` is the generated text and ``decoded`` the whole sequence (prompt ids +
    generated ids) decoded with ``skip_special_tokens=True``, as the original drivers
    decode it before splitting on the answer prefix; template questions get
    ``bench.record(q, reply)``.
    """

    qid: str
    video: str
    answer: str = ""
    prompt_text: str = ""
    clip_text: str | None = None
    frames: FrameRule | None = None
    answer_prefix: str = ""
    group: str = "default"
    candidates: tuple[str, ...] = ()
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # template questions only (see above)
    prompt: str = ""
    num_frames: int = 0
    bound: tuple[float, float] | None = None
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.prompt_text:
            if self.frames is None or self.clip_text is None:
                raise ValueError(
                    f"question {self.qid!r}: an exact question (prompt_text) needs clip_text "
                    "and frames (a FrameRule)"
                )
            if self.prompt_text.startswith("<s>"):
                raise ValueError(
                    f"question {self.qid!r}: prompt_text must not start with <s> (the "
                    "tokenizer adds BOS)"
                )
        elif not self.prompt or self.num_frames <= 0:
            raise ValueError(
                f"question {self.qid!r}: give prompt_text + clip_text + frames (exact) or "
                "prompt + num_frames (template)"
            )

    @property
    def exact(self) -> bool:
        """True when the prompt, CLIP text and frames are given exactly (``prompt_text``)."""
        return bool(self.prompt_text)

    @property
    def frame_count(self) -> int:
        """T, the frames read for this question."""
        return int(self.frames.num_segments) if self.frames is not None else int(self.num_frames)


@dataclasses.dataclass(frozen=True)
class BadItem:
    """A question of an annotation file that could not be built (a missing field, a wrong
    type): skipped and reported, as an unreadable video is.

    Attributes:
      qid: the question id it would have had (the id field when readable, else
        ``<file name>:<index>``).
      path: the annotation file; index: the item's position in it; reason: what is wrong.
    """

    qid: str
    path: str
    index: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path} [item {self.index}, question {self.qid}]: {self.reason}"


class ItemError(ValueError):
    """A malformed annotation item (the message says which field and what is wrong)."""


# what building one item's questions raises on a malformed item (KeyError: a missing field;
# ItemError is a ValueError)
ITEM_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def item_reason(e: BaseException) -> str:
    """What is wrong with an item, from the error building its question raised."""
    if isinstance(e, KeyError):
        return f"field {e.args[0]!r} is missing" if e.args else "a field is missing"
    if isinstance(e, ItemError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def field(item: Any, key: str, kinds: type | tuple[type, ...] = str) -> Any:
    """``item[key]``, checked: ItemError when ``item`` is no object, the field is missing or
    null, or its value is not one of ``kinds`` (bool is no number)."""
    if not isinstance(item, Mapping):
        raise ItemError(f"an item must be an object, got {type(item).__name__}")
    if key not in item or item[key] is None:
        raise ItemError(f"field {key!r} is missing")
    v = item[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ItemError(f"field {key!r} must be of type {names}, got {type(v).__name__} {v!r:.60}")
    return v


class ItemReader:
    """Builds the questions of a benchmark's annotation items one item at a time; an item
    whose building raises one of :data:`ITEM_ERRORS` is skipped, logged and kept in ``bad``
    (one :class:`BadItem` per question id it would have had)."""

    def __init__(self, name: str):
        self.name = name
        self.questions: list[Question] = []
        self.bad: list[BadItem] = []

    def add(
        self,
        path: str,
        index: int,
        qids: Sequence[str],
        build: Callable[..., Question | Sequence[Question]],
        *args: Any,
        **kw: Any,
    ) -> None:
        """The questions ``build(*args, **kw)`` returns (one or a list), or, when it raises,
        ``qids`` as bad items."""
        try:
            got = build(*args, **kw)
        except ITEM_ERRORS as e:
            bad = [BadItem(str(q), os.fspath(path), int(index), item_reason(e)) for q in qids]
            self.bad += bad
            log.warning("%s: skipping a malformed annotation item: %s", self.name, bad[0])
            return
        self.questions += [got] if isinstance(got, Question) else list(got)


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


def scalar_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a summary for TensorBoard / ``metrics.jsonl``: the overall accuracies
    (``accuracy``; exact benchmarks ``accuracy_original`` and ``accuracy_strict``), each
    group's as ``<accuracy name>/<group>``, and the counts ``correct``, ``answered``,
    ``num_questions``, ``num_missing``, ``bad_annotations``, ``unparsed`` (those present)."""
    counts = ("correct", "answered", "num_questions", "num_missing", "bad_annotations", "unparsed")
    out: dict[str, float] = {}
    for k, v in summary.items():
        if (k.startswith("accuracy") or k in counts) and isinstance(v, (int, float)):
            out[k] = float(v)
        elif k.startswith("by_") and isinstance(v, dict):
            for group, row in v.items():
                for m, x in row.items():
                    if m.startswith("accuracy") and isinstance(x, (int, float)):
                        out[f"{m}/{group}"] = float(x)
    return out


def results_path(workdir: str | os.PathLike, split: str) -> str:
    """The results file of a split scored in a training run: ``<workdir>/results_<split>.json``
    (its answers beside it, ``results_<split>.answers.jsonl``)."""
    return os.path.join(os.fspath(workdir), f"results_{split}.json")


def format_table(summary: dict[str, Any], title: str) -> str:
    """A printable table of a summary (per-group accuracies, then the overall line); a
    two-verdict summary (``accuracy_original`` / ``accuracy_strict``) prints both."""
    two = "accuracy_original" in summary

    def row(name: str, r: dict[str, Any]) -> str:
        if two:
            return (
                f"{name:<32} {r['correct_original']:>6}/{r['counted_original']:<6} "
                f"{100 * r['accuracy_original']:>8.2f}% {r['correct_strict']:>6}/"
                f"{r['counted_strict']:<6} {100 * r['accuracy_strict']:>8.2f}%"
            )
        return f"{name:<32} {r['correct']:>8} {r['total']:>7} {100 * r['accuracy']:>8.2f}%"

    head = (
        f"{'group':<32} {'original (paper)':>23} {'strict':>23}"
        if two
        else f"{'group':<32} {'correct':>8} {'total':>7} {'accuracy':>9}"
    )
    lines = [title, head]
    for k, v in summary.items():
        if k.startswith("by_") and isinstance(v, dict):
            for g, r in v.items():
                lines.append(row(g, r))
    if two:
        lines.append(row("overall", summary))
        for k in ("excluded_original", "errors_original", "errors_strict"):
            if summary.get(k):
                lines.append(f"{k}: {summary[k]}")
    elif "accuracy" in summary:
        lines.append(row("overall", {**summary, "total": summary["answered"]}))
    for k in ("num_questions", "num_missing", "bad_annotations", "unparsed", "answered"):
        if k in summary and not ("accuracy" in summary and k == "answered"):
            lines.append(f"{k}: {summary[k]}")
    for k, v in summary.items():
        if k.endswith("_file"):
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


def media_extent(video: str, rule: FrameRule) -> tuple[int, float]:
    """``(max_frame, fps)`` the original's readers give ``get_index``: a frame folder (its
    number of entries, ``rule.folder_fps``), a GIF (frames - 1, 25 fps as ``read_gif``) or a
    video file (frames - 1, its average rate). Raises MediaError / OSError when unreadable."""
    from ppllava_jax.data import video as vid

    if os.path.isdir(video):
        return len(os.listdir(video)), float(rule.folder_fps)
    if video.lower().endswith(".gif"):
        from PIL import Image

        with Image.open(video) as im:
            return int(getattr(im, "n_frames", 1)) - 1, vid.GIF_RULE_FPS
    n, fps = vid.video_info(video)
    return n - 1, float(fps)


def resolve_frame_rule(video: str, rule: FrameRule, assigned_frame: int = 16) -> FrameRule:
    """``rule`` with the frame count the original's ``get_index`` reads for ``video``: a
    positive ``num_segments`` as it is; 0 ``assigned_frame``; negative 32 or 64 by the clip's
    length at ``|num_segments|`` seconds a frame (``frame_index.eval_num_segments``). Media
    that cannot be read get :data:`UNREADABLE_FRAMES` (the pipeline then skips them)."""
    from ppllava_jax.data.errors import MediaError
    from ppllava_jax.data.frame_index import eval_num_segments

    n = int(rule.num_segments)
    if n > 0:
        return rule
    if n == 0:
        return dataclasses.replace(rule, num_segments=int(assigned_frame))
    try:
        max_frame, fps = media_extent(video, rule)
    except (MediaError, OSError):
        return dataclasses.replace(rule, num_segments=UNREADABLE_FRAMES)
    t = eval_num_segments(n, max_frame, fps, rule.bound, assigned_frame)
    return dataclasses.replace(rule, num_segments=t)


VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif")
