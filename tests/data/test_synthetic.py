"""The synthetic video-QA dataset: parseable, decodable, balanced, deterministic, correct."""

import collections
import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from ppllava_jax.data import shapes
from ppllava_jax.data import synthetic as S
from ppllava_jax.data.annotations import load_annotation_file
from ppllava_jax.data.templates import encode_conversation, get_template
from ppllava_jax.data.video import load_video

ARGS = dict(
    num_train=48, num_eval=24, frames=8, size=32, seed=3, qtypes=S.QTYPES, multiturn_fraction=0.3
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    info = S.ensure_dataset(out, **ARGS)
    return str(out), info


def test_layout_and_annotations(dataset):
    out, info = dataset
    convs = info["conversations"]
    assert convs[S.MULTITURN_SPLIT] == 24 and 1 <= convs["train"] < 48
    assert info["splits"] == {"train": 48 + convs["train"], "eval": 24, S.MULTITURN_SPLIT: 24}
    for split, n in info["splits"].items():
        samples = load_annotation_file(os.path.join(out, f"{split}.json"), out, on_error="raise")
        assert len(samples) == n
        for s in samples[:6] + samples[-2:]:
            clip = load_video(s.media[0], 8)
            assert clip.frames.shape == (8, 32, 32, 3)
            cands, letter = s.extra["candidates"], s.extra["answer_letter"]
            assert len(cands) == 4 and len(set(cands)) == 4
            assert cands["ABCD".index(letter)] == s.extra["answer"]
            assert s.turns[0].a == s.extra["answer"]
            if s.extra["form"] == "mc":
                assert s.turns[0].q.startswith("Question: " + s.extra["question"] + "\n")
                assert "(A) " in s.turns[0].q and s.turns[0].q.endswith(shapes.MC_SUFFIX)
            else:  # a plain phrasing of the same question, no options
                assert split != "eval" and "(A)" not in s.turns[0].q
                assert s.turns[0].q in phrasings(s.extra)
                assert (len(s.turns) > 1) == (s.extra["form"] == "multiturn")


def phrasings(a):
    """Every phrasing of an annotation's question (its slots read off the canonical one)."""
    words = a["question"].rstrip("?").split()
    colour = next((w for w in words if w in shapes.COLOURS), "")
    shape = next((w for w in words if w in shapes.SHAPES), "")
    return {p.format(colour=colour, shape=shape) for p in shapes.PHRASINGS[a["qtype"]]}


def test_a_share_of_training_clips_asks_plain_questions(dataset):
    out, _ = dataset
    train = json.load(open(os.path.join(out, "train.json")))
    held_out = json.load(open(os.path.join(out, "eval.json")))
    assert all(a["form"] == "mc" and a["QA"][0]["q"].startswith("Question: ") for a in held_out)
    plain = [a for a in train if a["form"] == "plain"]
    assert 1 <= len(plain) <= 0.3 * len(train)  # PLAIN_FRACTION = 0.1
    assert len({a["QA"][0]["q"] != a["question"] for a in plain}) == 2  # varied phrasings
    for a in plain:
        assert a["QA"][0]["q"] in phrasings(a) and a["QA"][0]["a"] == a["answer"]


def test_plain_questions_leave_the_clips_unchanged(tmp_path, monkeypatch):
    """The choice of form draws its own numbers: the clips, questions and answers are those of
    a multiple-choice-only set (with or without conversations)."""
    args = ("train", 12, 4, 32, 0, 8.0, None, S.DEFAULT_QTYPES)
    monkeypatch.setattr(S, "PLAIN_FRACTION", 0.5)
    mixed, convs = S.generate_split(str(tmp_path / "a"), *args, multiturn_fraction=1.0)
    monkeypatch.setattr(S, "PLAIN_FRACTION", 0.0)
    only_mc, none = S.generate_split(str(tmp_path / "b"), *args, multiturn_fraction=0.0)
    assert len(convs) == 12 and none == []
    assert {a["form"] for a in mixed} == {"mc", "plain"} and {a["form"] for a in only_mc} == {"mc"}
    keys = ("video", "qtype", "question", "candidates", "answer", "answer_letter")
    assert [[a[k] for k in keys] for a in mixed] == [[a[k] for k in keys] for a in only_mc]
    for a in mixed[:3]:
        np.testing.assert_array_equal(
            load_video(str(tmp_path / "a" / a["video"]), 4).frames,
            load_video(str(tmp_path / "b" / a["video"]), 4).frames,
        )


def test_answers_balanced(dataset):
    out, _ = dataset
    for split in ("train", "eval"):
        anns = json.load(open(os.path.join(out, f"{split}.json")))
        by_type = collections.defaultdict(list)
        for a in anns:
            if a["form"] == "multiturn":  # the clips' own questions are the single turns
                continue
            by_type[a["qtype"]].append(a)
        assert set(by_type) == set(S.QTYPES)
        assert max(map(len, by_type.values())) - min(map(len, by_type.values())) <= 1
        for qtype, items in by_type.items():
            letters = collections.Counter(a["answer_letter"] for a in items)
            assert len(letters) == 4 and max(letters.values()) - min(letters.values()) <= 1
            values = collections.Counter(a["answer"] for a in items)
            assert len(values) == shapes.num_values(qtype) or len(items) < shapes.num_values(qtype)
            assert max(values.values()) - min(values.values()) <= 1
            if qtype == "first_colour":  # both colours shown are among the options
                assert all(len(set(a["candidates"]) & set(shapes.COLOURS)) == 4 for a in items)


def _centroid(frame, colour):
    m = np.abs(frame.astype(int) - np.array(shapes.COLOURS[colour])).sum(-1) < 90
    ys, xs = np.nonzero(m)
    return (ys.mean(), xs.mean()) if len(ys) else None


def test_clip_content_matches_answers(dataset):
    out, _ = dataset
    anns = json.load(open(os.path.join(out, "train.json")))
    checked = collections.Counter()
    for a in anns:
        clip = load_video(os.path.join(out, a["video"]), 8).frames
        if a["qtype"] == "direction":
            colour = a["question"].split()[-3]
            (y0, x0), (y1, x1) = _centroid(clip[0], colour), _centroid(clip[-1], colour)
            dy, dx = y1 - y0, x1 - x0
            moved = (
                ("right" if dx > 0 else "left")
                if abs(dx) > abs(dy)
                else ("down" if dy > 0 else "up")
            )
            assert moved == a["answer"] and max(abs(dx), abs(dy)) > 8
        elif a["qtype"] == "first_colour":
            first = a["answer"]
            second = next(c for c in a["candidates"] if c != first and _centroid(clip[-1], c))
            assert _centroid(clip[0], first) is not None and _centroid(clip[-1], first) is None
            assert _centroid(clip[0], second) is None
        elif a["qtype"] == "last_colour":
            last = a["answer"]
            first = next(c for c in a["candidates"] if c != last and _centroid(clip[0], c))
            assert _centroid(clip[-1], last) is not None and _centroid(clip[0], last) is None
            assert _centroid(clip[-1], first) is None
        elif a["qtype"] == "colour":
            assert _centroid(clip[4], a["answer"]) is not None
        checked[a["qtype"]] += 1
    assert len(checked) == len(S.QTYPES)


def test_conversations_about_the_clips(dataset):
    """2-3 plain turns about one clip: the clip's own question first, then other questions it
    answers (another type than the turn before where the clip has one), every answer true of
    the clip; a share of the training clips, and every held-out clip (the same videos)."""
    out, _ = dataset
    train = json.load(open(os.path.join(out, "train.json")))
    single = {a["video"]: a for a in train if a["form"] != "multiturn"}
    convs = [a for a in train if a["form"] == "multiturn"]
    held_out = json.load(open(os.path.join(out, f"{S.MULTITURN_SPLIT}.json")))
    assert [a["video"] for a in held_out] == [
        a["video"] for a in json.load(open(os.path.join(out, "eval.json")))
    ]
    assert all(a["video"] in single for a in convs)
    kinds = collections.Counter()
    for a in convs + held_out:
        qa, turns = a["QA"], a["turns"]
        assert 2 <= len(qa) == len(turns) <= S.MAX_TURNS and a["form"] == "multiturn"
        assert turns[0]["qtype"] == a["qtype"] and a["answer"] == turns[0]["answer"]
        clip = load_video(os.path.join(out, a["video"]), 8).frames
        for k, (q, t) in enumerate(zip(qa, turns)):
            assert q["a"] == t["answer"] == t["candidates"]["ABCD".index(t["answer_letter"])]
            assert len(set(t["candidates"])) == 4 and "(A)" not in q["q"]
            assert q["q"] in phrasings(t)
            if k and a["qtype"] in ("first_colour", "last_colour"):  # two shapes: the other half
                assert t["qtype"] != turns[k - 1]["qtype"]
                assert t["answer"] != turns[k - 1]["answer"]
            if t["qtype"] == "first_colour":
                assert _centroid(clip[0], t["answer"]) is not None
            elif t["qtype"] == "last_colour":
                assert _centroid(clip[-1], t["answer"]) is not None
            elif t["qtype"] == "colour":
                assert _centroid(clip[4], t["answer"]) is not None
            kinds[(a["qtype"], t["qtype"])] += 1
    assert kinds[("first_colour", "last_colour")] and kinds[("colour", "first_colour")]


def test_tokenizers_and_encoding(dataset):
    out, info = dataset
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    clip = AutoTokenizer.from_pretrained(os.path.join(out, "clip_tokenizer"))
    assert tok.convert_tokens_to_ids("<image>") == info["image_token_id"]
    assert clip.eos_token_id == len(clip) - 1 == info["clip_eos_token_id"]
    s = load_annotation_file(os.path.join(out, "train.json"), out)[0]
    enc = encode_conversation(tok, s.turns, get_template("plain_v1"), info["image_token_id"])
    sup = enc.input_ids[enc.labels != -100]
    assert tok.decode(sup).strip() == s.turns[0].a + "</s>"
    assert (enc.input_ids == tok.unk_token_id).sum() == 0


def test_deterministic_and_idempotent(dataset, tmp_path):
    out, _ = dataset
    marker = os.path.join(out, S.MARKER)
    mtime = os.path.getmtime(marker)
    S.ensure_dataset(out, **ARGS)  # complete: nothing is redone
    assert os.path.getmtime(marker) == mtime
    with pytest.raises(ValueError, match="another directory"):
        S.ensure_dataset(out, **{**ARGS, "seed": 4})
    small = dict(ARGS, num_train=8, num_eval=4)
    S.main(
        ["--out", str(tmp_path / "a")]
        + [
            f"--{k.replace('_', '-')}={','.join(v) if k == 'qtypes' else v}"
            for k, v in small.items()
        ]
    )
    S.ensure_dataset(tmp_path / "b", **small)
    for split in ("train", "eval", S.MULTITURN_SPLIT):
        ja = json.load(open(tmp_path / "a" / f"{split}.json"))
        jb = json.load(open(tmp_path / "b" / f"{split}.json"))
        assert ja == jb
    va = load_video(str(tmp_path / "a" / ja[0]["video"]), 8).frames
    vb = load_video(str(tmp_path / "b" / jb[0]["video"]), 8).frames
    np.testing.assert_array_equal(va, vb)
    other = S.generate(tmp_path / "c", **dict(small, seed=99))
    assert other["splits"] == {
        "train": 8 + other["conversations"]["train"],
        "eval": 4,
        S.MULTITURN_SPLIT: 4,
    }
    assert json.load(open(tmp_path / "c" / "train.json")) != json.load(
        open(tmp_path / "a" / "train.json")
    )


def test_question_types_are_chosen(tmp_path):
    info = S.ensure_dataset(tmp_path, **dict(ARGS, num_train=6, num_eval=3, qtypes=["colour"]))
    assert info["question_types"] == ["colour"]
    assert {a["qtype"] for a in json.load(open(tmp_path / "train.json"))} == {"colour"}
    assert S.DEFAULT_QTYPES == ("colour", "first_colour", "last_colour")
    with pytest.raises(ValueError, match="pick distinct ones"):
        S.ensure_dataset(tmp_path / "x", qtypes=["colour", "size"])
