"""Preference annotations (data/dpo.py): parsing, loading, skipping bad pairs."""

import json

import pytest

from ppllava_jax.data import dpo
from ppllava_jax.data.errors import AnnotationError
from ppllava_jax.data.skips import LoadCounter


def test_chosen_spellings_and_earlier_turns():
    raw = {
        "video": "v.mp4",
        "QA": [{"q": "a?", "a": "yes"}, {"q": "b?", "chosen": "no", "rejected": "so"}],
    }
    s = dpo.parse_dpo_sample(raw, "f.json", 3, data_root="/r")
    assert [t.a for t in s.turns] == ["yes", "no"] and s.extra["rejected"] == "so"
    assert s.media == ("/r/v.mp4",) and s.index == 3
    same = {"video": "v", "QA": [{"q": "q", "a": "y", "chosen": "y", "rejected": "n"}]}
    assert dpo.parse_dpo_sample(same, "f", 0).turns[-1].a == "y"  # a == chosen is allowed


@pytest.mark.parametrize(
    "qa, msg",
    [
        ([{"q": "q", "a": "y"}], "no 'rejected'"),
        ([{"q": "q", "a": "y", "rejected": "  "}], "no 'rejected'"),
        ([{"q": "q", "a": "y", "rejected": " y "}], "equal"),
        ([{"q": "q", "a": "y", "chosen": "z", "rejected": "n"}], "both 'a' and 'chosen'"),
        ([{"q": "q", "rejected": "n"}], "must be a non-empty string"),
    ],
)
def test_bad_pairs_name_the_sample(qa, msg):
    with pytest.raises(AnnotationError, match=rf"f\.json \[sample 5\].*{msg}"):
        dpo.parse_dpo_sample({"video": "v", "QA": qa}, "f.json", 5)


def test_load_skips_and_counts_bad_pairs(tmp_path):
    good = {"video": "v.mp4", "QA": [{"q": "q", "a": "y", "rejected": "n"}]}
    bad = {"video": "v.mp4", "QA": [{"q": "q", "a": "y"}]}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, bad, good]))
    counter = LoadCounter()
    pairs = dpo.load_dpo_annotation_file(str(path), skipped=counter)
    assert [p.index for p in pairs] == [0, 2] and all(p.extra["rejected"] == "n" for p in pairs)
    assert counter.total == 1 and counter.by_reason == {"bad_annotation": 1}
    with pytest.raises(AnnotationError, match=r"\[sample 1\]"):
        dpo.load_dpo_annotation_file(str(path), on_error="raise")
