"""Video-MME as the original evaluates it (``ppllava/test/video_mme``; the fixture
``reference_protocols`` pins every piece).

Layout (the released dataset; ``--data ROOT`` or the parquet file itself)::

    ROOT/videomme/test-00000-of-00001.parquet   one row per question: videoID, duration,
                                                domain, sub_category, question_id,
                                                task_type, question, options (list of
                                                'A. ...' strings), answer (letter)
    ROOT/data/<videoID>.mp4                      the videos (--video_dir)
    ROOT/subtitle/<videoID>.srt                  the subtitles (--subtitle_dir)

Protocol (``VideoMME_dataset`` + ``infer_videomme_llava`` + ``eval_your_results``):

- Frames: ``--num_frames 0`` (the default) reads 32 frames of a ``short`` video and 64 of a
  ``medium``/``long`` one, N>0 reads N of every video, N<0 32 or 64 by the video's length
  (at most ``32 * |N|`` seconds: 32; ``get_index``'s "fps 1" branch); indices by
  ``frame_index.segment_indices`` over the whole video (``max_frame = frames - 1``).
- Question: ``question + '\\n' + str(options)``, ``options`` rendered as the numpy object
  array pandas returns for the parquet's list column (:func:`render_options`). It is also
  the CLIP text.
- Prompt (``plain_v1``): ``USER: <image>\\n{SYSTEM}\\n{question} ASSISTANT: The best answer
  is:``; with subtitles ``USER: <image>\\nThis video's subtitles are listed below: {subs}
  \\n{SYSTEM}\\n{question} ASSISTANT: The best answer is:``. The Qwen family (``plain_qwen``):
  ``<|im_start|>user\\n<image>\\n{...same user turn...}<|im_end|>\\n<|im_start|>assistant\\n
  The best answer is:`` (one line).
- Subtitles (:func:`select_subtitles`): the .srt is split on blank lines, times become frame
  numbers ``int(t * fps)``, a subtitle is kept when a read frame ``f`` has ``start <= f <
  end``, the kept indices are put through ``list(set(...))`` (CPython's set order), each
  one's first ``<font color="white" size=".72c">(.*?)</font>`` match is taken and the texts
  are joined with one space. Computed on the host from the video's frame count and fps
  (``data.video.video_info``) and the indices the pipeline reads.
- Response: the decoded prompt + generation split on ``The best answer is:``, element 1,
  stripped; the verdicts are ``evaluate.scoring``'s (the original's ``extract_characters_regex``
  / ``eval_your_results``: an unparsable response leaves the denominator; the strict verdict
  counts it wrong).

Subtitles are off unless ``subtitles=True`` (``eval.py --use_subtitles``). The original's
program has the same default; its shipped script means to pass ``--use_subtitles`` with
``--num-frames 0`` but a broken line continuation drops the flag, so as shipped it runs without
subtitles. The two settings are two results: the summary says which (``setting``,
``use_subtitles``), the table title too, and the original-layout file is named after it
(``<out stem>_videomme_results_with_subtitles.json`` / ``..._without_subtitles.json``); a
rerun into the other setting's ``--out`` is refused (``answers.protocol``).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ppllava_jax.data import video as vid
from ppllava_jax.data.errors import MediaError
from ppllava_jax.evaluate import scoring
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import ItemReader, Question, field, resolve_frame_rule
from ppllava_jax.evaluate.conversation import (
    VICUNA,
    Family,
    decoded_text,
    family_of,
    one_turn_prompt,
    reply_after,
)
from ppllava_jax.evaluate.subtitles import (  # noqa: F401 - re-exported
    FONT_PATTERN,
    parse_srt,
    select_subtitles,
    subtitle_frames,
    subtitles_for,
)

SYSTEM = (
    "Select the best answer to the following multiple-choice question based on the video and "
    "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
)
ANSWER_PROMPT = "The best answer is:"
SUBTITLE_INTRO = "This video's subtitles are listed below: "
PARQUET_GLOB = os.path.join("videomme", "test-*.parquet")


# --------------------------------------------------------------------------------------
# Question text


def render_options(options: Iterable[str]) -> str:
    """``str(options)`` of the original, where ``options`` is the numpy object array pandas
    returns for the parquet's list column: ``['A. x' 'B. y'\\n 'C. z']`` (numpy's rendering,
    wrapped at 75 characters with a newline and a space, double quotes around options that
    hold a ``'``). Rendered by numpy itself, with its default print options."""
    arr = np.empty(len(list(options)), dtype=object)
    arr[:] = [str(o) for o in options]
    with np.printoptions(linewidth=75, threshold=1000, edgeitems=3, legacy=False):
        return str(arr)


