"""``evaluate/common.py``: the question contract, multiple-choice records and summaries, the
printed table."""

import pytest

from ppllava_jax.data.video import FrameRule
from ppllava_jax.evaluate.common import (
    Question,
    accuracy_by,
    format_table,
    mc_record,
    mc_summary,
    results_path,
    scalar_metrics,
)


def _q(qid="q", answer="B", qtype="colour"):
    return Question(
        qid=qid,
        video="v.mp4",
        prompt="Which?",
        answer=answer,
        num_frames=8,
        candidates=("red", "green", "blue"),
        info={"qtype": qtype},
    )


def test_question_contract():
    assert _q().frame_count == 8 and not _q().exact
    exact = Question(qid="e", video="v", prompt_text="USER: x", clip_text="x", frames=FrameRule(16))
    assert exact.exact and exact.frame_count == 16
    with pytest.raises(ValueError, match="needs clip_text and frames"):
        Question(qid="e", video="v", prompt_text="USER: x")
    with pytest.raises(ValueError, match="must not start with <s>"):
        Question(qid="e", video="v", prompt_text="<s>USER: x", clip_text="x", frames=FrameRule(4))
    with pytest.raises(ValueError, match="give prompt_text"):
        Question(qid="t", video="v", prompt="Which?")  # no frames


def test_mc_record_reads_the_letter_or_the_option_text():
    r = mc_record(_q(), "(B) green")
    assert r == {
        "id": "q",
        "prediction": "(B) green",
        "pred_letter": "B",
        "answer": "B",
        "correct": True,
        "qtype": "colour",
    }
    assert mc_record(_q(), "blue")["pred_letter"] == "C" and not mc_record(_q(), "blue")["correct"]
    assert mc_record(_q(), "no idea")["pred_letter"] is None


def test_accuracy_and_summary():
    recs = [
        mc_record(_q("1", "A", "colour"), "red"),
        mc_record(_q("2", "B", "colour"), "red"),
        mc_record(_q("3", "C", "shape"), "blue"),
        mc_record(_q("4", "A", "shape"), "?"),
    ]
    assert accuracy_by(recs, None) == {"all": {"accuracy": 0.5, "correct": 2, "total": 4}}
    assert accuracy_by(recs, "qtype") == {
        "colour": {"accuracy": 0.5, "correct": 1, "total": 2},
        "shape": {"accuracy": 0.5, "correct": 1, "total": 2},
    }
    s = mc_summary(recs, "qtype", num_questions=5)
    assert (s["accuracy"], s["correct"], s["answered"]) == (0.5, 2, 4)
    assert (s["num_questions"], s["num_missing"], s["unparsed"]) == (5, 1, 1)
    assert s["by_qtype"]["shape"]["correct"] == 1
    table = format_table(s, "== toy ==").splitlines()
    assert table[0] == "== toy =="
    assert table[2].split() == ["colour", "1", "2", "50.00%"]
    assert table[4].split() == ["overall", "2", "4", "50.00%"]
    assert "num_missing: 1" in table and "unparsed: 1" in table


def test_two_verdict_table():
    row = dict(
        correct_original=3, counted_original=4, accuracy_original=0.75,
        correct_strict=2, counted_strict=4, accuracy_strict=0.5,
    )  # fmt: skip
    table = format_table({**row, "by_task": {"t1": row}, "num_questions": 4}, "mv").splitlines()
    assert "original (paper)" in table[1] and "strict" in table[1]
    assert table[2].split() == ["t1", "3/4", "75.00%", "2/4", "50.00%"]
    assert table[3].split()[0] == "overall" and "num_questions: 4" in table


def test_scalar_metrics_for_tensorboard():
    recs = [mc_record(_q("1", "A", "colour"), "red"), mc_record(_q("2", "B", "shape"), "red")]
    m = scalar_metrics({**mc_summary(recs, "qtype", num_questions=3), "answers_file": "x.json"})
    assert m == {
        "accuracy": 0.5,
        "correct": 1.0,
        "answered": 2.0,
        "num_questions": 3.0,
        "num_missing": 1.0,
        "unparsed": 0.0,
        "accuracy/colour": 1.0,
        "accuracy/shape": 0.0,
    }
    two = {"accuracy_original": 0.75, "accuracy_strict": 0.5, "acc_dict": {"Total Acc": 75.0}}
    two["by_task_type"] = {
        "t1": {"accuracy_original": 1.0, "accuracy_strict": 0.5, "correct_original": 2}
    }
    assert scalar_metrics(two) == {
        "accuracy_original": 0.75,
        "accuracy_strict": 0.5,
        "accuracy_original/t1": 1.0,
        "accuracy_strict/t1": 0.5,
    }


def test_results_are_named_after_the_split(tmp_path):
    assert results_path(tmp_path, "eval") == str(tmp_path / "results_eval.json")
    assert results_path(str(tmp_path), "train") == str(tmp_path / "results_train.json")


def test_resolve_frame_rule_reads_the_media_for_a_negative_count(tmp_path):
    from ppllava_jax.data.frame_index import eval_num_segments
    from ppllava_jax.evaluate.common import UNREADABLE_FRAMES, resolve_frame_rule

    rule = FrameRule(32, folder_fps=3.0)
    assert resolve_frame_rule("missing.mp4", rule) is rule  # a positive count: as given
    assert resolve_frame_rule("missing.mp4", FrameRule(0), assigned_frame=64).num_segments == 64
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 121):  # 120 files at 3 fps: 40 s
        (folder / f"{i:05d}.jpg").touch()
    for n in (-1, -2):
        got = resolve_frame_rule(str(folder), FrameRule(n, folder_fps=3.0))
        assert got.num_segments == eval_num_segments(n, 120, 3.0) and got.folder_fps == 3.0
    assert {resolve_frame_rule(str(folder), FrameRule(n)).num_segments for n in (-1, -2)} == {
        32,
        64,
    }
    # media that cannot be read: a positive count, so the pipeline reports the video unreadable
    got = resolve_frame_rule(str(tmp_path / "missing.mp4"), FrameRule(-1))
    assert got.num_segments == UNREADABLE_FRAMES
