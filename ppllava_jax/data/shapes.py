"""Synthetic clips of coloured shapes and their questions (the demo dataset's content).

:func:`make_scene` draws one clip for a question type (``colour``, ``first_colour``,
``last_colour``, ``direction``, ``shape``: see :mod:`ppllava_jax.data.synthetic`) with its
question in every phrasing of :data:`PHRASINGS`, four shuffled candidates, and every other
question the clip answers (:class:`Fact`, for the follow-up turns of a conversation; e.g. a
single red square is also the colour that appears first and last); :func:`make_clip` is its
clip and question alone, :func:`options` draws the candidates of a fact, and
:func:`format_question` writes the multiple-choice text. Pure NumPy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 210),
    "cyan": (40, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("left", "right", "up", "down")
LETTERS = "ABCD"
MC_SUFFIX = "Only give the best option."
# the phrasings of each question type, the first the multiple-choice question's
PHRASINGS = {
    "colour": (
        "What colour is the {shape}?",
        "What is the colour of the {shape}?",
        "Which colour does the {shape} have?",
        "Tell me the colour of the {shape}.",
    ),
    "first_colour": (
        "Which colour appears first?",
        "What colour do you see first?",
        "What is the first colour in the video?",
        "Which colour is shown first?",
    ),
    "last_colour": (
        "Which colour appears last?",
        "What colour do you see last?",
        "What is the last colour in the video?",
        "Which colour is shown last?",
    ),
    "direction": (
        "Which way does the {colour} {shape} move?",
        "In which direction does the {colour} {shape} move?",
        "Where does the {colour} {shape} go?",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "What is the shape of the {colour} object?",
        "Which shape is {colour}?",
    ),
}
RADIUS = (0.22, 0.26)  # object radius range, as a fraction of the clip size


@dataclasses.dataclass(frozen=True)
class Fact:
    """A question a clip answers.

    Attributes:
      phrasings: the question in each phrasing of :data:`PHRASINGS` (slots filled).
      answer: the correct value (``"red"``, ``"left"``, ``"square"``).
      pool: every value of the question's kind (the options are drawn from it).
      shown: values every option list holds besides the answer (both colours of a clip with
        two shapes, so only the order tells them apart).
    """

    phrasings: tuple[str, ...]
    answer: str
    pool: tuple[str, ...]
    shown: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Scene:
    """One clip, its question (of the type it was drawn for) and everything else it answers.

    Attributes:
      video: uint8[F, S, S, 3].
      qtype: the question type it was drawn for.
      questions: that question's phrasings (the first the multiple-choice one).
      candidates: its four options, the answer at the drawn letter.
      answer: its answer.
      facts: question type -> :class:`Fact`, every type the clip answers (``qtype`` included).
    """

    video: np.ndarray
    qtype: str
    questions: tuple[str, ...]
    candidates: list[str]
    answer: str
    facts: dict[str, Fact]


def _phrasings(qtype: str, **slots: str) -> tuple[str, ...]:
    return tuple(p.format(**slots) for p in PHRASINGS[qtype])


def _one_object_facts(colour: str, shape: str, direction: str | None) -> dict[str, Fact]:
    """What a clip of one object answers: its colour (asked by its shape; it is also the colour
    that appears first and last), its shape, and its direction when it moves."""
    colours = tuple(COLOURS)
    facts = {
        "colour": Fact(_phrasings("colour", shape=shape), colour, colours),
        "first_colour": Fact(_phrasings("first_colour"), colour, colours),
        "last_colour": Fact(_phrasings("last_colour"), colour, colours),
        "shape": Fact(_phrasings("shape", colour=colour), shape, SHAPES),
    }
    if direction is not None:
        facts["direction"] = Fact(
            _phrasings("direction", colour=colour, shape=shape), direction, DIRECTIONS
        )
    return facts


def options(rng: np.random.Generator, fact: Fact, letter: int) -> list[str]:
    """4 options of ``fact``: its answer at position ``letter``, then ``fact.shown`` and values
    drawn from its pool, the wrong ones in random order."""
    shown = [v for v in fact.shown if v != fact.answer]
    rest = [v for v in fact.pool if v != fact.answer and v not in shown]
    wrong = shown + [rest[i] for i in rng.permutation(len(rest))[: 3 - len(shown)]]
    wrong = [wrong[i] for i in rng.permutation(len(wrong))]
    wrong.insert(letter, fact.answer)
    return wrong


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float):
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1.15 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    raise ValueError(shape)


def _path(rng, size: int, r: float, direction: str | None, frames: int):
    """Per-frame centres (y, x) of a shape moving in ``direction`` (None: small drift)."""
    lo, hi = r + 1, size - r - 2
    travel = min(0.45 * size, hi - lo)
    t = np.linspace(0.0, 1.0, frames)
    if direction is None:
        y0, x0 = rng.uniform(lo, hi, 2)
        return np.full(frames, y0), np.full(frames, x0)
    across = rng.uniform(lo, hi)
    start = rng.uniform(lo, max(lo, hi - travel))
    along = start + travel * t
    if direction in ("left", "up"):
        along = along[::-1]
    if direction in ("left", "right"):
        return np.full(frames, across), along
    return along, np.full(frames, across)


def _options(rng, correct: str, pool: list[str], letter: int) -> list[str]:
    """4 options: ``correct`` at position ``letter``, the rest drawn from ``pool``."""
    others = [p for p in pool if p != correct]
    others = [others[i] for i in rng.permutation(len(others))[:3]]
    others.insert(letter, correct)
    return others


def make_clip(
    rng: np.random.Generator,
    qtype: str,
    answer: int,
    letter: int,
    frames: int,
    size: int,
    radius: tuple[float, float] = RADIUS,
):
    """One clip and its question. Returns (uint8[F, S, S, 3], the question's phrasings (the
    first the multiple-choice one), candidates, answer)."""
    s = make_scene(rng, qtype, answer, letter, frames, size, radius)
    return s.video, s.questions, s.candidates, s.answer


def make_scene(
    rng: np.random.Generator,
    qtype: str,
    answer: int,
    letter: int,
    frames: int,
    size: int,
    radius: tuple[float, float] = RADIUS,
) -> Scene:
    """One clip for a question of type ``qtype`` whose answer is value ``answer`` of its kind,
    the correct option at ``letter`` (0-3); see :class:`Scene`."""
    colours = list(COLOURS)
    bg = np.array(rng.integers(15, 70, 3), np.uint8)
    video = np.broadcast_to(bg, (frames, size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = size * rng.uniform(*radius)

    def draw(shape, colour, ys, xs, visible):
        for f in np.flatnonzero(visible):
            video[f][_mask(shape, yy, xx, ys[f], xs[f], r)] = COLOURS[colour]

    everywhere = np.ones(frames, bool)
    if qtype == "direction":
        d = DIRECTIONS[answer]
        shape, colour = SHAPES[rng.integers(4)], colours[rng.integers(len(colours))]
        draw(shape, colour, *_path(rng, size, r, d, frames), everywhere)
        slots = dict(colour=colour, shape=shape)
        cands = _options(rng, d, list(DIRECTIONS), letter)
        correct = d
        facts = _one_object_facts(colour, shape, d)
    elif qtype in ("first_colour", "last_colour"):
        correct = colours[answer]
        other = [c for c in colours if c != correct][rng.integers(len(colours) - 1)]
        first, second = (correct, other) if qtype == "first_colour" else (other, correct)
        early = np.arange(frames) < frames // 2
        for colour, vis in ((first, early), (second, ~early)):
            shape = SHAPES[rng.integers(4)]
            draw(shape, colour, *_path(rng, size, r, None, frames), vis)
        slots = {}
        # both colours shown are always options, so only the order tells them apart
        rest = [c for c in colours if c not in (first, second)]
        rest = [rest[i] for i in rng.permutation(len(rest))[:2]]
        wrong = [other] + rest
        wrong = [wrong[i] for i in rng.permutation(3)]
        wrong.insert(letter, correct)
        cands = wrong
        facts = {
            "first_colour": Fact(_phrasings("first_colour"), first, tuple(colours), (second,)),
            "last_colour": Fact(_phrasings("last_colour"), second, tuple(colours), (first,)),
        }
    elif qtype == "colour":
        colour, shape = colours[answer], SHAPES[rng.integers(4)]
        d = DIRECTIONS[rng.integers(4)] if rng.random() < 0.5 else None
        draw(shape, colour, *_path(rng, size, r, d, frames), everywhere)
        slots = dict(shape=shape)
        cands, correct = _options(rng, colour, colours, letter), colour
        facts = _one_object_facts(colour, shape, d)
    elif qtype == "shape":
        shape, colour = SHAPES[answer], colours[rng.integers(len(colours))]
        d = DIRECTIONS[rng.integers(4)] if rng.random() < 0.5 else None
        draw(shape, colour, *_path(rng, size, r, d, frames), everywhere)
        slots = dict(colour=colour)
        cands, correct = _options(rng, shape, list(SHAPES), letter), shape
        facts = _one_object_facts(colour, shape, d)
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    questions = _phrasings(qtype, **slots)
    assert facts[qtype].phrasings == questions and facts[qtype].answer == correct
    return Scene(video, qtype, questions, cands, correct, facts)


def format_question(question: str, candidates: list[str]) -> str:
    """MVBench-style multiple-choice text (SPEC §8) without the role markers."""
    opts = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{opts}\n{MC_SUFFIX}"


def num_values(qtype: str) -> int:
    """How many answers a question type has (colours, directions or shapes)."""
    return (
        len(DIRECTIONS)
        if qtype == "direction"
        else len(SHAPES)
        if qtype == "shape"
        else len(COLOURS)
    )
