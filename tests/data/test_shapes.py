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


@pytest.mark.parametrize("qtype", sorted(shapes.PHRASINGS))
def test_scene_facts(qtype):
    """Every question a clip answers: its own (as make_clip draws it, the same numbers), and
    the others (a clip of one object: its colour is also the first and last colour)."""
    scene = shapes.make_scene(np.random.default_rng(5), qtype, 1, 2, 8, 32)
    video, questions, cands, correct = shapes.make_clip(
        np.random.default_rng(5), qtype, 1, 2, 8, 32
    )
    np.testing.assert_array_equal(scene.video, video)
    assert (scene.questions, scene.candidates, scene.answer) == (questions, cands, correct)
    own = scene.facts[qtype]
    assert own.phrasings == questions and own.answer == correct
    if qtype in ("first_colour", "last_colour"):
        assert set(scene.facts) == {"first_colour", "last_colour"}
        first, last = scene.facts["first_colour"], scene.facts["last_colour"]
        assert first.answer != last.answer and first.shown == (last.answer,)
        assert last.shown == (first.answer,)
    else:
        assert {"colour", "first_colour", "last_colour", "shape"} <= set(scene.facts)
        colours = {scene.facts[q].answer for q in ("colour", "first_colour", "last_colour")}
        assert len(colours) == 1
    for fact in scene.facts.values():
        assert all("{" not in p for p in fact.phrasings) and fact.answer in fact.pool
        for letter in range(4):
            opts = shapes.options(np.random.default_rng(letter), fact, letter)
            assert len(set(opts)) == 4 and opts[letter] == fact.answer
            assert set(fact.shown) <= set(opts) and set(opts) <= set(fact.pool)
