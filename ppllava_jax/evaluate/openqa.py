"""Open-ended video QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA) and VCGBench (Video-ChatGPT's
benchmark) as the original runs them (``ppllava/test/qabench``, ``ppllava/test/vcgbench``;
the fixture ``reference_protocols`` pins every piece). Both are scored by an external GPT
judge; this module writes the judge's input files exactly as the original writes them.

**Open-ended QA** (``--benchmark openqa``, ``--qa_dataset msvd|msrvtt|activitynet``, default:
ActivityNet when ``test_q.json`` + ``test_a.json`` are given, MSVD for ``new_test_qa.json`` or a
path naming msvd, else MSRVTT; the setting only picks the layout, not the protocol)::

    MSVD:        --data MSVD-QA/new_test_qa.json   --video_dir MSVD/YouTubeClips
    MSRVTT:      --data MSRVTT-QA/test_qa.json     --video_dir MSRVTT-QA/video
                 [{"video_name" | "video" | "video_id", "question", "answer",
                   "question_id" | "id"}]; the video is <video_dir>/<video_name> (or
                   <video_id>.mp4), an extension (.avi/.mp4/...) appended if needed
    ActivityNet: --data video_chatgpt/test_q.json (+ test_a.json beside it, answers taken
                 by position as the original does) --video_dir ActivityNet/activitynet_frames
                 [{"video_name", "question", "question_id"}]; frames in
                 <video_dir>/v_<video_name>/000001.jpg ... (read at 3 fps, numbered from 1)

Prompt (``conv_videoqa_v1``): ``USER: <image>\\n{pre-query prompt} {question} ASSISTANT:
Answer: In the video,``; the Qwen family (``conv_videoqa_qwen``): ``<|im_start|>user\\n<image>
\\n{pre-query prompt} {question}<|im_end|>\\n<|im_start|>assistant\\nAnswer: In the video,``
(one line). CLIP text = the question; 32 frames (``--num_frames``; negative: 32 or 64 by the
video's length, as ``get_index``) by ``frame_index.segment_indices``. Judge record
(``<out stem>_pred.json``, a JSON list as the original's ``<dataset>.json``): ``{"pred",
"answer", "question", "id"}``, ``pred`` = the decoded prompt + generation between the first
and second ``Answer: In the video,``, stripped; ``answer``, ``question``, ``id`` as in the
annotation (types kept).

**VCGBench** (``--benchmark vcgbench``, ``--data ROOT``)::

    ROOT/Benchmarking_QA/generic_qa.json       [{"video_name", "Q", "A"}]
    ROOT/Benchmarking_QA/temporal_qa.json      [{"video_name", "Q", "A"}]
    ROOT/Benchmarking_QA/consistency_qa.json   [{"video_name", "Q1", "Q2", "A"}]
    ROOT/Test_Videos/<video_name>.mp4|mkv|mov|avi        (--video_dir)

(the JSON files directly in ROOT are read too). Prompt (``plain_v1``): ``USER: <image>\\n{Q}
ASSISTANT: `` (the trailing space is the token ``▁``); ``system_vcg=True`` uses
``conv_vcg_v1`` (the Video-ChatGPT system text first). ``pred`` = the decoded text split on
``'ASSISTANT: '``, element 1, stripped. The Qwen family: ``plain_qwen``
(``<|im_start|>user\\n<image>\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n``) or ``conv_vcg_qwen``
(the system text + ``<|im_end|>\\n`` first), ``pred`` = the decoded text split on
``'assistant\\n'``, element 1, stripped: a question ending in "assistant" or a reply holding
``assistant\\n`` cuts the prediction there, as in the original. Consistency asks Q1, then
Q2. Saved files as the original's ``save_results``: ``<out stem>_general.json``,
``_temporal.json``, ``_consist.json`` (``{"pred", "A", "Q", "video_name"}``; consistency
``{"pred1", "pred2", "video_name", "A", "Q1", "Q2"}``, ``pred1`` answering Q1). The original
labels the consistency questions the wrong way round (its ``Q1`` holds Q2);
``legacy_consistency_labels=True`` writes that layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ppllava_jax.data.annotations import read_json_list
from ppllava_jax.data.video import FrameRule
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import VIDEO_EXTS, ItemReader, Question, field, resolve_frame_rule
from ppllava_jax.evaluate.conversation import (
    VICUNA,
    VIDEOQA_ANSWER,
    VIDEOQA_PRE_QUERY,
    Family,
    decoded_text,
    family_of,
    one_turn_prompt,
    reply_after,
)

QA_DATASETS = ("msvd", "msrvtt", "activitynet")
QA_POSTFIX = {"msvd": (".avi",), "msrvtt": (".mp4",), "activitynet": (".mp4", ".mkv", ".webm")}
ACTIVITYNET_FRAMES = FrameRule(num_segments=32, folder_fps=3.0, file_pattern="{:0>6}.jpg")
VCG_TASKS = ("generic", "temporal", "consistency")
VCG_SAVED = {"generic": "general", "temporal": "temporal", "consistency": "consist"}
VCG_SPLIT = VICUNA.vcg_split  # the Vicuna family's; Family.vcg_split
VCG_POSTFIX = (".mp4", ".mkv", ".mov", ".avi")


def qa_prompt_text(question: str, family: Family = VICUNA) -> str:
    """The open-ended QA prompt (``conv_videoqa_v1`` / ``conv_videoqa_qwen``), no BOS."""
    return one_turn_prompt(
        family.videoqa,
        question,
        pre_query_prompt=VIDEOQA_PRE_QUERY,
        answer_prompt=VIDEOQA_ANSWER,
    )


def vcg_prompt_text(question: str, system_vcg: bool = False, family: Family = VICUNA) -> str:
    """The VCGBench prompt (``plain_v1`` / ``plain_qwen``, or with ``system_vcg``
    ``conv_vcg_v1`` / ``conv_vcg_qwen``), no BOS."""
    return one_turn_prompt(family.vcg_system if system_vcg else family.plain, question)


def qa_judge_record(pred: str, answer: Any, question: Any, qid: Any) -> dict[str, Any]:
    """What the original saves for the QA judge, in its key order."""
    return {"pred": pred, "answer": answer, "question": question, "id": qid}


def _decoded(q: Question, reply: str, decoded: str, family: str) -> str:
    return decoded or decoded_text(q.prompt_text, reply, family_of(family))


def _root(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def _with_postfix(base: str, postfixes: Sequence[str]) -> str:
    """``base`` if it exists, else the first ``base + ext`` that does (else ``base``)."""
    if os.path.exists(base):
        return base
    for ext in (*postfixes, *VIDEO_EXTS):
        if os.path.exists(base + ext):
            return base + ext
    return base


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class _Open(Benchmark):
    """Judge-scored benchmarks: records keep the reply and the judge fields; no accuracy."""

    max_new_tokens = 200  # the original's generate(max_new_tokens=200)

    def summarize(self, records: Sequence[dict], questions: Sequence[Question]) -> dict[str, Any]:
        return {
            "num_questions": len(questions),
            "answered": len(records),
            "num_missing": len(questions) - len(records),
        }


class OpenQA(_Open):
    """MSVD-QA / MSRVTT-QA / ActivityNet-QA (see the module docstring)."""

    name = "openqa"

    def __init__(
        self,
        data: str,
        num_frames: int = 32,
        video_dir: str = "",
        dataset: str = "",
        qwen: bool = False,
    ):
        """num_frames < 0: 32 / 64 by length (``get_index``); qwen: the Qwen protocol."""
        self.path = os.fspath(data)
        self.num_frames = int(num_frames or 32)
        self.family = family_of(qwen).name
        dataset = (dataset or "").lower()
        if dataset and dataset not in QA_DATASETS:
            raise ValueError(f"unknown open-ended QA dataset {dataset!r}; use one of {QA_DATASETS}")
        self.q_path, self.a_path = self._files()
        if not dataset:
            msvd = (
                os.path.basename(self.q_path) == "new_test_qa.json" or "msvd" in self.q_path.lower()
            )
            dataset = "activitynet" if self.a_path else "msvd" if msvd else "msrvtt"
        self.dataset = dataset
        if self.dataset == "activitynet" and not self.a_path:
            raise FileNotFoundError(
                f"ActivityNet-QA needs test_a.json beside {self.q_path!r} (answers by position)"
            )
        self.video_dir = video_dir or self._default_video_dir()

    def _files(self) -> tuple[str, str]:
        path = self.path
        if os.path.isdir(path):
            for name in ("test_q.json", "new_test_qa.json", "test_qa.json", "qa.json"):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(
                    f"no QA annotation in {path!r} (test_q.json + test_a.json for "
                    "ActivityNet, new_test_qa.json / test_qa.json for MSVD / MSRVTT)"
                )
        a_path = os.path.join(os.path.dirname(path), "test_a.json")
        use_a = os.path.basename(path) == "test_q.json" and os.path.exists(a_path)
        return path, a_path if use_a else ""

    def _default_video_dir(self) -> str:
        root = _root(self.q_path)
        names = {
            "activitynet": ("activitynet_frames", "frames", "videos"),
            "msvd": ("YouTubeClips", "videos", "video"),
            "msrvtt": ("video", "videos"),
        }[self.dataset]
        for d in names:
            if os.path.isdir(os.path.join(root, d)):
                return os.path.join(root, d)
        return root

    def rows(self) -> list[tuple[int, Any, Any]]:
        """``(index, question item, answer item or None)`` per entry of the question file;
        ActivityNet's answers are ``test_a.json``'s entries, paired by position as the
        original pairs them."""
        qs = read_json_list(self.q_path)
        if self.dataset != "activitynet":
            return [(i, s, None) for i, s in enumerate(qs)]
        answers = read_json_list(self.a_path)
        if len(answers) < len(qs):
            raise ValueError(
                f"{self.a_path} has {len(answers)} answers for {len(qs)} questions in "
                f"{self.q_path} (the original pairs them by position)"
            )
        return [(i, s, answers[i]) for i, s in enumerate(qs)]

    def row(self, s: Any, a: Any = None) -> dict[str, Any]:
        """``{video_name, id, question, answer}`` of one entry (``a``: its ActivityNet answer
        entry), as the original's dataset reads it; ItemError / KeyError when malformed."""
        if self.dataset == "activitynet":
            return {
                "video_name": "v_" + str(field(s, "video_name", (str, int))),
                "id": field(s, "question_id", (str, int)),
                "question": field(s, "question"),
                "answer": field(a, "answer", (str, int, float)),
            }
        field(s, "question")  # an object with a question
        if "video_name" in s:
            name = field(s, "video_name", (str, int))
        elif "video" in s:
            name = field(s, "video", (str, int))
        else:
            name = str(field(s, "video_id", (str, int))) + ".mp4"
        qid = field(s, "question_id" if "question_id" in s else "id", (str, int))
        answer = field(s, "answer", (str, int, float))
        return {"video_name": name, "id": qid, "question": s["question"], "answer": answer}

    def questions(self) -> list[Question]:
        """One question per entry; a malformed entry is skipped (:meth:`bad_items`)."""
        reader = ItemReader(self.name)
        seen: dict[str, int] = {}
        rule = FrameRule(
            num_segments=self.num_frames,
            folder_fps=ACTIVITYNET_FRAMES.folder_fps,
            file_pattern=ACTIVITYNET_FRAMES.file_pattern,
        )
        name = os.path.basename(self.q_path)
        for i, s, a in self.rows():
            raw = s.get("question_id", s.get("id")) if isinstance(s, Mapping) else None
            qid = str(raw) if isinstance(raw, (str, int)) else f"{name}:{i}"
            reader.add(self.q_path, i, [qid], self.question, s, a, seen, rule)
        self._bad_items = reader.bad
        return reader.questions

    def question(self, s: Any, a: Any, seen: dict[str, int], rule: FrameRule) -> Question:
        """The question of one entry (``seen``: how often each id came before: a repeated
        id gets ``#2``, ``#3``, ...)."""
        r = self.row(s, a)
        base = os.path.join(self.video_dir, str(r["video_name"]))
        video = _with_postfix(base, QA_POSTFIX[self.dataset])
        key = str(r["id"])
        seen[key] = seen.get(key, 0) + 1
        qid = key if seen[key] == 1 else f"{key}#{seen[key]}"
        question = str(r["question"])
        return Question(
            qid=qid,
            video=video,
            answer=str(r["answer"]),
            prompt_text=qa_prompt_text(question, family_of(self.family)),
            clip_text=question,
            frames=resolve_frame_rule(video, rule),
            answer_prefix=VIDEOQA_ANSWER,
            info={
                "dataset": self.dataset,
                "video_name": str(r["video_name"]),
                "raw": {"answer": r["answer"], "question": r["question"], "id": r["id"]},
            },
        )

    def record(self, q: Question, reply: str, decoded: str = "") -> dict[str, Any]:
        pred = reply_after(_decoded(q, reply, decoded, self.family), VIDEOQA_ANSWER)
        raw = q.info["raw"]
        return {
            "id": q.qid,
            "reply": reply,
            "judge": qa_judge_record(pred, raw["answer"], raw["question"], raw["id"]),
            "dataset": q.info["dataset"],
            "video_name": q.info["video_name"],
        }

    def write_outputs(self, records: Sequence[dict], out_path: str) -> dict[str, str]:
        path = os.path.splitext(out_path)[0] + "_pred.json"
        _write_json(path, [r["judge"] for r in records])
        return {"predictions_file": path}


