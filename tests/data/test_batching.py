"""Skipping and collation (data/batching.py) over hand-made records: counts, padding, state."""

import logging

import grain
import numpy as np
import pytest

from ppllava_jax.data.batching import BatchIterDataset, BatchSpec
from ppllava_jax.data.config import frames_per_group, resolve_config
from ppllava_jax.data.errors import DataError
from ppllava_jax.layout import IGNORE_INDEX
from tests.data.helpers import tiny_model

MODEL = tiny_model(50)


def ok(i, epoch=0, n=3):
    ids = np.arange(10, 10 + n, dtype=np.int32)
    return dict(
        status="ok",
        epoch=epoch,
        position=i,
        source=0,
        index=i,
        input_ids=ids,
        labels=np.where(np.arange(n) == n - 1, ids, IGNORE_INDEX).astype(np.int32),
        clip_ids=np.ones(4, np.int32),
        clip_mask=np.ones(4, np.int32),
        kind="",
    )


def skip(i, epoch=0, reason="bad_media"):
    return dict(
        status="skip",
        epoch=epoch,
        position=i,
        source=0,
        index=i,
        sample_index=100 + i,
        reason=reason,
        message=f"clip{i}.mp4: truncated",
        path=f"clip{i}.mp4",
    )


def batches(records, skips=None, **kw):
    cfg = resolve_config(dict(dict(sources=["a.json"], batch_size=2, buckets=[8]), **kw))
    spec = BatchSpec(cfg, MODEL, frames_per_group(cfg, MODEL), ["a.json"], skips or {})
    return BatchIterDataset(grain.MapDataset.source(records).to_iter_dataset(), spec).__iter__()


def test_training_drops_bad_samples_counts_and_names_them(caplog):
    it = batches([ok(0), skip(1), ok(2), ok(3), skip(4, reason="too_long"), ok(5)])
    with caplog.at_level(logging.WARNING):
        b1, b2 = next(it), next(it)
    assert b1["meta"]["ids"] == ["a.json:0", "a.json:2"] and b1["valid"].all()
    assert b2["meta"]["ids"] == ["a.json:3", "a.json:5"]
    assert b2["meta"]["skipped"] == {"bad_media": 1, "too_long": 1}
    assert it.get_state()["skipped"] == {"bad_media": 1, "too_long": 1}
    assert "a.json:101 (bad_media), file clip1.mp4" in caplog.text  # the annotation's own index
    assert b1["input_ids"].shape == (2, 8) and (b1["labels"][:, 2] == [12, 12]).all()
    with pytest.raises(StopIteration):
        next(it)


def test_evaluation_keeps_bad_and_padding_rows_invalid():
    it = batches([ok(0), skip(1), ok(2)], training=False)
    b1, b2 = next(it), next(it)
    assert b1["valid"].tolist() == [True, False] and b1["meta"]["status"] == ["ok", "skip"]
    assert b2["valid"].tolist() == [True, False] and b2["meta"]["status"] == ["ok", "pad"]
    assert b2["meta"]["ids"] == ["a.json:2", ""] and b2["meta"]["index"].tolist() == [2, -1]
    # an invalid row is a copy of a valid one, so it computes without NaNs; its labels are those
    np.testing.assert_array_equal(b1["input_ids"][1], b1["input_ids"][0])


def test_remainder_dropped_in_training_kept_when_asked():
    it = batches([ok(0), ok(1), ok(2)], num_epochs=1)
    next(it)
    with pytest.raises(StopIteration):
        next(it)
    it = batches([ok(0), ok(1), ok(2)], num_epochs=1, drop_remainder=False)
    next(it)
    last = next(it)
    assert last["valid"].tolist() == [True, False]


def test_errors_raise_or_stop_a_bad_run():
    it = batches([skip(0), ok(1)], on_error="raise")
    with pytest.raises(DataError, match=r"bad sample \(bad_media\).*clip0\.mp4"):
        next(it)
    it = batches([skip(i) for i in range(5)] + [ok(5)], max_consecutive_skips=3)
    with pytest.raises(DataError, match="3 bad samples in a row"):
        next(it)
    # a whole epoch without a usable sample: an error naming the last one
    it = batches([skip(0), skip(1), ok(0, epoch=1), ok(1, epoch=1)])
    with pytest.raises(DataError, match=r"epoch 0 has no valid sample.*a\.json:101"):
        next(it)


def test_state_resumes_with_the_same_batches_and_counts():
    recs = [ok(0), skip(1), ok(2), ok(3), skip(4), ok(5), ok(6), ok(7)]
    it = batches(recs, skips={"missing_media": 2})
    first = next(it)
    state = it.get_state()
    assert state["skipped"] == {"missing_media": 2, "bad_media": 1} and state["batches"] == 1
    rest = [next(it)["meta"]["ids"] for _ in range(2)]
    again = batches(recs)
    again.set_state(state)
    assert [next(again)["meta"]["ids"] for _ in range(2)] == rest
    assert first["meta"]["skipped"] == {"missing_media": 2, "bad_media": 1}
