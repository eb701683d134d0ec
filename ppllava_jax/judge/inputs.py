"""The judge inputs an ``eval.py`` run wrote, read into the questions the judge asks about.

What ``eval.py`` writes (``ppllava_jax/evaluate/openqa.py``), beside its results file
``OUT.json``:

    --benchmark openqa     OUT_pred.json        [{"pred", "answer", "question", "id"}]
    --benchmark vcgbench   OUT_general.json     [{"pred", "A", "Q", "video_name"}]
                           OUT_temporal.json    (same fields)
                           OUT_consist.json     [{"pred1", "pred2", "video_name", "A", "Q1", "Q2"}]

``--input`` takes the results file ``OUT.json`` (its summary names those files: every criterion
of the benchmark is judged), or one of those files (its fields say which criteria apply; a
``*general.json`` file: correctness, detail, context; ``*temporal.json``: temporal). The
original's own files (``MSVD.json``, ``general.json``, ...) have the same fields.

Each record becomes an :class:`Item` named as the original names its result file: the QA
``id`` (VCGBench: ``video_name``) and ``_<n>``, n counting the earlier records with that name
from 0; its ``qa_set`` is the dict the original keeps beside the verdict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ppllava_jax.evaluate.openqa import VCG_SAVED
from ppllava_jax.judge.prompts import CRITERIA, VCG_CRITERIA

FIELDS = {  # the fields each layout's records need
    "qa": ("id", "question", "answer", "pred"),
    "vcg": ("video_name", "Q", "A", "pred"),
    "consistency": ("video_name", "Q1", "Q2", "A", "pred1", "pred2"),
}
CRITERIA_OF_FILE = {  # the saved VCGBench file's name -> the criteria its records are judged on
    VCG_SAVED["generic"]: ("correctness", "detail", "context"),
    VCG_SAVED["temporal"]: ("temporal",),
    VCG_SAVED["consistency"]: ("consistency",),
}


@dataclass(frozen=True)
class Item:
    """One question for the judge: ``key`` names its result file (``<key>.json``) and its
    entry in the combined file; ``qa_set`` is what the prompt is built from."""

    key: str
    qa_set: dict[str, Any]


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} {path}: no such file (the judge reads what eval.py --benchmark openqa / "
            "vcgbench wrote: OUT.json, OUT_pred.json, OUT_general.json, ...)"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: not a JSON file ({e})") from None


def layout_of(path: str, records: Sequence[Any]) -> str:
    """``qa``, ``vcg`` or ``consistency``: the layout whose fields the first record has."""
    if not records:
        raise ValueError(f"--input {path}: no predictions in it (an empty list)")
    first = records[0]
    if isinstance(first, Mapping):
        for layout in ("consistency", "qa", "vcg"):
            if all(k in first for k in FIELDS[layout]):
                return layout
    raise ValueError(
        f"--input {path}: record 0 is not a judge input (QA: {list(FIELDS['qa'])}; VCGBench: "
        f"{list(FIELDS['vcg'])} or {list(FIELDS['consistency'])})"
    )


def _criteria_of(path: str, layout: str) -> tuple[str, ...]:
    if layout == "qa":
        return ("qa",)
    if layout == "consistency":
        return ("consistency",)
    stem = os.path.splitext(os.path.basename(path))[0]
    for saved in (VCG_SAVED["temporal"], VCG_SAVED["generic"]):
        if stem.endswith(saved):
            return CRITERIA_OF_FILE[saved]
    raise ValueError(
        f"--input {path}: VCGBench records, but the name says neither general nor temporal; "
        "name the criteria with --criteria (correctness,detail,context or temporal)"
    )


def _summary_file(results: str, path: str) -> str:
    """A file named in a results file's summary: as written, else beside the results file."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(results), os.path.basename(path))


def resolve(path: str, criteria: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(criterion, judge-input file)`` pairs for ``--input path`` (``criteria``: only these;
    a criterion the input cannot give is an error)."""
    data = _read_json(path, "--input")
    if isinstance(data, Mapping) and isinstance(data.get("summary"), Mapping):
        summary = data["summary"]
        files = []
        if "predictions_file" in summary:
            files.append(("qa", summary["predictions_file"]))
        for saved, names in CRITERIA_OF_FILE.items():
            if f"{saved}_file" in summary:
                files += [(c, summary[f"{saved}_file"]) for c in names]
        if not files:
            raise ValueError(
                f"--input {path}: a results file of benchmark {data.get('benchmark')!r}, which "
                "has no judge (only --benchmark openqa and vcgbench are judged)"
            )
        pairs = [(c, _summary_file(path, f)) for c, f in files]
    elif isinstance(data, list):
        layout = layout_of(path, data)
        if criteria:
            wrong = [c for c in criteria if CRITERIA[c].layout != layout]
            if wrong:
                raise ValueError(
                    f"--input {path} holds {layout} records; criteria {wrong} need "
                    f"{CRITERIA[wrong[0]].layout} records"
                )
            return [(c, path) for c in criteria]
        pairs = [(c, path) for c in _criteria_of(path, layout)]
    else:
        raise ValueError(
            f"--input {path}: neither eval.py's results file nor a list of predictions"
        )
    if criteria:
        have = [c for c, _ in pairs]
        missing = [c for c in criteria if c not in have]
        if missing:
            raise ValueError(f"--input {path} gives the criteria {have}, not {missing}")
        pairs = [p for p in pairs if p[0] in criteria]
    return pairs


def load_items(path: str, criterion: str, consistency_question2: str = "Q1") -> list[Item]:
    """The questions of one judge-input file for ``criterion``, in file order.

    ``consistency_question2``: the record field sent as "Question 2" (the original sends
    ``Q1`` twice: ``evaluate_benchmark_5_consistency.py`` reads ``sample['Q1']`` for both)."""
    layout = CRITERIA[criterion].layout
    records = _read_json(path, "judge input")
    if not isinstance(records, list):
        raise ValueError(f"judge input {path}: not a list of predictions")
    if layout_of(path, records) != layout:
        raise ValueError(f"judge input {path}: not {layout} records (criterion {criterion})")
    seen: dict[str, int] = {}
    items = []
    for i, r in enumerate(records):
        missing = [k for k in FIELDS[layout] if not isinstance(r, Mapping) or k not in r]
        if missing:
            raise ValueError(f"judge input {path}: record {i} has no {missing[0]!r} field")
        name = f"{r['id'] if layout == 'qa' else r['video_name']}"
        n = seen.get(name, 0)
        seen[name] = n + 1
        if layout == "consistency":
            q2 = r[consistency_question2]
            qa_set = {
                "q1": r["Q1"],
                "q2": q2,
                "a": r["A"],
                "pred1": r["pred1"],
                "pred2": r["pred2"],
            }
        elif layout == "qa":
            qa_set = {"q": r["question"], "a": r["answer"], "pred": r["pred"]}
        else:
            qa_set = {"q": r["Q"], "a": r["A"], "pred": r["pred"]}
        items.append(Item(f"{name}_{n}", qa_set))
    return items


def all_criteria() -> tuple[str, ...]:
    """Every criterion name (``qa`` and the VCGBench five)."""
    return ("qa", *VCG_CRITERIA)
