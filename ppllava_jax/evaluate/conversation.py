"""The original's evaluation conversations (``ppllava/conversation/conv.py``), as text.

The benchmark drivers of the original build every LLM prompt with a ``Conversation``:
``user_query(query, pre_query_prompt=..., is_mm=True)``, optionally
``assistant_response(answer_prompt)``, then ``get_prompt()``. :func:`one_turn_prompt`
reproduces that for one user turn, character for character:

- ``pre_query_prompt`` is joined to the query with one space (``f"{pre} {query}"``);
- ``is_mm``: the media token ``<image>\\n`` is prepended, unless the query already holds
  ``<image>\\n`` (left alone) or ``<image>`` (replaced, every occurrence, by ``<image>\\n``);
- ``get_prompt``: ``system + sep[user]`` when the system text is not empty, then
  ``USER: {query}{sep[user]}ASSISTANT: `` and the answer prompt when there is one
  (``ASSISTANT: {answer_prompt}``, no separator after it); without one the prompt ends
  with ``ASSISTANT: `` (a trailing space, which the Llama tokenizer turns into ``▁``).

The Vicuna templates (``USER: `` / ``ASSISTANT: ``; the tokenizer adds BOS): ``plain_v1``,
``conv_vcg_v1``, ``conv_mvbench_v1``, ``conv_videoqa_v1``. The Qwen ones (roles
``<|im_start|>user\n`` / ``<|im_start|>assistant\n``, both separators ``<|im_end|>\n``, no
BOS): ``plain_qwen``, ``conv_vcg_qwen`` (the Video-ChatGPT system text, then ``<|im_end|>\n``,
no ``<|im_start|>system``), ``conv_videoqa_qwen``. E.g. ``plain_qwen`` with an answer prompt:
``<|im_start|>user\n<image>\n{query}<|im_end|>\n<|im_start|>assistant\n{answer_prompt}``.

:class:`Family` holds what a model family changes in every benchmark (the original's drivers
switch when ``'qwen'`` is in the LLM name; here ``PPLLaVAConfig.qwen``): the templates, the
text VCGBench splits its decoded reply on (``conv.roles[1]``, for Qwen ``'assistant\n'``) and
the special tokens ``decode(..., skip_special_tokens=True)`` drops.
"""

from __future__ import annotations

import dataclasses

MM_TOKEN = "<image>\n"


@dataclasses.dataclass(frozen=True)
class EvalConversation:
    """One of the original's evaluation conversation templates (fields as in ``conv.py``)."""

    system: str = ""
    roles: tuple[str, str] = ("USER: ", "ASSISTANT: ")
    sep: tuple[str, str] = (" ", "</s>")
    mm_token: str = MM_TOKEN
    pre_query_prompt: str | None = None
    answer_prompt: str | None = None


VCG_SYSTEM = (
    "You are Video-ChatGPT, a large vision-language assistant. "
    "You are able to understand the video content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail based on the "
    "provided video."
)
MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the "
    "detail and movement of objects, and the action and pose of persons. Based on your "
    "observations, select the best option that accurately addresses the question.\n"
)
VIDEOQA_PRE_QUERY = (
    "The input consists of a sequence of key frames from a video. Answer the question "
    "concisely first and followed by significant events, characters, or objects that appear "
    "throughout the frames. Question:"
)
VIDEOQA_ANSWER = "Answer: In the video,"

QWEN_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
QWEN_SEP = ("<|im_end|>\n", "<|im_end|>\n")

