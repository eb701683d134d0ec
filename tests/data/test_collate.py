"""The host-side merge plan against transformers' LLaVA-NeXT packing and hand-checked layouts."""

import numpy as np
import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextModel

from ppllava_jax.data.collate import Media, Planner, Sample, collate
from ppllava_jax.layout import GROUPS, anyres_grid_shape
from ppllava_jax.models.config import CLIPVisionConfig, PPLLaVAConfig

IMG = 99


def _cfg(pooling="none", tower=24, patch=4, pinpoints=((24, 48), (48, 24), (48, 48), (72, 24))):
    return PPLLaVAConfig(
        vision=CLIPVisionConfig(image_size=tower, patch_size=patch, num_hidden_layers=2),
        frame_shape=(tower // patch, tower // patch),
        btadapter_depth=1,
        pooling=pooling,
        pooling_kernel=(2, 3, 3),
        pooling_stride=(2, 3, 3),
        image_pooling_kernel=(1, 3, 3),
        image_pooling_stride=(1, 3, 3),
        image_grid_pinpoints=tuple(tuple(p) for p in pinpoints),
        image_token_index=IMG,
        pad_token_id=0,
    )


def _hf_pack(cfg, image_size, views):
    """transformers' own pack_image_features applied to features that hold their local index."""
    hf_cfg = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=cfg.vision.image_size,
            patch_size=cfg.vision.patch_size,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            vocab_size=128,
        ),
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
    )
    model = LlavaNextModel(hf_cfg)
    g = cfg.vision.image_size // cfg.vision.patch_size
    feats = torch.arange(views * g * g, dtype=torch.float32).reshape(views, g * g, 1)
    packed, _ = model.pack_image_features(
        [feats], torch.tensor([image_size]), "default", image_newline=torch.tensor([-1.0])
    )
    return packed[0][:, 0].numpy().astype(np.int64)


@pytest.mark.parametrize("image_size", [(30, 70), (70, 30), (50, 50), (100, 20), (24, 24)])
def test_anyres_layout_matches_transformers_pack(image_size):
    cfg = _cfg()
    planner = Planner(cfg)

    rows, cols = anyres_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision.image_size)
    views = 1 + rows * cols
    px = np.zeros((views, 24, 24, 3), np.float32)
    (layout,) = planner.local_layout(Media("image", px, image_size), views)
    np.testing.assert_array_equal(layout, _hf_pack(cfg, image_size, views))


def test_single_view_image_gets_one_newline():
    cfg = _cfg()
    px = np.zeros((1, 24, 24, 3), np.float32)
    (layout,) = Planner(cfg).local_layout(Media("image", px, (24, 24)), 1)
    np.testing.assert_array_equal(layout, _hf_pack(cfg, (24, 24), 1))


def test_collate_merges_in_place_with_padding_sides():
    cfg = _cfg(pooling="ppllava")
    vid = Media("video", np.ones((4, 24, 24, 3), np.float32))  # -> (2, 2, 2) = 8 tokens
    multi = Media("multi", np.ones((2, 24, 24, 3), np.float32))  # 2 images x 4 tokens
    s0 = Sample(np.array([1, 5, IMG, 6, 7]), np.array([-100, -100, -100, 6, 7]), vid)
    s1 = Sample(np.array([1, IMG, 8, IMG, 9]), np.array([-100, -100, 8, -100, 9]), multi)
    s2 = Sample(np.array([1, 3, 4]), np.array([-100, 3, 4]))
    for side in ("right", "left"):
        b = collate([s0, s1, s2], cfg, padding_side=side, clip_length=4)
        assert b["input_ids"].shape == (3, 12)
        assert b["video_pixels"].shape == (1, 4, 24, 24, 3)
        assert b["multi_pixels"].shape == (1, 2, 24, 24, 3)
        # pool: video rows 0-7, multi rows 8-15, newline 16
        m = b["attention_mask"].astype(bool)
        v0 = b["visual_index"][0][m[0]]
        np.testing.assert_array_equal(v0, [-1, -1, *range(8), -1, -1])
        v1 = b["visual_index"][1][m[1]]
        np.testing.assert_array_equal(v1, [-1, 8, 9, 10, 11, -1, 12, 13, 14, 15, -1])
        ids1 = b["input_ids"][1][m[1]]
        assert ids1[0] == 1 and ids1[5] == 8 and ids1[-1] == 9
        lab1 = b["labels"][1][m[1]]
        np.testing.assert_array_equal(lab1[[5, 10]], [8, 9])
        assert (lab1[b["visual_index"][1][m[1]] >= 0] == -100).all()
        assert m.sum(1).tolist() == [12, 11, 3]
        np.testing.assert_array_equal(b["positions"][2][m[2]], [0, 1, 2])
        if side == "left":
            assert not m[2, :9].any() and b["positions"][2, 0] == 0
        else:
            assert not m[2, 3:].any()


