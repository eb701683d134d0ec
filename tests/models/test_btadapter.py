"""The vision tower with BT-Adapter against the reference fixtures, batched and padded.

All video and multi-image samples of both forward fixture files go through the tower as one
padded batch ``[N, T_max]`` with ``frame_mask``; the projector then gives ``visual_tokens_i`` at
<= 1e-5. Also: scanned and unscanned CLIP trunks agree, too many frames are refused, the tower
without adapter is plain CLIP (transformers' ``CLIPVisionModel``), and the 3-frame quirk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.convert.clip_keys import vision_rules
from ppllava_jax.convert.mapping import KeyMap, convert_state_dict
from ppllava_jax.convert.ppllava_config import ppllava_config_from_hf
from ppllava_jax.convert.torch_io import TorchCheckpoint
from ppllava_jax.models.btadapter import PPLLaVAVisionModel
from ppllava_jax.models.config import PPLLaVAConfig
from ppllava_jax.models.projector import PPLLaVAProjector
from tests.convert.ppllava_parts import convert_vision_and_projector, vision_abstract_params

REF = Path(os.environ.get("PPLLAVA_REFERENCE_DIR", "tests/fixtures/reference_ppllava"))
FILES = ("forward_train_batch.npz", "forward_infer_batch.npz")


def _cfg(**runtime) -> PPLLaVAConfig:
    hf = json.loads((REF / "config.json").read_text())
    clip_dir = REF / (hf.get("clip_weight") or "clip")
    clip = json.loads((clip_dir / "config.json").read_text()) if clip_dir.exists() else None
    return ppllava_config_from_hf(hf, clip, **runtime)


@pytest.fixture(scope="module")
def ref():
    cfg = _cfg(scan_layers=False)
    vp, pp = convert_vision_and_projector(TorchCheckpoint(REF / "model.safetensors"), cfg)
    items = []  # (file, index, media, frames [T, H, W, 3], clip_ids, clip_mask, want)
    for fname in FILES:
        with np.load(REF / fname) as z:
            d = dict(z)
        for i, media in enumerate(d["media_types"]):
            if media in ("video", "multi-image"):
                px = d[f"pixel_values_{i}"][:, 0].transpose(0, 2, 3, 1)
                want = d[f"visual_tokens_{i}"]
                items.append((fname, i, str(media), px, d["clip_ids"][i], d["clip_mask"][i], want))
    return cfg, vp, pp, items


def test_padded_batch_matches_reference(ref) -> None:
    cfg, vp, pp, items = ref
    assert any(m == "video" for _, _, m, *_ in items)
    t_max = max(it[3].shape[0] for it in items) + 1  # every sample padded
    rng = np.random.default_rng(0)
    px = np.stack(
        [
            np.concatenate(
                [it[3], rng.standard_normal((t_max - len(it[3]), *it[3].shape[1:]))]
            ).astype(np.float32)
            for it in items
        ]
    )
    fm = np.arange(t_max)[None] < np.array([len(it[3]) for it in items])[:, None]
    feats = jax.jit(PPLLaVAVisionModel(cfg).apply)({"params": vp}, px, fm)
    proj = jax.jit(PPLLaVAProjector(cfg).apply, static_argnames=("video",))
    ids = jnp.asarray(np.stack([it[4] for it in items]), jnp.int32)
    cm = jnp.asarray(np.stack([it[5] for it in items]), jnp.int32)
    for video in (True, False):
        out = proj({"params": pp}, feats, fm, ids, cm, video=video)
        tok, tmask = np.asarray(out["tokens"]), np.asarray(out["token_mask"])
        for n, (fname, i, media, _, _, _, want) in enumerate(items):
            if (media == "video") != video:
                continue
            got = tok[n][tmask[n]]  # [T', h', w', D]: valid output frames only
            got = got.reshape(1 if video else got.shape[0], -1, got.shape[-1])
            assert got.shape == want.shape, (fname, i)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{fname} {i}")


def test_scanned_trunk_matches_unscanned(ref) -> None:
    cfg, vp, _, items = ref
    scfg = cfg.replace(scan_layers=True)
    sp, _ = convert_vision_and_projector(TorchCheckpoint(REF / "model.safetensors"), scfg)
    assert "layers" in sp["encoder"]  # stacked layers
    x = jnp.asarray(items[0][3][None, :2])
    a = PPLLaVAVisionModel(cfg).apply({"params": vp}, x)
    b = PPLLaVAVisionModel(scfg).apply({"params": sp}, x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_rematerialised_adapter_same_values_and_gradients(ref) -> None:
    """``remat_policy='full'`` wraps the BT-Adapter's layers in ``nn.remat`` (they are trained
    over every frame's tokens): same parameter tree, features and gradients as the
    reference-checked tower without remat."""
    cfg, vp, _, items = ref
    rcfg = _cfg(scan_layers=False, remat_policy="full")
    assert rcfg.vision.remat_policy == "full"
    x = jnp.asarray(items[0][3][None, :3])
    fm = jnp.asarray([[True, True, False]])

    def loss(model):
        return lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, fm)))

    plain, remat = PPLLaVAVisionModel(cfg), PPLLaVAVisionModel(rcfg)
    rp = nn.unbox(jax.eval_shape(lambda: remat.init(jax.random.PRNGKey(0), x, fm))["params"])
    assert jax.tree.structure(rp) == jax.tree.structure(vp)
    np.testing.assert_allclose(loss(remat)(vp), loss(plain)(vp), atol=1e-5, rtol=1e-6)
    ga, gb = jax.grad(loss(remat))(vp), jax.grad(loss(plain))(vp)
    for key in ("btadapter_S_layers_0", "btadapter_T_layers_0"):
        for a, b in zip(jax.tree.leaves(ga[key]), jax.tree.leaves(gb[key]), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_too_many_frames_is_refused() -> None:
    cfg = _cfg()
    s = cfg.vision.image_size
    x = jax.ShapeDtypeStruct((1, cfg.max_T + 1, s, s, 3), jnp.float32)
    params = vision_abstract_params(cfg)
    with pytest.raises(ValueError, match=f"max_T={cfg.max_T}"):
        jax.eval_shape(lambda p, x: PPLLaVAVisionModel(cfg).apply({"params": p}, x), params, x)


def test_without_adapter_is_plain_clip() -> None:
    import torch
    from transformers import CLIPVisionConfig as HFVisionConfig
    from transformers import CLIPVisionModel

    cfg = _cfg(scan_layers=False)
    cfg = dataclasses.replace(cfg, btadapter=False, vision_feature_layer=-2)
    v = cfg.vision
    torch.manual_seed(0)
    hf = CLIPVisionModel(
        HFVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps,
        )
    ).eval()
    sd = {k: p.detach().numpy() for k, p in hf.state_dict().items()}
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    params = convert_state_dict(
        sd, KeyMap(vision_rules(prefix)), vision_abstract_params(cfg), ignore=(r"position_ids$",)
    )
    assert not any(k.startswith("btadapter") for k in params)
    x = np.random.default_rng(1).standard_normal((2, 3, v.image_size, v.image_size, 3))
    x = x.astype(np.float32)
    got = PPLLaVAVisionModel(cfg).apply({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        hs = hf(
            torch.tensor(x.reshape(6, *x.shape[2:])).permute(0, 3, 1, 2), output_hidden_states=True
        )
    want = hs.hidden_states[-2][:, 1:].numpy().reshape(2, 3, -1, v.hidden_size)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_three_frame_quirk(ref) -> None:
    """The original reads 3 frames [3, C, H, W] as channels-first; ``legacy_three_frame_swap``
    reproduces it, and False is the same as feeding the pre-swapped frames with it on."""
    cfg, vp, _, items = ref
    x = jnp.asarray(next(it[3] for it in items if it[2] == "multi-image")[None])
    assert x.shape[1] == 3
    plain = dataclasses.replace(cfg, legacy_three_frame_swap=False)
    a = PPLLaVAVisionModel(cfg).apply({"params": vp}, x)
    b = PPLLaVAVisionModel(plain).apply({"params": vp}, jnp.swapaxes(x, 1, 4))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    c = PPLLaVAVisionModel(plain).apply({"params": vp}, x)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
