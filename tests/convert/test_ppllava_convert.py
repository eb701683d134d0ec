"""Whole-model conversion: LLaVA-NeXT parity with transformers, the PPLLaVA export round trip, and
the training start point assembled from LLaVA-NeXT + CLIP."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, LlavaNextConfig, LlavaNextForConditionalGeneration

from ppllava_jax.convert.api import convert_checkpoint, export_checkpoint, load_checkpoint
from ppllava_jax.convert.mapping import ConversionError
from ppllava_jax.convert.start_point import build_start_point
from ppllava_jax.convert.torch_io import TorchCheckpoint
from ppllava_jax.data.collate import Media, Planner, Sample, collate
from ppllava_jax.models.longclip import extend_positions
from ppllava_jax.models.ppllava import PPLLaVA
from tests.sft_loss import mean_loss

REF = Path(
    os.environ.get(
        "PPLLAVA_REFERENCE_DIR", Path(__file__).resolve().parents[1] / "fixtures/reference_ppllava"
    )
)
IMG = 100
TOWER, PATCH = 24, 4
PINPOINTS = [[24, 48], [48, 24], [48, 48]]


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    cfg = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=TOWER,
            patch_size=PATCH,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            pad_token_id=0,
        ),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=IMG,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _randomize(model, 0)
    out = tmp_path_factory.mktemp("llava") / "hf"
    model.save_pretrained(out)
    return out, model


def test_llava_next_logits_match_transformers(llava_dir, tmp_path):
    src, hf_model = llava_dir
    convert_checkpoint(src, tmp_path / "ckpt")
    family, cfg, params = load_checkpoint(tmp_path / "ckpt")
    assert family == "llava_next" and not cfg.btadapter and cfg.pooling == "none"
    rng = np.random.default_rng(0)
    sizes = [(30, 70), (70, 30), (50, 50)]  # 1x2, 2x1 and 2x2 crop grids
    planner = Planner(cfg)
    samples, hf_ids, hf_px = [], [], []
    from ppllava_jax.layout import anyres_grid_shape as anyres_grid

    for i, size in enumerate(sizes):
        rows, cols = anyres_grid(size, cfg.image_grid_pinpoints, TOWER)
        px = rng.normal(size=(1 + rows * cols, TOWER, TOWER, 3)).astype(np.float32)
        text = rng.integers(3, IMG, size=5 + i)
        ids = np.concatenate([[1], text[:2], [IMG], text[2:]])
        media = Media("image", px, size)
        samples.append(Sample(ids, media=media))
        (layout,) = planner.local_layout(media, px.shape[0])
        hf_ids.append(np.concatenate([[1], text[:2], np.full(len(layout), IMG), text[2:]]))
        hf_px.append(px)
    batch = collate(samples, cfg, padding_side="right", num_frames={"image": 5})
    out = PPLLaVA(cfg).apply({"params": params}, batch)
    n = max(len(x) for x in hf_ids)
    ids = np.zeros((len(sizes), n), np.int64)
    mask = np.zeros((len(sizes), n), np.int64)
    for i, x in enumerate(hf_ids):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    views = max(p.shape[0] for p in hf_px)
    pv = np.zeros((len(sizes), views, 3, TOWER, TOWER), np.float32)
    for i, p in enumerate(hf_px):
        pv[i, : p.shape[0]] = p.transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pv),
            image_sizes=torch.tensor(sizes),
        ).logits.numpy()
    for i in range(len(sizes)):
        m = batch["attention_mask"][i].astype(bool)
        assert m.sum() == mask[i].sum()
        np.testing.assert_allclose(
            np.asarray(out["logits"][i])[m], ref[i, : mask[i].sum()], atol=1e-4, err_msg=str(i)
        )


def test_ppllava_export_round_trip_is_exact(tmp_path):
    convert_checkpoint(REF, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    src, back = TorchCheckpoint(REF), TorchCheckpoint(tmp_path / "hf")
    assert sorted(src) == sorted(back)
    for k in src:
        np.testing.assert_array_equal(back[k], src[k], err_msg=k)
    assert (tmp_path / "hf" / "clip" / "config.json").exists()
    # the export converts again to the same parameters and config
    convert_checkpoint(tmp_path / "hf", tmp_path / "again")
    _, cfg1, p1 = load_checkpoint(tmp_path / "ckpt")
    _, cfg2, p2 = load_checkpoint(tmp_path / "again")
    assert cfg1 == cfg2
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_ppllava_conversion_is_strict(tmp_path):
    from ppllava_jax.convert.torch_io import write_safetensors

    src = TorchCheckpoint(REF)
    dst = tmp_path / "broken"
    keys = [k for k in src if "btadapter_T_layers.1.temporal_fc.weight" not in k]
    write_safetensors({k: src[k] for k in keys} | {"surplus.weight": np.zeros(3)}, dst)
    for f in ("config.json",):
        (dst / f).write_text((REF / f).read_text())
    (dst / "clip").mkdir()
    (dst / "clip" / "config.json").write_text((REF / "clip" / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(dst, tmp_path / "out")
    msg = str(e.value)
    assert "btadapter_T_layers.1.temporal_fc.weight" in msg and "surplus.weight" in msg


def test_start_point_from_llava_next_and_clip(llava_dir, tmp_path):
    src, hf_model = llava_dir
    clip_cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=99,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=TOWER,
            patch_size=PATCH,
        ),
        projection_dim=16,
    )
    clip = CLIPModel(clip_cfg).eval()
    _randomize(clip, 1)
    clip.save_pretrained(tmp_path / "clip")
    build_start_point(src, tmp_path / "clip", tmp_path / "start", btadapter_depth=2)
    family, cfg, params = load_checkpoint(tmp_path / "start")
    assert family == "ppllava" and cfg.btadapter and cfg.btadapter_depth == 2
    assert cfg.clip_text.extended and cfg.clip_text.max_position_embeddings == 248
    llava, clipck = TorchCheckpoint(src), TorchCheckpoint(tmp_path / "clip")
    vm = params["vision_tower"]["vision_model"]
    # spatial adapter j = trunk layer N - D + j; temporal_fc starts at zero
    for j, layer in enumerate((1, 2)):
        w = llava[f"vision_tower.encoder.layers.{layer}.mlp.fc1.weight"]
        np.testing.assert_array_equal(vm[f"btadapter_S_layers_{j}"]["mlp"]["fc1"]["kernel"], w.T)
        assert not np.any(vm[f"btadapter_T_layers_{j}"]["temporal_fc"]["kernel"])
    proj = params["multi_modal_projector"]
    table = extend_positions(clipck["text_model.embeddings.position_embedding.weight"])
    for name in ("position_embedding", "position_embedding_res"):
        np.testing.assert_array_equal(proj["clip_text_model"]["embeddings"][name], table)
    np.testing.assert_array_equal(
        proj["clip_visual_ln"]["scale"], clipck["vision_model.post_layernorm.weight"]
    )
    np.testing.assert_array_equal(proj["logit_scale"], clipck["logit_scale"])
    np.testing.assert_array_equal(
        params["language_model"]["lm_head"]["kernel"], llava["language_model.lm_head.weight"].T
    )
    # the assembled model runs on a video
    px = np.random.default_rng(0).normal(size=(4, TOWER, TOWER, 3)).astype(np.float32)
    s = Sample(
        np.array([1, 5, IMG, 7]),
        np.array([-100, -100, -100, 7]),
        Media("video", px),
        clip_ids=np.array([97, 5, 98]),
        clip_mask=np.ones(3, np.int32),
    )
    batch = collate([s], cfg)
    out = PPLLaVA(cfg).apply({"params": params}, batch)
    assert np.isfinite(np.asarray(mean_loss(out["logits"], batch)))