def test_collate_refuses_wrong_number_of_image_tokens():
    cfg = _cfg(pooling="ppllava")
    multi = Media("multi", np.ones((3, 24, 24, 3), np.float32))
    with pytest.raises(ValueError, match="3 image tokens|needs 3"):
        collate([Sample(np.array([1, IMG, IMG]), media=multi)], cfg)


def test_groups_order_is_documented():
    assert GROUPS == ("video", "image", "multi")


def test_micro_batches_are_self_contained():
    """With micro_batches=k, rows j, j+k, ... (as train.step.microbatch splits them) and their
    visual items form a batch equal to collating those samples alone."""
    from ppllava_jax.train.step import microbatch

    cfg = _cfg(pooling="ppllava")
    rng = np.random.default_rng(0)

    def vid(n):
        return Media("video", rng.normal(size=(n, 24, 24, 3)).astype(np.float32))

    def multi():
        return Media("multi", rng.normal(size=(2, 24, 24, 3)).astype(np.float32))

    # micro-batch 0 = rows 0, 2; micro-batch 1 = rows 1, 3: each one video and one image set
    samples = [
        Sample(np.array([1, 5, IMG, 6]), np.array([-100, -100, -100, 6]), vid(4)),
        Sample(np.array([1, 7, IMG]), np.array([-100, 7, -100]), vid(4)),
        Sample(np.array([1, IMG, 8, IMG, 9]), np.array([-100, -100, 8, -100, 9]), multi()),
        Sample(np.array([1, IMG, IMG, 3]), np.array([-100, -100, -100, 3]), multi()),
    ]
    for s in samples:
        s.clip_ids, s.clip_mask = rng.integers(0, 50, size=4), np.ones(4, np.int32)
    k = 2
    full = collate(samples, cfg, micro_batches=k, clip_length=4, buckets=[16])
    split = {key: np.asarray(v) for key, v in microbatch(full, k).items()}
    for j in range(k):
        alone = collate(
            samples[j::k], cfg, clip_length=4, buckets=[16], capacity={"video": 1, "multi": 1}
        )
        for key, v in alone.items():
            np.testing.assert_array_equal(split[key][j], v, err_msg=f"micro {j} {key}")
    with pytest.raises(ValueError, match="micro-batches"):
        collate(samples[:3], cfg, micro_batches=2)


def _resolve(batch, cfg, k):
    """(group, item tag, token) of every visual position, read through the pool the model builds
    for each micro-batch (rows j, j+k, ...; items j, j+k, ... of every group; newline last)."""
    planner = Planner(cfg)
    out = {}
    for j in range(k):
        pool = []
        for g in GROUPS:
            if f"{g}_pixels" not in batch:
                continue
            px = batch[f"{g}_pixels"][j::k]
            n = int(np.prod(planner.item_grid(g, px.shape[1])))
            pool += [(g, float(px[i, 0, 0, 0, 0]), t) for i in range(len(px)) for t in range(n)]
        pool.append("newline")
        for r in range(j, batch["visual_index"].shape[0], k):
            out[r] = [pool[v] for v in batch["visual_index"][r] if v >= 0]
    return out


def test_globalized_visual_index_reads_the_same_tokens_across_hosts():
    from ppllava_jax.data.collate import globalize_visual_index

    cfg = _cfg(pooling="ppllava")
    k, hosts = 2, 2
    tag = iter(range(1, 100))
    rows, cols = anyres_grid_shape((40, 60), cfg.image_grid_pinpoints, cfg.vision.image_size)

    def media(kind, n):
        px = np.zeros((n, 24, 24, 3), np.float32)
        px[:, 0, 0, 0] = next(tag)
        return Media(kind, px, (40, 60) if kind == "image" else None)

    local, expect = [], {}
    for h in range(hosts):
        samples = [
            Sample(np.array([1, IMG, 5]), media=media("video", 4)),
            Sample(np.array([1, IMG, 6]), media=media("image", 1 + rows * cols)),
            Sample(np.array([1, IMG, IMG]), media=media("multi", 2)),
            Sample(np.array([1, IMG, 7]), media=media("video", 4)),
        ]
        b = collate(samples, cfg, micro_batches=k, buckets=[128], capacity={g: 4 for g in GROUPS})
        for r, toks in _resolve(b, cfg, k).items():
            expect[h * 4 + r] = toks
        local.append(globalize_visual_index(b, cfg, h, hosts, k))
    glob = {key: np.concatenate([b[key] for b in local]) for key in local[0]}
    got = _resolve(glob, cfg, k)
    assert got == expect
