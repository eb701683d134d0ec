"""A judge reply -> a verdict, and the verdicts -> the summary each original script prints.

A reply is read as the original reads it: ``ast.literal_eval`` of the whole message (so
``{'pred': 'yes', 'score': 4}`` and ``{"score": 3}`` are read, prose around the dict is not),
and the verdict is what that gives, stored as JSON as the original stores it.

The summaries follow each script's own loop (``ppllava/test/gpt_evaluation/*.py``, end of
``main``), averaging over every judged question:

- ``qa``: ``score`` missing -> 3; ``int(score)``; ``"yes" in pred.lower()`` counts yes, else
  ``"no" in ...`` counts no (neither: counted in the average only); accuracy = yes / (yes +
  no); a list reply is read by its first element.
- ``correctness``, ``detail``: a verdict without a ``score`` counts as 0 (the script skips
  the sum, not the count); listed as ``no_score``.
- ``context``, ``temporal``, ``consistency``: the script needs ``score`` (it stops, or reuses
  the previous question's score); such a reply is unparsable here and asked again.

A verdict the script could not sum at all (``int()`` fails, ``pred`` not text) is unparsable
too: :func:`check` raises :class:`Unparsable`, and the question is asked again instead of
stopping the whole summary as the original would.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ppllava_jax.judge.prompts import Criterion

DEFAULT_QA_SCORE = 3  # evaluate_activitynet_qa.py: a verdict without 'score' counts 3
ZERO_IF_NO_SCORE = ("correctness", "detail")


class Unparsable(ValueError):
    """A reply the original's parsing or summary could not use (the message says why)."""


def parse_reply(content: str) -> Any:
    """The verdict of a reply: ``ast.literal_eval(content)`` as JSON would store it."""
    try:
        value = ast.literal_eval(content)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise Unparsable(f"not a Python literal ({type(e).__name__})") from None
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise Unparsable(f"a {type(value).__name__}, which JSON cannot hold") from None


def _qa_dict(verdict: Any) -> Any:
    if isinstance(verdict, list):  # the script's `if isinstance(result[0], list)`
        if not verdict:
            raise Unparsable("an empty list")
        return verdict[0]
    return verdict


def _int(score: Any) -> int:
    try:
        return int(score)
    except (TypeError, ValueError, OverflowError):
        raise Unparsable(f"score {score!r} is not a number int() reads") from None


def score_of(criterion: Criterion, verdict: Any) -> int | None:
    """The score the original's summary adds for ``verdict`` (None: counted, nothing added);
    raises :class:`Unparsable` where the summary could not use it."""
    if criterion.name == "qa":
        d = _qa_dict(verdict)
        if not isinstance(d, Mapping) or not isinstance(d.get("pred"), str):
            raise Unparsable("no 'pred' text")
        return _int(d.get("score", DEFAULT_QA_SCORE))
    if isinstance(verdict, Mapping) and "score" in verdict:
        return _int(verdict["score"])
    if criterion.name in ZERO_IF_NO_SCORE:
        return None
    raise Unparsable("no 'score'")


def check(criterion: Criterion, verdict: Any) -> None:
    """Raises :class:`Unparsable` unless the original's summary can use ``verdict``."""
    score_of(criterion, verdict)


def summarize(
    criterion: Criterion, verdicts: Sequence[tuple[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """``(summary, printed lines)`` of the judged questions (``(key, verdict)`` pairs), as the
    criterion's script computes and prints them (None where it would divide by zero)."""
    total, count, no_score, defaulted = 0, 0, [], []
    yes = no = 0
    for key, verdict in verdicts:
        score = score_of(criterion, verdict)
        count += 1
        if score is None:
            no_score.append(key)
            continue
        total += score
        if criterion.name != "qa":
            continue
        d = _qa_dict(verdict)
        if "score" not in d:
            defaulted.append(key)
        pred = d["pred"].lower()
        if "yes" in pred:
            yes += 1
        elif "no" in pred:
            no += 1
    average = total / count if count else None
    summary: dict[str, Any] = {"judged": count, "average_score": average}
    if criterion.name == "qa":
        accuracy = yes / (yes + no) if yes + no else None
        summary.update(yes_count=yes, no_count=no, accuracy=accuracy, score_defaulted=defaulted)
        printed = [
            f"Yes count: {yes}",
            f"No count: {no}",
            f"Accuracy: {accuracy}",
            f"Average score: {average}",
        ]
        return summary, printed
    if criterion.name in ZERO_IF_NO_SCORE:
        summary["no_score"] = no_score
    return summary, [f"{criterion.label} {average}"]
