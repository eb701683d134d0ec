"""MVBench (20 tasks, multiple choice, 32 frames at segment centres; SPEC §8).

Layout (as distributed; ``--data DIR``)::

    DIR/json/<task>.json            a list of {"video", "question", "candidates", "answer",
                                     optional "start", "end" (seconds)}; also DIR/<task>.json
    DIR/video/<prefix>/<video>      videos (mp4, webm, avi, gif) or frame folders (tvqa, 3 fps)

The task table below gives each known task file its video folder, media kind and whether it
uses the start/end bound (as in the official evaluation script). A JSON file that is not in
the table is a task named after the file with its videos in ``DIR/video/<file stem>/`` (bounds
used when present). The prompt is SPEC §8's; the answer is the first option letter after
``Best option:(``; accuracy per task and overall.
"""

from __future__ import annotations

import glob
import json
import os

from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import MC_PREFIX, Question, find_video, mc_prompt
from ppllava_jax.evaluate.extract import letter_of_answer

# task -> (json file, video folder under DIR/video, kind, uses bound)
TASKS: dict[str, tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": (
        "fine_grained_action.json",
        "Moments_in_Time_Raw/videos",
        "video",
        False,
    ),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": (
        "counterfactual_inference.json",
        "clevrer/video_validation",
        "video",
        False,
    ),
}
FRAME_FOLDER_FPS = 3.0  # tvqa frame folders
_PIPELINE_FOLDER_FPS = 1.0  # what load_video assumes for a folder (the pipeline passes none)


def task_files(root: str) -> list[tuple[str, str, str, str, bool]]:
    """``(task, json path, video root, kind, uses bound)`` of every task file present."""
    jdir = os.path.join(root, "json") if os.path.isdir(os.path.join(root, "json")) else root
    by_file = {v[0]: (k, *v[1:]) for k, v in TASKS.items()}
    out = []
    for path in sorted(glob.glob(os.path.join(jdir, "*.json"))):
        fname = os.path.basename(path)
        if fname in by_file:
            task, prefix, kind, bound = by_file[fname]
        else:
            task, prefix, kind, bound = (
                os.path.splitext(fname)[0],
                os.path.splitext(fname)[0],
                "",
                True,
            )
        out.append((task, path, os.path.join(root, "video", prefix), kind, bound))
    if not out:
        raise FileNotFoundError(
            f"no MVBench task JSON files in {jdir} (expected e.g. json/action_sequence.json)"
        )
    return out


class MVBench(Benchmark):
    name = "mvbench"
    group_key = "task"

    def __init__(self, data: str, num_frames: int = 32):
        self.root = os.fspath(data)
        self.num_frames = int(num_frames or 32)

    def questions(self) -> list[Question]:
        qs = []
        for task, path, vroot, _kind, use_bound in task_files(self.root):
            with open(path) as f:
                items = json.load(f)
            for i, it in enumerate(items):
                cands = [str(c) for c in it["candidates"]]
                bound = None
                if use_bound and "start" in it and "end" in it:
                    bound = (float(it["start"]), float(it["end"]))
                video = find_video(vroot, it["video"])
                if os.path.isdir(video) and bound is not None:
                    # frame folders are read at 1 fps by the pipeline; rescale the bound
                    f = FRAME_FOLDER_FPS / _PIPELINE_FOLDER_FPS
                    bound = (bound[0] * f, bound[1] * f)
                stem = os.path.splitext(os.path.basename(path))[0]
                qs.append(
                    Question(
                        qid=f"{stem}:{i}",
                        video=video,
                        prompt=mc_prompt(str(it["question"]), cands),
                        answer=letter_of_answer(str(it["answer"]), cands),
                        num_frames=self.num_frames,
                        answer_prefix=MC_PREFIX,
                        bound=bound,
                        candidates=tuple(cands),
                        info={"task": task, "question": str(it["question"])},
                    )
                )
        return qs
