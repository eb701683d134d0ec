"""Trainable/frozen selection by path, split/merge, weight-decay mask, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.train.optimizer import (
    check_selection,
    decay_mask_fn,
    default_optimizer_config,
    make_schedule,
    merge_params,
    param_count_table,
    param_paths,
    split_params,
    trainable_predicate,
)
from tests.train.toy_model import make_toy


@pytest.fixture(scope="module")
def params():
    return make_toy()[1]()


def _frozen_paths(params, trainable):
    cfg = default_optimizer_config()
    cfg.trainable = trainable
    _, frozen = split_params(params, trainable_predicate(cfg))
    return sorted(param_paths(frozen))


def test_ppllava_sft_preset(params):
    assert _frozen_paths(params, "ppllava_sft") == [
        "multi_modal_projector/clip_text_model/bias",
        "multi_modal_projector/clip_text_model/kernel",
        "multi_modal_projector/logit_scale",
        "vision_tower/vision_model/class_embedding",
        "vision_tower/vision_model/embeddings/bias",
        "vision_tower/vision_model/embeddings/kernel",
        "vision_tower/vision_model/encoder/bias",
        "vision_tower/vision_model/encoder/kernel",
        "vision_tower/vision_model/post_layernorm/bias",
        "vision_tower/vision_model/post_layernorm/scale",
    ]


def test_other_presets_and_regex_lists(params):
    paths = param_paths(params)
    llm = [p for p in paths if p.startswith("language_model/")]
    assert sorted(set(paths) - set(_frozen_paths(params, "llm_only"))) == sorted(llm)
    proj = set(paths) - set(_frozen_paths(params, "projector_only"))
    assert proj == {
        "image_newline",
        *(
            p
            for p in paths
            if p.split("/")[1:2] in (["linear_1"], ["linear_2"], ["clip_visual_ln"])
        ),
    }
    trained = set(paths) - set(_frozen_paths(params, ["^image_newline$", "lm_head"]))
    assert trained == {"image_newline", "language_model/lm_head/kernel"}
    cfg = default_optimizer_config()
    cfg.trainable = "no_such_preset_or_path"
    with pytest.raises(ValueError, match="selects no parameter"):
        check_selection(params, cfg)


def test_split_merge_roundtrip_and_table(params):
    pred = trainable_predicate(default_optimizer_config())
    tr, fr = split_params(params, pred)
    merged = merge_params(tr, fr)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        assert a is b  # no copies
    with pytest.raises(ValueError, match="two trees"):
        merge_params(tr, tr)
    table = param_count_table(params, pred)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert table.splitlines()[-1].split()[1:] == [
        f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr)):,}",
        f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(fr)):,}",
    ]
    assert n > 0


def test_decay_mask(params):
    mask = dict(zip(param_paths(params), jax.tree.leaves(decay_mask_fn()(params)), strict=True))
    assert mask["language_model/model/layers_0/q_proj/kernel"]
    assert mask["language_model/model/embed_tokens/embedding"]
    assert mask["vision_tower/vision_model/btadapter_fc/kernel"]
    for p in (
        "language_model/model/layers_0/q_proj/bias",
        "language_model/model/layers_0/input_layernorm/scale",
        "language_model/model/norm/scale",
        "multi_modal_projector/clip_visual_ln/scale",
        "vision_tower/vision_model/class_embedding",
        "image_newline",
    ):
        assert not mask[p], p
    # scanned layers: a norm weight with a leading layer axis is still not decayed
    scanned = {"layers": {"post_attention_layernorm": {"weight": np.ones((4, 8))}}}
    assert not jax.tree.leaves(decay_mask_fn()(scanned))[0]
    pos = {"embeddings": {"position_embedding": {"embedding": np.ones((4, 8))}}}
    assert not jax.tree.leaves(decay_mask_fn()(pos))[0]


def test_schedules():
    cfg = default_optimizer_config()
    cfg.lr, cfg.warmup_ratio = 1.0, 0.2
    cos = make_schedule(cfg, 10)
    np.testing.assert_allclose(
        [float(cos(s)) for s in (0, 1, 2, 6, 10)], [0, 0.5, 1, 0.5, 0], atol=1e-6
    )
    cfg.schedule = "linear"
    lin = make_schedule(cfg, 10)
    np.testing.assert_allclose([float(lin(s)) for s in (1, 2, 4, 10)], [0.5, 1, 0.75, 0], atol=1e-6)
    cfg.schedule, cfg.warmup_steps = "constant", 0
    assert float(make_schedule(cfg, 10)(0)) == 1.0
    cfg.schedule = "bogus"
    with pytest.raises(ValueError, match="cosine"):
        make_schedule(cfg, 10)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clipping_equals_optax_and_torch(max_norm):
    """``clip_by_global_norm`` (a multiplication, for XLA's fusion) against optax's and
    PyTorch's ``clip_grad_norm_``, clipping (0.5) and not (1e3: unchanged bit for bit)."""
    import optax
    import torch

    from ppllava_jax.train.optimizer import clip_by_global_norm

    rng = np.random.default_rng(0)
    g = {"a": rng.standard_normal((7, 5)).astype(np.float32), "b": {"c": rng.standard_normal(9)}}
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    got, _ = clip_by_global_norm(max_norm).update(g, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
    ts = [torch.tensor(np.asarray(x)) for x in jax.tree.leaves(g)]
    for t in ts:
        t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(ts, max_norm)
    for a, r, t in zip(jax.tree.leaves(got), jax.tree.leaves(ref), ts, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-6, atol=0)
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=2e-6, atol=0)
        if max_norm > 100:
            np.testing.assert_array_equal(a, r)
    norm = float(optax.tree.norm(got))
    assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(g))), rel=1e-6)
