"""Conversation templates, label masking with a real Llama tokenizer, the CLIP prompt."""

import io
import random

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer

from ppllava_jax.data import templates as T
from ppllava_jax.data.errors import DataError
from ppllava_jax.data.tokenizers import train_clip_tokenizer, train_llama_tokenizer
from ppllava_jax.layout import IGNORE_INDEX

WORDS = (
    "which way does the red blue green circle square move left right up down what colour "
    "is it a video shows person cat dog runs jumps why how many there are two three answer "
    "question option best only give"
).split()


def corpus(n=300, seed=0):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        s = " ".join(r.choice(WORDS) for _ in range(r.randint(3, 12)))
        out.append(s.capitalize() + r.choice(["?", ".", "!"]))
    out += ["USER: ASSISTANT: (A) (B) (C) (D) Question: Options:"] * 5
    return out


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """A real transformers LlamaTokenizer from a SentencePiece model trained here."""
    d = tmp_path_factory.mktemp("spm")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(d))
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def supervised_runs(enc):
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


TURNS = [
    T.Turn("Which way does the red circle move?", "(B) left"),
    T.Turn("What colour is it?", "It is red."),
    T.Turn("How many dogs are there?", "3 dogs, 2 cats"),
]


def test_plain_v1_text_is_the_spec_format():
    text, spans = T.render(TURNS[:2], "plain_v1")
    assert text == (
        "<s>USER: <image>\nWhich way does the red circle move? ASSISTANT: (B) left</s>"
        "USER: What colour is it? ASSISTANT: It is red.</s>"
    )
    assert [text[a:b] for a, b in spans] == ["(B) left</s>", "It is red.</s>"]
    text, _ = T.render(TURNS[:1], "vicuna_v1")
    assert text.startswith("<s>" + T.VICUNA_SYSTEM + " USER: <image>\n")
    text, _ = T.render(TURNS[:1], "plain_v1", system="Be brief.")
    assert text.startswith("<s>Be brief. USER: <image>\nWhich")
    text, _ = T.render([T.Turn("Q?")], "plain_v1", answer_prefix="Best option:(")
    assert text == "<s>USER: <image>\nQ? ASSISTANT: Best option:("
    text, _ = T.render([T.Turn("Q?")], "plain_v1")
    assert text.endswith("Q? ASSISTANT:")


@pytest.mark.parametrize("template", ["plain_v1", "vicuna_v1"])
@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_label_masking_multi_turn(llama_tok, template, num_images):
    img = llama_tok.convert_tokens_to_ids("<image>")
    enc = T.encode_conversation(llama_tok, TURNS, template, img, num_images=num_images)
    assert enc.input_ids.dtype == np.int32 and enc.labels.shape == enc.input_ids.shape
    assert enc.input_ids[0] == llama_tok.bos_token_id
    assert int((enc.input_ids == img).sum()) == num_images
    assert (enc.labels[enc.input_ids == img] == IGNORE_INDEX).all()
    runs = supervised_runs(enc)
    decoded = [llama_tok.decode(r).strip() for r in runs]
    assert decoded == [t.a + llama_tok.eos_token for t in TURNS]
    assert all(r[-1] == llama_tok.eos_token_id for r in runs)
    # everything else is masked: the number of supervised tokens equals the runs' lengths
    assert int((enc.labels != IGNORE_INDEX).sum()) == sum(map(len, runs))
    # the whole text (image placeholders expanded) decodes back
    assert llama_tok.decode(enc.input_ids).replace(" ", "") == enc.text.replace(" ", "")
    # images stand right after "USER: " in the first turn
    if num_images:
        first = int(np.flatnonzero(enc.input_ids == img)[0])
        assert llama_tok.decode(enc.input_ids[:first]).rstrip().endswith("USER:")


def test_explicit_image_placeholders_and_errors(llama_tok):
    img = llama_tok.convert_tokens_to_ids("<image>")
    turns = [T.Turn("First <image> then <image>, same?", "no")]
    enc = T.encode_conversation(llama_tok, turns, "plain_v1", img, num_images=2)
    assert int((enc.input_ids == img).sum()) == 2
    with pytest.raises(DataError, match="placeholders"):
        T.encode_conversation(llama_tok, turns, "plain_v1", img, num_images=1)
    with pytest.raises(DataError, match="empty"):
        T.render([], "plain_v1")
    with pytest.raises(ValueError, match="unknown conversation template"):
        T.get_template("nope")


def test_plain_qwen(llama_tok):
    tok = llama_tok
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    img = tok.convert_tokens_to_ids("<image>")
    enc = T.encode_conversation(tok, TURNS[:2], "plain_qwen", img)
    assert enc.text.startswith("<|im_start|>user\n<image>\n")  # no system prompt (original)
    assert "<|im_start|>assistant\n(B) left<|im_end|>\n<|im_start|>user\n" in enc.text
    sys = T.encode_conversation(tok, TURNS[:1], "plain_qwen", img, system="Be brief.")
    assert sys.text.startswith("Be brief.<|im_end|>\n<|im_start|>user\n")
    assert enc.input_ids[0] != tok.bos_token_id
    end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = supervised_runs(enc)
    assert [tok.decode(r).strip() for r in runs] == [t.a + "<|im_end|>" for t in TURNS[:2]]
    assert all(r[-2] == end and tok.decode(r[-1:]).strip() == "" for r in runs)  # then "\n"


def test_clip_prompt_and_trained_tokenizers(tmp_path):
    text = corpus(200, seed=1)
    tok = train_llama_tokenizer(text, tmp_path / "llama", vocab_size=400)
    clip = train_clip_tokenizer(text, tmp_path / "clip", num_merges=100)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    clip2 = AutoTokenizer.from_pretrained(str(tmp_path / "clip"))
    for t in (tok, tok2):
        assert (t.unk_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
        assert t.pad_token == "<pad>" and t.convert_tokens_to_ids("<image>") == len(t) - 1
    s = "Which way does the red circle move?"
    assert tok2(s).input_ids == tok(s).input_ids and tok2(s).input_ids[0] == 1
    assert clip2.eos_token_id == len(clip2) - 1 == clip.eos_token_id
    assert clip2.bos_token_id == len(clip2) - 2 and clip2.pad_token_id == clip2.eos_token_id
    assert clip2.decode(clip2(s.upper()).input_ids, skip_special_tokens=True).replace(
        " ", ""
    ) == s.lower().replace(" ", "")
    ids, mask = T.encode_clip_prompt(clip2, s, 248)
    assert ids.shape == mask.shape == (248,) and ids.dtype == np.int32
    n = int(mask.sum())
    assert ids[0] == clip2.bos_token_id and ids[n - 1] == clip2.eos_token_id
    assert (mask[:n] == 1).all() and (mask[n:] == 0).all() and (ids[n:] == clip2.pad_token_id).all()
    assert int(np.argmax(ids)) == n - 1  # the text tower pools at the first largest id
    long_ids, long_mask = T.encode_clip_prompt(clip2, " ".join([s] * 80), 248)
    assert long_mask.all() and long_ids[-1] == clip2.eos_token_id
    # training: whole conversation; evaluation: the question alone
    assert T.clip_text_of(TURNS[:2], training=True) == (
        "Which way does the red circle move? (B) left What colour is it? It is red."
    )
    assert T.clip_text_of([T.Turn("<image>\nWhich way?", "x")], training=False) == "Which way?"
