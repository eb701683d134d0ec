"""The original's training samples (data/original_text.py): text, pieces and label rule."""

import dataclasses

import numpy as np
import pytest

from ppllava_jax.data import original_text as O
from ppllava_jax.data.errors import DataError
from ppllava_jax.data.templates import VICUNA_SYSTEM, Turn, get_template
from ppllava_jax.data.tokenizers import load_llm_tokenizer, train_llama_tokenizer
from ppllava_jax.layout import IGNORE_INDEX

TURNS = [Turn("What is it?", "A red cat."), Turn("Where is it?", "On the left.")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = [t.q + " " + t.a for t in TURNS] * 20 + ["USER: ASSISTANT: </s> <image>"] * 5
    train_llama_tokenizer(corpus, d, vocab_size=300)
    return load_llm_tokenizer(d, legacy=False)


def test_process_qa_writes_the_original_conversation():
    assert O.process_qa(TURNS, "plain_v1") == (
        "USER: <image>\nWhat is it? ASSISTANT: A red cat.</s>"
        "USER: Where is it? ASSISTANT: On the left.</s>"
    )
    assert O.process_qa(TURNS[:1], "vicuna_v1").startswith(VICUNA_SYSTEM + " USER: <image>\n")
    assert O.process_qa(TURNS[:1], "plain_v1", system="Be brief.").startswith("Be brief. USER:")
    mine = dataclasses.replace(get_template("plain_v1"), name="mine")
    with pytest.raises(ValueError, match="text_encoding='offsets'"):
        O.process_qa(TURNS, mine)
    with pytest.raises(DataError, match="empty"):
        O.process_qa([], "plain_v1")


def test_process_qa_writes_the_original_qwen_conversation():
    """conv_plain_qwen: roles '<|im_start|>user\\n' / '<|im_start|>assistant\\n', both separators
    '<|im_end|>\\n' (also after a system text, which gets no '<|im_start|>system\\n'), text kept
    verbatim (not stripped)."""
    turns = [Turn(" What is it? ", "\nA red cat. "), Turn("Where?", "Left.")]
    assert O.process_qa(turns, "plain_qwen", system="Be brief.") == (
        "Be brief.<|im_end|>\n<|im_start|>user\n<image>\n What is it? <|im_end|>\n"
        "<|im_start|>assistant\n\nA red cat. <|im_end|>\n"
        "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\nLeft.<|im_end|>\n"
    )


def test_first_question_image_placeholders():
    assert O.original_first_question("Q?") == "<image>\nQ?"
    assert O.original_first_question("Q?", num_images=2) == "<image><image>\nQ?"
    assert O.original_first_question("a <image> b") == "a <image>\n b"
    assert O.original_first_question("<image>\nQ?") == "<image>\nQ?"
    assert O.original_first_question("Q?", num_images=0) == "Q?"


def test_training_sample_supervises_answers_and_their_end_token(tok):
    img = tok.convert_tokens_to_ids("<image>")
    enc = O.encode_training_sample(tok, TURNS, "plain_v1", img)
    assert enc.text == tok.bos_token + enc.clip_text and enc.clip_text == O.process_qa(TURNS)
    assert enc.input_ids.dtype == np.int32 and enc.labels.shape == enc.input_ids.shape
    assert int((enc.input_ids == img).sum()) == 1 and enc.input_ids[0] == tok.bos_token_id
    sup = enc.labels != IGNORE_INDEX
    np.testing.assert_array_equal(enc.labels[sup], enc.input_ids[sup])
    runs = np.split(np.flatnonzero(sup), np.flatnonzero(np.diff(np.flatnonzero(sup)) > 1) + 1)
    assert len(runs) == 2  # one run per answer
    for run, turn in zip(runs, TURNS):
        text = tok.decode(enc.input_ids[run])
        assert text.replace(" ", "") == (turn.a + tok.eos_token).replace(" ", "")
    # the pieces are tokenized alone: the ids are those of each 'ASSISTANT: '-split piece
    pieces = enc.text.split("ASSISTANT: ")
    pieces = [p + "ASSISTANT: " for p in pieces[:-1]] + pieces[-1:]
    want = [i for p in pieces for i in tok(p, add_special_tokens=False).input_ids]
    assert enc.input_ids.tolist() == want


def test_training_sample_errors(tok):
    img = tok.convert_tokens_to_ids("<image>")
    with pytest.raises(DataError, match="answer in every QA turn"):
        O.encode_training_sample(tok, [Turn("Q?", None)], "plain_v1", img)
    with pytest.raises(DataError, match="2 visual inputs but its text gives 1"):
        O.encode_training_sample(tok, [Turn("<image> Q?", "A.")], "plain_v1", img, num_images=2)
