"""Scanned vs unscanned layers, conversion into the scanned layout, remat policies.

Both layouts come from the converter (``convert_checkpoint(..., scan_layers=False/True)``) of the
reference fixture checkpoint; the scanned one must still match the fixture logits.
"""

import jax
import numpy as np
import pytest
from flax import traverse_util

from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint
from ppllava_jax.models.ppllava import PPLLaVA
from tests.sft_loss import mean_loss
from tests.test_sharding import KINDS, REF, fixture_batch


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = {}
    for scan in (False, True):
        d = tmp_path_factory.mktemp(f"scan_{scan}") / "ckpt"
        convert_checkpoint(REF, d, scan_layers=scan)
        _, cfg, params = load_checkpoint(d)
        assert cfg.scan_layers == scan and cfg.llm.scan_layers == scan
        out[scan] = (cfg, params)
    return out


def _forward(cfg, params, batch):
    def fwd(p, b):
        out = PPLLaVA(cfg).apply({"params": p}, b)
        return {**out, "loss": mean_loss(out["logits"], b)}

    return jax.jit(fwd)(params, batch)


def test_layouts_hold_the_same_numbers(layouts):
    (cfg_u, p_u), (_, p_s) = layouts[False], layouts[True]
    flat_u = traverse_util.flatten_dict(p_u, sep="/")
    flat_s = traverse_util.flatten_dict(p_s, sep="/")
    n = cfg_u.llm.num_hidden_layers
    q_s = flat_s["language_model/model/layers/self_attn/q_proj/kernel"]
    assert q_s.shape[0] == n
    for i in range(n):
        np.testing.assert_array_equal(
            q_s[i], flat_u[f"language_model/model/layers_{i}/self_attn/q_proj/kernel"]
        )
    assert sum(v.size for v in flat_u.values()) == sum(v.size for v in flat_s.values())


def test_scanned_logits_equal_unscanned_and_match_fixture(layouts):
    data = dict(np.load(REF / "forward_train_batch.npz"))
    (cfg_u, p_u), (cfg_s, p_s) = layouts[False], layouts[True]
    batch = fixture_batch(cfg_s)
    out_u = _forward(cfg_u, p_u, batch)
    out_s = _forward(cfg_s, p_s, batch)
    np.testing.assert_allclose(out_s["logits"], out_u["logits"], atol=1e-5)
    np.testing.assert_allclose(out_s["loss"], out_u["loss"], rtol=1e-6)
    # the fixture's three samples (fixture_batch appends a copy of sample 0): parity <= 1e-4
    ref = data["logits"]
    assert [KINDS[str(k)] for k in data["media_types"]]
    for i in range(ref.shape[0]):
        m = np.asarray(batch["attention_mask"][i]).astype(bool)
        got = np.asarray(out_s["logits"][i])[m]
        np.testing.assert_allclose(got, ref[i, : int(m.sum())], atol=1e-4, err_msg=f"sample {i}")


def test_remat_policies_give_the_same_loss_and_gradients(layouts):
    cfg, params = layouts[True]  # remat wraps the scanned body (the layout that trains)
    batch = fixture_batch(cfg)

    def loss_and_grads(policy):
        model = PPLLaVA(cfg.replace(remat_policy=policy))

        def f(p, b):
            return mean_loss(model.apply({"params": p}, b, deterministic=True)["logits"], b)

        return jax.jit(jax.value_and_grad(f))(params, batch)

    loss0, g0 = loss_and_grads("none")
    for policy in ("full", "dots"):
        loss, g = loss_and_grads(policy)
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=policy)
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g), strict=True
        ):
            np.testing.assert_allclose(
                b, a, atol=1e-6, rtol=1e-5, err_msg=f"{policy} {jax.tree_util.keystr(path)}"
            )


def test_remat_is_in_the_scanned_program(layouts):
    """'full' actually rematerialises: the jaxpr of the gradient holds a remat/checkpoint."""
    cfg, params = layouts[True]
    batch = fixture_batch(cfg)
    model = PPLLaVA(cfg.replace(remat_policy="full"))
    f = lambda p: mean_loss(model.apply({"params": p}, batch)["logits"], batch)  # noqa: E731
    text = str(jax.make_jaxpr(jax.grad(f))(params))
    assert "checkpoint" in text or "remat" in text
