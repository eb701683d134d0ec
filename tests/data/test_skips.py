"""Skip accounting (data/skips.py): reasons, skip records, the no-valid-sample message."""

import pytest

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import skips
from ppllava_jax.data.errors import AnnotationError, DataError, MediaError, SampleTooLongError


@pytest.mark.parametrize(
    "err, reason",
    [
        (MediaError("a.mp4", "file not found"), "missing_media"),
        (MediaError("a.mp4", "truncated or corrupt"), "bad_media"),
        (SampleTooLongError(300, 256, "a.mp4"), "too_long"),
        (AnnotationError("f.json", 2, "'QA' must be a non-empty list"), "empty_qa"),
        (AnnotationError("f.json", 2, "bound must be [start, end]"), "bad_annotation"),
        (DataError("2 <image> placeholders"), "bad_sample"),
        (KeyError("x"), "unexpected_error"),
    ],
)
def test_reasons(err, reason):
    assert skips.skip_reason(err) == reason and reason in skips.SKIP_REASONS


def test_skip_record_names_the_file_and_keeps_a_traceback_for_the_unexpected():
    rec = skips.skip_record(MediaError("clip.mp4", "file not found"), "fallback.json")
    assert rec == {
        "status": "skip",
        "reason": "missing_media",
        "message": "MediaError: clip.mp4: file not found",
        "path": "clip.mp4",
    }
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError as e:
        odd = skips.skip_record(e, "fallback.json")
    assert odd["reason"] == "unexpected_error" and odd["path"] == "fallback.json"
    assert "Traceback" in odd["message"] and "boom" in odd["message"]


def test_no_samples_message_says_why():
    srcs = [ann.AnnotationSource("a.json"), ann.AnnotationSource("b.json")]
    counter = skips.LoadCounter()
    assert "hold no samples (a.json, b.json)" in skips.no_samples_message(srcs, counter)
    counter.add(AnnotationError("a.json", 0, "'QA' must be a non-empty list"))
    counter.add(AnnotationError("b.json", 4, "bound must be [start, end]"))
    assert counter.by_reason == {"empty_qa": 1, "bad_annotation": 1}
    msg = skips.no_samples_message(srcs, counter)
    assert "all 2 samples of a.json, b.json were rejected" in msg
    assert "bad_annotation 1, empty_qa 1" in msg and "b.json [sample 4]" in msg
