"""The analytic FLOP count (ppllava_jax/flops.py) against the matmuls the model really traces:
every dot_general and convolution of the forward's jaxpr, scanned layers counted once per
iteration."""

import math

import jax
import jax.extend
import numpy as np
import pytest

from ppllava_jax import flops
from ppllava_jax.convert.ppllava_config import ppllava_config_from_dict
from ppllava_jax.models.ppllava import PPLLaVA, init_params


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), (lb, _) = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        contract = math.prod(lhs[i] for i in lc)
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape  # the kernel: out, in, spatial... in some layout
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / max(rhs)
    return 0.0


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        mult = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += mult * _jaxpr_flops(sub)
    return total


def tiny_config(**kw):
    """A tiny PPLLaVA config (32-px frames, 4x4 patches, 2-layer towers, 3-layer LLM); ``kw``
    overrides fields."""
    d = dict(
        vision=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=16,
        ),
        clip_text=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            projection_dim=16,
        ),
        llm=dict(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_token_index=95,
        frame_shape=(4, 4),
        pooling="ppllava",
        pooling_kernel=(2, 2, 2),
        pooling_stride=(2, 2, 2),
        btadapter=True,
        btadapter_depth=2,
        vision_feature_layer=-1,
        max_T=8,
        scan_layers=True,
    )
    d.update(kw)
    return ppllava_config_from_dict(d)


def _video_batch(cfg, rows, length, frames, clip_len):
    n_vis = (frames // 2) * 2 * 2
    ids = np.full((rows, length), 5, np.int32)
    vis = np.full((rows, length), -1, np.int32)
    for r in range(rows):
        vis[r, 1 : 1 + n_vis] = r * n_vis + np.arange(n_vis)
    return {
        "input_ids": ids,
        "visual_index": vis,
        "attention_mask": np.ones((rows, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "video_pixels": np.zeros((rows, frames, 32, 32, 3), np.float32),
        "video_frames": np.ones((rows, frames), bool),
        "video_clip_ids": np.ones((rows, clip_len), np.int32),
        "video_clip_mask": np.ones((rows, clip_len), np.int32),
    }


@pytest.mark.parametrize("scan,layer", [(True, -1), (False, -1), (True, -2), (False, -2)])
def test_forward_count_equals_traced_matmuls(scan, layer):
    """Also with a feature layer below the top: the trunk layers above it are neither counted
    nor run (``CLIPEncoder(upto_taps=True)``)."""
    cfg = tiny_config(scan_layers=scan, vision_feature_layer=layer)
    rows, length, frames, clip_len = 3, 24, 4, 10
    batch = _video_batch(cfg, rows, length, frames, clip_len)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    model = PPLLaVA(cfg)
    jaxpr = jax.make_jaxpr(lambda p, b: model.apply({"params": p}, b)["logits"])(params, batch)
    traced = _jaxpr_flops(jaxpr.jaxpr)
    counted = flops.forward_flops(cfg, rows, length, [(rows, frames, False)], clip_len)
    np.testing.assert_allclose(counted["total"], traced, rtol=1e-9)
    assert counted["llm"] > 0 and counted["btadapter"] > 0 and counted["clip_text"] > 0


def test_train_multipliers_follow_what_trains():
    every = flops.part_multipliers(None)
    assert set(every.values()) == {3.0}
    recipe = flops.part_multipliers(
        ["multi_modal_projector/linear_1/kernel", "language_model/model/layers/mlp/x"]
    )
    # frozen CLIP trunk and text tower: forward only; pooling and the adapter sit between a
    # trained projector and ... nothing trained upstream: forward only
    assert recipe["vision_trunk"] == recipe["clip_text"] == recipe["btadapter"] == 1.0
    assert recipe["projector_mlp"] == recipe["llm"] == 3.0
    assert recipe["pooling"] == 2.0 and recipe["lm_head"] == 2.0  # gradients pass through
    cfg = tiny_config()
    b = _video_batch(cfg, 2, 16, 4, 8)
    fwd = flops.forward_flops(cfg, 2, 16, [(2, 4, False)], 8)
    assert flops.batch_train_flops(cfg, b) == pytest.approx(3 * fwd["total"])
