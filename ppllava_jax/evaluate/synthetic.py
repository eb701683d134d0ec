"""The held-out splits of the demo dataset (``data/synthetic.py``): accuracy.

``--data DIR`` is the dataset directory (``DIR/<split>.json``, ``DIR/videos/``).

- ``eval`` (multiple choice): the prompt is the one the demo model was trained with
  (``Question: ...\\nOptions:\\n(A) ...\\nOnly give the best option.``, no answer prefix); the
  model answers with the option's text (``red``), which the extractor maps to its letter.
- ``eval_multiturn`` (conversations, ``--split eval_multiturn``): each *later* turn of a
  conversation is one question, asked as the chat asks it (``ppllava_jax.chat``): the earlier
  turns stand in the prompt (``Question.history``) with the **reference** answers (not the
  model's own: each turn is scored on its own, a wrong earlier answer does not count twice),
  the question is plain, the CLIP prompt is the question being asked; the plain answer is
  matched to the turn's options (``turns[k].candidates``) as above. Records carry ``turn``
  (2, 3) and ``repeat`` (the answer equals an earlier turn's, e.g. "Which colour appears
  last?" of a clip with one shape).

Accuracy overall and per question type (of the turn).
"""

from __future__ import annotations

import os
from typing import Any

from ppllava_jax.data.annotations import read_json_list
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import ItemError, ItemReader, Question, field


class Synthetic(Benchmark):
    name = "synthetic"
    group_key = "qtype"
    max_new_tokens = 8

    def __init__(self, data: str, num_frames: int = 8, split: str = "eval"):
        self.root = os.fspath(data)
        self.num_frames = int(num_frames or 8)
        self.split = split

    def questions(self) -> list[Question]:
        """The split's questions; a malformed item is skipped (:meth:`bad_items`)."""
        path = os.path.join(self.root, f"{self.split}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: --data must be a synthetic dataset dir")
        reader = ItemReader(self.name)
        for i, it in enumerate(read_json_list(path)):
            qid = f"{self.split}:{i}"
            reader.add(path, i, [qid], self.question, qid, it)
        self._bad_items = reader.bad
        return reader.questions

    def question(self, qid: str, it: Any) -> Question | list[Question]:
        """The question of one item of ``<split>.json`` (the demo dataset's fields); of a
        conversation (``turns``), one per later turn (``<qid>:<turn>``, from 2)."""
        qa = field(it, "QA", list)
        if not qa:
            raise ItemError("field 'QA' is empty")
        if "turns" in it:
            return self.later_turns(qid, it, qa)
        return Question(
            qid=qid,
            video=os.path.join(self.root, field(it, "video")),
            prompt=field(qa[0], "q"),
            answer=field(it, "answer_letter"),
            num_frames=self.num_frames,
            candidates=tuple(str(c) for c in field(it, "candidates", list)),
            info={"qtype": it.get("qtype", "all"), "question": it.get("question", "")},
        )

    def later_turns(self, qid: str, it: Any, qa: list) -> list[Question]:
        """A conversation's turns 2.. asked after the earlier ones with the reference answers
        (module docstring)."""
        turns = field(it, "turns", list)
        if len(turns) != len(qa):
            raise ItemError(f"'turns' has {len(turns)} entries, 'QA' {len(qa)}")
        history = [(field(t, "q"), field(t, "a")) for t in qa]
        video = os.path.join(self.root, field(it, "video"))
        return [
            Question(
                qid=f"{qid}:{k + 1}",
                video=video,
                prompt=history[k][0],
                history=tuple(history[:k]),
                answer=field(turns[k], "answer_letter"),
                num_frames=self.num_frames,
                candidates=tuple(str(c) for c in field(turns[k], "candidates", list)),
                info={
                    "qtype": turns[k].get("qtype", "all"),
                    "question": history[k][0],
                    "turn": k + 1,
                    "repeat": any(a == history[k][1] for _, a in history[:k]),
                },
            )
            for k in range(1, len(qa))
        ]
