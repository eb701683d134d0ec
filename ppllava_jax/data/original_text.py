"""The original's training samples: ``Interleave_sft_dataset.__getitem__`` of the authors' code.

What the pipeline uses to train the original's templates (``data.text_encoding='original'``),
both families. :func:`process_qa` writes the conversation as the original's ``Conversation``
does, nothing stripped: ``plain_v1`` (Vicuna)
``{i} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``, ``plain_qwen``
(Qwen2) ``{i}<|im_end|>\\n<|im_start|>user\\n<image>\\n{q1}<|im_end|>\\n<|im_start|>assistant\\n
{a1}<|im_end|>\\n...`` (a system text has no ``<|im_start|>system\\n`` opener). The LLM text
(the tokenizer's BOS, if it has one, + that) is split on the assistant role (``'ASSISTANT: '``
/ ``'<|im_start|>assistant\\n'``, re-appended to every piece but the last), each piece is
tokenized alone without special tokens and the ids are concatenated; labels mask the first
piece and, in every middle piece, what follows the answer (``piece.split(user role)[0]
.rstrip(' ')``). With the legacy Llama tokenizer every piece starts with a prepended ``▁``, so
an unsupervised standalone ``▁`` follows every ``ASSISTANT: `` (as in the released model's
training); with Qwen2's byte-level BPE an answer starting with ``\\n`` gives ``\\n`` + ``\\n``
where the whole text would give ``\\n\\n``. The CLIP (SigLIP) prompt is the
:func:`process_qa` text itself (role strings, ``<image>\\n``, the separators and the system
instruction included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ppllava_jax.data.errors import DataError
from ppllava_jax.data.templates import IMAGE_PLACEHOLDER, Encoded, Template, Turn, get_template
from ppllava_jax.layout import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class OriginalConversation:
    """The fields of the original's ``Conversation`` that its training text uses.

    Attributes:
      user / assistant: the roles (``roles[0]`` / ``roles[1]``); the assistant role is where
        the LLM text is split, the user role where a middle piece's answer ends.
      user_sep / assistant_sep: ``sep[0]`` (after a question, and after a system text) and
        ``sep[1]`` (after an answer; ``process_qa`` appends it after the last one too).
    """

    user: str
    assistant: str
    user_sep: str
    assistant_sep: str


_VICUNA = OriginalConversation("USER: ", "ASSISTANT: ", " ", "</s>")  # conv_plain_v1
# templates whose training text the original's Conversation writes: plain_v1 (vicuna_v1 only
# adds a default system) and conv_plain_qwen
ORIGINAL_CONVERSATIONS: dict[str, OriginalConversation] = {
    "plain_v1": _VICUNA,
    "vicuna_v1": _VICUNA,
    "plain_qwen": OriginalConversation(
        "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>\n"
    ),
}
ORIGINAL_TEMPLATES = tuple(ORIGINAL_CONVERSATIONS)
ORIGINAL_USER = _VICUNA.user  # conv_plain_v1.roles[0]
ORIGINAL_ASSISTANT = _VICUNA.assistant  # conv_plain_v1.roles[1]: the split point of the text


def original_conversation(template: Template | str) -> OriginalConversation:
    """The original's ``Conversation`` of ``template``; ValueError for the project's own ones."""
    name = template.name if isinstance(template, Template) else get_template(template).name
    if name not in ORIGINAL_CONVERSATIONS:
        raise ValueError(
            f"the original's training text is defined for {ORIGINAL_TEMPLATES}, not "
            f"{name!r}; use data.text_encoding='offsets' for this template"
        )
    return ORIGINAL_CONVERSATIONS[name]


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
) -> str:
    """The conversation text of the original's ``InterleaveBaseDataset.process_qa``.

    ``{system}{sep0}{user}{q1'}{sep0}{assistant}{a1}{sep1}{user}{q2}...{assistant}{aN}{sep1}``
    with the template's :class:`OriginalConversation` (module docstring), where ``system`` is
    the first turn's ``i`` verbatim when non-empty (else the template's default: none for
    ``plain_v1`` / ``plain_qwen``, the Vicuna system prompt for ``vicuna_v1``) and ``q1'`` is
    :func:`original_first_question`. Questions and answers are written as given (not stripped).
    No BOS (the LLM text is ``bos_token + process_qa(...)`` where the tokenizer has one; the
    CLIP / SigLIP prompt is this text).
    """
    t = get_template(template) if isinstance(template, str) else template
    conv = original_conversation(t)
    if not turns:
        raise DataError("empty conversation (no QA turns)")
    sys_text = system if system else t.system
    parts = [sys_text + conv.user_sep] if sys_text else []
    for i, turn in enumerate(turns):
        q = original_first_question(turn.q, num_images) if i == 0 else turn.q
        a = "" if turn.a is None else turn.a
        parts.append(f"{conv.user}{q}{conv.user_sep}{conv.assistant}{a}{conv.assistant_sep}")
    return "".join(parts)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def original_ids_and_labels(
    tokenizer, llm_text: str, conv: OriginalConversation = _VICUNA
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``labels`` (int32[L] each) of the original's ``__getitem__``.

    ``llm_text`` (BOS included where the tokenizer has one) is split on ``conv.assistant``,
    which is re-appended to every piece but the last; each piece is tokenized alone
    (``add_special_tokens=False``) and the ids concatenated. Labels: -100 on the first piece;
    in every middle piece (answer + separator + the next question) -100 after the first
    ``len(tok(piece.split(conv.user)[0].rstrip(' ')))`` tokens; the last piece supervised
    whole. So an answer containing the user role loses its tail from the labels and one
    containing the assistant role is split in two pieces, as in the original. (The original
    then pads the labels with -100 to 3000.) Raises DataError where the original's length
    assertion fails.
    """
    raw = llm_text.split(conv.assistant)
    for k in range(len(raw) - 1):
        raw[k] += conv.assistant
    pieces = [_ids(tokenizer, p) for p in raw]
    ids = np.asarray([i for p in pieces for i in p], np.int32)
    labels = ids.copy()
    cur = len(pieces[0])
    labels[:cur] = IGNORE_INDEX
    for text, p in zip(raw[1:-1], pieces[1:-1]):
        ans = len(_ids(tokenizer, text.split(conv.user)[0].rstrip(" ")))
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
      template: ``plain_v1``, ``vicuna_v1`` or ``plain_qwen``.
      image_token_id: the model's ``image_token_index``; the text must yield it
        ``num_images`` times.
      num_images: visual inputs of the sample (1 for a video or image, N for multi-image).
      system: the first turn's ``i`` (verbatim; None or "" for the template's default).

    Returns:
      :class:`Encoded`: int32[L] ids and labels, ``text`` = BOS (none for Qwen2) +
      :func:`process_qa`, ``clip_text`` = :func:`process_qa` (the original's CLIP / SigLIP
      prompt in training).

    Raises:
      DataError: an unanswered turn, or a number of image tokens other than ``num_images``.
    """
    if any(t.a is None for t in turns):
        raise DataError("a training sample needs an answer in every QA turn")
    body = process_qa(turns, template, system, num_images)
    text = (tokenizer.bos_token or "") + body
    ids, labels = original_ids_and_labels(tokenizer, text, original_conversation(template))
    found = int((ids == image_token_id).sum())
    if found != num_images:
        raise DataError(
            f"the sample has {num_images} visual inputs but its text gives {found} image "
            f"tokens (id {image_token_id}; {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
            "in the text): the questions must hold one <image> per visual input (or none), and "
            "the tokenizer must map <image> to model.image_token_index"
        )
    return Encoded(ids, labels, text, body)
