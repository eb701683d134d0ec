"""MVBench exactly as the original evaluates it (``ppllava/test/mvbench``, run by
``script/inference/mvbench/test_mvbench.sh``: ``--num-frames 32 --ask_simple --system_llm``).

Layout (as distributed; ``--data DIR``)::

    DIR/json/<task>.json            a list of {"video", "question", "candidates", "answer",
                                     optional "start", "end" (seconds)}; also DIR/<task>.json
    DIR/video/<prefix>/<video>      videos, or frame folders 00001.jpg... (tvqa, 3 fps)

The protocol, one pure function per piece (the reader and the tests use the same ones):

- :func:`qa_template`: ``Question: {q}\\nOptions:\\n(A) {c1}\\n...`` rstripped, and the
  reference ``gt = '(X) answer'`` (``X = '@'`` when the answer is none of the candidates).
- :func:`prompt_text`: template ``plain_v1`` (Qwen: ``plain_qwen``), user turn = question +
  ``\\nOnly give the best option.``, answer prefix ``Best option:(``:
  ``USER: <image>\\n{question}\\nOnly give the best option. ASSISTANT: Best option:(``, for
  Qwen ``<|im_start|>user\\n<image>\\n{question}\\nOnly give the best option.<|im_end|>\\n
  <|im_start|>assistant\\nBest option:(`` (one line). The MVBench system text is off as the
  shipped script runs it (``--system_llm`` is a ``store_false`` flag); ``system_llm=True``
  (``eval.py --mvbench_system``) puts it in front of the question, as the driver does when
  the flag is omitted.
- CLIP text: the ``qa_template`` question alone (no trailing instruction).
- :func:`frame_rule`: 32 segments of ``EvalDataset.get_index`` (a negative ``num_segments``:
  32 or 64 by the clip's length, ``common.resolve_frame_rule``); the ``start``/``end`` bound
  only for the tasks flagged in :data:`TASKS`; videos decoded whole (``first_idx=0``),
  frame folders (Episodic Reasoning) at 3 fps from ``00001.jpg`` (``first_idx=1``,
  ``max_frame`` = number of files, ``'{:0>5}.jpg'``).
- :func:`pred_of`: ``'(' + decoded.split('Best option:(')[1].strip()``, the decoded text
  being prompt + generated ids with ``skip_special_tokens=True`` (both families).
- Scoring: both verdicts (``scoring.mvbench_verdict`` = the original ``check_ans``,
  ``scoring.mvbench_verdict_strict``), and the original ``save_results`` ``acc_dict``.

A JSON file that is not in the task table is a task named after the file with its videos in
``DIR/video/<file stem>/`` (video files, bound used when present).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ppllava_jax.data.annotations import read_json_list
from ppllava_jax.data.video import FrameRule
from ppllava_jax.evaluate import scoring
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import ItemReader, Question, field, resolve_frame_rule
from ppllava_jax.evaluate.conversation import (
    MVBENCH_SYSTEM,
    VICUNA,
    Family,
    decoded_text,
    family_of,
    one_turn_prompt,
    reply_after,
)

# task -> (video folder under DIR/video, data type, uses the bound): the original's ``data_list``
# of ppllava/test/mvbench/utils.py, whose JSON file is the task's name in snake case
# (:func:`task_file`); TASKS below adds the file name
_TASK_TABLE: dict[str, tuple[str, str, bool]] = {
    "Action Sequence": ("star/Charades_v1_480", "video", True),
    "Action Prediction": ("star/Charades_v1_480", "video", True),
    "Action Antonym": ("ssv2_video", "video", False),
    "Fine-grained Action": ("Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("FunQA_test/test", "video", False),
    "Object Existence": ("clevrer/video_validation", "video", False),
    "Object Interaction": ("star/Charades_v1_480", "video", True),
    "Object Shuffle": ("perception/videos", "video", False),
    "Moving Direction": ("clevrer/video_validation", "video", False),
    "Action Localization": ("sta/sta_video", "video", True),
    "Scene Transition": ("scene_qa/video", "video", False),
    "Action Count": ("perception/videos", "video", False),
    "Moving Count": ("clevrer/video_validation", "video", False),
    "Moving Attribute": ("clevrer/video_validation", "video", False),
    "State Change": ("perception/videos", "video", False),
    "Fine-grained Pose": ("nturgbd", "video", False),
    "Character Order": ("perception/videos", "video", False),
    "Egocentric Navigation": ("vlnqa", "video", False),
    "Episodic Reasoning": ("tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("clevrer/video_validation", "video", False),
}


def task_file(task: str) -> str:
    """The JSON file of a task: ``"Fine-grained Action"`` -> ``fine_grained_action.json``."""
    return task.lower().replace("-", "_").replace(" ", "_") + ".json"


# task -> (json file, video folder under DIR/video, data type, uses the bound)
TASKS: dict[str, tuple[str, str, str, bool]] = {
    task: (task_file(task), *row) for task, row in _TASK_TABLE.items()
}
NUM_SEGMENTS = 32
FRAME_FOLDER_FPS = 3.0  # EvalDataset.read_frame's default
FRAME_FILE_PATTERN = "{:0>5}.jpg"
QUESTION_PROMPT = "\nOnly give the best option."
ANSWER_PROMPT = "Best option:("
RETURN_PROMPT = "("
SYSTEM = MVBENCH_SYSTEM


def qa_template(data: Mapping[str, Any]) -> tuple[str, str]:
    """The original ``MVBench_dataset.qa_template``: (question text, ``gt``)."""
    question = f"Question: {data['question']}\n"
    question += "Options:\n"
    answer = data["answer"]
    answer_idx = -1
    for idx, c in enumerate(data["candidates"]):
        question += f"({chr(ord('A') + idx)}) {c}\n"
        if c == answer:
            answer_idx = idx
    question = question.rstrip()
    return question, f"({chr(ord('A') + answer_idx)}) {answer}"


def prompt_text(question: str, system_llm: bool = False, family: Family = VICUNA) -> str:
    """The full LLM prompt of a ``qa_template`` question (no BOS; module docstring)."""
    query = (SYSTEM if system_llm else "") + question + QUESTION_PROMPT
    return one_turn_prompt(family.plain, query, answer_prompt=ANSWER_PROMPT)


def frame_rule(
    data_type: str,
    uses_bound: bool,
    data: Mapping[str, Any],
    num_segments: int = NUM_SEGMENTS,
) -> FrameRule:
    """The frames the original reads for one MVBench item (module docstring).

    data_type: ``video`` or ``frame`` (a frame folder); uses_bound: the task's flag.
    """
    bound = (data["start"], data["end"]) if uses_bound else None
    if data_type == "frame":
        return FrameRule(
            num_segments,
            bound,
            folder_fps=FRAME_FOLDER_FPS,
            file_pattern=FRAME_FILE_PATTERN,
            first_idx=1,
        )
    return FrameRule(num_segments, bound, first_idx=0)


def pred_of(decoded: str) -> str:
    """The original ``infer_mvbench_llava`` answer: ``'(' + text after 'Best option:('``,
    stripped, of the decoded prompt + generation."""
    return RETURN_PROMPT + reply_after(decoded, ANSWER_PROMPT)


def question_of(
    task_type: str,
    data: Mapping[str, Any],
    video_root: str,
    *,
    qid: str,
    num_segments: int = NUM_SEGMENTS,
    system_llm: bool = False,
    data_type: str | None = None,
    uses_bound: bool | None = None,
    family: Family | bool | str = VICUNA,
) -> Question:
    """The :class:`Question` of one MVBench json item (what the reader builds).

    task_type: a key of :data:`TASKS` (data type and bound flag come from it unless given).
    video_root: the task's video folder (``DIR/video/<prefix>``).
    family: the model family (``conversation.family_of``: a Family, ``qwen`` bool or name).
    """
    family = family_of(family)
    if data_type is None or uses_bound is None:
        if task_type not in TASKS:
            raise ValueError(f"unknown MVBench task {task_type!r}; known: {sorted(TASKS)}")
        _, _, kind, bound = TASKS[task_type]
        data_type = kind if data_type is None else data_type
        uses_bound = bound if uses_bound is None else uses_bound
    if uses_bound and not ("start" in data and "end" in data):
        raise ValueError(f"{qid}: task {task_type!r} reads the start/end bound; the item has none")
    for key, kinds in (("video", str), ("question", str), ("candidates", list)):
        field(data, key, kinds)
    field(data, "answer", (str, int, float))
    if uses_bound:
        field(data, "start", (int, float)), field(data, "end", (int, float))
    question, gt = qa_template(data)
    video = os.path.join(video_root, data["video"])
    rule = frame_rule(data_type, uses_bound, data, num_segments)
    return Question(
        qid=qid,
        video=video,
        answer=gt,
        prompt_text=prompt_text(question, system_llm, family),
        clip_text=question,
        frames=resolve_frame_rule(video, rule),
        answer_prefix=ANSWER_PROMPT,
        candidates=tuple(str(c) for c in data["candidates"]),
        info={"task_type": task_type, "question": question},
    )


def task_files(root: str) -> list[tuple[str, str, str, str, bool]]:
    """``(task, json path, video root, data type, uses bound)`` of every task file present,
    in the task table's order, then the other JSON files by name."""
    jdir = os.path.join(root, "json") if os.path.isdir(os.path.join(root, "json")) else root
    present = {os.path.basename(p): p for p in glob.glob(os.path.join(jdir, "*.json"))}
    out = []
    for task, (fname, prefix, kind, bound) in TASKS.items():
        if fname in present:
            out.append((task, present.pop(fname), os.path.join(root, "video", prefix), kind, bound))
    for fname in sorted(present):
        stem = os.path.splitext(fname)[0]
        out.append((stem, present[fname], os.path.join(root, "video", stem), "video", True))
    if not out:
        raise FileNotFoundError(
            f"no MVBench task JSON files in {jdir} (expected e.g. json/action_sequence.json)"
        )
    return out


