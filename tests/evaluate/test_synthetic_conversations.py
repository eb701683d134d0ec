"""The demo dataset's conversations as the chat has them: a training conversation's later turn
and the multi-turn scorer's prompt are the chat's own prompt (``Chat.prompt_batch``) for the
same conversation, and the multi-turn split is scored on a tiny model."""

import json
import os

import ml_collections
import numpy as np
import pytest

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data import synthetic
from ppllava_jax.data import templates as tpl
from ppllava_jax.data.config import resolve_config
from ppllava_jax.data.preprocess import Preprocess
from ppllava_jax.layout import IGNORE_INDEX
from tests.evaluate.tiny import FRAMES, make_tiny_checkpoint

MESH = "data=1,fsdp=1,tensor=1"
MAX_NEW = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, data dir, its Setup on one device)."""
    from ppllava_jax.evaluate import model_setup

    root = tmp_path_factory.mktemp("conv")
    data = str(root / "data")
    ckpt = make_tiny_checkpoint(str(root / "ckpt"), data, multiturn_fraction=0.5)
    # as the demo exports it (train/run.export_final): the tokenizer file's own pre-tokenization
    # in training, so in the scorer's prompts too, as in the chat's (the tokenizer as saved)
    with open(os.path.join(ckpt, "inference.json"), "w") as f:
        json.dump({"template": "plain_v1", "num_frames": FRAMES, "tokenizer_legacy": None}, f)
    return ckpt, data, model_setup.load_setup(ckpt, mesh=MESH)


def _chat(setup, video: str, history: list[tpl.Turn], question: str):
    """The chat's model input asking ``question`` after ``history`` (its own builder)."""
    from ppllava_jax.chat import Chat

    chat = Chat(setup, video, num_frames=FRAMES, max_new_tokens=MAX_NEW)
    chat.history = list(history)
    batch = chat.prompt_batch(question)
    assert chat.history == history  # it fits: nothing dropped
    return chat, batch


def _real(batch: dict, row: int = 0) -> dict[str, np.ndarray]:
    """Row ``row``'s tokens and CLIP prompt without their padding."""
    keep = batch["attention_mask"][row] == 1
    cmask = batch["video_clip_mask"][row] == 1
    return {
        "input_ids": batch["input_ids"][row][keep],
        "visual_index": batch["visual_index"][row][keep],
        "clip_ids": batch["video_clip_ids"][row][cmask],
    }


def test_training_conversation_is_what_the_chat_renders(tiny):
    """The later turn of a training conversation: the text before its answer is the chat's
    prompt after the earlier turns; every answer is supervised; the CLIP prompt is the one the
    chat pools the video with for that (last) question."""
    _, data, setup = tiny
    path = os.path.join(data, "train.json")
    samples = ann.load_annotation_file(path, data, on_error="raise")
    convs = [s for s in samples if s.extra["form"] == "multiturn"]
    assert convs and all(2 <= len(s.turns) <= synthetic.MAX_TURNS for s in convs)
    cfg = resolve_config(
        dict(
            sources=[dict(path=path, data_root=data)],
            tokenizer=setup.tokenizer_dir,
            clip_tokenizer=setup.clip_tokenizer_dir,
            template=setup.template,
            num_frames=FRAMES,
            clip_max_length=int(setup.cfg.clip_text.max_position_embeddings),
            clip_prompt="question",  # the demo's training settings (configs/common.py)
            text_encoding="offsets",
            max_length=256,
            buckets=[256],
        )
    )
    pre = Preprocess(cfg, setup.cfg, [samples])
    for s in convs[:2]:
        turns = list(s.turns)
        enc = pre.encode_text(s, turns)
        chat, batch = _chat(setup, s.media[0], turns[:-1], turns[-1].q)
        assert chat.last_prompt.count("ASSISTANT:") == len(turns)
        assert enc.text == f"{chat.last_prompt} {turns[-1].a}{pre.tokenizer.eos_token}"
        sup = enc.input_ids[enc.labels != IGNORE_INDEX]
        eos = pre.tokenizer.eos_token
        assert pre.tokenizer.decode(sup).replace(" ", "") == "".join(
            t.a + eos for t in turns
        ).replace(" ", "")
        rec = pre.decode(s, 0, 0)
        np.testing.assert_array_equal(
            rec["clip_ids"][rec["clip_mask"] == 1], _real(batch)["clip_ids"]
        )


def test_multiturn_scorer_asks_as_the_chat_does(tiny):
    """The scorer's question for a later turn is the chat's model input for the same
    conversation (the reference answers as the earlier replies): tokens, visual positions and
    CLIP prompt."""
    from ppllava_jax.evaluate import runner
    from ppllava_jax.evaluate.synthetic import Synthetic

    _, data, setup = tiny
    bench = Synthetic(data, FRAMES, split=synthetic.MULTITURN_SPLIT)
    questions = bench.questions()
    convs = json.load(open(os.path.join(data, f"{synthetic.MULTITURN_SPLIT}.json")))
    assert len(convs) == 8  # one per held-out clip
    assert len(questions) == sum(len(c["QA"]) - 1 for c in convs)  # the later turns
    q = max(questions, key=lambda q: len(q.history))
    assert len(q.history) >= 1 and q.info["turn"] == len(q.history) + 1
    src = "synthetic:test"
    cfg = runner.pipeline_config(
        setup, src, "synthetic", num_frames=FRAMES, answer_prefix="", batch_size=1,
        max_new_tokens=MAX_NEW,
    )  # fmt: skip
    pipe = pl.Pipeline(cfg, setup.cfg, samples=[[runner.pipeline_sample(q, src, 0)]])
    try:
        scored, _ = pl.split_meta(next(iter(pipe.iterator())))
    finally:
        pipe.close()
    history = [tpl.Turn(hq, ha) for hq, ha in q.history]
    chat, batch = _chat(setup, q.video, history, q.prompt)
    want, got = _real(batch), _real(scored)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the chat's rendering: the earlier turns, answered, then the open question
    a1 = q.history[0][1]
    assert chat.last_prompt.startswith(f"<s>USER: <image>\n{q.history[0][0]} ASSISTANT: {a1}</s>")
    assert chat.last_prompt.endswith(f"</s>USER: {q.prompt} ASSISTANT:")


def test_multiturn_split_scored_on_a_tiny_model(tiny, tmp_path):
    """``score_synthetic`` of the multi-turn split (what the demo runs at its end): one record
    per later turn, with its turn and whether it repeats an earlier answer; its results file."""
    from ppllava_jax.train import run

    ckpt, data, _ = tiny
    cfg = ml_collections.ConfigDict(
        dict(
            synthetic=dict(dir=data),
            data=dict(num_frames=FRAMES),
            eval=dict(batch_size=8, max_new_tokens=MAX_NEW),
        )
    )
    scores = run.score_synthetic(ckpt, cfg, synthetic.MULTITURN_SPLIT, str(tmp_path))
    convs = json.load(open(os.path.join(data, f"{synthetic.MULTITURN_SPLIT}.json")))
    n = sum(len(c["QA"]) - 1 for c in convs)
    assert scores["num_questions"] == scores["answered"] == n and 0 <= scores["accuracy"] <= 1
    res = json.load(open(tmp_path / f"results_{synthetic.MULTITURN_SPLIT}.json"))
    assert len(res["records"]) == n
    assert {r["turn"] for r in res["records"]} <= {2, 3}
    assert all(isinstance(r["repeat"], bool) for r in res["records"])
