"""Identical batch shapes for multi-host steps: empty fixed groups and a lengthened batch change
no logit, loss or gradient; the pipeline and train.py honour the settings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.data.collate import Media, Sample, collate, pad_length
from ppllava_jax.layout import IGNORE_INDEX
from ppllava_jax.models.ppllava import PPLLaVA, init_params
from ppllava_jax.train import run
from tests.sft_loss import mean_loss
from tests.test_flops import tiny_config

IMG = 95


def _samples(rng):
    multi = Media("multi", rng.normal(size=(2, 32, 32, 3)).astype(np.float32))
    s0 = Sample(
        np.array([1, IMG, 7, IMG, 9, 10]),
        np.array([IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 9, 10]),
        multi,
    )
    s1 = Sample(np.array([1, 4, 5, 6]), np.array([IGNORE_INDEX, IGNORE_INDEX, 5, 6]))
    for s in (s0, s1):
        s.clip_ids, s.clip_mask = rng.integers(1, 60, size=6), np.ones(6, np.int32)
    return [s0, s1]


def test_empty_groups_and_padding_leave_the_model_unchanged():
    cfg = tiny_config(btadapter_depth=1, vision_feature_layer=-2)
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    model = PPLLaVA(cfg)
    samples = _samples(np.random.default_rng(0))
    kw = dict(clip_length=6, num_frames={"video": 4, "multi": 2})
    plain = collate(samples, cfg, **kw)
    fixed = collate(samples, cfg, groups=("video", "multi"), **kw)
    assert "video_pixels" not in plain
    assert fixed["video_pixels"].shape == (1, 4, 32, 32, 3) and not fixed["video_frames"].any()
    longer = pad_length(fixed, plain["input_ids"].shape[1] + 5, pad_id=0)
    assert (
        longer["attention_mask"][:, -5:].sum() == 0
        and (longer["labels"][:, -5:] == IGNORE_INDEX).all()
    )

    def loss(p, b):
        return mean_loss(model.apply({"params": p}, b)["logits"], b)

    outs = []
    for b in (plain, longer):  # longer = the fixed groups, then lengthened
        b = {k: jnp.asarray(v) for k, v in b.items()}
        logits = model.apply({"params": params}, b)["logits"]
        value, grads = jax.value_and_grad(loss)(params, b)
        assert np.isfinite(float(value))
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        outs.append((np.asarray(logits), float(value), grads))
    n = plain["input_ids"].shape[1]
    m = plain["attention_mask"].astype(bool)
    for logits, value, grads in outs[1:]:
        np.testing.assert_allclose(logits[:, :n][m], outs[0][0][m], atol=1e-5)
        np.testing.assert_allclose(value, outs[0][1], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][2])):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_pad_length_refuses_what_it_cannot_do():
    cfg = tiny_config()
    b = collate(_samples(np.random.default_rng(1)), cfg, clip_length=6)
    with pytest.raises(ValueError, match="shorten"):
        pad_length(b, 2, 0)
    left = collate(_samples(np.random.default_rng(1)), cfg, clip_length=6, padding_side="left")
    with pytest.raises(ValueError, match="right-padded"):
        pad_length(left, 40, 0)


def test_multihost_needs_fixed_groups():
    from configs import demo

    cfg = demo.get_config()
    run.check_multihost(cfg, 4)  # the demo fixes its video group
    with cfg.unlocked():
        cfg.data.fixed_groups = []
    run.check_multihost(cfg, 1)
    with pytest.raises(ValueError, match="fixed_groups"):
        run.check_multihost(cfg, 4)
