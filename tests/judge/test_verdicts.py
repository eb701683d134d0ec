"""Reply parsing and the summaries against the original's summary loops (tests/judge/original.py)
on replies of every shape: what the original sums, the judge sums the same; what would stop the
original's summary (a missing 'pred', a score int() cannot read) is unparsable here."""

from __future__ import annotations

import pytest

from ppllava_jax.judge.prompts import CRITERIA
from ppllava_jax.judge.verdicts import Unparsable, check, parse_reply, summarize
from tests.judge.original import original_qa_summary, original_vcg_summary

REPLIES = [
    "{'pred': 'yes', 'score': 4}",
    '{"pred": "no", "score": 2}',
    "{'pred': 'Yes', 'score': '3'}",
    "{'pred': 'not sure', 'score': 4.8}",
    "{'pred': 'maybe'}",
    "[{'pred': 'no', 'score': 1}]",
    "{'score': 5}",
    "{'score': 'five'}",
    "{'pred': 'yes', 'score': None}",
    "{'pred': 3, 'score': 1}",
    "3",
    "[]",
    "'yes'",
]
UNPARSABLE = ["yes, 4", "{'pred': 'yes', 'score': 4} because", "", "{1, 2}"]


def _original(criterion: str, verdicts: list) -> list[str] | None:
    combined = {f"k{i}_0": [v, {}] for i, v in enumerate(verdicts)}
    try:
        if criterion == "qa":
            return original_qa_summary(combined)
        return original_vcg_summary(criterion, combined)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("reply", REPLIES)
def test_each_reply_as_the_original_sums_it(criterion, reply):
    crit = CRITERIA[criterion]
    base = parse_reply(REPLIES[0])  # a good verdict beside it (the accuracy needs a yes or no)
    verdict = parse_reply(reply)
    want = _original(criterion, [base, verdict])
    if want is None:
        with pytest.raises(Unparsable):
            check(crit, verdict)
        return
    check(crit, verdict)
    _, printed = summarize(crit, [("k0_0", base), ("k1_0", verdict)])
    assert printed == want


@pytest.mark.parametrize("reply", UNPARSABLE)
def test_what_literal_eval_or_json_cannot_read_is_unparsable(reply):
    with pytest.raises(Unparsable):
        parse_reply(reply)