def question_text(question: str, options: Iterable[str]) -> str:
    """``question + '\\n' + str(options)``: the question of the prompt and the CLIP text."""
    return str(question) + "\n" + render_options(options)


def prompt_text(
    question: str,
    subtitles: str | None = None,
    system: str = SYSTEM,
    family: Family = VICUNA,
) -> str:
    """The LLM prompt (no BOS) of ``infer_videomme_llava``; ``subtitles`` None or empty: the
    prompt without subtitles."""
    if subtitles:
        query = SUBTITLE_INTRO + subtitles + " \n" + system + "\n" + question
    else:
        query = system + "\n" + question
    return one_turn_prompt(family.plain, query, answer_prompt=ANSWER_PROMPT)


def frames_for(duration: str, num_frames: int, num_frames_long: int = 64) -> int:
    """Frames read for a video of ``duration``: ``num_frames`` if positive, else 32 for
    ``short`` and ``num_frames_long`` (64) otherwise (the original's ``--num-frames 0``, the
    ``assigned_frame`` of ``get_index``; a negative count needs the video:
    ``VideoMME.frame_rule``)."""
    if num_frames > 0:
        return int(num_frames)
    return 32 if duration == "short" else int(num_frames_long)


def setting_name(subtitles: bool) -> str:
    """``with subtitles`` / ``without subtitles``: the setting a results file holds."""
    return "with subtitles" if subtitles else "without subtitles"


def response_of(decoded: str) -> str:
    """The original's response: the decoded sequence split on ``The best answer is:``,
    element 1, stripped (``return_prompt`` is empty)."""
    return reply_after(decoded, ANSWER_PROMPT)


# --------------------------------------------------------------------------------------
# Reading the release


def find_parquet(data: str) -> str:
    """The question parquet: ``data`` itself, ``data/videomme/test-*.parquet`` or the one
    ``*.parquet`` under ``data``."""
    if os.path.isfile(data):
        return data
    found = sorted(glob.glob(os.path.join(data, PARQUET_GLOB)))
    if not found:
        found = sorted(glob.glob(os.path.join(data, "**", "*.parquet"), recursive=True))
    if not found:
        raise FileNotFoundError(
            f"no Video-MME question file in {data!r}: expected {PARQUET_GLOB} (the release's "
            "layout) or pass the .parquet file as --data"
        )
    if len(found) > 1:
        raise ValueError(f"several Video-MME parquet files in {data!r}: {found}; pass one")
    return found[0]