class VCGBench(_Open):
    """VCGBench generic / temporal / consistency (see the module docstring)."""

    name = "vcgbench"
    group_key = "task"

    def __init__(
        self,
        data: str,
        num_frames: int = 32,
        video_dir: str = "",
        system_vcg: bool = False,
        legacy_consistency_labels: bool = False,
        qwen: bool = False,
    ):
        """num_frames < 0: 32 / 64 by length (``get_index``); qwen: the Qwen protocol."""
        self.root = os.fspath(data)
        self.num_frames = int(num_frames or 32)
        self.family = family_of(qwen).name
        self.split = family_of(qwen).vcg_split  # the reply split (Family.vcg_split)
        qa = os.path.join(self.root, "Benchmarking_QA")
        self.json_dir = qa if os.path.isdir(qa) else self.root
        if not video_dir:
            for d in ("Test_Videos", "videos", "video"):
                if os.path.isdir(os.path.join(self.root, d)):
                    video_dir = os.path.join(self.root, d)
                    break
            else:
                video_dir = self.root
        self.video_dir = video_dir
        self.system_vcg = bool(system_vcg)
        self.legacy_consistency_labels = bool(legacy_consistency_labels)

    def task_file(self, task: str) -> str:
        """The annotation file of a task (``<json dir>/<task>_qa.json``)."""
        return os.path.join(self.json_dir, f"{task}_qa.json")

    def items(self) -> list[tuple[str, int, Any]]:
        """``(task, index, annotation)`` in the original's order (generic, temporal,
        consistency; file order within each)."""
        out = []
        for task in VCG_TASKS:
            path = self.task_file(task)
            if os.path.exists(path):
                out += [(task, i, r) for i, r in enumerate(read_json_list(path))]
        if not out:
            raise FileNotFoundError(
                f"no VCGBench annotation in {self.json_dir!r}: expected "
                "Benchmarking_QA/{generic,temporal,consistency}_qa.json under --data"
            )
        return out

    def questions(self) -> list[Question]:
        """Every item's questions (consistency: Q1, then Q2); a malformed item is skipped
        with all its questions (:meth:`bad_items`)."""
        reader = ItemReader(self.name)
        rule = FrameRule(num_segments=self.num_frames)
        for task, i, r in self.items():
            keys = ("Q1", "Q2") if task == "consistency" else ("Q",)
            qids = [f"{task}:{i}:{k}" for k in keys]
            reader.add(self.task_file(task), i, qids, self.item_questions, task, i, r, rule)
        self._bad_items = reader.bad
        return reader.questions

    def item_questions(self, task: str, i: int, r: Any, rule: FrameRule) -> list[Question]:
        """The questions of item ``i`` of ``task``; ItemError when a field is missing or of
        the wrong type."""
        name = str(field(r, "video_name", (str, int)))
        keys = ("Q1", "Q2") if task == "consistency" else ("Q",)
        texts = {k: field(r, k) for k in keys}
        answer = field(r, "A")
        video = _with_postfix(os.path.join(self.video_dir, name), VCG_POSTFIX)
        family = family_of(self.family)
        rule = resolve_frame_rule(video, rule)
        return [
            Question(
                qid=f"{task}:{i}:{k}",
                video=video,
                answer=answer,
                prompt_text=vcg_prompt_text(texts[k], self.system_vcg, family),
                clip_text=texts[k],
                frames=rule,
                answer_prefix=family.vcg_split,
                group=task,
                info={
                    "task": task,
                    "index": i,
                    "key": k,
                    "video_name": r["video_name"],
                    "raw": {"Q": r[k], "A": r["A"]},
                },
            )
            for k in keys
        ]

    def record(self, q: Question, reply: str, decoded: str = "") -> dict[str, Any]:
        return {
            "id": q.qid,
            "reply": reply,
            "pred": reply_after(_decoded(q, reply, decoded, self.family), self.split),
            "question": q.info["raw"]["Q"],
            "answer": q.info["raw"]["A"],
            **{k: v for k, v in q.info.items() if k != "raw"},
        }

    def saved_files(self, records: Sequence[dict]) -> dict[str, list[dict[str, Any]]]:
        """``{"general", "temporal", "consist"}`` lists as the original's ``save_results``
        writes them (items whose answers are all present, in annotation order)."""
        by_item: dict[tuple[str, int], dict[str, dict]] = {}
        for r in records:
            by_item.setdefault((r["task"], int(r["index"])), {})[r["key"]] = r
        out: dict[str, list[dict[str, Any]]] = {v: [] for v in VCG_SAVED.values()}
        for task in VCG_TASKS:
            for (t, _), got in sorted(by_item.items(), key=lambda kv: kv[0][1]):
                if t != task:
                    continue
                if task != "consistency":
                    r = got["Q"]
                    out["general" if task == "generic" else task].append(
                        {
                            "pred": r["pred"],
                            "A": r["answer"],
                            "Q": r["question"],
                            "video_name": r["video_name"],
                        }
                    )
                    continue
                if "Q1" not in got or "Q2" not in got:
                    continue
                r1, r2 = got["Q1"], got["Q2"]
                q1, q2 = r1["question"], r2["question"]
                if self.legacy_consistency_labels:
                    q1, q2 = q2, q1
                out["consist"].append(
                    {
                        "pred1": r1["pred"],
                        "pred2": r2["pred"],
                        "video_name": r1["video_name"],
                        "A": r1["answer"],
                        "Q1": q1,
                        "Q2": q2,
                    }
                )
        return out

    def write_outputs(self, records: Sequence[dict], out_path: str) -> dict[str, str]:
        stem = os.path.splitext(out_path)[0]
        files = {}
        for name, rows in self.saved_files(records).items():
            path = f"{stem}_{name}.json"
            _write_json(path, rows)
            files[f"{name}_file"] = path
        return files
