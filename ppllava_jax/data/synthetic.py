"""The embedded default dataset: synthetic video QA with coloured shapes (runs anywhere).

    python -m ppllava_jax.data.synthetic --out DIR [--num-train 400 --num-eval 100
        --frames 16 --size 64 --seed 0 --qtypes colour,first_colour,last_colour]

writes, in the original annotation format (see ``annotations.py``)::

    DIR/videos/{train,eval}_NNNNN.mp4   short clips (PyAV, h264 or mpeg4)
    DIR/train.json  DIR/eval.json        multiple-choice QA, one turn per clip
    DIR/tokenizer/                       LLaMA-style SentencePiece tokenizer (+ <image>)
    DIR/clip_tokenizer/                  CLIP-style BPE tokenizer
    DIR/dataset_info.json                sizes, image token id, question types
    DIR/COMPLETE                         marker written last (its content: the arguments)

Question types (each clip has one; the chosen types in equal shares):

- ``colour``: "What colour is the {shape}?" (one shape, still or moving).
- ``first_colour`` / ``last_colour``: two shapes, one in each half of the clip: "Which colour
  appears first?" / "... last?" The options hold both colours shown, so only the temporal order
  answers them, and the same kind of clip is asked both ways (the question says which half).
- ``direction``: "Which way does the {colour} {shape} move?" -> left/right/up/down. Needs
  the temporal order (any single frame, or the frames shuffled, cannot tell).
- ``shape``: "What shape is the {colour} object?"

The default set (``DEFAULT_QTYPES``: colour, first_colour, last_colour) is what a model trained
from scratch learns in the demo's 10 CPU minutes. ``direction`` and ``shape`` need features the
vision tower has to learn first (position over time, outline): in the demo's budget they stay at
chance, so they are opt-in (``--qtypes``, ``synthetic.qtypes``) for longer runs.

Nothing is answerable from the text alone: per split and question type the correct
answers cycle through every value equally often, the correct letter through (A)-(D)
equally often, and the options are shuffled. The answer is the correct option's text
(``"left"``), as an answer extractor matches it to its letter; a model trained from scratch
also has to learn a text look-up (the letter in front of the option) before it can answer with
letters, which a 10-minute CPU run does not reach.
``extra`` fields hold the bare question, the candidates, the answer and its letter.
Deterministic given the seed (encoding is single-threaded).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from ppllava_jax.data import templates as tpl
from ppllava_jax.data.tokenizers import train_clip_tokenizer, train_llama_tokenizer
from ppllava_jax.data.video import write_video

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
QTYPES = ("colour", "first_colour", "last_colour", "direction", "shape")  # every known type
DEFAULT_QTYPES = ("colour", "first_colour", "last_colour")
LETTERS = "ABCD"
MC_SUFFIX = "Only give the best option."
MARKER = "COMPLETE"
VERSION = 3  # 3: answers are the option text ('left'), larger objects
RADIUS = (0.22, 0.26)  # object radius range, as a fraction of the clip size


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


def _balanced(rng: np.random.Generator, values: int, n: int) -> np.ndarray:
    """n draws of range(values), each value equally often (+-1), in random order."""
    return rng.permutation(np.tile(np.arange(values), -(-n // values))[:n])


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
    """One clip and its question. Returns (uint8[F, S, S, 3], question, candidates, answer)."""
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
        question = f"Which way does the {colour} {shape} move?"
        cands = _options(rng, d, list(DIRECTIONS), letter)
        correct = d
    elif qtype in ("first_colour", "last_colour"):
        correct = colours[answer]
        other = [c for c in colours if c != correct][rng.integers(len(colours) - 1)]
        first, second = (correct, other) if qtype == "first_colour" else (other, correct)
        early = np.arange(frames) < frames // 2
        for colour, vis in ((first, early), (second, ~early)):
            shape = SHAPES[rng.integers(4)]
            draw(shape, colour, *_path(rng, size, r, None, frames), vis)
        question = f"Which colour appears {qtype.split('_')[0]}?"
        # both colours shown are always options, so only the order tells them apart
        rest = [c for c in colours if c not in (first, second)]
        rest = [rest[i] for i in rng.permutation(len(rest))[:2]]
        wrong = [other] + rest
        wrong = [wrong[i] for i in rng.permutation(3)]
        wrong.insert(letter, correct)
        cands = wrong
    elif qtype == "colour":
        colour, shape = colours[answer], SHAPES[rng.integers(4)]
        d = DIRECTIONS[rng.integers(4)] if rng.random() < 0.5 else None
        draw(shape, colour, *_path(rng, size, r, d, frames), everywhere)
        question = f"What colour is the {shape}?"
        cands, correct = _options(rng, colour, colours, letter), colour
    elif qtype == "shape":
        shape, colour = SHAPES[answer], colours[rng.integers(len(colours))]
        d = DIRECTIONS[rng.integers(4)] if rng.random() < 0.5 else None
        draw(shape, colour, *_path(rng, size, r, d, frames), everywhere)
        question = f"What shape is the {colour} object?"
        cands, correct = _options(rng, shape, list(SHAPES), letter), shape
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return video, question, cands, correct


def format_question(question: str, candidates: list[str]) -> str:
    """MVBench-style multiple-choice text (SPEC §8) without the role markers."""
    opts = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{opts}\n{MC_SUFFIX}"


def _num_values(qtype: str) -> int:
    return (
        len(DIRECTIONS)
        if qtype == "direction"
        else len(SHAPES)
        if qtype == "shape"
        else len(COLOURS)
    )


def check_qtypes(qtypes: Sequence[str]) -> tuple[str, ...]:
    """``qtypes`` as a tuple; raises ValueError naming an unknown type."""
    qtypes = tuple(qtypes)
    bad = [q for q in qtypes if q not in QTYPES]
    if bad or not qtypes or len(set(qtypes)) != len(qtypes):
        raise ValueError(f"question types {list(qtypes)}: pick distinct ones of {list(QTYPES)}")
    return qtypes


def generate_split(
    out: str,
    split: str,
    num: int,
    frames: int,
    size: int,
    seed: int,
    fps: float,
    codec: str | None,
    qtypes: Sequence[str] = DEFAULT_QTYPES,
) -> list[dict]:
    """Write the clips of one split and return its annotation list."""
    qtypes = check_qtypes(qtypes)
    rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split]])
    types = np.resize(np.arange(len(qtypes)), num)
    types = types[rng.permutation(num)]
    answers = np.zeros(num, np.int64)
    letters = np.zeros(num, np.int64)
    for k, q in enumerate(qtypes):
        sel = np.flatnonzero(types == k)
        answers[sel] = _balanced(rng, _num_values(q), len(sel))
        letters[sel] = _balanced(rng, 4, len(sel))
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    anns = []
    for i in range(num):
        qtype = qtypes[types[i]]
        video, question, cands, correct = make_clip(
            rng, qtype, int(answers[i]), int(letters[i]), frames, size
        )
        rel = f"videos/{split}_{i:05d}.mp4"
        write_video(os.path.join(out, rel), video, fps=fps, codec=codec)
        letter = LETTERS[int(letters[i])]
        assert cands[int(letters[i])] == correct
        anns.append(
            {
                "video": rel,
                "media_type": "video",
                "QA": [{"q": format_question(question, cands), "a": correct}],
                "qtype": qtype,
                "question": question,
                "candidates": cands,
                "answer": correct,
                "answer_letter": letter,
                "answer_index": int(letters[i]),
            }
        )
    return anns


def tokenizer_corpus(annotations: list[dict]) -> list[str]:
    """Text the tokenizers are trained on: every conversation in the templates, the MVBench
    prompt pieces and the vocabulary lists."""
    corpus = []
    for a in annotations:
        turns = [tpl.Turn(t["q"], t["a"]) for t in a["QA"]]
        for name in ("plain_v1", "vicuna_v1"):
            text, _ = tpl.render(turns, name, num_images=0)
            corpus.append(text)
        corpus.append(a["question"])
        corpus.append(f"ASSISTANT: Best option:({a['answer_letter']}) {a['answer']}")
    corpus.append(" ".join(list(COLOURS) + list(SHAPES) + list(DIRECTIONS)))
    return corpus


def generate(
    out: str | os.PathLike,
    num_train: int = 400,
    num_eval: int = 100,
    frames: int = 16,
    size: int = 64,
    seed: int = 0,
    fps: float = 8.0,
    codec: str | None = None,
    qtypes: Sequence[str] = DEFAULT_QTYPES,
) -> dict:
    """Write the whole dataset to ``out`` (see module docstring); returns dataset_info."""
    qtypes = check_qtypes(qtypes)
    if size % 2 or size < 32:
        raise ValueError(f"size must be even and >= 32, got {size}")
    if frames < 4:
        raise ValueError(f"frames must be >= 4, got {frames}")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    t0 = time.time()
    splits = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        splits[split] = generate_split(out, split, n, frames, size, seed, fps, codec, qtypes)
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(splits[split], f, indent=1)
    corpus = tokenizer_corpus(splits["train"] + splits["eval"])
    tok = train_llama_tokenizer(corpus, os.path.join(out, "tokenizer"))
    clip_tok = train_clip_tokenizer(corpus, os.path.join(out, "clip_tokenizer"))
    info = {
        "version": VERSION,
        "args": _args(num_train, num_eval, frames, size, seed, fps, codec, qtypes),
        "splits": {k: len(v) for k, v in splits.items()},
        "question_types": list(qtypes),
        "chance_accuracy": 0.25,
        "image_token": "<image>",
        "image_token_id": int(tok.convert_tokens_to_ids("<image>")),
        "vocab_size": len(tok),
        "clip_vocab_size": len(clip_tok),
        "clip_eos_token_id": int(clip_tok.eos_token_id),
        "generation_seconds": round(time.time() - t0, 2),
    }
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(marker, "w") as f:
        json.dump(info["args"], f, sort_keys=True)
    return info


def _args(num_train, num_eval, frames, size, seed, fps, codec, qtypes=DEFAULT_QTYPES) -> dict:
    return {
        "num_train": num_train,
        "num_eval": num_eval,
        "frames": frames,
        "size": size,
        "seed": seed,
        "fps": fps,
        "codec": codec,
        "qtypes": list(qtypes),
        "version": VERSION,
    }


def ensure_dataset(out: str | os.PathLike, **kwargs) -> dict:
    """Create the dataset in ``out`` unless a complete one with the same arguments is there.

    Idempotent: the ``COMPLETE`` marker is written last, so an interrupted generation is
    redone. A complete dataset made with other arguments raises ValueError (use another
    directory or delete it). Returns dataset_info.
    """
    out = os.fspath(out)
    params = inspect.signature(generate).parameters
    defaults = {k: p.default for k, p in params.items() if k != "out"}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; allowed: {sorted(defaults)}")
    args = {**defaults, **kwargs}
    args["qtypes"] = check_qtypes(args["qtypes"])
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            have = json.load(f)
        want = _args(**args)
        if have != json.loads(json.dumps(want, sort_keys=True)):
            raise ValueError(
                f"{out} holds a synthetic dataset made with {have}, not {want}; "
                "use another directory or delete it"
            )
        with open(os.path.join(out, "dataset_info.json")) as f:
            return json.load(f)
    return generate(out, **args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    d = {k: v.default for k, v in inspect.signature(generate).parameters.items()}
    for name in ("num_train", "num_eval", "frames", "size", "seed", "fps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(d[name]), default=d[name])
    p.add_argument("--codec", default=None, help="libx264 (default when available) or mpeg4")
    p.add_argument(
        "--qtypes", default=",".join(DEFAULT_QTYPES), help=f"comma-separated, of {list(QTYPES)}"
    )
    a = p.parse_args(argv)
    qtypes = [q.strip() for q in a.qtypes.split(",") if q.strip()]
    info = generate(
        a.out, a.num_train, a.num_eval, a.frames, a.size, a.seed, a.fps, a.codec, qtypes
    )
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
