"""Answer scoring, two verdicts side by side: the original's and a strict one.

A paper comparison needs the original's verdict, quirks included; the strict verdict says what
the model actually answered. Every results file reports both, per record
(``verdict_original`` / ``verdict_strict``) and in the summary (``accuracy_original`` /
``accuracy_strict``). A verdict is one of ``correct``, ``wrong``, ``excluded`` (the original
leaves the question out of its denominator) or ``error:<Exception>`` (the original raises
there, which ends its run).

MVBench (``ppllava/test/mvbench/utils.py``): :func:`check_ans` is the original rule,
``p = pred.lower().split(' ')[0]``, ``g = gt.lower().split(' ')[0]``, correct iff
``p.replace('.', '') in g or g in p``: so an empty reply (``pred == '('``) is correct, a
lower-case letter is correct, option text without its letter is wrong; a ``gt`` without answer
text raises IndexError (``error:IndexError``); an answer missing from the candidates has the
letter ``@`` (``qa_template``). Strict: the option letter must open the reply (``(B``,
``(B)``, ``(b.``; one extra ``(`` allowed) and equal the reference letter; an empty or
unparsable reply is wrong.

Video-MME (``eval_your_results`` of the benchmark's own kit): :func:`videomme_extract` is the
original ``extract_characters_regex``: strip the response, remove the answer prefixes (two
pairs are concatenated by missing commas, so ``"The best option is"``,
``"The correct option is"``, ``"Best answer:"`` and ``"Best option:"`` are never removed),
return ``''`` for more than 10 words without any of ``ABCD``, else the first of ``[ABCD]``
anywhere (the B of ``Best`` / ``Based`` counts). ``''`` means the question is excluded from
the denominator. Strict: the prefixes removed (the intended list, any case), then a leading
letter closed by punctuation or the end (``C``, ``(C)``, ``C.``), or else the only
standalone capital ``A-D`` of the reply (``A or B``: none);
anything else, an empty reply included, is wrong and stays in the denominator.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

CORRECT, WRONG, EXCLUDED = "correct", "wrong", "excluded"


def _error(e: BaseException) -> str:
    return f"error:{type(e).__name__}"


# --------------------------------------------------------------------------------------
# MVBench


def check_ans(pred: str, gt: str) -> bool:
    """The original MVBench ``check_ans`` (module docstring), raising where it raises."""
    pred_list = pred.lower().split(" ")
    pred_option = pred_list[0]
    gt_list = gt.lower().split(" ")
    gt_option, gt_content = gt_list[0], " ".join(gt_list[1:])
    if gt_content[-1] == ".":  # IndexError on an empty answer text, as in the original
        gt_content = gt_content[:-1]
    if pred_option.replace(".", "") in gt_option:
        return True
    return gt_option in pred_option


def mvbench_verdict(pred: str, gt: str) -> str:
    """The original's verdict of an MVBench ``pred`` (``'(' + reply``) against ``gt``
    (``'(X) answer'``): ``correct`` | ``wrong`` | ``error:<Exception>``."""
    try:
        return CORRECT if check_ans(pred, gt) else WRONG
    except Exception as e:  # noqa: BLE001 - reported, as the original would have crashed
        return _error(e)


_MV_PRED = re.compile(r"^\(\(?\s*([A-Za-z])(?=$|[\s).:,;\]])")
_MV_GT = re.compile(r"^\(([A-Za-z@])\)")


def mvbench_letter_strict(pred: str) -> str | None:
    """The option letter opening an MVBench ``pred`` (upper case), or None (module
    docstring)."""
    m = _MV_PRED.match(pred or "")
    return m.group(1).upper() if m else None


def mvbench_verdict_strict(pred: str, gt: str) -> str:
    """Strict MVBench verdict: ``correct`` iff the letter opening ``pred`` is the reference's;
    empty or unparsable = ``wrong``; a reference whose answer is not among the candidates
    (letter ``@``) or without a letter gives ``error:BadReference``."""
    m = _MV_GT.match(gt or "")
    if m is None or m.group(1) == "@":
        return "error:BadReference"
    letter = mvbench_letter_strict(pred)
    return CORRECT if letter is not None and letter == m.group(1).upper() else WRONG


def mvbench_acc_dict(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The original ``save_results``' ``acc_dict``: ``{task_type: [correct, total], ...,
    'Total Acc': percent}`` in first-seen task order, from records with ``task_type``,
    ``pred``, ``gt``. A record whose ``check_ans`` raises (the original crashes) counts as
    not correct here."""
    acc: dict[str, Any] = {}
    correct = total = 0
    for r in records:
        c = acc.setdefault(r["task_type"], [0, 0])
        c[1] += 1
        total += 1
        if mvbench_verdict(r["pred"], r["gt"]) == CORRECT:
            c[0] += 1
            correct += 1
    for v in list(acc.values()):  # the original adds every task a second time
        correct += v[0]
        total += v[1]
    if total:
        acc["Total Acc"] = correct / total * 100
    return acc


# --------------------------------------------------------------------------------------
# Video-MME

# the original list, missing commas included (adjacent literals concatenate)
VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)
VIDEOMME_PREFIXES_INTENDED = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)


