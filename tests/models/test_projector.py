"""The prompt-guided projector against the reference fixtures (PyTorch original, float32).

Every sample of ``forward_train_batch.npz`` and ``forward_infer_batch.npz`` is run as the original
runs it (see the docstring of ``ppllava_jax/models/projector.py``): vision tower with BT-Adapter,
then the projector, then (any-resolution image) the base + unpadded grid + newline layout. The
result must equal ``visual_tokens_i``, and the cosine map ``visual_attention_0``, at <= 1e-5.
Every size, kernel, temperature and depth comes from the fixture's config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.convert.ppllava_config import ppllava_config_from_hf
from ppllava_jax.convert.torch_io import TorchCheckpoint
from ppllava_jax.layout import anyres_token_order, num_pooled
from ppllava_jax.models.btadapter import PPLLaVAVisionModel
from ppllava_jax.models.projector import PPLLaVAProjector
from tests.convert.ppllava_parts import convert_vision_and_projector

REF = Path(os.environ.get("PPLLAVA_REFERENCE_DIR", "tests/fixtures/reference_ppllava"))
FILES = ("forward_train_batch.npz", "forward_infer_batch.npz")


def gather_tokens(tokens, order, newline):
    """``tokens float[M, D]``, ``order int32[L]`` (-1 = newline), ``newline float[D]`` ->
    ``float[L, D]``: an any-resolution image's merged tokens as the original lays them out."""
    picked = jnp.take(tokens, jnp.maximum(order, 0), axis=0)
    return jnp.where((order < 0)[:, None], newline.astype(tokens.dtype)[None], picked)


def load_reference(scan_layers: bool = False):
    """(cfg, vision params, projector params, image_newline) from the fixture directory."""
    hf = json.loads((REF / "config.json").read_text())
    clip_dir = REF / (hf.get("clip_weight") or "clip")
    clip = json.loads((clip_dir / "config.json").read_text()) if clip_dir.exists() else None
    cfg = ppllava_config_from_hf(hf, clip, scan_layers=scan_layers)
    ck = TorchCheckpoint(REF / "model.safetensors")
    vp, pp = convert_vision_and_projector(ck, cfg)
    return cfg, vp, pp, ck["image_newline"]


@pytest.fixture(scope="module")
def ref():
    return load_reference()


class _Jitted:
    """``apply`` of the two modules under ``jax.jit`` (one compile per shape)."""

    def __init__(self, cfg):
        self.vision = jax.jit(PPLLaVAVisionModel(cfg).apply)
        self.projector = jax.jit(PPLLaVAProjector(cfg).apply, static_argnames=("video",))


_JIT: dict = {}


def _jitted(cfg):
    if cfg not in _JIT:
        j = _JIT[cfg] = _Jitted(cfg)
        return j.vision, j.projector
    return _JIT[cfg].vision, _JIT[cfg].projector


def run_sample(cfg, vp, pp, newline, d, i):
    """One sample as the original encodes it -> (tokens [n_items, L, D], visual attention)."""
    vm, pm = _jitted(cfg)
    media = str(d["media_types"][i])
    px = d[f"pixel_values_{i}"].transpose(0, 1, 3, 4, 2)  # channels-last (T, V, H, W, 3)
    ids = jnp.asarray(d["clip_ids"][i : i + 1], jnp.int32)
    mask = jnp.asarray(d["clip_mask"][i : i + 1], jnp.int32)
    if media == "image":  # views are separate 1-frame samples in the tower, one sample after
        f = vm({"params": vp}, jnp.asarray(px[0][:, None]))
        f = f.reshape(1, -1, *f.shape[2:])
        out = pm({"params": pp}, f, None, ids, mask, video=False)
        tok = out["tokens"][0]  # [V, h', w', D]
        order = anyres_token_order(
            tuple(int(v) for v in d["image_sizes"][i]),
            cfg.image_grid_pinpoints,
            cfg.vision.image_size,
            tok.shape[1:3],
            tok.shape[0],
        )
        merged = gather_tokens(tok.reshape(-1, tok.shape[-1]), jnp.asarray(order), newline)
        return np.asarray(merged)[None], np.asarray(out["visual_attention"])
    video = media == "video"
    f = vm({"params": vp}, jnp.asarray(px[:, 0][None]))  # one sample of T frames
    out = pm({"params": pp}, f, None, ids, mask, video=video)
    tok = np.asarray(out["tokens"][0])
    assert tok.shape[:3] == num_pooled(cfg, px.shape[0], video)
    n_items = 1 if video else tok.shape[0]  # multi-image: one item per image
    return tok.reshape(n_items, -1, tok.shape[-1]), np.asarray(out["visual_attention"])


