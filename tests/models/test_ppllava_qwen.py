"""The Qwen2 + SigLIP family's conversions: LLaVA-OneVision parity with transformers, the released
PPLLaVA-Qwen layout round trip (the reference fixture), and the training start point assembled
from LLaVA-OneVision + SigLIP and exported back."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
)

from ppllava_jax.convert import registry
from ppllava_jax.convert.api import convert_checkpoint, export_checkpoint, load_checkpoint
from ppllava_jax.convert.mapping import ConversionError
from ppllava_jax.convert.start_point import build_start_point
from ppllava_jax.convert.torch_io import TorchCheckpoint, write_safetensors
from ppllava_jax.data.collate import Media, Planner, Sample, collate
from ppllava_jax.layout import IGNORE_INDEX
from ppllava_jax.layout import anyres_grid_shape as anyres_grid
from ppllava_jax.models.longclip import extend_positions
from ppllava_jax.models.ppllava import PPLLaVA
from tests.sft_loss import mean_loss

REF = Path(
    os.environ.get(
        "PPLLAVA_QWEN_REFERENCE_DIR",
        Path(__file__).resolve().parents[1] / "fixtures/reference_ppllava_qwen",
    )
)
IMG, PAD = 120, 100
TOWER, PATCH = 18, 4  # a 4x4 patch grid; 2 pixel rows/columns past it ignored
PINPOINTS = [[18, 18], [18, 36], [36, 18], [36, 36]]
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    cfg = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            image_size=TOWER,
            patch_size=PATCH,
            num_hidden_layers=2,
            vision_use_head=False,
            **SIGLIP,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            rope_theta=1e6,
            pad_token_id=PAD,
            tie_word_embeddings=False,
        ),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=IMG,
        video_token_index=IMG + 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _randomize(model, 0)
    out = tmp_path_factory.mktemp("onevision") / "hf"
    model.save_pretrained(out)
    return out, model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=99,
            num_hidden_layers=2,
            max_position_embeddings=24,
            eos_token_id=1,
            pad_token_id=1,
            bos_token_id=None,
            **SIGLIP,
        ),
        vision_config=dict(image_size=TOWER, patch_size=PATCH, num_hidden_layers=3, **SIGLIP),
    )
    model = SiglipModel(cfg).eval()
    _randomize(model, 1)
    out = tmp_path_factory.mktemp("siglip") / "hf"
    model.save_pretrained(out)
    return out


def test_llava_onevision_image_logits_match_transformers(onevision_dir, tmp_path):
    """Images whose grid needs no ``anyres_max_9`` downscaling: LLaVA-OneVision's merge is
    PPLLaVA's (base view, unpadded grid, ``image_newline`` after each row)."""
    src, hf_model = onevision_dir
    assert registry.detect_family(json.loads((src / "config.json").read_text())).name == (
        "llava_onevision"
    )
    convert_checkpoint(src, tmp_path / "ckpt")
    family, cfg, params = load_checkpoint(tmp_path / "ckpt")
    assert family == "llava_onevision" and cfg.qwen and cfg.pooling == "none"
    assert cfg.pad_token_id == PAD and cfg.llm.qkv_bias and cfg.frame_shape == (4, 4)
    rng = np.random.default_rng(0)
    sizes = [(20, 40), (40, 20), (30, 30), (17, 17)]  # 1x2, 2x1, 2x2 grids and a single view
    planner = Planner(cfg)
    samples, hf_ids, hf_px = [], [], []
    for i, size in enumerate(sizes):
        rows, cols = anyres_grid(size, cfg.image_grid_pinpoints, TOWER)
        # base view + grid crops (the 1x1 grid is a pinpoint too: base + one crop)
        px = rng.normal(size=(1 + rows * cols, TOWER, TOWER, 3)).astype(np.float32)
        text = rng.integers(0, IMG - 30, size=5 + i)
        ids = np.concatenate([text[:2], [IMG], text[2:]])
        media = Media("image", px, size)
        samples.append(Sample(ids, media=media))
        (layout,) = planner.local_layout(media, px.shape[0])
        hf_ids.append(np.concatenate([text[:2], np.full(len(layout), IMG), text[2:]]))
        hf_px.append(px)
    batch = collate(samples, cfg, padding_side="right", num_frames={"image": 5})
    out = PPLLaVA(cfg).apply({"params": params}, batch)
    n = max(len(x) for x in hf_ids)
    ids = np.full((len(sizes), n), PAD, np.int64)
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


