"""The embedded default dataset: synthetic video QA with coloured shapes (runs anywhere).

    python -m ppllava_jax.data.synthetic --out DIR [--num-train 400 --num-eval 100
        --frames 16 --size 64 --seed 0]

writes, in the original annotation format (see ``annotations.py``)::

    DIR/videos/{train,eval}_NNNNN.mp4   short clips (PyAV, h264 or mpeg4)
    DIR/train.json  DIR/eval.json        multiple-choice QA, one turn per clip
    DIR/tokenizer/                       LLaMA-style SentencePiece tokenizer (+ <image>)
    DIR/clip_tokenizer/                  CLIP-style BPE tokenizer
    DIR/dataset_info.json                sizes, image token id, question types
    DIR/COMPLETE                         marker written last (its content: the arguments)

Question types (each clip has one; types in equal shares):

- ``direction``: "Which way does the {colour} {shape} move?" -> left/right/up/down. Needs
  the temporal order (any single frame, or the frames shuffled, cannot tell).
- ``first_colour``: two shapes, one in each half of the clip: "Which colour appears
  first?" The options hold both colours shown, so it too needs the order.
- ``colour``: "What colour is the {shape}?"
- ``shape``: "What shape is the {colour} object?"

Nothing is answerable from the text alone: per split and question type the correct
answers cycle through every value equally often, the correct letter through (A)-(D)
equally often, and the options are shuffled. The answer is written ``"left (B)"``: the value
first, then its option letter (a tiny model learns the look-up from the value to the letter far
faster than choosing a letter first, which needs the value and the look-up in one step);
``extra`` fields hold the bare question, the candidates, the answer and its letter.
Deterministic given the seed (encoding is single-threaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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
QTYPES = ("direction", "first_colour", "colour", "shape")
LETTERS = "ABCD"
MC_SUFFIX = "Only give the best option."
MARKER = "COMPLETE"
VERSION = 2  # 2: answers read 'left (B)' (the value, then its letter)


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
    travel = 0.45 * size
    t = np.linspace(0.0, 1.0, frames)
    if direction is None:
        y0, x0 = rng.uniform(lo, hi, 2)
        return np.full(frames, y0), np.full(frames, x0)
    across = rng.uniform(lo, hi)
    start = rng.uniform(lo, hi - travel)
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
    rng: np.random.Generator, qtype: str, answer: int, letter: int, frames: int, size: int
):
    """One clip and its question. Returns (uint8[F, S, S, 3], question, candidates, answer)."""
    colours = list(COLOURS)
    bg = np.array(rng.integers(15, 70, 3), np.uint8)
    video = np.broadcast_to(bg, (frames, size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = size * rng.uniform(0.13, 0.17)

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
    elif qtype == "first_colour":
        first = colours[answer]
        second = [c for c in colours if c != first][rng.integers(len(colours) - 1)]
        half = frames // 2
        early = np.arange(frames) < half
        for colour, vis in ((first, early), (second, ~early)):
            shape = SHAPES[rng.integers(4)]
            draw(shape, colour, *_path(rng, size, r, None, frames), vis)
        question = "Which colour appears first?"
        # both colours shown are always options, so only the order tells them apart
        rest = [c for c in colours if c not in (first, second)]
        rest = [rest[i] for i in rng.permutation(len(rest))[:2]]
        wrong = [second] + rest
        wrong = [wrong[i] for i in rng.permutation(3)]
        wrong.insert(letter, first)
        cands, correct = wrong, first
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
    return {"direction": 4, "first_colour": len(COLOURS), "colour": len(COLOURS), "shape": 4}[qtype]


def generate_split(
    out: str, split: str, num: int, frames: int, size: int, seed: int, fps: float, codec: str | None
) -> list[dict]:
    """Write the clips of one split and return its annotation list."""
    rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split]])
    types = np.resize(np.arange(len(QTYPES)), num)
    types = types[rng.permutation(num)]
    answers = np.zeros(num, np.int64)
    letters = np.zeros(num, np.int64)
    for k, q in enumerate(QTYPES):
        sel = np.flatnonzero(types == k)
        answers[sel] = _balanced(rng, _num_values(q), len(sel))
        letters[sel] = _balanced(rng, 4, len(sel))
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    anns = []
    for i in range(num):
        qtype = QTYPES[types[i]]
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
                "QA": [{"q": format_question(question, cands), "a": f"{correct} ({letter})"}],
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
) -> dict:
    """Write the whole dataset to ``out`` (see module docstring); returns dataset_info."""
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
        splits[split] = generate_split(out, split, n, frames, size, seed, fps, codec)
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(splits[split], f, indent=1)
    corpus = tokenizer_corpus(splits["train"] + splits["eval"])
    tok = train_llama_tokenizer(corpus, os.path.join(out, "tokenizer"))
    clip_tok = train_clip_tokenizer(corpus, os.path.join(out, "clip_tokenizer"))
    info = {
        "version": VERSION,
        "args": _args(num_train, num_eval, frames, size, seed, fps, codec),
        "splits": {k: len(v) for k, v in splits.items()},
        "question_types": list(QTYPES),
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


def _args(num_train, num_eval, frames, size, seed, fps, codec) -> dict:
    return {
        "num_train": num_train,
        "num_eval": num_eval,
        "frames": frames,
        "size": size,
        "seed": seed,
        "fps": fps,
        "codec": codec,
        "version": VERSION,
    }


def ensure_dataset(out: str | os.PathLike, **kwargs) -> dict:
    """Create the dataset in ``out`` unless a complete one with the same arguments is there.

    Idempotent: the ``COMPLETE`` marker is written last, so an interrupted generation is
    redone. A complete dataset made with other arguments raises ValueError (use another
    directory or delete it). Returns dataset_info.
    """
    out = os.fspath(out)
    defaults = dict(num_train=400, num_eval=100, frames=16, size=64, seed=0, fps=8.0, codec=None)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; allowed: {sorted(defaults)}")
    args = {**defaults, **kwargs}
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
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-eval", type=int, default=100)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--codec", default=None, help="libx264 (default when available) or mpeg4")
    a = p.parse_args(argv)
    info = generate(a.out, a.num_train, a.num_eval, a.frames, a.size, a.seed, a.fps, a.codec)
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
