"""``evaluate/answers.py``: the answers files' names, reading and appending (cut lines from a
kill), and ``resume`` (keyed on the protocol: refused, resumed or started afresh). The run
through the model is in test_reliability.py / test_runner.py."""

import json
import os

import pytest

from ppllava_jax.evaluate import answers


def test_answers_file_names(tmp_path):
    out = str(tmp_path / "res.json")
    assert answers.answers_path(out, 0) == str(tmp_path / "res.answers.jsonl")
    assert answers.answers_path(out, 3) == str(tmp_path / "res.answers.host3.jsonl")
    assert answers.answers_path(out) == answers.answers_path(out, 0)  # one process here
    assert answers.protocol_path(out) == str(tmp_path / "res.answers.protocol.json")
    for p in (answers.answers_path(out, 0), answers.answers_path(out, 1)):
        open(p, "w").close()
    open(tmp_path / "res2.answers.jsonl", "w").close()  # another --out's answers
    assert answers.answer_files(out) == [
        str(tmp_path / "res.answers.host1.jsonl"),
        str(tmp_path / "res.answers.jsonl"),
    ]


def test_records_round_trip_and_cut_lines(tmp_path):
    out = str(tmp_path / "res.json")
    path = answers.answers_path(out, 0)
    with answers.open_answers(path) as sink:
        answers.append_records(sink, [{"id": "a", "p": 1}, {"id": "b", "p": 2}])
    with open(path, "a") as f:
        f.write('{"id": "c", "p"')  # a kill in the middle of a write
    # the next writer starts on a line of its own; the cut record is not read
    with answers.open_answers(path) as sink:
        answers.append_records(sink, [{"id": "a", "p": 3}])
    with open(answers.answers_path(out, 1), "w") as f:
        f.write('{"id": "d", "p": 4}\n\n[1, 2]\n{"no_id": 1}\n')
    recs = answers.answer_records(out)
    assert [r["id"] for r in recs] == ["d", "a", "b", "a"]  # host1's file sorts first
    assert answers.read_answers(out) == {
        "a": {"id": "a", "p": 3},  # the last record of a question wins
        "b": {"id": "b", "p": 2},
        "d": {"id": "d", "p": 4},
    }
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[2] == '{"id": "c", "p"' and json.loads(lines[3]) == {"id": "a", "p": 3}


def test_resume_keyed_on_the_protocol(tmp_path):
    out = str(tmp_path / "res.json")
    proto = {"checkpoint_id": "abc", "benchmark": "synthetic", "num_frames": 8}
    # nothing yet: the protocol is recorded, nothing answered
    assert answers.resume(out, proto, "synthetic", checkpoint=str(tmp_path)) == {}
    assert answers.read_protocol(out) == (proto, os.path.realpath(str(tmp_path)))
    with answers.open_answers(answers.answers_path(out)) as sink:
        answers.append_records(sink, [{"id": "q1", "correct": True}])
    # the same protocol: resumed
    assert answers.resume(out, proto, "synthetic") == {"q1": {"id": "q1", "correct": True}}
    # another one: refused, naming what differs, the answers kept
    other = {**proto, "num_frames": 4}
    with pytest.raises(answers.AnswersMismatchError, match="num_frames: 8 in the file, 4 now"):
        answers.resume(out, other, "synthetic")
    assert answers.read_answers(out) == {"q1": {"id": "q1", "correct": True}}
    # fresh: deleted, started again under the new protocol
    assert answers.resume(out, other, "synthetic", fresh=True) == {}
    assert answers.answer_files(out) == [] and answers.read_protocol(out)[0] == other


def test_refusal_counts_every_record(tmp_path):
    out = str(tmp_path / "res.json")
    with answers.open_answers(answers.answers_path(out)) as sink:
        answers.append_records(sink, [{"id": "q1"}, {"id": "q2"}, {"id": "q1"}])
    with pytest.raises(answers.AnswersMismatchError, match=r"(?s)hold 3 answers.*is missing"):
        answers.check_answers(out, {"benchmark": "x"})


def test_benchmark_settings_are_its_public_plain_attributes(tmp_path):
    class Bench:
        name = "toy"

        def __init__(self):
            self.root = str(tmp_path)
            self.num_frames = 8
            self.split = "eval"
            self._cache = {"not": "kept"}
            self.tokenizer = object()  # not a plain value: left out

    assert answers.benchmark_settings(Bench()) == {
        "benchmark": "toy",
        "num_frames": 8,
        "root": os.path.abspath(str(tmp_path)),
        "split": "eval",
    }
