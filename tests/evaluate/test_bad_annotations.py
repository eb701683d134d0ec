"""A malformed annotation item (a missing field, a wrong type) does not stop an evaluation
(issue 22, item 1): every benchmark reader skips it, names its file, item, question id and
what is wrong (``Benchmark.bad_items``); ``eval.py`` lists the questions without an answer in
the results file, fails with one line above ``--max_missing``, and says when it resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppllava_jax.evaluate.mvbench import MVBench
from ppllava_jax.evaluate.openqa import OpenQA, VCGBench
from ppllava_jax.evaluate.synthetic import Synthetic
from ppllava_jax.evaluate.videomme import VideoMME
from tests.evaluate.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def _bad(bench) -> dict[str, tuple[str, int, str]]:
    return {b.qid: (b.path, b.index, b.reason) for b in bench.bad_items()}


def test_mvbench_skips_and_names_bad_items(tmp_path):
    good = {"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "y"}
    path = _write(
        tmp_path / "json" / "object_shuffle.json",
        [good, {**good, "answer": None}, {**good, "candidates": 5}, "not an item"],
    )
    bench = MVBench(str(tmp_path))
    assert [q.qid for q in bench.questions()] == ["object_shuffle:0"]
    bad = _bad(bench)
    assert bad["object_shuffle:1"] == (path, 1, "field 'answer' is missing")
    assert bad["object_shuffle:2"] == (
        path,
        2,
        "field 'candidates' must be of type list, got int 5",
    )
    assert bad["object_shuffle:3"][2] == "an item must be an object, got str"
    # a bounded task's item without its bound, or with a text for one
    bounded = _write(
        tmp_path / "json" / "action_sequence.json",
        [{**good, "start": 1.0}, {**good, "start": "1", "end": 2}],
    )
    bench.questions()
    assert _bad(bench)["action_sequence:0"][:2] == (bounded, 0)
    assert "start/end bound" in _bad(bench)["action_sequence:0"][2]
    assert (
        "field 'start' must be of type int or float, got str" in _bad(bench)["action_sequence:1"][2]
    )


def test_videomme_skips_rows_with_null_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"videoID": "v1", "duration": "short", "question_id": "001-1", "question": "Q?",
           "options": ["A. a", "B. b"], "answer": "A", "task_type": "t"}  # fmt: skip
    rows = [row, {**row, "question_id": "001-2", "options": None}, {**row, "question_id": None}]
    (tmp_path / "videomme").mkdir()
    path = str(tmp_path / "videomme" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    bench = VideoMME(str(tmp_path))
    assert [q.qid for q in bench.questions()] == ["001-1"]
    bad = _bad(bench)
    assert bad["001-2"] == (path, 1, "field 'options' is missing")
    # no id to name it by: the file name and the row
    assert bad["test-00000-of-00001.parquet:2"] == (path, 2, "field 'question_id' is missing")


def test_open_qa_and_vcgbench_skip_bad_items(tmp_path):
    path = _write(
        tmp_path / "msrvtt" / "test_qa.json",
        [
            {"video_id": 7, "question": "who?", "answer": "man", "id": 1},
            {"video_id": 8, "answer": "dog", "id": 2},  # no question
            {"video_id": 9, "question": ["what?"], "answer": "x", "id": 3},
            {"video_id": 9, "question": "what?", "answer": "x"},  # no id
        ],
    )
    qa = OpenQA(path, dataset="msrvtt")
    assert [q.qid for q in qa.questions()] == ["1"]
    bad = _bad(qa)
    assert bad["2"] == (path, 1, "field 'question' is missing")
    assert bad["3"] == (path, 2, "field 'question' must be of type str, got list ['what?']")
    assert bad["test_qa.json:3"] == (path, 3, "field 'id' is missing")

    qa_dir = tmp_path / "vcg" / "Benchmarking_QA"
    _write(qa_dir / "generic_qa.json", [{"Q": "What?", "A": "It.", "video_name": "v"}, {"Q": 1}])
    cons = _write(
        qa_dir / "consistency_qa.json",
        [{"Q1": "a?", "A": "b", "video_name": "v"}, {"Q1": "a?", "Q2": "c?", "A": "b",
                                                      "video_name": "v"}],
    )  # fmt: skip
    vcg = VCGBench(str(tmp_path / "vcg"))
    assert [q.qid for q in vcg.questions()] == [
        "generic:0:Q", "consistency:1:Q1", "consistency:1:Q2"
    ]  # fmt: skip
    bad = _bad(vcg)
    assert bad["generic:1:Q"][1:] == (1, "field 'video_name' is missing")
    # both questions of a consistency item go: the judge needs the pair
    assert bad["consistency:0:Q1"] == bad["consistency:0:Q2"] == (cons, 0, "field 'Q2' is missing")


def test_a_file_that_is_no_list_is_named(tmp_path):
    from ppllava_jax.data.errors import AnnotationError

    path = _write(tmp_path / "json" / "object_shuffle.json", {"video": "a.mp4"})
    with pytest.raises(AnnotationError, match="expected a JSON list") as e:
        MVBench(str(tmp_path)).questions()
    assert e.value.path == path


def test_synthetic_skips_bad_items(tmp_path):
    good = {"video": "videos/a.mp4", "QA": [{"q": "Q?", "a": "red"}], "answer_letter": "A",
            "candidates": ["red", "blue"]}  # fmt: skip
    path = _write(tmp_path / "eval.json", [{**good, "QA": []}, good, {**good, "video": 3}])
    bench = Synthetic(str(tmp_path))
    assert [q.qid for q in bench.questions()] == ["eval:1"]
    assert _bad(bench) == {
        "eval:0": (path, 0, "field 'QA' is empty"),
        "eval:2": (path, 2, "field 'video' must be of type str, got int 3"),
    }


# --------------------------------------------------------------------------------------
# eval.py as a user runs it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("badann")
    ckpt = make_tiny_checkpoint(str(root / "ckpt"), str(root / "data"))
    data = root / "broken"  # the demo set with 2 of its 8 held-out items broken
    shutil.copytree(root / "data", data)
    items = json.loads((data / "eval.json").read_text())
    del items[1]["QA"]
    items[3]["candidates"] = 5
    (data / "eval.json").write_text(json.dumps(items))
    return ckpt, data


def _eval(ckpt, data, out, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("PPLLAVA_TRACEBACK", None)
    cmd = [sys.executable, "eval.py", "--checkpoint", str(ckpt), "--benchmark", "synthetic",
           "--data", str(data), "--out", str(out), "--batch_size", "8", "--max_new_tokens", "2",
           "--mesh", "data=1,fsdp=1,tensor=1", "--no_progress", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_eval_py_skips_bad_items_lists_them_and_fails_above_the_share(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "results_eval.json"
    res = _eval(ckpt, data, out)  # 2 of 8 missing > the default 5%
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        "error: synthetic: 2 of 8 questions (25.0%) have no answer, more than "
        "--max_missing=0.05: 2 malformed annotation items, 0 unreadable videos (the log names "
        f"each); their ids are under missing_ids in {out} (the first: eval:1, eval:3). Fix the "
        "data, or raise --max_missing to accept the scores"
    ]
    # each skipped item is named in the log: file, item, question id and what is wrong
    eval_json = str(data / "eval.json")
    assert f"{eval_json} [item 1, question eval:1]: field 'QA' is missing" in res.stderr
    assert f"{eval_json} [item 3, question eval:3]: field 'candidates' must be of type list" in (
        res.stderr
    )
    result = json.loads(out.read_text())  # written before failing
    assert result["missing_ids"] == ["eval:1", "eval:3"]
    assert [(b["qid"], b["index"]) for b in result["bad_annotations"]] == [
        ("eval:1", 1), ("eval:3", 3)
    ]  # fmt: skip
    s = result["summary"]
    assert (s["num_questions"], s["num_missing"], s["bad_annotations"]) == (8, 2, 2)
    assert len(result["records"]) == 6

    # a looser share: the same command resumes (saying so) and succeeds
    again = _eval(ckpt, data, out, "--max_missing", "0.3")
    assert again.returncode == 0, again.stderr[-3000:]
    answers = str(tmp_path / "results_eval.answers.jsonl")
    assert f"synthetic: resuming {answers}: 6 of 6 questions answered before, 0 to go" in (
        again.stdout
    )
    assert "bad_annotations: 2" in again.stdout and "num_missing: 2" in again.stdout
