"""Skip accounting: why a sample was not used, as a counting key and a small record.

A bad sample is skipped (or raised, ``data.on_error='raise'``) and counted by reason:
``missing_media`` (file not found), ``bad_media`` (unreadable, truncated, empty), ``empty_qa``
(no or empty QA turns), ``bad_annotation`` (other malformed sample), ``too_long`` (merged length
> ``max_length``), ``bad_sample`` (another DataError, e.g. a wrong number of ``<image>``
placeholders), ``unexpected_error`` (any other exception while preparing a sample; the
traceback is logged). The preprocessing workers turn an exception into a skip record
(:func:`skip_record`); the batching iterator and the ArrayRecord writer count them.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

from ppllava_jax.data import annotations as ann
from ppllava_jax.data.errors import AnnotationError, DataError, MediaError, SampleTooLongError

SKIP_REASONS = (
    "missing_media",
    "bad_media",
    "empty_qa",
    "bad_annotation",
    "too_long",
    "bad_sample",
    "unexpected_error",
)


def skip_reason(err: BaseException) -> str:
    """The counting key of a skipped sample (see module docstring)."""
    if isinstance(err, MediaError):
        return "missing_media" if "not found" in err.reason else "bad_media"
    if isinstance(err, SampleTooLongError):
        return "too_long"
    if isinstance(err, AnnotationError):
        r = err.reason
        if "QA" in r and ("non-empty" in r or "is empty" in r):
            return "empty_qa"
        return "bad_annotation"
    if isinstance(err, DataError):
        return "bad_sample"
    return "unexpected_error"


def skip_record(e: BaseException, default_path: str) -> dict:
    """The record of a skipped sample: ``status='skip'``, ``reason`` (:func:`skip_reason`),
    ``message`` (with the traceback for an unexpected error) and ``path`` (the error's file,
    else ``default_path``)."""
    reason = skip_reason(e)
    msg = f"{type(e).__name__}: {e}"
    if reason == "unexpected_error":
        msg += "\n" + "".join(traceback.format_exception(e))
    return {
        "status": "skip",
        "reason": reason,
        "message": msg,
        "path": getattr(e, "path", None) or default_path,
    }


class LoadCounter(ann.SkipCounter):
    """SkipCounter that also counts by pipeline reason."""

    def __init__(self):
        super().__init__()
        self.by_reason: dict[str, int] = {}

    def add(self, err: Exception) -> None:
        super().add(err)
        r = skip_reason(err)
        self.by_reason[r] = self.by_reason.get(r, 0) + 1


def no_samples_message(sources: Sequence[ann.AnnotationSource], counter: ann.SkipCounter) -> str:
    """Why a mixture has no valid sample at all (every file empty or every sample rejected)."""
    files = ", ".join(s.path for s in sources)
    if not counter.total:
        return f"data.sources: the annotation files hold no samples ({files}); add data"
    by = getattr(counter, "by_reason", None) or counter.by_kind
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
    first = "\n  ".join(counter.messages[:3])
    return (
        f"data.sources: no valid sample: all {counter.total} samples of {files} were rejected "
        f"when loading ({reasons}); the first:\n  {first}\nfix the annotations (format: "
        "ppllava_jax/data/annotations.py)"
    )
