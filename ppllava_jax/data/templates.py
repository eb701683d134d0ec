"""Conversation templates, tokenization with label masking, and the CLIP prompt (SPEC §7).

``plain_v1`` (the PPLLaVA recipe)::

    <s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

``vicuna_v1`` is the same with the Vicuna system prompt and a space before the first
``USER:``; ``plain_qwen`` is the Qwen chat format (``<|im_start|>role\\n...<|im_end|>\\n``).
A system instruction (the annotation's ``"i"``) replaces the template's system prompt.

Only the answers and the end-of-turn token after each (``</s>``, or ``<|im_end|>`` for
Qwen) are supervised; every other label is -100. Labels are aligned with ``input_ids``
(not shifted); the loss shifts them. Each ``<image>`` becomes one ``image_token_id`` (one
per visual input: a video or an any-resolution image counts as one, a multi-image sample
has one per image). The text is split at the image placeholders, as LLaVA's
``tokenizer_image_token`` does, and each piece is tokenized with character offsets, so a
token is supervised exactly when its characters overlap an answer (or its end token).

The CLIP prompt is the whole conversation (questions and answers, in order, without role
markers) in training and the question alone (the last turn's) in evaluation, tokenized by a
CLIP tokenizer and padded/truncated to ``clip_max_length`` (248) with a mask.

The original's training samples (``Interleave_sft_dataset``) are encoded by
:mod:`ppllava_jax.data.original_text`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from ppllava_jax.data.errors import DataError
from ppllava_jax.layout import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class Template:
    """How a conversation is written out.

    Attributes:
      name: the template's name.
      system: default system prompt ("" for none).
      system_format: how a (non-empty) system prompt is written, ``{system}`` in it.
      user_format: a user turn up to where the answer starts, ``{q}`` in it.
      answer_format: the answer, ``{a}`` in it (characters outside ``{a}`` unsupervised).
      eos: end-of-turn token after each answer (supervised); None: the tokenizer's eos.
      after_eos: unsupervised text after the end-of-turn token.
      add_bos: start with the tokenizer's bos token.
      image_format: how each visual input is announced at the start of the first question.
    """

    name: str
    system: str
    system_format: str
    user_format: str
    answer_format: str
    eos: str | None
    after_eos: str
    add_bos: bool
    image_format: str = IMAGE_PLACEHOLDER + "\n"


_PLAIN_V1 = Template(
    name="plain_v1",
    system="",
    system_format="{system} ",
    user_format="USER: {q} ASSISTANT:",
    answer_format=" {a}",
    eos=None,
    after_eos="",
    add_bos=True,
)

TEMPLATES: dict[str, Template] = {
    "plain_v1": _PLAIN_V1,
    "vicuna_v1": dataclasses.replace(_PLAIN_V1, name="vicuna_v1", system=VICUNA_SYSTEM),
    # the original's conv_plain_qwen: no default system prompt (a system instruction is written
    # as the original's Conversation writes it: "{i}<|im_end|>\n" before the first turn); the
    # answer, its <|im_end|> and the "\n" after it are supervised (its label rule)
    "plain_qwen": Template(
        name="plain_qwen",
        system="",
        system_format="{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
        answer_format="{a}",
        eos="<|im_end|>\n",
        after_eos="",
        add_bos=False,
    ),
}


def get_template(name: str) -> Template:
    """The template called ``name``; raises ValueError listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = sorted(TEMPLATES)
        raise ValueError(f"unknown conversation template {name!r}; use one of {known}") from None


@dataclasses.dataclass(frozen=True)
class Turn:
    """One question and its answer (``a`` may be None for the open turn of a prompt)."""

    q: str
    a: str | None = None


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenized conversation.

    Attributes:
      input_ids: int32[L] with one ``image_token_id`` per visual input.
      labels: int32[L], -100 except on answers and their end-of-turn tokens.
      text: the rendered conversation, ``<image>`` where the image tokens stand.
      clip_text: the text given to the CLIP prompt encoder.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    text: str
    clip_text: str


def _with_images(q: str, num_images: int, template: Template) -> str:
    present = q.count(IMAGE_PLACEHOLDER)
    if present == 0:
        return template.image_format * num_images + q
    if present != num_images:
        raise DataError(
            f"the question has {present} {IMAGE_PLACEHOLDER} placeholders but the sample has "
            f"{num_images} visual inputs"
        )
    return q


