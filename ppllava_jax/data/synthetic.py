"""The embedded default dataset: synthetic video QA with coloured shapes (runs anywhere).

    python -m ppllava_jax.data.synthetic --out DIR [--num-train 400 --num-eval 100
        --frames 16 --size 64 --seed 0 --qtypes colour,first_colour,last_colour
        --multiturn-fraction 0.3]

writes, in the original annotation format (see ``annotations.py``)::

    DIR/videos/{train,eval}_NNNNN.mp4   short clips (PyAV, h264 or mpeg4)
    DIR/train.json  DIR/eval.json        QA, one turn per clip: multiple choice (and, in
                                         train.json, a share of plain questions), and in
                                         train.json conversations about a share of the clips
    DIR/eval_multiturn.json              a conversation about each held-out clip
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
``extra`` fields hold the bare question, the candidates, the answer and its letter, and the
``form`` of the turn: ``mc``, or ``plain`` for the :data:`PLAIN_FRACTION` of training clips
asked one of their question's phrasings (``shapes.PHRASINGS``, e.g. "What is the colour of the
square?") without options, so the model also answers questions as a person types them (the
chat); the clips are those of a multiple-choice-only set, and the held-out split stays multiple
choice.

Conversations (``form`` ``multiturn``): 2 or 3 plain turns about one clip, as a person chats
(``ppllava_jax.chat``, the web demo): the clip's own question first, then questions the clip
also answers (``shapes.Scene.facts``, of the chosen types), each of another type than the
turn before where the clip has one: on a clip of two shapes "Which colour appears first?" ->
``green``, then "Which colour appears last?" -> ``purple``; on a clip of one red square "What
colour is the square?" -> ``red``, then "What colour do you see last?" -> ``red``. Every answer
is supervised; the earlier turns stand in the prompt of a later one exactly as the chat renders
a conversation (``templates.render`` of the turns). A ``multiturn_fraction`` of the training
clips get one *besides* their single-turn annotation (appended to ``train.json``, the same
video; 0 by default, the demos' :data:`MULTITURN_FRACTION` 0.3), so the single-turn set is
exactly that of a set without conversations;
``eval_multiturn.json`` holds one about each held-out clip (``evaluate/synthetic.py`` scores
its later turns). Their ``turns`` field holds each turn's ``qtype``, ``question``,
``candidates``, ``answer``, ``answer_letter``, ``answer_index`` (options a scorer matches the
plain answer to); the top-level fields are the first turn's. Conversations draw numbers of
their own: the clips and single-turn annotations do not depend on them.
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
from ppllava_jax.data.shapes import (
    COLOURS,
    DIRECTIONS,
    LETTERS,
    SHAPES,
    Scene,
    format_question,
    make_scene,
    num_values,
    options,
)
from ppllava_jax.data.tokenizers import train_clip_tokenizer, train_llama_tokenizer
from ppllava_jax.data.video import write_video

QTYPES = ("colour", "first_colour", "last_colour", "direction", "shape")  # every known type
DEFAULT_QTYPES = ("colour", "first_colour", "last_colour")
MARKER = "COMPLETE"
# 3: answers are the option text ('left'), larger objects; 4: plain questions; 5: conversations
VERSION = 5
PLAIN_FRACTION = 0.1  # training clips asked a plain phrasing instead of multiple choice
MULTITURN_FRACTION = 0.3  # the demos' share of training clips that also get a conversation
MAX_TURNS = 3  # a conversation has 2 .. MAX_TURNS turns
SPLIT_IDS = {"train": 0, "eval": 1}
MULTITURN_SPLIT = "eval_multiturn"  # the held-out conversations (about the eval clips)


def _balanced(rng: np.random.Generator, values: int, n: int) -> np.ndarray:
    """n draws of range(values), each value equally often (+-1), in random order."""
    return rng.permutation(np.tile(np.arange(values), -(-n // values))[:n])


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
    multiturn_fraction: float = 0.0,
) -> tuple[list[dict], list[dict]]:
    """Write the clips of one split; returns (its single-turn annotations, its conversations:
    about a ``multiturn_fraction`` of the training clips, or about every held-out clip)."""
    qtypes = check_qtypes(qtypes)
    rng = np.random.default_rng([seed, SPLIT_IDS[split]])
    types = np.resize(np.arange(len(qtypes)), num)
    types = types[rng.permutation(num)]
    answers = np.zeros(num, np.int64)
    letters = np.zeros(num, np.int64)
    for k, q in enumerate(qtypes):
        sel = np.flatnonzero(types == k)
        answers[sel] = _balanced(rng, num_values(q), len(sel))
        letters[sel] = _balanced(rng, 4, len(sel))
    # which training clips are asked plainly (numbers of their own: the clips are unchanged)
    form_rng = np.random.default_rng([seed, SPLIT_IDS[split], 2])
    plain = (form_rng.random(num) < PLAIN_FRACTION) & (split == "train")
    phrasing = form_rng.integers(0, 1 << 16, num)
    # the conversations: numbers of their own again
    conv_rng = np.random.default_rng([seed, SPLIT_IDS[split], 3])
    talk = conv_rng.random(num) < (multiturn_fraction if split == "train" else 1.0)
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    anns, convs = [], []
    for i in range(num):
        qtype = qtypes[types[i]]
        scene = make_scene(rng, qtype, int(answers[i]), int(letters[i]), frames, size)
        rel = f"videos/{split}_{i:05d}.mp4"
        write_video(os.path.join(out, rel), scene.video, fps=fps, codec=codec)
        cands, correct = scene.candidates, scene.answer
        letter = LETTERS[int(letters[i])]
        assert cands[int(letters[i])] == correct
        ann = {
            "video": rel,
            "media_type": "video",
            "QA": [{"q": format_question(scene.questions[0], cands), "a": correct}],
            "form": "mc",
            "qtype": qtype,
            "question": scene.questions[0],
            "candidates": cands,
            "answer": correct,
            "answer_letter": letter,
            "answer_index": int(letters[i]),
        }
        if plain[i]:
            q = scene.questions[phrasing[i] % len(scene.questions)]
            ann.update(QA=[{"q": q, "a": correct}], form="plain")
        anns.append(ann)
        if talk[i]:
            turns = conversation(conv_rng, scene, qtypes)
            first = {k: v for k, v in turns[0].items() if k != "q"}
            convs.append(
                {
                    "video": rel,
                    "media_type": "video",
                    "QA": [{"q": t["q"], "a": t["answer"]} for t in turns],
                    "form": "multiturn",
                    **first,
                    "turns": [{k: v for k, v in t.items() if k != "q"} for t in turns],
                }
            )
    return anns, convs


def conversation(rng: np.random.Generator, scene: Scene, qtypes: Sequence[str]) -> list[dict]:
    """2 .. ``MAX_TURNS`` plain turns about ``scene`` (see module docstring): each turn's
    question as asked (``q``), its type, canonical question, answer and four options."""
    facts = {q: f for q, f in scene.facts.items() if q in qtypes}
    order = [scene.qtype]
    for _ in range(int(rng.integers(2, MAX_TURNS + 1)) - 1):
        other = [q for q in facts if q != order[-1]] or [order[-1]]
        order.append(other[int(rng.integers(len(other)))])
    asked: set[str] = set()
    turns = []
    for qtype in order:
        fact = facts[qtype]
        fresh = [p for p in fact.phrasings if p not in asked] or list(fact.phrasings)
        q = fresh[int(rng.integers(len(fresh)))]
        asked.add(q)
        letter = int(rng.integers(4))
        turns.append(
            {
                "q": q,
                "qtype": qtype,
                "question": fact.phrasings[0],
                "candidates": options(rng, fact, letter),
                "answer": fact.answer,
                "answer_letter": LETTERS[letter],
                "answer_index": letter,
            }
        )
    return turns


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
    multiturn_fraction: float = 0.0,
) -> dict:
    """Write the whole dataset to ``out`` (see module docstring); returns dataset_info."""
    qtypes = check_qtypes(qtypes)
    if size % 2 or size < 32:
        raise ValueError(f"size must be even and >= 32, got {size}")
    if frames < 4:
        raise ValueError(f"frames must be >= 4, got {frames}")
    if not 0.0 <= multiturn_fraction <= 1.0:
        raise ValueError(f"multiturn_fraction must be in [0, 1], got {multiturn_fraction}")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    t0 = time.time()
    args = (frames, size, seed, fps, codec, qtypes, multiturn_fraction)
    train, train_convs = generate_split(out, "train", num_train, *args)
    held_out, held_out_convs = generate_split(out, "eval", num_eval, *args)
    splits = {"train": train + train_convs, "eval": held_out, MULTITURN_SPLIT: held_out_convs}
    for split, anns in splits.items():
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(anns, f, indent=1)
    corpus = tokenizer_corpus(splits["train"] + splits["eval"])
    tok = train_llama_tokenizer(corpus, os.path.join(out, "tokenizer"))
    clip_tok = train_clip_tokenizer(corpus, os.path.join(out, "clip_tokenizer"))
    info = {
        "version": VERSION,
        "args": _args(num_train, num_eval, *args),
        "splits": {k: len(v) for k, v in splits.items()},
        "conversations": {"train": len(train_convs), MULTITURN_SPLIT: len(held_out_convs)},
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


def _args(
    num_train,
    num_eval,
    frames,
    size,
    seed,
    fps,
    codec,
    qtypes=DEFAULT_QTYPES,
    multiturn_fraction=0.0,
) -> dict:
    return {
        "num_train": num_train,
        "num_eval": num_eval,
        "frames": frames,
        "size": size,
        "seed": seed,
        "fps": fps,
        "codec": codec,
        "qtypes": list(qtypes),
        "multiturn_fraction": float(multiturn_fraction),
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
    for name in ("num_train", "num_eval", "frames", "size", "seed", "fps", "multiturn_fraction"):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(d[name]), default=d[name])
    p.add_argument("--codec", default=None, help="libx264 (default when available) or mpeg4")
    p.add_argument(
        "--qtypes", default=",".join(DEFAULT_QTYPES), help=f"comma-separated, of {list(QTYPES)}"
    )
    a = p.parse_args(argv)
    qtypes = [q.strip() for q in a.qtypes.split(",") if q.strip()]
    info = generate(
        a.out,
        a.num_train,
        a.num_eval,
        a.frames,
        a.size,
        a.seed,
        a.fps,
        a.codec,
        qtypes,
        a.multiturn_fraction,
    )
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
