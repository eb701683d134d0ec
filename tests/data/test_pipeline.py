"""The grain pipeline on the synthetic set: static shapes, labels, order, resume, workers,
bad-input skipping, sharding, evaluation mode (the ArrayRecord round trip: test_tfds_builder)."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import image as img
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data.errors import DataError
from tests.data.helpers import BUCKETS, data_cfg, tiny_model


def _model(info):
    return tiny_model(info["image_token_id"])


def _cfg(out, split="train", **kw):
    return data_cfg(out, split, **kw)


def _take(data, n, state=None, **kw):
    out, info = data
    p = pl.Pipeline(_cfg(out, **kw), _model(info))
    it = p.iterator(state)
    batches = [next(it) for _ in range(n)]
    st = it.get_state()
    p.close()
    return batches, st


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["meta"]["ids"] == y["meta"]["ids"]
        assert set(x) == set(y)
        for k in x:
            if k != "meta":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shapes_static_in_buckets_and_labels_only_answers(data):
    out, info = data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    anns = json.load(open(os.path.join(out, "train.json")))
    batches, _ = _take(data, 7)  # crosses the epoch boundary (6 batches per epoch)
    for b in batches:
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] in BUCKETS
        assert b["video_pixels"].shape == (4, 4, 32, 32, 3)
        assert b["video_pixels"].dtype == np.float32
        assert b["video_clip_ids"].shape == (4, 32) and b["valid"].all()
        for r in range(4):
            lab, ids = b["labels"][r], b["input_ids"][r]
            sup = lab != -100
            np.testing.assert_array_equal(lab[sup], ids[sup])
            assert not (sup & (b["visual_index"][r] >= 0)).any()
            assert (b["visual_index"][r] >= 0).sum() == 8  # (4/2) * (4/2) * (4/2) tokens
            idx = int(b["meta"]["ids"][r].split(":")[1])
            answer = anns[idx]["QA"][0]["a"]
            assert tok.decode(ids[sup]).strip() == answer + tok.eos_token
            # the supervised tokens are the last attended ones (answer + </s>)
            last = np.flatnonzero(b["attention_mask"][r])[-int(sup.sum()) :]
            np.testing.assert_array_equal(np.flatnonzero(sup), last)
    ids = [i for b in batches[:6] for i in b["meta"]["ids"]]
    assert sorted(ids) == sorted(f"train.json:{i}" for i in range(24))  # one epoch
    assert batches[6]["meta"]["epoch"].tolist() == [1] * 4


def test_order_deterministic_by_seed_and_resume_exact(data):
    a, _ = _take(data, 8)
    b, _ = _take(data, 8)
    _same(a, b)
    c, _ = _take(data, 3, seed=2)
    assert [x["meta"]["ids"] for x in c] != [x["meta"]["ids"] for x in a[:3]]
    _, state = _take(data, 3)  # mid-epoch
    state = json.loads(json.dumps(state))  # checkpointable as JSON
    resumed, _ = _take(data, 5, state=state)
    _same(resumed, a[3:])


def test_workers_give_same_batches_and_resume(data):
    out, info = data
    ref, _ = _take(data, 8)
    p = pl.Pipeline(_cfg(out, num_workers=2, prefetch_batches=2), _model(info))
    it = p.iterator()
    try:
        first = [next(it) for _ in range(4)]
        state = it.get_state()
        rest = [next(it) for _ in range(4)]
        it.set_state(json.loads(json.dumps(state)))  # rewind the live workers
        again = [next(it) for _ in range(4)]
    finally:
        p.close()
    _same(first + rest, ref)
    _same(again, rest)


def _bad_dataset(data, tmp_path):
    out, _ = data
    anns = json.load(open(os.path.join(out, "train.json")))[:10]
    trunc = tmp_path / "truncated.mp4"
    src = os.path.join(out, anns[0]["video"])
    trunc.write_bytes(open(src, "rb").read()[: os.path.getsize(src) // 2])
    bad = [
        dict(anns[1], video=str(tmp_path / "missing.mp4")),
        dict(anns[2], video=str(trunc)),
        dict(anns[3], QA=[]),
        dict(anns[4], QA=[{"q": "word " * 200, "a": "(A) left"}]),
    ]
    mixed = anns[5:7] + bad[:2] + anns[7:] + bad[2:]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mixed))
    return str(path), out, len(mixed) - len(bad)


def test_bad_samples_skipped_counted_and_named(data, tmp_path, caplog):
    path, root, good = _bad_dataset(data, tmp_path)
    kw = dict(sources=[dict(path=path, data_root=root)], batch_size=1, num_epochs=1)
    p = pl.Pipeline(_cfg(data[0], **kw), _model(data[1]))
    it = p.iterator()
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert all(b["valid"].all() and b["input_ids"].shape[0] == 1 for b in batches)
    want = {"missing_media": 1, "bad_media": 1, "empty_qa": 1, "too_long": 1}
    assert batches[-1]["meta"]["skipped"] == want
    assert it.get_state()["skipped"] == want
    text = caplog.text
    assert "missing.mp4" in text and "truncated.mp4" in text and "bad.json" in text
    ids = [i for b in batches for i in b["meta"]["ids"]]
    assert len(ids) == len(set(ids)) == good
    # on_error='raise': the empty QA fails at loading, naming the annotation file ...
    with pytest.raises(DataError, match=r"bad\.json \[sample 7\].*QA"):
        _take(data, good, **dict(kw, on_error="raise"))
    # ... and without it, the first bad sample read fails naming its file
    anns = [a for a in json.load(open(path)) if a["QA"]]
    json.dump(anns, open(path, "w"))
    with pytest.raises(DataError, match=r"(missing|truncated|train_00004)\.mp4"):
        _take(data, good, **dict(kw, on_error="raise"))


def test_sharding_disjoint(data):
    per = []
    for shard in (0, 1):
        b, _ = _take(data, 3, shard_index=shard, shard_count=2)  # one epoch of 12 each
        per.append({i for x in b for i in x["meta"]["ids"]})
    assert not per[0] & per[1]
    assert per[0] | per[1] == {f"train.json:{i}" for i in range(24)}


def test_eval_mode_every_sample_once_in_order_padded(data):
    out, info = data
    for shards in ((0, 1), (0, 2), (1, 2)):
        p = pl.Pipeline(
            _cfg(
                out,
                "eval",
                training=False,
                batch_size=3,
                shard_index=shards[0],
                shard_count=shards[1],
            ),
            _model(info),
        )
        batches = list(p.iterator())
        n = 8 // shards[1]
        assert len(batches) == -(-n // 3)
        ids = [i for b in batches for i, v in zip(b["meta"]["ids"], b["valid"]) if v]
        assert ids == [f"eval.json:{i}" for i in range(shards[0], 8, shards[1])]
        assert sum(b["valid"].sum() for b in batches) == n
        assert not batches[-1]["valid"][-1]
        assert all(b["input_ids"].shape[0] == 3 and b["valid"].shape == (3,) for b in batches)


def test_images_and_multi_images(data, tmp_path):
    out, info = data
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide.png": (20, 50), "sq.png": (40, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(tmp_path / name)
    anns = [
        {"image": "wide.png", "QA": [{"q": "What is it?", "a": "a wide image"}]},
        {"image": ["wide.png", "sq.png"], "QA": [{"q": "Compare.", "a": "they differ"}]},
    ]
    (tmp_path / "img.json").write_text(json.dumps(anns))
    cfg = _cfg(
        out,
        sources=[dict(path=str(tmp_path / "img.json"), data_root=str(tmp_path))],
        batch_size=2,
        max_images=3,
        training=False,
    )
    p = pl.Pipeline(cfg, _model(info))
    (b,) = list(p.iterator())
    assert b["image_pixels"].shape == (2, 5, 32, 32, 3)  # 1 + 2x2 views at most
    assert b["multi_pixels"].shape == (2, 3, 32, 32, 3) and b["multi_frames"][0].sum() == 2
    assert b["image_sizes"][0].tolist() == [20, 50] and b["valid"].all()
    # uint8 views then normalize == image.preprocess_anyres
    im = img.load_image(tmp_path / "wide.png")
    pins = _model(info).image_grid_pinpoints
    views, grid, hw = img.anyres_views_uint8(im, 32, pins)
    ref = img.preprocess_anyres(im, 32, pins)
    assert grid == ref.grid and hw == ref.image_size == (20, 50)
    np.testing.assert_array_equal(img.normalize(views), ref.pixel_values)


def test_bad_config_fails_early(data):
    out, info = data
    with pytest.raises(ValueError, match="unknown data config fields"):
        pl.Pipeline(_cfg(out, bogus=1), _model(info))
    with pytest.raises(ValueError, match="largest bucket"):
        pl.Pipeline(_cfg(out, max_length=200), _model(info))
    with pytest.raises(ValueError, match="pooling kernel"):
        pl.Pipeline(_cfg(out, num_frames=1), _model(info))


def test_fixed_length_and_groups_give_one_shape(data):
    out, info = data
    mcfg = _model(info)
    p = pl.Pipeline(_cfg(out, fixed_length=True, fixed_groups=["video", "image"]), mcfg)
    it = p.iterator()
    shapes = set()
    for _ in range(3):
        b, _ = pl.split_meta(next(it))
        shapes.add(tuple(sorted((k, v.shape) for k, v in b.items())))
        assert b["input_ids"].shape[1] == max(BUCKETS) and not b["image_views"].any()
    assert len(shapes) == 1
    with pytest.raises(ValueError, match="fixed_groups"):
        pl.Pipeline(_cfg(out, fixed_groups=["audio"]), mcfg)
