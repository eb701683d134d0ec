"""Tokenizers (data/tokenizers.py): the LLM tokenizer's Llama pre-tokenization switch, errors."""

import pytest

from ppllava_jax.data.tokenizers import load_llm_tokenizer, train_llama_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    corpus = ["What is it? A red cat."] * 20 + ["USER: ASSISTANT: </s> <image>"] * 5
    train_llama_tokenizer(corpus, d, vocab_size=300)
    return str(d)


def test_legacy_prepends_a_piece_after_special_tokens(tok_dir):
    legacy = load_llm_tokenizer(tok_dir, legacy=True)
    modern = load_llm_tokenizer(tok_dir, legacy=False)
    text = "<image>\nWhat"
    a = legacy.convert_ids_to_tokens(legacy(text, add_special_tokens=False).input_ids)
    b = modern.convert_ids_to_tokens(modern(text, add_special_tokens=False).input_ids)
    assert a[:2] == ["<image>", "▁"] and b[:2] == ["<image>", "<0x0A>"]
    assert a[2:] == b[1:]  # otherwise the same pieces
    # at the start of a text both prepend "▁" (and the BOS)
    assert legacy("What").input_ids == modern("What").input_ids
    assert legacy.convert_ids_to_tokens(legacy("What").input_ids) == ["<s>", "▁What"]


def test_image_token_is_the_last_id_and_missing_dirs_are_named(tok_dir, tmp_path):
    tok = load_llm_tokenizer(tok_dir)
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 1
    with pytest.raises(FileNotFoundError, match="nope"):
        load_llm_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_llm_tokenizer(tmp_path / "empty")
