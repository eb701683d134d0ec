"""The held-out split of the demo dataset (``data/synthetic.py``): multiple choice, accuracy.

``--data DIR`` is the dataset directory (``DIR/eval.json``, ``DIR/videos/``); the prompt is
the one the demo model was trained with (``Question: ...\\nOptions:\\n(A) ...\\nOnly give the
best option.``, no answer prefix); the model answers with the option's text (``red``), which the
extractor maps to its letter. Accuracy overall and per question type.
"""

from __future__ import annotations

import json
import os

from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import Question


class Synthetic(Benchmark):
    name = "synthetic"
    group_key = "qtype"
    max_new_tokens = 8

    def __init__(self, data: str, num_frames: int = 8, split: str = "eval"):
        self.root = os.fspath(data)
        self.num_frames = int(num_frames or 8)
        self.split = split

    def questions(self) -> list[Question]:
        path = os.path.join(self.root, f"{self.split}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: --data must be a synthetic dataset dir")
        with open(path) as f:
            items = json.load(f)
        return [
            Question(
                qid=f"{self.split}:{i}",
                video=os.path.join(self.root, it["video"]),
                prompt=it["QA"][0]["q"],
                answer=it["answer_letter"],
                num_frames=self.num_frames,
                candidates=tuple(it["candidates"]),
                info={"qtype": it.get("qtype", "all"), "question": it.get("question", "")},
            )
            for i, it in enumerate(items)
        ]