def render(
    turns: Sequence[Turn],
    template: Template | str,
    num_images: int = 1,
    system: str | None = None,
    eos_token: str = "</s>",
    bos_token: str = "<s>",
    answer_prefix: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Write a conversation out as text.

    The last turn may have ``a=None``: the text then ends where the model starts answering
    (a generation prompt), followed by ``answer_prefix`` if given (e.g. MVBench's
    ``"Best option:("``).

    Returns:
      (text, supervised character spans [start, end) — each answer and its end token).
    """
    t = get_template(template) if isinstance(template, str) else template
    if not turns:
        raise DataError("empty conversation (no QA turns)")
    eos = t.eos if t.eos is not None else eos_token
    sys_text = system.strip() if system and system.strip() else t.system
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    if t.add_bos:
        emit(bos_token)
    if sys_text:
        emit(t.system_format.format(system=sys_text))
    for i, turn in enumerate(turns):
        q = turn.q.strip()
        q = _with_images(q, num_images, t) if i == 0 else q
        if i > 0 and IMAGE_PLACEHOLDER in q:
            raise DataError(f"{IMAGE_PLACEHOLDER} only allowed in the first question")
        emit(t.user_format.format(q=q))
        if turn.a is None:
            if i != len(turns) - 1:
                raise DataError("only the last turn may be unanswered")
            if answer_prefix:
                emit(t.answer_format.format(a=answer_prefix))
            break
        a = turn.a.strip()
        pre, post = t.answer_format.split("{a}")
        emit(pre)
        start = pos
        emit(a + post)
        emit(eos)
        spans.append((start, pos))
        emit(t.after_eos)
    return "".join(parts), spans


def _tokenize_piece(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not text:
        return [], []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def tokenize_with_labels(
    tokenizer,
    text: str,
    spans: Sequence[tuple[int, int]],
    image_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels of rendered text (see module docstring).

    ``tokenizer`` is a transformers fast tokenizer (offsets needed). Special tokens written
    in the text (``<s>``, ``</s>``) are recognized by the tokenizer itself.
    """
    ids: list[int] = []
    sup: list[bool] = []
    base = 0
    pieces = text.split(IMAGE_PLACEHOLDER)
    for k, piece in enumerate(pieces):
        if k > 0:
            ids.append(int(image_token_id))
            sup.append(False)
            base += len(IMAGE_PLACEHOLDER)
        pid, offs = _tokenize_piece(tokenizer, piece)
        for tid, (s, e) in zip(pid, offs):
            s, e = s + base, e + base
            ids.append(int(tid))
            sup.append(any(s < b and e > a for a, b in spans))
        base += len(piece)
    input_ids = np.asarray(ids, np.int32)
    labels = np.where(np.asarray(sup, bool), input_ids, IGNORE_INDEX).astype(np.int32)
    return input_ids, labels


def clip_text_of(turns: Sequence[Turn], training: bool) -> str:
    """Text for the CLIP prompt: the whole conversation (training) or the question being asked,
    the last turn's (the chat's rule: each turn pools the video for what is asked now)."""
    if training:
        texts = [x for t in turns for x in (t.q, t.a) if x]
    else:
        texts = [turns[-1].q]
    s = " ".join(x.replace(IMAGE_PLACEHOLDER, " ") for x in texts)
    return re.sub(r"\s+", " ", s).strip()


def encode_conversation(
    tokenizer,
    turns: Sequence[Turn],
    template: Template | str,
    image_token_id: int,
    num_images: int = 1,
    system: str | None = None,
    training: bool = True,
    answer_prefix: str | None = None,
) -> Encoded:
    """Render, tokenize and mask one conversation.

    Args:
      tokenizer: transformers fast tokenizer of the LLM (``eos_token`` and ``bos_token`` used).
      turns: the QA turns; the last may be open (``a=None``) for a generation prompt.
      template: a :class:`Template` or its name.
      image_token_id: id written for each visual input.
      num_images: visual inputs of the sample (0 for text only).
      system: system instruction replacing the template's default (annotation ``"i"``).
      training: selects the CLIP text (whole conversation vs question).

    Returns:
      :class:`Encoded`.
    """
    text, spans = render(
        turns,
        template,
        num_images=num_images,
        system=system,
        eos_token=tokenizer.eos_token or "</s>",
        bos_token=tokenizer.bos_token or "<s>",
        answer_prefix=answer_prefix,
    )
    ids, labels = tokenize_with_labels(tokenizer, text, spans, image_token_id)
    return Encoded(ids, labels, text, clip_text_of(turns, training))


def encode_clip_prompt(
    clip_tokenizer, text: str, max_length: int = 248
) -> tuple[np.ndarray, np.ndarray]:
    """CLIP token ids and mask, int32[max_length] each.

    ``<|startoftext|> ... <|endoftext|>``, truncated to ``max_length`` (keeping the end token,
    where the text tower pools) and padded with the tokenizer's pad token (end-of-text in
    CLIP); the mask is 1 on real tokens.
    """
    enc = clip_tokenizer(
        text,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        add_special_tokens=True,
    )
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    return ids, mask


def encode_siglip_prompt(
    tokenizer, text: str, max_length: int = 196, training: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """SigLIP prompt ids (the Qwen family) and an all-ones mask, int32 each.

    As the original's Qwen path: truncated to ``max_length`` (keeping the end token); in
    training unpadded (``int32[n]``, the text tower pools the end token), in evaluation padded
    with the tokenizer's pad token (``</s>`` in SigLIP) to ``int32[max_length]``, so the pooled
    last position is a pad. SigLIP takes no mask: the ones only tell ``collate`` which positions
    are the prompt's own (its batch padding is hidden from the tower).
    """
    enc = tokenizer(
        text,
        max_length=max_length,
        truncation=True,
        padding=False if training else "max_length",
        add_special_tokens=True,
    )
    ids = np.asarray(enc["input_ids"], np.int32)
    return ids, np.ones_like(ids)