class MVBench(Benchmark):
    """MVBench as the original runs it (module docstring)."""

    name = "mvbench"
    group_key = "task_type"
    max_new_tokens = 200

    def __init__(
        self,
        data: str,
        num_frames: int = NUM_SEGMENTS,
        system_llm: bool = False,
        qwen: bool = False,
    ):
        """num_frames: frames per video (negative: 32 or 64 by length, as ``get_index``);
        qwen: the Qwen family's protocol (``PPLLaVAConfig.qwen``)."""
        self.root = os.fspath(data)
        self.num_frames = int(num_frames or NUM_SEGMENTS)
        self.system_llm = bool(system_llm)
        self.family = family_of(qwen).name

    def questions(self) -> list[Question]:
        """Every item of every task file; a malformed item is skipped (:meth:`bad_items`)."""
        reader = ItemReader(self.name)
        for task, path, vroot, kind, use_bound in task_files(self.root):
            stem = os.path.splitext(os.path.basename(path))[0]
            for i, it in enumerate(read_json_list(path)):
                reader.add(
                    path,
                    i,
                    [f"{stem}:{i}"],
                    question_of,
                    task,
                    it,
                    vroot,
                    qid=f"{stem}:{i}",
                    num_segments=self.num_frames,
                    system_llm=self.system_llm,
                    data_type=kind,
                    uses_bound=use_bound,
                    family=self.family,
                )
        self._bad_items = reader.bad
        return reader.questions

    def record(self, q: Question, prediction: str, decoded: str = "") -> dict[str, Any]:
        """The original's saved fields (``pred``, ``gt``, ``task_type``, ``video_path``,
        ``question``) plus the reply and both verdicts."""
        if not decoded:
            decoded = decoded_text(q.prompt_text, prediction, family_of(self.family))
        pred = pred_of(decoded)
        v_orig = scoring.mvbench_verdict(pred, q.answer)
        v_strict = scoring.mvbench_verdict_strict(pred, q.answer)
        return {
            "id": q.qid,
            "task_type": q.info.get("task_type", ""),
            "video_path": q.video,
            "question": q.info.get("question", ""),
            "reply": prediction,
            "pred": pred,
            "gt": q.answer,
            "verdict_original": v_orig,
            "verdict_strict": v_strict,
            "correct_original": v_orig == scoring.CORRECT,
            "correct_strict": v_strict == scoring.CORRECT,
        }

    def summarize(self, records: Sequence[dict], questions: Sequence[Question]) -> dict[str, Any]:
        """Both accuracies overall and per task, and the original's ``acc_dict``."""
        out = scoring.two_verdict_summary(records, self.group_key)
        out["acc_dict"] = scoring.mvbench_acc_dict(records)
        out["num_questions"] = len(questions)
        out["num_missing"] = len(questions) - len(records)
        return out
