"""The benchmark interface the runner drives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ppllava_jax.evaluate.common import BadItem, Question, mc_record, mc_summary


class Benchmark:
    """A benchmark: its questions, how an answer is recorded, how records are summarised.

    Subclasses set ``name`` and implement :meth:`questions` (see ``common.Question`` for the
    contract), built with a ``common.ItemReader`` whose malformed items they keep in
    ``self._bad_items`` (:meth:`bad_items`). Template multiple-choice ones keep the default
    :meth:`record` / :meth:`summarize` (accuracy overall and per ``group_key``). Exact
    benchmarks score each record with both verdicts (``scoring``: ``verdict_original`` /
    ``verdict_strict``) and summarize with ``scoring.two_verdict_summary``
    (``accuracy_original`` / ``accuracy_strict``).
    """

    name = "benchmark"
    group_key: str | None = None  # record field for per-group accuracy (task, duration, ...)
    max_new_tokens: int | None = None  # benchmark default (None: the command's)

    def questions(self) -> list[Question]:
        raise NotImplementedError

    def bad_items(self) -> list[BadItem]:
        """The annotation items the last :meth:`questions` skipped (missing fields, wrong
        types), one per question id they would have had."""
        return list(getattr(self, "_bad_items", ()))

    def record(self, q: Question, prediction: str, decoded: str = "") -> dict[str, Any]:
        """The answer record of ``q`` (one JSON line of the answers file).

        prediction: the generated text (``decode(generated ids, skip_special_tokens=True)``).
        decoded: exact questions only: the prompt ids + generated ids decoded together with
          ``skip_special_tokens=True``, what the original drivers split on the answer prefix.
        Template questions are called without it (default ``mc_record``)."""
        return mc_record(q, prediction)

    def setting(self) -> str:
        """What a results file must say about how it was produced beyond the benchmark's name
        (Video-MME: with or without subtitles); "" for nothing."""
        return ""

    def summarize(self, records: Sequence[dict], questions: Sequence[Question]) -> dict[str, Any]:
        return mc_summary(records, self.group_key, len(questions))

    def write_outputs(self, records: Sequence[dict], out_path: str) -> dict[str, str]:
        """Extra files next to the results (e.g. judge inputs); returns {name: path}."""
        return {}
