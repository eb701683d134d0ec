"""Synthetic clips and their questions (data/shapes.py)."""

import numpy as np
import pytest

from ppllava_jax.data import shapes


@pytest.mark.parametrize("qtype", sorted(shapes.PHRASINGS))
def test_clip_question_phrasings_and_options(qtype):
    rng = np.random.default_rng(0)
    video, questions, cands, correct = shapes.make_clip(rng, qtype, 1, 2, 8, 32)
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    assert len(questions) == len(shapes.PHRASINGS[qtype]) == len(set(questions)) >= 3
    assert all("{" not in q for q in questions)  # every slot filled
    assert len(cands) == 4 == len(set(cands)) and cands[2] == correct
    pool = {
        "direction": shapes.DIRECTIONS,
        "shape": shapes.SHAPES,
    }.get(qtype, tuple(shapes.COLOURS))
    assert correct == pool[1] and len(pool) == shapes.num_values(qtype)
    if qtype in ("colour", "shape", "direction"):  # the clip's object is named in each phrasing
        named = [
            w.strip("?.")
            for w in questions[0].split()
            if w.strip("?.") in (*shapes.SHAPES, *shapes.COLOURS)
        ]
        assert named and all(all(n in q for n in named) for q in questions)


def test_format_question_is_mvbench_style():
    text = shapes.format_question("What colour is the square?", ["red", "blue", "cyan", "green"])
    assert text == (
        "Question: What colour is the square?\nOptions:\n(A) red\n(B) blue\n(C) cyan\n"
        "(D) green\nOnly give the best option."
    )
    with pytest.raises(ValueError, match="unknown question type"):
        shapes.make_clip(np.random.default_rng(0), "size", 0, 0, 8, 32)