def videomme_extract(response: str) -> str:
    """The original ``extract_characters_regex``: a letter of ABCD or ``''`` (module
    docstring). Raises where it raises (e.g. AttributeError on None)."""
    s = response.strip()
    for prefix in VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return "" if m is None else m[0]


def videomme_verdict(response: str, answer: str) -> str:
    """The original's verdict (``eval_your_results``): ``excluded`` when nothing is
    extracted, else ``correct`` / ``wrong``; ``error:<Exception>`` where it raises."""
    try:
        letter = videomme_extract(response)
    except Exception as e:  # noqa: BLE001
        return _error(e)
    if letter == "":
        return EXCLUDED
    return CORRECT if letter == answer else WRONG


_VM_LEAD = re.compile(r"^[\(\[]?([ABCD])(?=$|[).:,;\]])")
_VM_ANY = re.compile(r"(?<![A-Za-z0-9])([ABCD])(?![A-Za-z0-9])")


def videomme_extract_strict(response: str | None) -> str:
    """Strict letter of a Video-MME response, or ``''`` (module docstring)."""
    s = (response or "").strip()
    for prefix in sorted(VIDEOMME_PREFIXES_INTENDED, key=len, reverse=True):
        s = re.sub(re.escape(prefix), " ", s, flags=re.IGNORECASE)
    s = s.strip()
    m = _VM_LEAD.match(s)
    if m:
        return m.group(1)
    found = set(_VM_ANY.findall(s))
    return found.pop() if len(found) == 1 else ""


def videomme_verdict_strict(response: str | None, answer: str) -> str:
    """Strict Video-MME verdict: ``correct`` / ``wrong`` (unparsable = wrong, counted)."""
    letter = videomme_extract_strict(response)
    return CORRECT if letter and letter == answer else WRONG


# --------------------------------------------------------------------------------------
# Summaries


def accuracy_of(verdicts: Sequence[str]) -> dict[str, Any]:
    """``{accuracy, correct, counted, excluded, errors}`` of a list of verdicts: the
    denominator ``counted`` leaves out ``excluded`` and ``error:*`` verdicts."""
    correct = sum(v == CORRECT for v in verdicts)
    wrong = sum(v == WRONG for v in verdicts)
    excluded = sum(v == EXCLUDED for v in verdicts)
    errors = sum(v.startswith("error:") for v in verdicts)
    counted = correct + wrong
    return {
        "accuracy": correct / counted if counted else 0.0,
        "correct": correct,
        "counted": counted,
        "excluded": excluded,
        "errors": errors,
    }


def two_verdict_summary(
    records: Sequence[dict[str, Any]], group_key: str | None = None
) -> dict[str, Any]:
    """Both accuracies over records with ``verdict_original`` and ``verdict_strict``, overall
    and per ``group_key``::

        {"accuracy_original", "correct_original", "counted_original", "excluded_original",
         "errors_original", "accuracy_strict", "correct_strict", "counted_strict",
         "errors_strict", "answered", "by_<group_key>": {group: {same keys}}}

    Accuracies are fractions in [0, 1].
    """

    def one(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("original", "strict"):
            a = accuracy_of([str(r.get(f"verdict_{kind}", WRONG)) for r in rs])
            for k, v in a.items():
                if kind == "strict" and k == "excluded":
                    continue
                out[f"{k}_{kind}"] = v
        out["answered"] = len(rs)
        return out

    summary = one(records)
    if group_key is not None:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault(str(r.get(group_key, "?")), []).append(r)
        summary[f"by_{group_key}"] = {g: one(rs) for g, rs in groups.items()}
    return summary


__all__ = [
    "CORRECT",
    "EXCLUDED",
    "WRONG",
    "accuracy_of",
    "check_ans",
    "mvbench_acc_dict",
    "mvbench_letter_strict",
    "mvbench_verdict",
    "mvbench_verdict_strict",
    "two_verdict_summary",
    "videomme_extract",
    "videomme_extract_strict",
    "videomme_verdict",
    "videomme_verdict_strict",
]
