"""``python -m ppllava_jax.judge`` against a scripted local OpenAI-compatible server
(tests/judge/chat_server.py): the exact prompts of the original's judge scripts (written below
from ``ppllava/test/gpt_evaluation/*.py``, file:line cited), retries (a timeout, HTTP 429 and
503, a body that is not JSON), unparsable replies counted and named, resume without asking an
answered question again, and the summaries the original prints (its summary loops transcribed
below, applied to the verdicts the server gave)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ppllava_jax.judge.__main__ as judge_cli
from ppllava_jax.evaluate.openqa import qa_judge_record
from ppllava_jax.judge.run import IncompleteError
from tests.judge.chat_server import ChatServer, Reply, ok, user_text
from tests.judge.original import (
    original_keys,
    original_prompts,
    original_qa_summary,
    original_vcg_summary,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "judge-model"
FAST = ["--backoff", "0.01", "--timeout", "0.5", "--no_progress", "--api_key_env", "JUDGE_KEY"]


def scripted(plan: dict[str, list[Reply]]):
    """A server script: the replies for the request whose user message holds a plan key,
    the n-th request of the same messages getting the n-th reply (the last one repeats)."""

    def script(body, n):
        text = user_text(body)
        (key,) = [k for k in plan if k in text]
        replies = plan[key]
        return replies[min(n, len(replies) - 1)]

    return script


def verdict_of(reply: Reply):
    """What the original stores for a scripted reply: ``ast.literal_eval`` of its message."""
    return ast.literal_eval(json.loads(reply.body)["choices"][0]["message"]["content"])


def run_judge(args: list[str]) -> dict | None:
    """``python -m ppllava_jax.judge ARGS`` in this process (IncompleteError propagates)."""
    return judge_cli.main([*args, *FAST])


# ----------------------------------------------------------------------------- open QA

QA_ROWS = [  # (id, question, answer, pred, [replies]); the final reply is the verdict
    ("v_1", "what is he doing?", "drumming", "he plays drums", [ok("{'pred': 'yes', 'score': 4}")]),
    ("v_1", "who plays?", "a boy", "a girl", [Reply(429, "{}", {"Retry-After": "0"}),
                                              ok("{'pred': 'no', 'score': 1}")]),
    (7, "where is it?", "a park", "outdoors, a park", [Reply(body="{not json"),
                                                      ok('{"pred": "yes", "score": 5}')]),
    ("v_3", "is it day?", "yes", "it is day", [Reply(delay=1.5), ok("{'pred': 'Yes'}")]),
    ("v_4", "how many?", 2, "three", [Reply(503, "busy"), ok("[{'pred': 'no', 'score': 2}]")]),
    ("v_5", "what colour?", "red", "reddish", [ok("The answer is yes, 4.")]),
    ("v_6", "why?", "no reason", "because", [Reply(500, "down")]),
]  # fmt: skip


def _qa_input(tmp_path) -> tuple[Path, list[dict]]:
    records = [qa_judge_record(pred, a, q, i) for i, q, a, pred, _ in QA_ROWS]
    path = tmp_path / "anet_pred.json"
    path.write_text(json.dumps(records))
    return path, records


def test_qa_prompts_retries_unparsable_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    path, records = _qa_input(tmp_path)
    plan = {f"Predicted Answer: {row[3]}\n": row[4] for row in QA_ROWS}
    out = tmp_path / "judged"
    args = ["--input", str(path), "--model", MODEL, "--output_dir", str(out), "--retries", "2"]
    with ChatServer(scripted(plan)) as server:
        with pytest.raises(IncompleteError, match=r"^2 of 7 questions have no verdict yet"):
            run_judge([*args, "--base_url", server.url])
        first = list(server.requests)
    keys = original_keys(records, "id")
    # every request: the original's two messages, the model, nothing else, the key
    asks = {"v_5_0": 1 + 2, "v_6_0": 1 + 2}  # --parse_retries 2 (unparsable), --retries 2 (500)
    for (_, q, a, pred, replies), key in zip(QA_ROWS, keys):
        system, user = original_prompts(q, a, pred)["qa"]
        want = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        sent = [(h, b) for h, b in first if f"Predicted Answer: {pred}\n" in user_text(b)]
        assert sent and all(b == {"model": MODEL, "messages": want} for _, b in sent), key
        assert all(h["Authorization"] == "Bearer test-key" for h, _ in sent)
        # one request per scripted reply: each failure retried until the verdict
        assert len(sent) == asks.get(key, len(replies)), key
    results = json.loads((out / "results.json").read_text())
    qa = results["criteria"]["qa"]
    assert results["complete"] is False
    reply = "The answer is yes, 4."
    why = "not a Python literal (SyntaxError)"
    assert qa["unparsable"] == [{"key": "v_5_0", "why": why, "reply": reply}]
    assert qa["failed"] == [{"key": "v_6_0", "error": "HTTP 500: down (after 3 tries)"}]
    verdicts = {k: verdict_of(row[4][-1]) for k, row in zip(keys, QA_ROWS) if k not in asks}
    qa_sets = {
        k: {"q": r["question"], "a": r["answer"], "pred": r["pred"]} for k, r in zip(keys, records)
    }  # noqa: E501
    combined = {k: [verdicts[k], qa_sets[k]] for k in keys if k in verdicts}
    assert json.loads((out / "qa.json").read_text()) == combined
    for k, content in combined.items():  # the original's per-question files
        assert json.loads((out / "qa" / f"{k}.json").read_text()) == content
    assert not (out / "qa" / "v_5_0.json").exists() and not (out / "qa" / "v_6_0.json").exists()
    assert qa["printed"] == original_qa_summary(combined)
    assert (qa["questions"], qa["asked"], qa["judged"]) == (7, 7, 5)

    # rerun: only the two questions without a verdict are asked; now they get one
    plan["Predicted Answer: reddish\n"] = [ok("{'pred': 'yes', 'score': 3}")]
    plan["Predicted Answer: because\n"] = [ok("{'pred': 'no', 'score': 0}")]
    with ChatServer(scripted(plan)) as server:
        res = run_judge([*args, "--base_url", server.url])
        asked = sorted(user_text(b) for _, b in server.requests)
    assert asked == sorted(original_prompts(*r[1:4])["qa"][1] for r in QA_ROWS[-2:])
    for key, row in zip(keys[-2:], QA_ROWS[-2:]):
        combined[key] = [verdict_of(plan[f"Predicted Answer: {row[3]}\n"][-1]), qa_sets[key]]
    qa = res["criteria"]["qa"]
    assert res["complete"] and qa["unparsable"] == [] and qa["failed"] == []
    assert (qa["judged_before"], qa["asked"]) == (5, 2)
    assert qa["printed"] == original_qa_summary(combined)
    assert qa["summary"]["score_defaulted"] == ["v_3_0"]  # {'pred': 'Yes'}: scored 3
    assert json.loads((out / "results.json").read_text()) == res

    # once every question has a verdict nothing is asked; a changed prediction is asked again
    with ChatServer(scripted(plan)) as server:
        again = run_judge([*args, "--base_url", server.url])["criteria"]["qa"]
        assert server.requests == [] and (again["asked"], again["judged_before"]) == (0, 7)
    assert (again["summary"], again["printed"]) == (qa["summary"], qa["printed"])
    records[0]["pred"] = "he sings"
    path.write_text(json.dumps(records))
    plan["Predicted Answer: he sings\n"] = [ok("{'pred': 'no', 'score': 0}")]
    with ChatServer(scripted(plan)) as server:
        res = run_judge([*args, "--base_url", server.url])
        assert len(server.requests) == 1 and "he sings" in user_text(server.requests[0][1])
    qa_sets[keys[0]] = {"q": records[0]["question"], "a": "drumming", "pred": "he sings"}
    combined[keys[0]] = [{"pred": "no", "score": 0}, qa_sets[keys[0]]]
    assert res["criteria"]["qa"]["printed"] == original_qa_summary(combined)


# ----------------------------------------------------------------------------- VCGBench

GENERAL = [
    {"pred": "a clip of shapes", "A": "A clip.", "Q": "What happens?", "video_name": "v_one"},
    {"pred": "I don't know", "A": "Nothing.", "Q": "What else?", "video_name": "v_one"},
]
TEMPORAL = [{"pred": "red then blue", "A": "Red.", "Q": "What comes first?", "video_name": "v_two"}]
CONSIST = [
    {"pred1": "red", "pred2": "crimson", "video_name": "v_one", "A": "Red.", "Q1": "Colour?",
     "Q2": "Which colour?"},
]  # fmt: skip
SYSTEM_WORDS = {  # a phrase of each criterion's system message
    "correctness": "factual accuracy of generative",
    "detail": "detail orientation of generative",
    "context": "contextual understanding of generative",
    "temporal": "temporal understanding of generative",
    "consistency": "consistency of generative",
}
VCG_REPLIES = {  # (criterion, pred) -> replies
    ("correctness", "a clip of shapes"): [ok("{'score': 4}")],
    ("correctness", "I don't know"): [ok("0")],  # no 'score': the original counts 0
    ("detail", "a clip of shapes"): [ok("{'score': 3}")],
    ("detail", "I don't know"): [ok("{'score': 2}")],
    ("context", "a clip of shapes"): [ok("{'score': '5'}")],
    ("context", "I don't know"): [ok("{'score': 1}")],
    ("temporal", "red then blue"): [ok("{'pred': 'yes'}"), ok("{'score': 2}")],  # asked again
    ("consistency", "red"): [ok("{'score': 5}")],
}


def _vcg_script(body, n):
    system = body["messages"][0]["content"]
    (criterion,) = [c for c, words in SYSTEM_WORDS.items() if words in system]
    text = user_text(body)
    (pred,) = [p for c, p in VCG_REPLIES if c == criterion and f": {p}\n" in text]
    replies = VCG_REPLIES[criterion, pred]
    return replies[min(n, len(replies) - 1)]


def _vcg_input(tmp_path) -> Path:
    """What eval.py --benchmark vcgbench --out vcg.json writes: the results file and the three
    saved files beside it."""
    files = {}
    for name, rows in (("general", GENERAL), ("temporal", TEMPORAL), ("consist", CONSIST)):
        path = tmp_path / f"vcg_{name}.json"
        path.write_text(json.dumps(rows))
        files[f"{name}_file"] = str(path)
    results = tmp_path / "vcg.json"
    results.write_text(json.dumps({"benchmark": "vcgbench", "summary": files, "records": []}))
    return results


def test_vcgbench_five_criteria(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "k")
    path = _vcg_input(tmp_path)
    with ChatServer(_vcg_script) as server:
        res = run_judge(["--input", str(path), "--model", MODEL, "--base_url", server.url])
        sent = [b["messages"] for _, b in server.requests]
    assert list(res["criteria"]) == ["correctness", "detail", "context", "temporal", "consistency"]
    assert os.path.isdir(tmp_path / "vcg_judge" / "temporal")  # default: <input>_judge/
    keys = original_keys([dict(r) for r in GENERAL], "video_name")
    for criterion in ("correctness", "detail", "context"):
        for r in GENERAL:
            system, user = original_prompts(r["Q"], r["A"], r["pred"])[criterion]
            assert [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ] in sent
    system, user = original_prompts(TEMPORAL[0]["Q"], TEMPORAL[0]["A"], TEMPORAL[0]["pred"])[
        "temporal"
    ]
    assert (
        sent.count([{"role": "system", "content": system}, {"role": "user", "content": user}]) == 2
    )
    c = CONSIST[0]
    # evaluate_benchmark_5_consistency.py:120-121: question2 = sample['Q1']
    system, user = original_prompts(
        question1=c["Q1"], question2=c["Q1"], answer=c["A"], pred1=c["pred1"], pred2=c["pred2"]
    )["consistency"]
    assert [{"role": "system", "content": system}, {"role": "user", "content": user}] in sent
    assert len(sent) == 3 * 2 + 2 + 1
    inputs = {"correctness": GENERAL, "detail": GENERAL, "context": GENERAL,
              "temporal": TEMPORAL, "consistency": CONSIST}  # fmt: skip
    for criterion, rows in inputs.items():
        entry = res["criteria"][criterion]
        ks = original_keys(rows, "video_name")
        qa_sets = (
            [{"q1": r["Q1"], "q2": r["Q1"], "a": r["A"], "pred1": r["pred1"], "pred2": r["pred2"]}
             for r in rows]
            if criterion == "consistency"
            else [{"q": r["Q"], "a": r["A"], "pred": r["pred"]} for r in rows]
        )  # fmt: skip
        preds = [r.get("pred", r.get("pred1")) for r in rows]
        combined = {
            k: [verdict_of(VCG_REPLIES[criterion, p][-1]), s] for k, p, s in zip(ks, preds, qa_sets)
        }
        assert json.loads((tmp_path / "vcg_judge" / f"{criterion}.json").read_text()) == combined
        printed = original_vcg_summary(criterion, combined)
        assert entry["printed"] == printed, criterion
        assert res["vcgbench"][criterion] == float(printed[0].rsplit(" ", 1)[1])
        assert entry["unparsable"] == [] and entry["failed"] == []
    assert res["criteria"]["correctness"]["summary"]["no_score"] == [keys[1]]

    # --consistency_question2 Q2 sends each question
    with ChatServer(_vcg_script) as server:
        out = str(tmp_path / "q2")
        consist = str(tmp_path / "vcg_consist.json")
        q2 = ["--consistency_question2", "Q2"]
        run_judge(
            [
                "--input",
                consist,
                "--model",
                MODEL,
                "--base_url",
                server.url,
                "--output_dir",
                out,
                *q2,
            ]
        )
        ((_, body),) = server.requests
    assert f"Question 1: {c['Q1']}\nQuestion 2: {c['Q2']}\n" in user_text(body)


# ----------------------------------------------------------------------------- mistakes


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ppllava_jax.judge", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip


def _one_error_line(res: subprocess.CompletedProcess, code: int, start: str) -> None:
    assert res.returncode == code, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), res.stderr
    assert "Traceback" not in res.stderr


def test_help_and_command_line_mistakes(tmp_path):
    res = _cli(["--help"], {})
    assert res.returncode == 0 and "python -m ppllava_jax.judge --input " in res.stdout
    res = _cli(["--input", "x.json"], {})
    _one_error_line(res, 2, "error: the following arguments are required: --model")
    res = _cli(["--input", "x.json", "--model", "m", "--criteria", "qa,speed"], {})
    _one_error_line(res, 2, "error: --criteria: unknown ['speed']")


def test_user_mistakes_are_one_line(tmp_path):
    path, _ = _qa_input(tmp_path)
    key = {"OPENAI_API_KEY": "k"}
    res = _cli(["--input", str(tmp_path / "nowhere.json"), "--model", "m"], key)
    _one_error_line(res, 1, f"error: --input {tmp_path / 'nowhere.json'}: no such file")
    res = _cli(["--input", str(path), "--model", "m", "--base_url", "localhost:8000/v1"], key)
    _one_error_line(res, 1, "error: --base_url 'localhost:8000/v1' is not an http(s) URL")
    env = {"OPENAI_API_KEY": ""}
    res = _cli(["--input", str(path), "--model", "m"], env)
    _one_error_line(res, 1, "error: no API key: the environment variable OPENAI_API_KEY is not set")
    with ChatServer(lambda body, n: Reply(401, '{"error": "bad key"}')) as server:
        res = _cli(["--input", str(path), "--model", "m", "--base_url", server.url], key)
        _one_error_line(res, 1, "error: POST ")
        assert "HTTP 401: the endpoint refused the API key" in res.stderr
        no_v1 = server.url.removesuffix("/v1")
        res = _cli(["--input", str(path), "--model", "m", "--base_url", no_v1], key)
        _one_error_line(res, 1, "error: POST ")
        assert "HTTP 404: no chat completions there (check --base_url" in res.stderr
    res = _cli(["--input", str(path), "--model", "m", "--base_url", server.url], key)  # closed
    _one_error_line(res, 1, f"error: cannot reach --base_url {server.url}/chat/completions")
    mvbench = tmp_path / "mvbench.json"
    mvbench.write_text(json.dumps({"benchmark": "mvbench", "summary": {"accuracy": 0.5}}))
    res = _cli(["--input", str(mvbench), "--model", "m"], key)
    _one_error_line(res, 1, f"error: --input {mvbench}: a results file of benchmark 'mvbench'")


def test_verdicts_of_another_model_are_not_mixed(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "k")
    path, _ = _qa_input(tmp_path)
    plan = {f"Predicted Answer: {row[3]}\n": [ok("{'pred': 'yes', 'score': 5}")] for row in QA_ROWS}
    with ChatServer(scripted(plan)) as server:
        args = ["--input", str(path), "--base_url", server.url, "--output_dir", str(tmp_path / "o")]
        run_judge([*args, "--model", MODEL])
        with pytest.raises(ValueError, match=r"holds the qa verdicts of judge model 'judge-model'"):
            run_judge([*args, "--model", "other-model"])
