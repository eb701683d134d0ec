"""The original's training samples: ``Interleave_sft_dataset.__getitem__`` of the authors' code.

What the pipeline uses to train the Vicuna templates (``data.text_encoding='original'``).
:func:`process_qa` writes the conversation as the original's ``plain_v1`` ``Conversation``
does (``{i} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``, nothing
stripped); the LLM text ``<s>`` + that is split on ``'ASSISTANT: '`` (re-appended to every
piece but the last), each piece is tokenized alone without special tokens and the ids are
concatenated; labels mask the first piece and, in every middle piece, what follows the answer
(``piece.split('USER: ')[0].rstrip(' ')``). With the legacy Llama tokenizer every piece starts
with a prepended ``▁``, so an unsupervised standalone ``▁`` follows every ``ASSISTANT: `` (as in
the released model's training). The CLIP prompt is the :func:`process_qa` text itself (role
strings, ``<image>\\n``, ``</s>`` and the system instruction included).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ppllava_jax.data.errors import DataError
from ppllava_jax.data.templates import IMAGE_PLACEHOLDER, Encoded, Template, Turn, get_template
from ppllava_jax.layout import IGNORE_INDEX

ORIGINAL_USER = "USER: "  # conv_plain_v1.roles[0]
ORIGINAL_ASSISTANT = "ASSISTANT: "  # conv_plain_v1.roles[1]: the split point of the text
# templates whose training text the original's Vicuna ``Conversation`` writes (roles
# "USER: " / "ASSISTANT: ", separators " " / "</s>"); vicuna_v1 only adds a default system
ORIGINAL_TEMPLATES = ("plain_v1", "vicuna_v1")


def original_first_question(q: str, num_images: int = 1) -> str:
    """The first question as ``Conversation.user_query(q, is_mm=True)`` writes it.

    Unless ``q`` already holds ``<image>\\n``: every ``<image>`` in it becomes ``<image>\\n``,
    or, with none, ``'<image>' * num_images + '\\n'`` is prepended (the original's
    ``num_mm_token`` form; its training always passes 1). ``num_images=0`` leaves ``q`` as is.
    """
    mm = IMAGE_PLACEHOLDER + "\n"
    if num_images <= 0 or mm in q:
        return q
    if IMAGE_PLACEHOLDER in q:
        return q.replace(IMAGE_PLACEHOLDER, mm)
    return IMAGE_PLACEHOLDER * num_images + "\n" + q


def process_qa(
    turns: Sequence[Turn],
    template: Template | str = "plain_v1",
    system: str | None = None,
    num_images: int = 1,
    eos_token: str = "</s>",
) -> str:
    """The conversation text of the original's ``InterleaveBaseDataset.process_qa``.

    ``{system} USER: {q1'} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...`` where
    ``system`` is the first turn's ``i`` verbatim when non-empty (else the template's default:
    none for ``plain_v1``, the Vicuna system prompt for ``vicuna_v1``) and ``q1'`` is
    :func:`original_first_question`. Questions and answers are written as given (not stripped).
    No BOS (the LLM text is ``bos_token + process_qa(...)``; the CLIP prompt is this text).
    """
    t = get_template(template) if isinstance(template, str) else template
    if t.name not in ORIGINAL_TEMPLATES:
        raise ValueError(
            f"the original's training text is defined for {ORIGINAL_TEMPLATES}, not "
            f"{t.name!r}; use data.text_encoding='offsets' for this template"
        )
    if not turns:
        raise DataError("empty conversation (no QA turns)")
    sys_text = system if system else t.system
    parts = [sys_text + " "] if sys_text else []
    for i, turn in enumerate(turns):
        q = original_first_question(turn.q, num_images) if i == 0 else turn.q
        a = "" if turn.a is None else turn.a
        parts.append(f"{ORIGINAL_USER}{q} {ORIGINAL_ASSISTANT}{a}{eos_token}")
    return "".join(parts)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def original_ids_and_labels(tokenizer, llm_text: str) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``labels`` (int32[L] each) of the original's ``__getitem__``.

    ``llm_text`` (BOS included) is split on ``'ASSISTANT: '``, which is re-appended to every
    piece but the last; each piece is tokenized alone (``add_special_tokens=False``) and the
    ids concatenated. Labels: -100 on the first piece; in every middle piece (answer +
    ``</s>`` + the next question) -100 after the first ``len(tok(piece.split('USER: ')[0]
    .rstrip(' ')))`` tokens; the last piece supervised whole. So an answer containing
    ``USER: `` loses its tail from the labels and one containing ``ASSISTANT: `` is split in
    two pieces, as in the original. (The original then pads the labels with -100 to 3000.)
    Raises DataError where the original's length assertion fails.
    """
    raw = llm_text.split(ORIGINAL_ASSISTANT)
    for k in range(len(raw) - 1):
        raw[k] += ORIGINAL_ASSISTANT
    pieces = [_ids(tokenizer, p) for p in raw]
    ids = np.asarray([i for p in pieces for i in p], np.int32)
    labels = ids.copy()
    cur = len(pieces[0])
    labels[:cur] = IGNORE_INDEX
    for text, p in zip(raw[1:-1], pieces[1:-1]):
        ans = len(_ids(tokenizer, text.split(ORIGINAL_USER)[0].rstrip(" ")))
        labels[cur + ans : cur + len(p)] = IGNORE_INDEX
        cur += len(p)
    if len(raw) > 1:
        cur += len(_ids(tokenizer, raw[-1].rstrip(" ")))
    if cur != len(ids):
        raise DataError(
            f"the original's label rule covers {cur} of {len(ids)} tokens (its assertion "
            f"fails; the original skips such a sample): {llm_text[:200]!r}"
        )
    return ids, labels


def encode_training_sample(
    tokenizer,
    turns: Sequence[Turn],
    template: Template | str,
    image_token_id: int,
    num_images: int = 1,
    system: str | None = None,
) -> Encoded:
    """One training sample exactly as the original's ``Interleave_sft_dataset`` encodes it.

    Args:
      tokenizer: the LLM's transformers tokenizer with ``<image>`` as a special token
        (``tokenizers.load_llm_tokenizer``; ``legacy`` decides the ``▁`` after special tokens).
      turns: the QA turns (all answered), as written in the annotation.
      template: ``plain_v1`` or ``vicuna_v1``.
      image_token_id: the model's ``image_token_index``; the text must yield it
        ``num_images`` times.
      num_images: visual inputs of the sample (1 for a video or image, N for multi-image).
      system: the first turn's ``i`` (verbatim; None or "" for the template's default).

    Returns:
      :class:`Encoded`: int32[L] ids and labels, ``text`` = BOS + :func:`process_qa`,
      ``clip_text`` = :func:`process_qa` (the original's CLIP prompt in training).

    Raises:
      DataError: an unanswered turn, or a number of image tokens other than ``num_images``.
    """
    if any(t.a is None for t in turns):
        raise DataError("a training sample needs an answer in every QA turn")
    body = process_qa(turns, template, system, num_images)  # "</s>" written as the original
    text = (tokenizer.bos_token or "") + body
    ids, labels = original_ids_and_labels(tokenizer, text)
    found = int((ids == image_token_id).sum())
    if found != num_images:
        raise DataError(
            f"the sample has {num_images} visual inputs but its text gives {found} image "
            f"tokens (id {image_token_id}; {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
            "in the text): the questions must hold one <image> per visual input (or none), and "
            "the tokenizer must map <image> to model.image_token_index"
        )
    return Encoded(ids, labels, text, body)