def test_released_qwen_layout_round_trip_is_exact(tmp_path):
    hf = json.loads((REF / "config.json").read_text())
    assert registry.detect_family(hf).name == "ppllava"
    convert_checkpoint(REF, tmp_path / "ckpt")
    family, cfg1, p1 = load_checkpoint(tmp_path / "ckpt")
    assert family == "ppllava" and cfg1.qwen and not cfg1.btadapter
    assert cfg1.clip_text.max_position_embeddings == 4 * 64 - 3 * cfg1.clip_text.position_keep
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    src, back = TorchCheckpoint(REF), TorchCheckpoint(tmp_path / "hf")
    assert sorted(src) == sorted(back)
    for k in src:
        np.testing.assert_array_equal(back[k], src[k], err_msg=k)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "llava_onevision" and written["qwen"] is True
    clip = json.loads((tmp_path / "hf" / "clip" / "config.json").read_text())
    assert clip["model_type"] == "siglip"
    convert_checkpoint(tmp_path / "hf", tmp_path / "again")
    _, cfg2, p2 = load_checkpoint(tmp_path / "again")
    assert cfg1 == cfg2
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_released_qwen_conversion_is_strict(tmp_path):
    src = TorchCheckpoint(REF)
    gone = "multi_modal_projector.clip_visual_head.attention.in_proj_bias"
    dst = tmp_path / "broken"
    write_safetensors({k: src[k] for k in src if k != gone} | {"surplus.bias": np.zeros(3)}, dst)
    (dst / "config.json").write_text((REF / "config.json").read_text())
    (dst / "clip").mkdir()
    (dst / "clip" / "config.json").write_text((REF / "clip" / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(dst, tmp_path / "out")
    assert gone in str(e.value) and "surplus.bias" in str(e.value)


def test_start_point_from_onevision_and_siglip_and_back(onevision_dir, siglip_dir, tmp_path):
    src, _ = onevision_dir
    build_start_point(src, siglip_dir, tmp_path / "start", btadapter_depth=4)
    family, cfg, params = load_checkpoint(tmp_path / "start")
    assert family == "ppllava" and cfg.qwen and not cfg.btadapter and cfg.pooling == "ppllava"
    assert cfg.clip_text.extended and cfg.clip_text.max_position_embeddings == 4 * 24 - 3 * 20
    assert (cfg.pooling_kernel, cfg.image_pooling_kernel) == ((2, 3, 3), (1, 3, 3))
    back = export_checkpoint(tmp_path / "start", tmp_path / "hf")
    out, ov, sig = TorchCheckpoint(back), TorchCheckpoint(src), TorchCheckpoint(siglip_dir)

    def source(key):
        """The tensor of LLaVA-OneVision or SigLIP that ``key`` of the export came from."""
        for a, b in (
            ("vision_tower.vision_model.", "vision_tower."),
            ("multi_modal_projector.clip_text_model.", "text_model."),
            ("multi_modal_projector.clip_visual_head.", "vision_model.head."),
            ("multi_modal_projector.clip_visual_ln.", "vision_model.post_layernorm."),
            ("multi_modal_projector.logit_", "logit_"),
        ):
            if key.startswith(a):
                k = b + key[len(a) :]
                return sig[k] if k in sig else ov[k]
        return ov[key]

    pos = extend_positions(sig["text_model.embeddings.position_embedding.weight"])
    seen_ov = set()
    for k in out:
        if k.endswith(("position_embedding", "position_embedding_res")) and "clip_text" in k:
            np.testing.assert_array_equal(out[k], pos, err_msg=k)
            continue
        np.testing.assert_array_equal(out[k], source(k), err_msg=k)
        seen_ov.add(k.replace("vision_tower.vision_model.", "vision_tower."))
    assert set(ov) <= seen_ov  # every LLaVA-OneVision tensor made it back out
    # the assembled model runs on a video with an evaluation-style SigLIP prompt
    px = np.random.default_rng(0).normal(size=(4, TOWER, TOWER, 3)).astype(np.float32)
    s = Sample(
        np.array([3, 5, IMG, 7]),
        np.array([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7]),
        Media("video", px),
        clip_ids=np.array([5, 9, 1, 1]),
    )
    batch = collate([s], cfg)
    res = PPLLaVA(cfg).apply({"params": params}, batch)
    assert np.isfinite(np.asarray(mean_loss(res["logits"], batch)))


def test_start_point_refuses_a_clip_model(onevision_dir, tmp_path):
    src, _ = onevision_dir
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="SiglipModel"):
        build_start_point(src, tmp_path / "clip", tmp_path / "start")
