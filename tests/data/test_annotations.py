"""The original annotation format: validation, skipping, mixtures."""

import json

import pytest

from ppllava_jax.data import annotations as A
from ppllava_jax.data.errors import AnnotationError

GOOD = [
    {"video": "v/a.mp4", "QA": [{"i": "Be brief.", "q": "What?", "a": "A cat."}], "id": 7},
    {"image": "i/b.jpg", "QA": [{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": "A2"}]},
    {"image": ["i/c.jpg", "/abs/d.jpg"], "QA": [{"q": "Same?", "a": "No."}]},
    {
        "video": "v/e.mp4",
        "media_type": "video",
        "start": 1.5,
        "end": 4,
        "QA": [{"q": "", "a": "x"}],
    },
    {"QA": [{"q": "text only", "a": "ok"}]},
]
BAD = [
    "not an object",
    {"video": "v.mp4"},  # no QA
    {"video": "v.mp4", "QA": []},
    {"video": "v.mp4", "QA": [{"q": "q"}]},  # no answer
    {"video": "v.mp4", "QA": [{"q": "q", "a": "a"}, {"q": "", "a": "b"}]},
    {"video": 3, "QA": [{"q": "q", "a": "a"}]},
    {"video": "v.mp4", "image": "i.jpg", "QA": [{"q": "q", "a": "a"}]},
    {"video": "v.mp4", "media_type": "image", "QA": [{"q": "q", "a": "a"}]},
    {"video": "v.mp4", "media_type": "audio", "QA": [{"q": "q", "a": "a"}]},
    {"video": "v.mp4", "start": 5, "end": 1, "QA": [{"q": "q", "a": "a"}]},
]


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_parse_good_samples(tmp_path):
    path = write(tmp_path, "good.json", GOOD)
    s = A.load_annotation_file(path, data_root="/data", on_error="raise")
    assert [x.media_type for x in s] == ["video", "image", "multi-image", "video", "text"]
    assert s[0].media == ("/data/v/a.mp4",) and s[0].system == "Be brief."
    assert s[0].extra == {"id": 7} and s[0].index == 0 and s[0].source == path
    assert s[1].turns[1].q == "Q2" and s[1].system is None
    assert s[2].media == ("/data/i/c.jpg", "/abs/d.jpg") and s[2].num_images == 2
    assert s[3].bound == (1.5, 4.0) and s[4].num_images == 0 and s[0].num_images == 1


def test_bad_samples_skipped_counted_or_raised(tmp_path):
    data = GOOD[:2] + BAD + GOOD[2:]
    path = write(tmp_path, "mixed.json", data)
    skipped = A.SkipCounter()
    s = A.load_annotation_file(path, on_error="skip", skipped=skipped)
    assert len(s) == len(GOOD) and skipped.total == len(BAD)
    assert skipped.by_kind == {"AnnotationError": len(BAD)}
    assert all(path in m for m in skipped.messages)
    assert all(f"[sample {i}]" in m for i, m in zip(range(2, 2 + len(BAD)), skipped.messages))
    with pytest.raises(AnnotationError, match=r"mixed\.json \[sample 2\]") as e:
        A.load_annotation_file(path, on_error="raise")
    assert e.value.index == 2
    for bad_file, content in (("x.json", "{not json"), ("y.json", '{"a": 1}')):
        p = tmp_path / bad_file
        p.write_text(content)
        with pytest.raises(AnnotationError, match=bad_file):
            A.load_annotation_file(str(p))
    with pytest.raises(AnnotationError, match="not found"):
        A.load_annotation_file(str(tmp_path / "missing.json"))


def test_sources_from_config_and_paths(tmp_path):
    a = write(tmp_path, "a.json", [GOOD[0]] * 10)
    b = write(tmp_path, "b.json", [GOOD[1]] * 4 + [BAD[1]])
    src_a = A.AnnotationSource.from_config({"path": a, "data_root": "/r", "weight": 0.5})
    src_b = A.AnnotationSource.from_config([b, "/s", "image", 2.0])
    assert src_a == A.AnnotationSource(a, "/r", None, 0.5)
    assert src_b == A.AnnotationSource(b, "/s", "image", 2.0)
    assert A.AnnotationSource.from_config(a) == A.AnnotationSource(a)
    skipped = A.SkipCounter()
    loaded = A.load_annotation_file(b, src_b.data_root, src_b.media_type, "skip", skipped)
    assert len(loaded) == 4 and skipped.total == 1
    assert loaded[0].media == ("/s/i/b.jpg",)
    with pytest.raises(ValueError, match="unknown annotation source fields"):
        A.AnnotationSource.from_config({"path": a, "wieght": 2})
    with pytest.raises(ValueError, match="weight must be >= 0"):
        A.AnnotationSource.from_config({"path": a, "weight": -1})
    with pytest.raises(ValueError, match="on_error"):
        A.load_annotation_file(a, on_error="ignore")


def test_eval_sample_keeps_prompt_clip_text_and_rule():
    from ppllava_jax.data.frame_index import FrameRule

    rule = FrameRule(8, bound=(1.0, 3.0))
    s = A.eval_sample("v.mp4", "USER: <image> Q? ASSISTANT:", "Q?", rule, index=3, extra={"qid": 7})
    assert s.media == ("v.mp4",) and s.bound == (1.0, 3.0) and s.index == 3
    assert s.extra[A.EVAL_PROMPT] == "USER: <image> Q? ASSISTANT:"
    assert s.extra[A.EVAL_CLIP] == "Q?" and s.extra[A.EVAL_FRAMES] is rule
    assert s.extra["qid"] == 7


def test_multi_image_under_the_originals_key():
    """The original reads a sample's media from ``ann[media_type]``: multi-image samples come
    as ``{"multi-image": [paths]}`` (joined to the data root; another media key besides is an
    error, as is anything but a non-empty list of paths)."""
    qa = [{"q": "q?", "a": "a"}]
    s = A.parse_sample({"multi-image": ["b.png", "a.png"], "QA": qa}, "f", 0, "root")
    assert s.media_type == "multi-image" and s.num_images == 2
    assert s.media == ("root/b.png", "root/a.png") and "multi-image" not in s.extra
    typed = A.parse_sample({"multi-image": ["a.png"], "QA": qa}, "f", 0, media_type="multi-image")
    assert typed.media == ("a.png",)
    for raw in (
        {"multi-image": "folder", "QA": qa},
        {"multi-image": [], "QA": qa},
        {"multi-image": ["a.png"], "image": "b.png", "QA": qa},
    ):
        with pytest.raises(AnnotationError):
            A.parse_sample(raw, "f", 0)
