"""Judge every question of the inputs: cached verdicts kept, the rest asked in parallel, then
the original's summaries.

Per criterion, under ``--output_dir`` (the original's ``--output_dir`` / ``--output_json``):

    <criterion>/<key>.json   [verdict, qa_set] per judged question (store.py)
    <criterion>.json         {key: [verdict, qa_set]} of the judged questions, in input order
    results.json             every criterion: counts, the unparsable and failed questions by
                             name (with the last reply / error), the summary and the lines the
                             original prints; "complete": every question has a verdict

A reply that does not parse is asked again (``parse_retries`` more times; the original asks
until it parses); a question still without a verdict is named, not stored, and asked again by
the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from ppllava_jax.judge.client import ChatClient, RequestFailed
from ppllava_jax.judge.inputs import Item, load_items, resolve
from ppllava_jax.judge.prompts import CRITERIA, VCG_CRITERIA, Criterion
from ppllava_jax.judge.store import ResultDir
from ppllava_jax.judge.verdicts import Unparsable, check, parse_reply, summarize


@dataclass(frozen=True)
class Settings:
    """How to judge: output_dir (the results), workers (requests in flight), parse_retries
    (asks after an unparsable reply), consistency_question2 (the field sent as Question 2),
    progress (print progress lines)."""

    output_dir: str
    workers: int = 4
    parse_retries: int = 2
    consistency_question2: str = "Q1"
    progress: bool = True


@dataclass
class Outcome:
    """What asking about one question gave: a verdict, or why there is none."""

    item: Item
    answered: bool = False
    verdict: Any = None
    kind: str = ""  # "unparsable" or "failed" when not answered
    why: str = ""
    reply: str = ""  # the last reply that did not parse


class IncompleteError(ValueError):
    """Some questions have no verdict after the run (named in results.json)."""


def ask(
    client: ChatClient, criterion: Criterion, item: Item, store: ResultDir, parse_retries: int
) -> Outcome:
    """Asks the judge about ``item`` until a reply parses (at most ``1 + parse_retries``
    replies); stores and returns the verdict. EndpointError propagates."""
    out = Outcome(item)
    messages = criterion.messages(item.qa_set)
    for _ in range(1 + parse_retries):
        try:
            reply = client.complete(messages)
        except RequestFailed as e:
            out.kind, out.why = "failed", str(e)
            return out
        try:
            verdict = parse_reply(reply)
            check(criterion, verdict)
        except Unparsable as e:
            out.kind, out.why, out.reply = "unparsable", str(e), reply
            continue
        store.save(item, verdict)
        out.answered, out.verdict, out.kind, out.why, out.reply = True, verdict, "", "", ""
        return out
    return out


def _usable(criterion: Criterion, verdict: Any) -> bool:
    try:
        check(criterion, verdict)
    except Unparsable:
        return False
    return True


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


@dataclass
class _Progress:
    name: str
    total: int
    on: bool
    done: int = 0
    step: int = field(init=False)

    def __post_init__(self):
        self.step = max(1, self.total // 10)

    def tick(self) -> None:
        self.done += 1
        if self.on and (self.done % self.step == 0 or self.done == self.total):
            print(f"{self.name}: {self.done}/{self.total} asked", flush=True)


def judge_criterion(
    client: ChatClient, name: str, path: str, settings: Settings
) -> tuple[dict[str, Any], list[str]]:
    """Judges one criterion on one judge-input file: ``(its results entry, printed lines)``."""
    criterion = CRITERIA[name]
    items = load_items(path, name, settings.consistency_question2)
    store = ResultDir(os.path.join(settings.output_dir, name), name, client.model)
    verdicts: dict[str, Any] = {}
    todo = []
    for item in items:
        found, verdict = store.load(item)
        if found and _usable(criterion, verdict):
            verdicts[item.key] = verdict
        else:
            todo.append(item)
    earlier = len(verdicts)
    if settings.progress and todo:
        print(f"{name}: asking {len(todo)} of {len(items)} ({earlier} judged before)", flush=True)
    missed: list[Outcome] = []
    progress = _Progress(name, len(todo), settings.progress)
    with ThreadPoolExecutor(max(1, settings.workers)) as pool:
        futures: list[Future] = [
            pool.submit(ask, client, criterion, it, store, settings.parse_retries) for it in todo
        ]
        try:
            for fut in as_completed(futures):
                out: Outcome = fut.result()
                progress.tick()
                if out.answered:
                    verdicts[out.item.key] = out.verdict
                else:
                    missed.append(out)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    done = [it for it in items if it.key in verdicts]
    judged = [(it.key, verdicts[it.key]) for it in done]
    combined = os.path.join(settings.output_dir, f"{name}.json")
    _write_json(combined, {it.key: [verdicts[it.key], it.qa_set] for it in done})
    summary, printed = summarize(criterion, judged)
    order = {it.key: i for i, it in enumerate(items)}
    missed.sort(key=lambda o: order[o.item.key])
    entry = {
        "script": criterion.script,
        "input": path,
        "questions": len(items),
        "judged_before": earlier,
        "asked": len(todo),
        "judged": len(judged),
        "unparsable": [
            {"key": o.item.key, "why": o.why, "reply": o.reply}
            for o in missed
            if o.kind == "unparsable"
        ],
        "failed": [{"key": o.item.key, "error": o.why} for o in missed if o.kind == "failed"],
        "summary": summary,
        "printed": printed,
        "results_dir": store.path,
        "combined_file": combined,
    }
    head = f"== {name} ({criterion.script}): {os.path.basename(path)}, {len(items)} questions =="
    lines = [head]
    if not missed:
        lines.append("All evaluation completed!")
    lines += printed
    for kind in ("unparsable", "failed"):
        if entry[kind]:
            keys = ", ".join(x["key"] for x in entry[kind])
            lines.append(f"{len(entry[kind])} {kind} (no verdict yet): {keys}")
    return entry, lines


def judge(
    input_path: str, client: ChatClient, criteria: Sequence[str], settings: Settings
) -> dict[str, Any]:
    """Judges every criterion ``--input`` gives (or ``criteria``); writes and returns
    results.json's content and prints the original's lines. IncompleteError (after writing
    everything) when some question has no verdict."""
    pairs = resolve(input_path, criteria)
    os.makedirs(settings.output_dir, exist_ok=True)
    results: dict[str, Any] = {
        "input": input_path,
        "model": client.model,
        "base_url": client.base_url,
        "criteria": {},
    }
    for name, path in pairs:
        entry, lines = judge_criterion(client, name, path, settings)
        results["criteria"][name] = entry
        print("\n".join(lines), flush=True)
    entries = results["criteria"].values()
    results["complete"] = all(e["judged"] == e["questions"] for e in entries)
    vcg = [n for n in VCG_CRITERIA if n in results["criteria"]]
    if vcg:  # the average score per criterion, as the paper's VCGBench table reports them
        results["vcgbench"] = {n: results["criteria"][n]["summary"]["average_score"] for n in vcg}
    out = os.path.join(settings.output_dir, "results.json")
    _write_json(out, results)
    print(f"results: {out}", flush=True)
    if not results["complete"]:
        missing = sum(e["questions"] - e["judged"] for e in entries)
        total = sum(e["questions"] for e in entries)
        raise IncompleteError(
            f"{missing} of {total} questions have no verdict yet (named under 'unparsable' and "
            f"'failed' in {out}); rerun the same command to ask them again (verdicts are kept)"
        )
    return results
