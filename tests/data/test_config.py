"""The data config (data/config.py): fields, settings derived from the model, early checks."""

import dataclasses

import pytest

from ppllava_jax.data import config as C
from tests.data.helpers import tiny_model

MODEL = tiny_model(7, pinpoints=((32, 64), (64, 32), (64, 96)))


def _cfg(**kw):
    return C.resolve_config(dict(dict(sources=["a.json"], num_frames=4, max_length=96), **kw))


def test_model_settings_are_derived_not_data_fields():
    assert (
        "image_size" not in C.default_config() and "image_grid_pinpoints" not in C.default_config()
    )
    assert C.tower_size(MODEL) == 32
    assert C.grid_pinpoints(MODEL) == [(32, 64), (64, 32), (64, 96)]
    assert C.max_views(32, C.grid_pinpoints(MODEL)) == 1 + 2 * 3
    cfg = _cfg(max_images=5)
    assert C.frames_per_group(cfg, MODEL) == {"video": 4, "image": 7, "multi": 5}
    wider = dataclasses.replace(MODEL, image_grid_pinpoints=((32, 32),))
    assert C.frames_per_group(cfg, wider)["image"] == 2


@pytest.mark.parametrize(
    "field, source",
    [
        ("image_size", "model.vision.image_size"),
        ("image_grid_pinpoints", "model.image_grid_pinpoints"),
    ],
)
def test_a_config_that_still_sets_a_model_setting_is_told_where_it_went(field, source):
    with pytest.raises(ValueError, match=rf"data\.{field} .*comes from the model \({source}\)"):
        C.resolve_config({"sources": ["a.json"], field: 32})
    cfg = C.default_config()
    cfg[field] = 32  # set on the ConfigDict after resolving: validate_config says it too
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        C.validate_config(cfg, MODEL)


def test_unknown_field_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown data config fields \['bogus'\].*batch_size"):
        C.resolve_config({"bogus": 1})


def test_a_valid_config_passes():
    C.validate_config(_cfg(), MODEL)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sources=[]), "data.sources: no annotation files"),
        (dict(batch_size=6, micro_batches=4), "does not split into 4 micro-batches"),
        (dict(clip_prompt="answer"), "data.clip_prompt"),
        (dict(on_error="ignore"), "data.on_error"),
        (dict(text_encoding="bytes"), "data.text_encoding"),
        (dict(frame_folder_order="random"), "data.frame_folder_order"),
        (dict(tokenizer_legacy="yes"), "data.tokenizer_legacy"),
        (dict(padding_side="middle"), "data.padding_side"),
        (dict(frame_sampling="uniform"), "data.frame_sampling"),
        (dict(group_capacity="max"), "data.group_capacity"),
        (dict(fixed_groups=["video", "video"]), "data.fixed_groups"),
        (dict(fixed_groups=["audio"]), "data.fixed_groups"),
        (dict(max_length=0), "data.max_length: must be positive"),
        (dict(num_workers=-1), "data.num_workers: must be >= 0"),
        (dict(buckets=[]), "data.buckets"),
        (dict(max_length=200, buckets=[128]), "exceeds the largest bucket"),
        (dict(num_frames=1), "unusable for video: pooling kernel 2 along time"),
        (dict(shard_index=2, shard_count=2), "data.shard_index"),
        (dict(dpo=True, array_record="dir"), "data.dpo"),
        (dict(dpo=True, generation_prompt=True), "data.dpo"),
    ],
)
def test_bad_settings_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        C.validate_config(_cfg(**kw), MODEL)


def test_pinpoints_must_be_multiples_of_the_tower():
    bad = dataclasses.replace(MODEL, image_grid_pinpoints=((32, 48),))
    with pytest.raises(ValueError, match=r"model\.image_grid_pinpoints .*multiple of the tower"):
        C.validate_config(_cfg(), bad)