@pytest.mark.parametrize("fname", FILES)
def test_visual_tokens_match_reference(ref, fname: str) -> None:
    cfg, vp, pp, newline = ref
    with np.load(REF / fname) as z:
        d = dict(z)
    n = len(d["media_types"])
    assert n >= 1
    for i in range(n):
        tok, attn = run_sample(cfg, vp, pp, newline, d, i)
        want = d[f"visual_tokens_{i}"]
        assert tok.shape == want.shape, (fname, i, d["media_types"][i])
        np.testing.assert_allclose(tok, want, atol=1e-5, rtol=0, err_msg=f"{fname} sample {i}")
        if i == 0 and "visual_attention_0" in d:
            np.testing.assert_allclose(attn, d["visual_attention_0"], atol=1e-5, rtol=0)


def _random_projector(pooling: str, **kw):
    hf = json.loads((REF / "config.json").read_text())
    clip = json.loads((REF / "clip" / "config.json").read_text())
    cfg = ppllava_config_from_hf({**hf, "pooling": pooling, **kw}, clip)
    p = cfg.frame_shape[0] * cfg.frame_shape[1]
    f = jax.random.normal(jax.random.PRNGKey(1), (2, 4, p, cfg.vision.hidden_size))
    pm = PPLLaVAProjector(cfg)
    params = pm.init(jax.random.PRNGKey(0), f)["params"]
    values = pm.apply({"params": params}, f, method=lambda m, x: m.mlp(x))
    return cfg, pm, params, f, values.reshape(2, 4, *cfg.frame_shape, -1)


def test_avp_none_pllava_modes() -> None:
    cfg, pm, params, f, v = _random_projector("avp")
    assert "clip_text_model" not in params
    out = pm.apply({"params": params}, f, video=True)
    np.testing.assert_allclose(out["tokens"][:, 0], v.mean(1), atol=1e-6)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    out = pm.apply({"params": params}, f, mask, video=True)
    np.testing.assert_allclose(out["tokens"][0, 0], v[0, :2].mean(0), atol=1e-6)
    cfg, pm, params, f, v = _random_projector("none")
    np.testing.assert_allclose(pm.apply({"params": params}, f)["tokens"], v, atol=1e-6)
    cfg, pm, params, f, v = _random_projector("pllava", pllava_pooling_shape=[2, 3, 2])
    out = pm.apply({"params": params}, f)["tokens"]
    assert out.shape == (2, 2, 3, 2, v.shape[-1])
    np.testing.assert_allclose(out[:, 0, 0, 0], v[:, :2, :2, :3].mean((1, 2, 3)), atol=1e-6)


def test_padded_frames_do_not_change_valid_tokens(ref) -> None:
    cfg, vp, pp, _ = ref
    apply = _jitted(cfg)[1]
    p = cfg.frame_shape[0] * cfg.frame_shape[1]
    f = jax.random.normal(jax.random.PRNGKey(2), (1, 4, p, cfg.vision.hidden_size))
    ids = jnp.asarray(np.r_[[97, 5, 6, 98], np.full(6, 98)][None], jnp.int32)
    m = jnp.asarray((np.arange(10) < 4)[None], jnp.int32)
    full = apply({"params": pp}, f, None, ids, m, video=False)
    pad = jnp.concatenate([f, 10 * jnp.ones_like(f[:, :2])], axis=1)
    fm = jnp.asarray([[1, 1, 1, 1, 0, 0]], bool)
    part = apply({"params": pp}, pad, fm, ids, m, video=False)
    np.testing.assert_allclose(part["tokens"][:, :4], full["tokens"], atol=1e-6)
    assert part["token_mask"].tolist() == [[True] * 4 + [False] * 2]


def test_anyres_layout() -> None:
    pins = ((24, 48), (48, 24), (48, 48))
    # a single view: its tokens, then one newline (the original's encode_image)
    assert anyres_token_order((24, 24), pins, 24, (2, 2), 1).tolist() == [0, 1, 2, 3, -1]
    # a wide image on a 1x2 grid: 2 rows x 4 cols pooled; unpadding keeps both rows
    order = anyres_token_order((20, 44), pins, 24, (2, 2))
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, -1, 6, 7, 10, 11, -1]
    # a tall image on a 2x1 grid: 4 rows x 2 cols, nothing to unpad
    order = anyres_token_order((48, 20), pins, 24, (2, 2))
    assert (order == -1).sum() == 4 and len(order) == 4 + 4 * 3
    # a very wide image, unpooled 6x6 views on a 1x2 grid: 6x12, unpadding keeps rows 2..3
    order = anyres_token_order((10, 44), pins, 24, (6, 6))
    assert len(order) == 36 + 2 * 13 and (order == -1).sum() == 2
    assert order[36] == 36 + 2 * 6  # view 1, row 2, col 0
    with pytest.raises(ValueError, match="crop grid"):
        anyres_token_order((40, 44), pins, 24, (2, 2), 3)
