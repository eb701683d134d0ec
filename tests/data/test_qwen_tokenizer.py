"""The Qwen family's text side: a tiny Qwen2-style tokenizer trained on the spot (special tokens
laid out as Qwen2's vocabulary), the ``plain_qwen`` template with the original's label rule, and
the SigLIP prompt (unpadded in training, padded in evaluation)."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from ppllava_jax.data import templates as T
from ppllava_jax.data.qwen_tokenizer import SPECIAL_TOKENS, train_qwen_tokenizer
from ppllava_jax.data.tokenizers import load_llm_tokenizer
from ppllava_jax.layout import IGNORE_INDEX

CORPUS = [
    "What colour is the square? red green blue yellow",
    "Which colour appears first? The circle moves left, then right.",
    "Answer with the option's letter. (A) red (B) green (C) blue",
] * 20
TURNS = [T.Turn("What colour is the square?", "red"), T.Turn("And the circle?", "It is blue.")]


@pytest.fixture(scope="module")
def qtok(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tok")
    train_qwen_tokenizer(CORPUS, path, vocab_size=300)
    return path


def test_special_tokens_follow_the_ordinary_ids(qtok):
    for tok in (AutoTokenizer.from_pretrained(str(qtok)), load_llm_tokenizer(qtok)):
        ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        n = ids[0]
        assert ids == list(range(n, n + 5)) and len(tok) == n + 5
        assert tok.pad_token_id == n and tok.eos_token_id == n + 2 and tok.bos_token is None
        # special tokens written in text are single ids; no BOS is added
        enc = tok("<|im_start|>user\n<image>\nred<|im_end|>\n").input_ids
        assert enc[0] == n + 1 and n + 3 in enc and n + 2 in enc
        assert tok.decode(enc) == "<|im_start|>user\n<image>\nred<|im_end|>\n"


def test_plain_qwen_labels_as_the_original(qtok):
    """Everything up to and including ``<|im_start|>assistant\\n`` is masked; each answer, its
    ``<|im_end|>`` and the ``\\n`` after it are supervised; no system prompt, no BOS."""
    tok = load_llm_tokenizer(qtok)
    img, end = tok.convert_tokens_to_ids(["<image>", "<|im_end|>"])
    enc = T.encode_conversation(tok, TURNS, "plain_qwen", img)
    assert enc.text == (
        "<|im_start|>user\n<image>\nWhat colour is the square?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the circle?<|im_end|>\n"
        "<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    )
    np.testing.assert_array_equal(enc.input_ids, tok(enc.text).input_ids)
    sup = enc.labels != IGNORE_INDEX
    runs = np.split(np.flatnonzero(sup), np.flatnonzero(np.diff(np.flatnonzero(sup)) > 1) + 1)
    assert [tok.decode(enc.input_ids[r]) for r in runs] == [
        "red<|im_end|>\n",
        "It is blue.<|im_end|>\n",
    ]
    assert (enc.input_ids == end).sum() == 4 and (enc.input_ids == img).sum() == 1
    prompt = T.encode_conversation(tok, TURNS[:1], "plain_qwen", img, training=False)
    gen = T.encode_conversation(tok, [T.Turn(TURNS[0].q)], "plain_qwen", img, training=False)
    assert gen.text.endswith("<|im_start|>assistant\n") and prompt.text.startswith(gen.text)


def test_siglip_prompt_training_unpadded_evaluation_padded(qtok):
    tok = AutoTokenizer.from_pretrained(str(qtok))
    text = T.clip_text_of(TURNS, training=True)
    ids, mask = T.encode_siglip_prompt(tok, text, 196, training=True)
    assert len(ids) == len(tok(text).input_ids) < 196 and mask.all()
    ids, mask = T.encode_siglip_prompt(tok, "What colour is the square?", 196, training=False)
    n = len(tok("What colour is the square?").input_ids)
    assert ids.shape == mask.shape == (196,) and mask.all()  # SigLIP attends to its padding
    assert (ids[n:] == tok.pad_token_id).all()
    long, _ = T.encode_siglip_prompt(tok, " ".join(CORPUS), 196, training=True)
    assert len(long) == 196
