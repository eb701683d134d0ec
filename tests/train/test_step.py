"""Train steps: gradient accumulation, frozen parameters, optimizer-state coverage, DPO."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppllava_jax.train.optimizer import make_optimizer, param_paths, trainable_predicate
from ppllava_jax.train.state import create_train_state
from ppllava_jax.train.step import make_grad_fn, make_train_step, microbatch
from ppllava_jax.train.trainer import default_config
from tests.train.toy_model import make_batch, make_toy


def _config(accum=1, trainable="ppllava_sft", total=10):
    cfg = default_config()
    cfg.train.total_steps = total
    cfg.train.grad_accum_steps = accum
    cfg.optimizer.lr = 1e-2
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.weight_decay = 0.01
    cfg.optimizer.trainable = trainable
    return cfg


@pytest.fixture(scope="module")
def toy():
    apply_fn, init = make_toy(dropout=0.0)
    return apply_fn, init()


def _state(params, cfg, dpo=False):
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.total_steps)
    return create_train_state(params, tx, trainable_predicate(cfg.optimizer), with_reference=dpo)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_microbatch_layout_keeps_dpo_pairs():
    rows = np.arange(8)  # 4 chosen (0..3) then 4 rejected (4..7)
    mb = np.asarray(microbatch({"x": rows}, 2)["x"])
    assert mb.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]  # each: chosen i, then rejected i
    with pytest.raises(ValueError, match="does not split"):
        microbatch({"x": rows}, 3)


def test_accumulation_equals_big_batch_sft(toy):
    apply_fn, params = toy
    k = 4
    batch = make_batch(np.random.default_rng(3), 8, 8)
    # SGD: Adam's first update is ~lr*sign(g), which amplifies rounding noise on gradients near
    # 0 and would test Adam rather than the accumulation; with SGD the params carry the grads.
    tx = optax.sgd(0.1)
    state = _state(params, _config())
    state = state.replace(opt_state=tx.init(state.params))
    rng = jax.random.key(0)
    s1, m1 = jax.jit(make_train_step(apply_fn, _config(1), tx=tx))(state, batch, rng)
    sk, mk = jax.jit(make_train_step(apply_fn, _config(k), tx=tx))(state, batch, rng)
    assert _max_diff(s1.params, sk.params) <= 1e-6
    assert _max_diff(s1.params, state.params) > 1e-3  # it did move
    np.testing.assert_allclose(float(m1["loss"]), float(mk["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(mk["grad_norm"]), rtol=1e-6)
    assert int(m1["num_tokens"]) == int(mk["num_tokens"]) > 0
    assert int(m1["num_samples"]) == int(mk["num_samples"]) == 8


def test_accumulation_equals_big_batch_dpo(toy):
    apply_fn, params = toy
    batch = make_batch(np.random.default_rng(3), 8, 8)  # 4 chosen rows, then 4 rejected
    state = _state(params, _config(trainable="llm_only"), dpo=True)
    # make the policy differ from the reference so the loss is not flat
    state = state.replace(params=jax.tree.map(lambda p: p * 1.1, state.params))
    rng = jax.random.key(0)
    g1, a1 = jax.jit(make_grad_fn(apply_fn, "dpo", accum_steps=1))(state, batch, rng)
    gk, ak = jax.jit(make_grad_fn(apply_fn, "dpo", accum_steps=2))(state, batch, rng)
    assert _max_diff(g1, gk) <= 1e-6
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1)) > 1e-4
    assert int(a1["num_pairs"]) == int(ak["num_pairs"]) == 4
    np.testing.assert_allclose(float(a1["loss_sum"]), float(ak["loss_sum"]), rtol=1e-6)
    np.testing.assert_allclose(
        float(a1["rewards/margins"]), float(ak["rewards/margins"]), rtol=1e-5, atol=1e-7
    )


def test_frozen_bit_identical_and_opt_state_only_trainable(toy):
    apply_fn, params = toy
    cfg = _config()
    state = _state(params, cfg)
    before_frozen = jax.device_get(state.frozen)
    before_train = jax.device_get(state.params)
    step = jax.jit(make_train_step(apply_fn, cfg), donate_argnums=0)
    for i in range(3):
        state, metrics = step(state, make_batch(np.random.default_rng(i), 4, 8), jax.random.key(i))
    assert int(state.step) == 3
    for a, b in zip(jax.tree.leaves(before_frozen), jax.tree.leaves(state.frozen), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    for path, a, b in zip(
        param_paths(before_train),
        jax.tree.leaves(before_train),
        jax.tree.leaves(state.params),
        strict=True,
    ):
        assert not np.array_equal(np.asarray(a), np.asarray(b)), path
    # Adam moments exist for trainable leaves only
    trainable_paths = set(param_paths(state.params))
    mu = state.opt_state[1][0].mu
    assert set(param_paths(mu)) == trainable_paths
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_tr = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_opt <= 2 * n_tr + 8  # mu, nu and a few counters
    assert set(metrics) >= {"loss", "lr", "grad_norm", "num_tokens", "num_samples"}
    assert "vision_tower/vision_model/encoder/kernel" not in trainable_paths


def test_dpo_step(toy):
    apply_fn, params = toy
    cfg = _config(accum=2, trainable="llm_only")
    cfg.train.mode = "dpo"
    state = _state(params, cfg, dpo=True)
    ref0 = jax.device_get(state.ref_params)
    assert set(param_paths(ref0)) == set(param_paths(state.params))
    step = jax.jit(make_train_step(apply_fn, cfg, "dpo"))
    batch = make_batch(np.random.default_rng(0), 4, 8)  # 2 chosen rows then 2 rejected
    state, m = step(state, batch, jax.random.key(0))
    # policy == reference at step 0: loss log 2, zero rewards
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
    assert float(m["rewards/margins"]) == 0.0 and int(m["num_pairs"]) == 2
    for _ in range(3):
        state, m = step(state, batch, jax.random.key(1))
    assert float(m["loss"]) < np.log(2.0)  # the policy learned to prefer the chosen rows
    assert float(m["rewards/accuracies"]) == 1.0
    for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(state.ref_params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
