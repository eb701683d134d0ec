"""Tiny tokenizers trained on a corpus (hub tokenizers cannot be downloaded everywhere).

- :func:`train_llama_tokenizer`: a LLaMA-style SentencePiece model (BPE or unigram, byte
  fallback, identity normalization, ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3),
  wrapped as a transformers ``LlamaTokenizer`` (fast) with ``<image>`` appended as an added
  special token, saved with ``save_pretrained`` (plus the SentencePiece ``tokenizer.model``).
- :func:`train_clip_tokenizer`: a CLIP-style byte-level BPE with the ``</w>`` end-of-word
  suffix, lower-casing, CLIP's pre-tokenizer, vocabulary laid out as OpenAI's (256 bytes,
  256 bytes + ``</w>``, one token per merge, then ``<|startoftext|>`` and
  ``<|endoftext|>``, so end-of-text is the largest id, where the text tower pools), wrapped
  as a transformers ``CLIPTokenizer`` (fast).

Both load back offline with ``AutoTokenizer.from_pretrained(dir)``.

- :func:`load_llm_tokenizer`: the LLM tokenizer of a directory, built from its own
  ``tokenizer.json`` (so the transformers version cannot change its pipeline), ``<image>``
  added as the released LLaVA tokenizers have it, and the Llama pre-tokenization chosen:
  ``legacy=True`` (Vicuna / LLaVA-NeXT: ``▁`` prepended to every piece, also right after a
  special token written in the text), ``legacy=False`` (``▁`` only at the very start),
  ``None`` (as the file says).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

IMAGE_TOKEN = "<image>"
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def _llama_pipeline(legacy: bool):
    from tokenizers import normalizers, pre_tokenizers

    if legacy:
        return (
            normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
            None,
        )
    return None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)


def _is_metaspace_bpe(backend) -> bool:
    """True for a SentencePiece-style (``▁``) tokenizer whose pre-tokenization can switch."""
    d = json.loads(backend.to_str())
    text = json.dumps([d.get("normalizer"), d.get("pre_tokenizer")])
    return "Metaspace" in text or "Prepend" in text


def load_llm_tokenizer(
    path: str | os.PathLike,
    legacy: bool | None = None,
    image_token: str | None = IMAGE_TOKEN,
):
    """The LLM tokenizer saved in ``path`` (see module docstring).

    Args:
      path: a directory with ``tokenizer.json`` (and ``tokenizer_config.json``,
        ``special_tokens_map.json``), or any directory ``AutoTokenizer`` reads.
      legacy: Llama pre-tokenization (True: legacy, False: non-legacy, None: the file's).
      image_token: added as a special, non-normalized token if absent (id = vocabulary
        size, 32000 for Vicuna), as the LLaVA conversion scripts add it.

    Returns:
      a transformers fast tokenizer. Raises FileNotFoundError naming ``path`` if it holds
      no tokenizer.
    """
    from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

    path = os.fspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if os.path.isfile(tj):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(tj)
        kwargs: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f, encoding="utf-8") as fh:
                    cfg = json.load(fh)
                for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                    v = cfg.get(key)
                    if isinstance(v, dict):
                        v = v.get("content")
                    if isinstance(v, str):
                        kwargs.setdefault(key, v)
                if "model_max_length" in cfg:
                    kwargs.setdefault("model_max_length", cfg["model_max_length"])
        if legacy is not None and _is_metaspace_bpe(backend):
            backend.normalizer, backend.pre_tokenizer = _llama_pipeline(legacy)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no tokenizer in {path!r}: {e}") from None
        if legacy is not None and _is_metaspace_bpe(tok.backend_tokenizer):
            bt = tok.backend_tokenizer
            bt.normalizer, bt.pre_tokenizer = _llama_pipeline(legacy)
    if image_token and image_token not in tok.get_vocab():
        tok.add_tokens(AddedToken(image_token, special=True, normalized=False), special_tokens=True)
    return tok


def train_llama_tokenizer(
    corpus: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    model_type: str = "bpe",
    image_token: str | None = IMAGE_TOKEN,
):
    """Train a SentencePiece LLaMA-style tokenizer on ``corpus`` and save it to ``out_dir``.

    ``vocab_size`` is an upper bound (byte fallback needs 256 + 4 + the characters seen).
    Returns the loaded transformers tokenizer; ``<image>`` (if given) has id = SentencePiece
    vocabulary size, i.e. the last id.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    sentences = [s for s in corpus if s and s.strip()]
    if not sentences:
        raise ValueError("empty corpus")
    chars = {c for s in sentences for c in s}
    vocab_size = max(vocab_size, 256 + 4 + len(chars) + 8)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        seed_sentencepiece_size=100000,
    )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(
        out_dir,
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
    )
    if image_token:
        tok.add_tokens([image_token], special_tokens=True)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable character table, in CLIP's vocabulary order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def train_clip_tokenizer(
    corpus: Iterable[str],
    out_dir: str | os.PathLike,
    num_merges: int = 256,
):
    """Train a CLIP-style BPE on ``corpus`` and save it to ``out_dir`` (see module docstring).

    Returns the loaded transformers tokenizer; its vocabulary has 512 + (merges learned) + 2
    ids, ``<|endoftext|>`` (also the pad token) the largest.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import AutoTokenizer, CLIPTokenizer

    sentences = [s for s in corpus if s and s.strip()]
    if not sentences:
        raise ValueError("empty corpus")
    # Borrow CLIP's normalizer and pre-tokenizer from an empty transformers CLIP tokenizer.
    proto = CLIPTokenizer().backend_tokenizer
    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tk.normalizer = proto.normalizer
    tk.pre_tokenizer = proto.pre_tokenizer
    alphabet = _bytes_to_unicode()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) * 2 + num_merges,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    tk.train_from_iterator(sentences, trainer=trainer)
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab_list)
    kept = []
    for a, b in merges:
        if a in seen and b in seen and a + b not in seen:
            kept.append((a, b))
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=kept)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