def read_questions(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The parquet's rows (pyarrow), grouped by ``videoID`` in order of first appearance as
    the original's dataset groups them: (row number in the file, a dict of the columns)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    need = {"videoID", "duration", "question_id", "question", "options", "answer"}
    missing = need - set(table.column_names)
    if missing:
        raise ValueError(
            f"{path}: Video-MME parquet lacks column(s) {sorted(missing)} (has "
            f"{table.column_names})"
        )
    by_video: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, row in enumerate(table.to_pylist()):
        by_video.setdefault(str(row["videoID"]), []).append((i, row))
    return [r for rows in by_video.values() for r in rows]


class VideoMME(Benchmark):
    """Video-MME (see the module docstring). Records carry the original's response, its
    extraction and both verdicts; accuracy per duration and overall."""

    name = "videomme"
    group_key = "duration"
    max_new_tokens = 200  # the original's generate(max_new_tokens=200)

    def __init__(
        self,
        data: str,
        num_frames: int = 0,
        num_frames_long: int = 64,
        video_dir: str = "",
        subtitle_dir: str = "",
        subtitles: bool = False,
        system: str = SYSTEM,
        qwen: bool = False,
    ):
        """num_frames: 0 32 / ``num_frames_long`` by duration, N>0 N, N<0 32 or 64 by length;
        qwen: the Qwen family's protocol (``PPLLaVAConfig.qwen``)."""
        self.path = find_parquet(os.fspath(data))
        root = os.fspath(data) if os.path.isdir(data) else os.path.dirname(self.path)
        if os.path.basename(root.rstrip(os.sep)) == "videomme" and not os.path.isdir(
            os.path.join(root, "data")
        ):
            root = os.path.dirname(root.rstrip(os.sep))
        self.video_dir = video_dir or os.path.join(root, "data")
        self.subtitle_dir = subtitle_dir or os.path.join(root, "subtitle")
        self.subtitles = bool(subtitles)
        self.num_frames = int(num_frames or 0)
        self.num_frames_long = int(num_frames_long or 64)
        self.system = system
        self.family = family_of(qwen).name
        self._frame_rules: dict[str, vid.FrameRule] = {}

    def setting(self) -> str:
        """The setting of this run (the results' title and ``summary.setting``)."""
        frames = (
            f"{self.num_frames} frames"
            if self.num_frames > 0
            else f"32 frames short / {self.num_frames_long} medium+long"
            if self.num_frames == 0
            else f"32 or 64 frames by length ({-self.num_frames} s a frame)"
        )
        return f"{setting_name(self.subtitles)}, {frames}, {self.family} prompts"

    def frame_rule(self, video_id: str, duration: str) -> vid.FrameRule:
        """The frames of a video (its count: ``frames_for``, or for a negative
        ``num_frames`` the video's length as ``get_index``), once per video."""
        if video_id not in self._frame_rules:
            video = os.path.join(self.video_dir, f"{video_id}.mp4")
            assigned = frames_for(duration, 0, self.num_frames_long)
            rule = vid.FrameRule(num_segments=self.num_frames)
            self._frame_rules[video_id] = resolve_frame_rule(video, rule, assigned)
        return self._frame_rules[video_id]

    def video_subtitles(self, video_id: str, t: int) -> tuple[str | None, list[int]]:
        """(joined subtitles or None, subtitle indices) of a video read with ``t`` frames."""
        if not self.subtitles:
            return None, []
        srt = os.path.join(self.subtitle_dir, f"{video_id}.srt")
        video = os.path.join(self.video_dir, f"{video_id}.mp4")
        if not os.path.exists(srt):
            return None, []
        try:
            n, fps = vid.video_info(video)
        except MediaError:  # missing or unreadable: the pipeline skips and counts it
            return None, []
        return subtitles_for(srt, n, fps, t)

    def questions(self) -> list[Question]:
        """One question per parquet row; a row with a missing (null) or mistyped field is
        skipped (:meth:`bad_items`)."""
        reader = ItemReader(self.name)
        cache: dict[tuple[str, int], tuple[str | None, list[int]]] = {}
        self._frame_rules = {}
        name = os.path.basename(self.path)
        for i, r in read_questions(self.path):
            qid = r.get("question_id")
            qid = str(qid) if isinstance(qid, (str, int)) and qid != "" else f"{name}:{i}"
            reader.add(self.path, i, [qid], self.question, r, cache)
        self._bad_items = reader.bad
        return reader.questions

    def question(
        self, r: dict[str, Any], cache: dict[tuple[str, int], tuple[str | None, list[int]]]
    ) -> Question:
        """The question of one parquet row; ``cache`` holds each video's subtitles."""
        video_id = str(field(r, "videoID", (str, int)))
        duration = field(r, "duration")
        options = [str(o) for o in field(r, "options", (list, tuple))]
        question = field(r, "question")
        rule = self.frame_rule(video_id, duration)
        t = int(rule.num_segments)
        if (video_id, t) not in cache:
            cache[(video_id, t)] = self.video_subtitles(video_id, t)
        subs, order = cache[(video_id, t)]
        q = question_text(question, options)
        return Question(
            qid=str(field(r, "question_id", (str, int))),
            video=os.path.join(self.video_dir, f"{video_id}.mp4"),
            answer=field(r, "answer"),
            prompt_text=prompt_text(q, subs, self.system, family_of(self.family)),
            clip_text=q,
            frames=rule,
            answer_prefix=ANSWER_PROMPT,
            group=f"frames{t}",
            candidates=tuple(options),
            info={
                "videoID": video_id,
                "video_id": str(r.get("video_id", "")),
                "duration": duration,
                "domain": str(r.get("domain", "")),
                "sub_category": str(r.get("sub_category", "")),
                "task_type": str(r.get("task_type", "")),
                "question": question,
                "options": options,
                "subtitles": bool(subs),
                "subtitle_order": order,
            },
        )

    def record(self, q: Question, prediction: str, decoded: str = "") -> dict[str, Any]:
        """The original's saved fields (``question_id``, ``task_type``, ``question``,
        ``options``, ``answer``, ``response``) plus the reply, the extractions and both
        verdicts (``scoring``)."""
        fam = family_of(self.family)
        response = response_of(decoded or decoded_text(q.prompt_text, prediction, fam))
        try:
            extraction = scoring.videomme_extract(response)
        except Exception as e:  # noqa: BLE001 - the verdict reports it
            extraction = f"error:{type(e).__name__}"
        v_orig = scoring.videomme_verdict(response, q.answer)
        v_strict = scoring.videomme_verdict_strict(response, q.answer)
        info = q.info
        return {
            "id": q.qid,
            "question_id": q.qid,
            "videoID": info.get("videoID", ""),
            "duration": info.get("duration", ""),
            "domain": info.get("domain", ""),
            "sub_category": info.get("sub_category", ""),
            "task_type": info.get("task_type", ""),
            "question": info.get("question", ""),
            "options": info.get("options", list(q.candidates)),
            "answer": q.answer,
            "subtitles": info.get("subtitles", False),
            "reply": prediction,
            "response": response,
            "extraction": extraction,
            "extraction_strict": scoring.videomme_extract_strict(response),
            "verdict_original": v_orig,
            "verdict_strict": v_strict,
            "correct_original": v_orig == scoring.CORRECT,
            "correct_strict": v_strict == scoring.CORRECT,
        }

    def summarize(self, records: Sequence[dict], questions: Sequence[Question]) -> dict[str, Any]:
        """Both accuracies overall and per duration (the original's denominator leaves out
        the excluded replies; the strict one counts every answered question)."""
        out = {"setting": self.setting(), "use_subtitles": self.subtitles}
        out.update(scoring.two_verdict_summary(records, self.group_key))
        out["num_questions"] = len(questions)
        out["num_missing"] = len(questions) - len(records)
        return out

    def write_outputs(self, records: Sequence[dict], out_path: str) -> dict[str, str]:
        """``<out stem>_videomme_results_with_subtitles.json`` (or ``_without_subtitles``): the
        original's results file (what its ``eval_your_results`` reads): one entry per video
        with its questions' responses."""
        suffix = setting_name(self.subtitles).replace(" ", "_")
        path = os.path.splitext(out_path)[0] + f"_videomme_results_{suffix}.json"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(original_results(records), f)
        os.replace(tmp, path)
        return {"videomme_results_file": path}


def original_results(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Records regrouped as the original driver saves them: ``[{video_id, duration, domain,
    sub_category, questions: [{question_id, task_type, question, options, answer,
    response}]}]``, videos in order of first appearance (``video_id`` is the ``videoID``)."""
    by_video: dict[str, dict[str, Any]] = {}
    for r in records:
        v = by_video.setdefault(
            r["videoID"],
            {
                "video_id": r["videoID"],
                "duration": r["duration"],
                "domain": r["domain"],
                "sub_category": r["sub_category"],
                "questions": [],
            },
        )
        v["questions"].append(
            {k: r[k] for k in ("question_id", "task_type", "question", "options", "answer")}
            | {"response": r["response"]}
        )
    return list(by_video.values())
