"""Preference pairs for DPO (``data.dpo = True``).

Preference samples are in the annotation format, their *last* QA turn carrying a chosen and a
rejected answer (earlier turns are ordinary context)::

    {"video": "v.mp4", "QA": [{"q": "What happens?", "a": "A dog runs.",       # chosen
                               "rejected": "A cat sleeps."}]}
    {"video": "v.mp4", "QA": [{"q": "What happens?", "chosen": "A dog runs.",  # same
                               "rejected": "A cat sleeps."}]}

A sample without a non-blank ``rejected`` answer on its last turn, or with identical chosen and
rejected answers, is a ``bad_annotation`` (skipped and counted at load time). How a pair is
batched: :mod:`ppllava_jax.data.pipeline`.

Encoding (``data.text_encoding='original'`` with the ``vicuna_v1`` template, the DPO recipe):
each twin as the original's ``train_dpo.py`` builds it (:func:`encode_preference_text`), LLaVA's
``preprocess_v1`` with the Vicuna conversation (``conv_templates['v1']``)::

    <s>{Vicuna system prompt} USER: <image>\n{prompt} ASSISTANT: {answer}</s>

the prompt with ``<video>`` removed and stripped, the answer verbatim, the whole text tokenized
at once, the labels by ``preprocess_v1``'s length rule (the answer from its first token and the
``</s>`` supervised), the CLIP prompt the stripped prompt alone. Other settings use the
offset-based encoder (``templates.encode_conversation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import templates as tpl
from ppllava_jax.data.errors import AnnotationError, DataError
from ppllava_jax.layout import IGNORE_INDEX

# the original's conversation (train_dpo.py sets conv_templates["vicuna_v1"], its yaml asks for
# version "v1": LLaVA's conv_vicuna_v1, separator style TWO)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"


def parse_dpo_sample(
    raw: Any, source: str, index: int, data_root: str = "", media_type: str | None = None
) -> ann.Sample:
    """A preference sample (module docstring): ``annotations.parse_sample`` with the last
    turn's chosen answer as its ``a`` and the rejected answer in ``extra["rejected"]``."""
    rejected = None
    qa = raw.get("QA") if isinstance(raw, Mapping) else None
    if isinstance(qa, list) and qa and isinstance(qa[-1], Mapping):
        last = dict(qa[-1])
        if "chosen" in last:
            if "a" in last and last["a"] != last["chosen"]:
                raise AnnotationError(source, index, "the last turn has both 'a' and 'chosen'")
            last["a"] = last.pop("chosen")
        rejected = last.pop("rejected", None)
        raw = dict(raw, QA=[*qa[:-1], last])
    sample = ann.parse_sample(raw, source, index, data_root, media_type)
    if not isinstance(rejected, str) or not rejected.strip():
        raise AnnotationError(
            source, index, "DPO sample: the last turn has no 'rejected' answer (a non-blank string)"
        )
    if rejected.strip() == sample.turns[-1].a.strip():
        raise AnnotationError(source, index, "DPO sample: chosen and rejected answers are equal")
    return dataclasses.replace(sample, extra={**sample.extra, "rejected": rejected})


def load_dpo_annotation_file(
    path: str,
    data_root: str = "",
    media_type: str | None = None,
    on_error: str = "skip",
    skipped: ann.SkipCounter | None = None,
) -> list[ann.Sample]:
    """``annotations.load_annotation_file`` for preference samples (:func:`parse_dpo_sample`)."""
    return ann.load_annotation_file(
        path, data_root, media_type, on_error, skipped, parse=parse_dpo_sample
    )


def _is_legacy(tokenizer, legacy: bool | None) -> bool:
    """The Llama pre-tokenization in use (``data.tokenizer_legacy``; None: the tokenizer's)."""
    if legacy is not None:
        return bool(legacy)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "Prepend" in repr(backend.normalizer)


def preference_text(turns, num_images: int = 1, system: str | None = None) -> tuple[str, str]:
    """(LLM text without BOS, CLIP text) of one twin: the original's ``DPODataset`` prompt
    (``<video>`` removed, stripped, ``<image>\n`` in front) in LLaVA's ``vicuna_v1``
    conversation; a ``<image>`` already in the first question stays where it is."""
    sys_text = system.strip() if system and system.strip() else tpl.VICUNA_SYSTEM
    out = sys_text + SEP
    clip = ""
    for i, turn in enumerate(turns):
        q = turn.q.replace("<video>", "").strip()
        if i == 0 and num_images and tpl.IMAGE_PLACEHOLDER not in q:
            q = (tpl.IMAGE_PLACEHOLDER + "\n") * num_images + q
        clip = q.replace(tpl.IMAGE_PLACEHOLDER + "\n", "").replace(tpl.IMAGE_PLACEHOLDER, "")
        out += f"{ROLES[0]}: {q}{SEP}{ROLES[1]}: {turn.a}{SEP2}"
    return out, clip.strip()


def encode_preference_text(
    tokenizer,
    turns,
    image_token_id: int,
    num_images: int = 1,
    system: str | None = None,
    legacy: bool | None = None,
) -> tpl.Encoded:
    """One twin of a pair (its ``turns``, the last one answered by the chosen or the rejected
    answer) as the original's ``train_dpo.py`` encodes it (module docstring): ids of the whole
    text (BOS added by the tokenizer, ``<image>`` its own token), labels by ``preprocess_v1``:
    BOS and each round's instruction up to ``ASSISTANT:`` unsupervised, the rest of the round
    (the answer and its ``</s>``) supervised; on a non-legacy tokenizer the later rounds' counts
    one shorter. A length mismatch (where the original ignores every label) is a DataError."""
    text, clip = preference_text(turns, num_images, system)
    ids = np.asarray(tokenizer(text).input_ids, np.int32)
    found = int((ids == image_token_id).sum())
    if found != num_images:
        raise DataError(
            f"the DPO prompt encodes to {found} image tokens (id {image_token_id}), expected "
            f"{num_images}: the tokenizer must hold <image> as that id"
        )
    n = lambda piece: len(tokenizer(piece).input_ids)  # noqa: E731
    non_legacy = not _is_legacy(tokenizer, legacy)
    labels = ids.copy()
    sep = f"{SEP}{ROLES[1]}: "
    cur = 1
    labels[:cur] = IGNORE_INDEX
    for i, rnd in enumerate(text.split(SEP2)):
        parts = rnd.split(sep)
        if rnd == "" or len(parts) != 2:
            break
        round_len, instruction_len = n(rnd), n(parts[0] + sep) - 2
        if i and non_legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur : cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    if cur != len(ids):
        raise DataError(f"DPO sample: tokenization mismatch ({cur} vs {len(ids)} tokens)")
    bos = tokenizer.bos_token or ""
    return tpl.Encoded(ids, labels.astype(np.int32), bos + text, clip)
