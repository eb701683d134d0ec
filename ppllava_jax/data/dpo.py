"""Preference pairs for DPO (``data.dpo = True``).

Preference samples are in the annotation format, their *last* QA turn carrying a chosen and a
rejected answer (earlier turns are ordinary context)::

    {"video": "v.mp4", "QA": [{"q": "What happens?", "a": "A dog runs.",       # chosen
                               "rejected": "A cat sleeps."}]}
    {"video": "v.mp4", "QA": [{"q": "What happens?", "chosen": "A dog runs.",  # same
                               "rejected": "A cat sleeps."}]}

A sample without a non-blank ``rejected`` answer on its last turn, or with identical chosen and
rejected answers, is a ``bad_annotation`` (skipped and counted at load time). How a pair is
encoded and batched: :mod:`ppllava_jax.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ppllava_jax.data import annotations as ann
from ppllava_jax.data.errors import AnnotationError


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
