"""A tiny Qwen2-style tokenizer trained on a corpus (for tests and the Qwen-family demo).

Laid out as Qwen2's vocabulary (and as the Qwen reference fixtures): ordinary byte-level BPE
ids ``0 .. N-1`` (0 is an ordinary token), then ``<|endoftext|>`` (= pad, Qwen2's 151643),
``<|im_start|>``, ``<|im_end|>`` (= eos of the chat models), and LLaVA-OneVision's added
``<image>`` (151646) and ``<video>`` (151647). No BOS. Pre-tokenization is Qwen2's (NFC, its
split regex, byte-level without a prefix space). Saved with ``save_pretrained``; loads back
offline with ``AutoTokenizer.from_pretrained(dir)`` or ``tokenizers.load_llm_tokenizer(dir)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE, VIDEO = "<image>", "<video>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO)
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-7B-Instruct)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_qwen_tokenizer(corpus: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 600):
    """Train the tokenizer on ``corpus`` and save it to ``out_dir`` (see module docstring).

    vocab_size: ordinary ids (the 256 bytes plus merges); the five special tokens follow.
    Returns the loaded transformers fast tokenizer (``eos_token`` ``<|im_end|>``, ``pad_token``
    ``<|endoftext|>``, no ``bos_token``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    sentences = [s for s in corpus if s and s.strip()]
    if not sentences:
        raise ValueError("empty corpus: the Qwen tokenizer needs text to learn merges from")
    tk = Tokenizer(models.BPE(byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tk.train_from_iterator(sentences, trainer=trainer)
    tk.add_special_tokens(list(SPECIAL_TOKENS))  # ids N .. N+4, in this order
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IMAGE, VIDEO],
        clean_up_tokenization_spaces=False,
    )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def ensure_qwen_tokenizer(data_dir: str | os.PathLike, vocab_size: int = 400) -> str:
    """``DATA_DIR/qwen_tokenizer``: the tokenizer of the Qwen-family demo, trained on the
    synthetic dataset's text (``synthetic.tokenizer_corpus`` of ``train.json`` + ``eval.json``)
    when missing. Returns its directory."""
    import json

    from ppllava_jax.data import synthetic

    data_dir = os.fspath(data_dir)
    out = os.path.join(data_dir, "qwen_tokenizer")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    anns = []
    for split in ("train", "eval"):
        path = os.path.join(data_dir, f"{split}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: generate the synthetic dataset first")
        with open(path) as f:
            anns += json.load(f)
    tok = train_qwen_tokenizer(synthetic.tokenizer_corpus(anns), out + ".tmp", vocab_size)
    if len(tok) != vocab_size + len(SPECIAL_TOKENS):
        raise ValueError(
            f"the synthetic corpus gave {len(tok) - len(SPECIAL_TOKENS)} ordinary ids < "
            f"vocab_size={vocab_size}: lower synthetic.qwen_vocab_size"
        )
    os.replace(out + ".tmp", out)
    return out