TEMPLATES: dict[str, EvalConversation] = {
    "plain_v1": EvalConversation(),
    "conv_vcg_v1": EvalConversation(system=VCG_SYSTEM),
    "conv_mvbench_v1": EvalConversation(system=MVBENCH_SYSTEM),
    "conv_videoqa_v1": EvalConversation(
        pre_query_prompt=VIDEOQA_PRE_QUERY, answer_prompt=VIDEOQA_ANSWER
    ),
    "plain_qwen": EvalConversation(roles=QWEN_ROLES, sep=QWEN_SEP),
    "conv_vcg_qwen": EvalConversation(system=VCG_SYSTEM, roles=QWEN_ROLES, sep=QWEN_SEP),
    "conv_videoqa_qwen": EvalConversation(
        roles=QWEN_ROLES,
        sep=QWEN_SEP,
        pre_query_prompt=VIDEOQA_PRE_QUERY,
        answer_prompt=VIDEOQA_ANSWER,
    ),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family changes in the benchmark protocols (module docstring).

    Attributes:
      name: ``vicuna`` or ``qwen``.
      plain: MVBench, Video-MME and VCGBench (without ``--system_vcg``).
      vcg_system: VCGBench with ``--system_vcg``.
      videoqa: open-ended QA.
      vcg_split: VCGBench's reply split (``decoded.split(vcg_split)[1].strip()``).
      special_tokens: the texts ``decode(skip_special_tokens=True)`` drops from a prompt.
    """

    name: str
    plain: str
    vcg_system: str
    videoqa: str
    vcg_split: str
    special_tokens: tuple[str, ...]


VICUNA = Family("vicuna", "plain_v1", "conv_vcg_v1", "conv_videoqa_v1", "ASSISTANT: ", ("<image>",))
QWEN = Family(
    "qwen",
    "plain_qwen",
    "conv_vcg_qwen",
    "conv_videoqa_qwen",
    "assistant\n",
    ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>"),
)
FAMILIES = {f.name: f for f in (VICUNA, QWEN)}


def family_of(qwen: bool | str | Family) -> Family:
    """The family of a model (``PPLLaVAConfig.qwen``), or the family named ``vicuna`` / ``qwen``."""
    if isinstance(qwen, Family):
        return qwen
    if isinstance(qwen, str):
        if qwen not in FAMILIES:
            raise ValueError(f"unknown model family {qwen!r}; use one of {sorted(FAMILIES)}")
        return FAMILIES[qwen]
    return QWEN if qwen else VICUNA


def get_conversation(name: str) -> EvalConversation:
    """The template ``name``; a ValueError lists the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown evaluation conversation {name!r}; use one of {sorted(TEMPLATES)}"
        ) from None


def user_query_text(
    conv: EvalConversation, query: str, pre_query_prompt: str | None = None, is_mm: bool = True
) -> str:
    """The user message ``Conversation.user_query`` stores (see module docstring)."""
    if pre_query_prompt is not None:
        query = f"{pre_query_prompt} {query}"
    if is_mm and conv.mm_token not in query:
        bare = conv.mm_token[:-1]
        query = query.replace(bare, conv.mm_token) if bare in query else conv.mm_token + query
    return query


def one_turn_prompt(
    conv: EvalConversation | str,
    query: str,
    *,
    pre_query_prompt: str | None = None,
    answer_prompt: str | None = None,
    is_mm: bool = True,
) -> str:
    """``get_prompt()`` after one ``user_query`` and, if ``answer_prompt`` is not None, one
    ``assistant_response(answer_prompt)``: the exact text the original tokenizes (no BOS)."""
    if isinstance(conv, str):
        conv = get_conversation(conv)
    user, assistant = conv.roles
    sep_user = conv.sep[0]
    ret = conv.system + sep_user if conv.system != "" else ""
    ret += user + user_query_text(conv, query, pre_query_prompt, is_mm)
    if answer_prompt is None:
        return ret + sep_user + assistant
    return ret + sep_user + assistant + answer_prompt


def reply_after(decoded: str, split_str: str) -> str:
    """The drivers' answer extraction: ``decoded.split(split_str)[1].strip()``, i.e. the text
    between the first and the second occurrence of ``split_str`` in the decoded
    prompt + generation (``decode(..., skip_special_tokens=True)``). Raises ValueError (the
    original: IndexError) when ``split_str`` does not occur."""
    parts = decoded.split(split_str)
    if len(parts) < 2:
        raise ValueError(f"{split_str!r} does not occur in the decoded text {decoded[:200]!r}")
    return parts[1].strip()


def decoded_text(prompt_text: str, reply: str, family: Family = VICUNA) -> str:
    """What the drivers decode (``skip_special_tokens=True``), rebuilt from the prompt text and
    the decoded reply: the family's special tokens dropped, the reply appended. For Vicuna it
    differs from the token decoding only in whitespace next to ``<image>`` and at the
    prompt/reply seam, which :func:`reply_after` strips; Qwen's byte-level decoding is the
    concatenation itself."""
    for token in family.special_tokens:
        prompt_text = prompt_text.replace(token, "")
    return prompt_text + reply
