"""Open-ended video QA (ActivityNet-QA, MSVD-QA, MSRVTT-QA) and VCGBench (Video-ChatGPT's
benchmark): greedy answers written in the format the usual LLM-judge scripts read. The judge
itself (GPT) is not part of this project.

openqa ``--data``: a JSON list of ``{video | video_name | video_id, question, answer,
question_id | id}`` (MSVD-QA / MSRVTT-QA as in Video-ChatGPT's evaluation), or ActivityNet-QA's
``test_q.json`` (``video_name, question, question_id``) with ``test_a.json`` (``question_id,
answer, type``) beside it. Videos are looked up in ``--video_dir`` (default: the file's folder
``videos/`` or the folder itself) by name, with the usual extensions and ActivityNet's ``v_``
prefix. Output ``<out stem>_pred.json``: ``[{"id", "question_id", "video_name", "question",
"answer", "pred"}]``.

vcgbench ``--data DIR``: ``generic_qa.json``, ``temporal_qa.json``, ``consistency_qa.json``
(any of them; ``{"video_name", "Q", "A"}`` and ``{"video_name", "Q1", "Q2", "A"}``). Output
one judge file per task, ``<out stem>_<task>_pred.json``, with ``{"video_name", "Q", "A",
"pred"}`` (consistency: ``"Q1", "Q2", "pred1", "pred2"``). The "correctness", "detail",
"context" judges read the generic file; "temporal" the temporal one; "consistency" its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import VIDEO_EXTS, Question, find_video


def _video_dir(path: str, given: str) -> str:
    if given:
        return given
    root = path if os.path.isdir(path) else os.path.dirname(path)
    for d in ("videos", "video", "Test_Videos", "all_test"):
        if os.path.isdir(os.path.join(root, d)):
            return os.path.join(root, d)
    return root


def _find(vdir: str, name: str) -> str:
    p = find_video(vdir, name, VIDEO_EXTS)
    if not os.path.exists(p) and not name.startswith("v_"):
        q = find_video(vdir, "v_" + name, VIDEO_EXTS)
        if os.path.exists(q):
            return q
    return p


class _Open(Benchmark):
    max_new_tokens = None

    def record(self, q: Question, prediction: str) -> dict[str, Any]:
        return {"id": q.qid, "prediction": prediction.strip(), "answer": q.answer, **q.info}

    def summarize(self, records: Sequence[dict], questions: Sequence[Question]) -> dict[str, Any]:
        return {
            "num_questions": len(questions),
            "answered": len(records),
            "num_missing": len(questions) - len(records),
        }


class OpenQA(_Open):
    name = "openqa"

    def __init__(self, data: str, num_frames: int = 32, video_dir: str = ""):
        self.path = os.fspath(data)
        self.num_frames = int(num_frames or 32)
        self.video_dir = _video_dir(self.path, video_dir)

    def _rows(self) -> list[dict]:
        path = self.path
        if os.path.isdir(path):
            for name in ("test_q.json", "test_qa.json", "qa.json"):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
        with open(path) as f:
            rows = json.load(f)
        a_path = os.path.join(os.path.dirname(path), "test_a.json")
        if os.path.basename(path) == "test_q.json" and os.path.exists(a_path):
            with open(a_path) as f:
                answers = {str(a["question_id"]): a for a in json.load(f)}
            rows = [{**r, **answers.get(str(r["question_id"]), {})} for r in rows]
        return rows

    def questions(self) -> list[Question]:
        qs = []
        for i, r in enumerate(self._rows()):
            name = str(r.get("video") or r.get("video_name") or r.get("video_id"))
            qid = str(r.get("question_id", r.get("id", i)))
            qs.append(
                Question(
                    qid=qid,
                    video=_find(self.video_dir, name),
                    prompt=str(r["question"]).strip(),
                    answer=str(r.get("answer", "")),
                    num_frames=self.num_frames,
                    info={
                        "video_name": name,
                        "question": str(r["question"]),
                        "type": r.get("type", ""),
                    },
                )
            )
        return qs

    def write_outputs(self, records: Sequence[dict], out_path: str) -> dict[str, str]:
        preds = [
            {
                "id": r["id"],
                "question_id": r["id"],
                "video_name": r.get("video_name", ""),
                "question": r.get("question", ""),
                "answer": r.get("answer", ""),
                "pred": r["prediction"],
                **({"type": r["type"]} if r.get("type") not in (None, "") else {}),
            }
            for r in records
        ]
        path = os.path.splitext(out_path)[0] + "_pred.json"
        with open(path, "w") as f:
            json.dump(preds, f, indent=1)
        return {"predictions_file": path}


VCG_TASKS = ("generic", "temporal", "consistency")


class VCGBench(_Open):
    name = "vcgbench"
    group_key = "task"

    def __init__(self, data: str, num_frames: int = 32, video_dir: str = ""):
        self.root = os.fspath(data)
        self.num_frames = int(num_frames or 32)
        self.video_dir = _video_dir(self.root, video_dir)

    def questions(self) -> list[Question]:
        qs = []
        found = False
        for task in VCG_TASKS:
            path = os.path.join(self.root, f"{task}_qa.json")
            if not os.path.exists(path):
                continue
            found = True
            with open(path) as f:
                rows = json.load(f)
            for i, r in enumerate(rows):
                name = str(r["video_name"])
                keys = ("Q1", "Q2") if task == "consistency" else ("Q",)
                for k in keys:
                    qs.append(
                        Question(
                            qid=f"{task}:{i}:{k}",
                            video=_find(self.video_dir, name),
                            prompt=str(r[k]).strip(),
                            answer=str(r["A"]),
                            num_frames=self.num_frames,
                            info={"task": task, "index": i, "key": k, "video_name": name},
                        )
                    )
        if not found:
            raise FileNotFoundError(f"no {{generic,temporal,consistency}}_qa.json in {self.root}")
        return qs

    def write_outputs(self, records: Sequence[dict], out_path: str) -> dict[str, str]:
        stem = os.path.splitext(out_path)[0]
        by_task: dict[str, dict[int, dict]] = {}
        for r in records:
            row = by_task.setdefault(r["task"], {}).setdefault(
                int(r["index"]), {"video_name": r["video_name"], "A": r["answer"]}
            )
            if r["key"] == "Q":
                row.update(Q=r.get("question_text", ""), pred=r["prediction"])
            else:
                n = r["key"][1]
                row.update({f"Q{n}": r.get("question_text", ""), f"pred{n}": r["prediction"]})
        files = {}
        for task, rows in by_task.items():
            path = f"{stem}_{task}_pred.json"
            with open(path, "w") as f:
                json.dump([rows[i] for i in sorted(rows)], f, indent=1)
            files[f"{task}_predictions_file"] = path
        return files

    def record(self, q: Question, prediction: str) -> dict[str, Any]:
        return {**super().record(q, prediction), "question_text": q.prompt}
