"""One result file per judged question, so a stopped or failed run resumes.

A criterion's directory holds ``<key>.json`` per question, ``[verdict, qa_set]`` exactly as
the original's ``--output_dir`` does (its summary code reads this directory unchanged), each
written to ``<key>.json.tmp`` first and renamed, so a killed run leaves whole files only. A
file counts as answered when its ``qa_set`` is the question's (a prediction that changed is
asked again) and its verdict still parses. ``JUDGE_SETTINGS`` records the judge model; a
directory of another model is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

from ppllava_jax.judge.inputs import Item

SETTINGS = "JUDGE_SETTINGS"
SAFE = " -_.,()[]{}'!@#$&+=;~"  # kept as they are in file names; '/', '%', ... are quoted


def file_name(key: str) -> str:
    """``<key>.json``, with the characters a file name cannot hold percent-quoted."""
    return urllib.parse.quote(key, safe=SAFE) + ".json"


class ResultDir:
    """The per-question results of one criterion in ``path`` (made if missing)."""

    def __init__(self, path: str, criterion: str, model: str):
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        settings = os.path.join(self.path, SETTINGS)
        want = {"criterion": criterion, "model": model}
        if os.path.exists(settings):
            with open(settings) as f:
                try:
                    have = json.load(f)
                except json.JSONDecodeError:
                    have = {}
            if have.get("model", model) != model or have.get("criterion", criterion) != criterion:
                raise ValueError(
                    f"{self.path} holds the {have.get('criterion')} verdicts of judge model "
                    f"{have.get('model')!r}; judge with that --model, or give another "
                    f"--output_dir for the verdicts of {model!r}"
                )
        self._write(settings, want)

    def _write(self, path: str, obj: Any) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)

    def path_of(self, item: Item) -> str:
        """The result file of ``item``."""
        return os.path.join(self.path, file_name(item.key))

    def load(self, item: Item) -> tuple[bool, Any]:
        """``(True, verdict)`` if the file of ``item`` holds this question's ``qa_set``, else
        ``(False, None)`` (no file, another prediction, or a file that is not the judge's)."""
        path = self.path_of(item)
        if not os.path.isfile(path):
            return False, None
        try:
            with open(path) as f:
                verdict, qa_set = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError):
            return False, None
        return (True, verdict) if qa_set == item.qa_set else (False, None)

    def save(self, item: Item, verdict: Any) -> None:
        """Stores ``[verdict, qa_set]`` for ``item`` (written whole, then renamed)."""
        self._write(self.path_of(item), [verdict, item.qa_set])
