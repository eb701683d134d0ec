"""A preprocessed split (data/tfds_builder.py writes, data/records.py reads): the pipeline
reads back exactly the batches it computes, refuses other settings, counts bad samples."""

import dataclasses
import json
import os

import numpy as np
import pytest

from ppllava_jax.data import pipeline as pl
from ppllava_jax.data import records, tfds_builder
from tests.data.helpers import data_cfg, tiny_model


def test_round_trip_equals_the_direct_pipeline(data, tmp_path):
    out, info = data
    model = tiny_model(info["image_token_id"])
    cfg = data_cfg(out, "eval", training=False, batch_size=4)
    written = tfds_builder.write_split(cfg, model, tmp_path / "rec", num_shards=2)
    assert written["num_records"] == 8 and written["shard_sizes"] == [4, 4]
    assert written["ids"] == [f"eval.json:{i}" for i in range(8)]
    assert written["settings"]["image_size"] == 32  # from the model
    direct = list(pl.Pipeline(cfg, model).iterator())
    cfg_rec = dict(cfg, sources=[], array_record=str(tmp_path / "rec"))
    back = list(pl.Pipeline(cfg_rec, model).iterator())
    assert len(direct) == len(back) == 2
    for x, y in zip(direct, back):
        assert set(x) == set(y)
        for k in x:
            if k != "meta":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    workers = pl.Pipeline(dict(cfg_rec, num_workers=1), model)  # a spawned process reads too
    try:
        again = list(workers.iterator())
    finally:
        workers.close()
    for x, y in zip(back, again):
        np.testing.assert_array_equal(x["video_pixels"], y["video_pixels"])
    with pytest.raises(ValueError, match="num_frames"):
        pl.Pipeline(dict(cfg_rec, num_frames=8), model)
    wide = dataclasses.replace(model.vision, image_size=64, patch_size=16)  # same 4x4 grid
    other = dataclasses.replace(model, vision=wide, image_grid_pinpoints=((64, 128),))
    with pytest.raises(ValueError, match="image_size"):
        records.RecordSource(tmp_path / "rec").check(pl.default_config(), other)  # 64 px tower


def test_bad_samples_are_counted_not_written(data, tmp_path):
    out, info = data
    anns = json.load(open(os.path.join(out, "eval.json")))[:3]
    anns[1] = dict(anns[1], video=str(tmp_path / "missing.mp4"))
    path = tmp_path / "some.json"
    path.write_text(json.dumps(anns))
    cfg = data_cfg(out, training=False, sources=[dict(path=str(path), data_root=out)])
    written = tfds_builder.write_split(cfg, tiny_model(info["image_token_id"]), tmp_path / "r")
    assert written["num_records"] == 2 and written["skipped"] == {"missing_media": 1}
    assert written["ids"] == ["some.json:0", "some.json:2"]
    with pytest.raises(ValueError, match="not a preprocessed split"):
        records.RecordSource(tmp_path / "nothing")
