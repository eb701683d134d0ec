"""``models/encoder.py``: hidden-state indexing and taps of the shared pre-LN encoder (its layer
numerics are checked against transformers through the CLIP and SigLIP towers, test_clip.py and
test_siglip.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.models.config import CLIPVisionConfig
from ppllava_jax.models.encoder import CLIPEncoder, normalize_taps


def test_normalize_taps() -> None:
    assert normalize_taps((0, 3, -1, -2, -4), 3) == (0, 3, 3, 2, 0)
    with pytest.raises(ValueError, match="hidden state 4 does not exist \\(4 hidden states\\)"):
        normalize_taps((4,), 3)
    with pytest.raises(ValueError, match="hidden state -5 does not exist"):
        normalize_taps((-5,), 3)


@pytest.mark.parametrize("scan", [False, True])
def test_taps_are_the_layer_outputs(scan: bool) -> None:
    """Tap k is the output of layer k - 1 (0 = the input), repeats and order kept, in either
    layout; the last tap equals the final output."""
    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    ).replace(scan_layers=scan)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    enc = CLIPEncoder(cfg)
    params = enc.init(jax.random.key(1), x)["params"]
    taps = (3, 0, 1, 1, 2)
    last, tapped = enc.apply({"params": params}, x, taps=taps)
    assert tapped.shape == (len(taps), 2, 5, 16)
    np.testing.assert_array_equal(tapped[1], x)
    np.testing.assert_allclose(tapped[0], last, atol=1e-6)
    np.testing.assert_array_equal(tapped[2], tapped[3])
    # tap 2 is tap 1 run through one more layer: a 1-layer prefix of the same weights
    one = cfg.replace(num_hidden_layers=1)
    if scan:
        first = jax.tree.map(lambda a: a[:1], params)
        second = jax.tree.map(lambda a: a[1:2], params)
    else:
        first, second = {"layers_0": params["layers_0"]}, {"layers_0": params["layers_1"]}
    y1, _ = CLIPEncoder(one).apply({"params": first}, x)
    y2, _ = CLIPEncoder(one).apply({"params": second}, y1)
    np.testing.assert_allclose(tapped[2], y1, atol=1e-5)
    np.testing.assert_allclose(tapped[4], y2, atol=1e-5)
    _, none = enc.apply({"params": params}, x)
    assert none.shape == (0, 2, 5, 16) and none.dtype == jnp.float32
    with pytest.raises(ValueError, match="taps \\[4\\] out of range \\[0, 3\\]"):
        enc.apply({"params": params}, x, taps=(4,))


@pytest.mark.parametrize("scan", [False, True])
def test_upto_taps_runs_only_the_layers_below_the_last_tap(scan: bool) -> None:
    """``upto_taps``: the same taps, ``last`` = the last tapped layer's output, and the layers
    above it are not in the program (a scan of that many steps, or that many unrolled layers)."""
    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2
    ).replace(scan_layers=scan)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    enc = CLIPEncoder(cfg)
    params = enc.init(jax.random.key(1), x)["params"]
    _, want = enc.apply({"params": params}, x, taps=(2, 0, 1))
    last, got = enc.apply({"params": params}, x, taps=(2, 0, 1), upto_taps=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(last, want[0])
    _, none = enc.apply({"params": params}, x, taps=(0,), upto_taps=True)
    np.testing.assert_array_equal(none[0], x)

    def fn(p):
        return enc.apply({"params": p}, x, taps=(2,), upto_taps=True)[1]

    text = str(jax.make_jaxpr(fn)(params))
    if scan:
        assert "length=2" in text and "length=4" not in text
    else:
        assert text.count("dot_general") == _dots_of_a_full_run(enc, params, x) // 2

    # gradients reach only the layers that ran (the others get zeros), as without upto_taps
    g = jax.grad(lambda p: fn(p).sum())(params)
    g_full = jax.grad(lambda p: enc.apply({"params": p}, x, taps=(2,))[1].sum())(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _dots_of_a_full_run(enc, params, x) -> int:
    """``dot_general`` count of the 4-layer encoder's program (every layer run)."""
    return str(jax.make_jaxpr(lambda p: enc.apply({"params": p}, x, taps=(2,)))(params)).count(
        "dot_general"
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "masked,causal", [(False, False), (True, False), (False, True), (True, True)]
)
def test_heads_first_attention_is_the_reference(dtype, masked, causal):
    """The CPU layout of CLIP attention (``heads_first_attention``) against
    ``jax.nn.dot_product_attention(implementation='xla')``: values and gradients; key padding
    with a fully masked row, causal, both."""
    from ppllava_jax.models.encoder import heads_first_attention

    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (jax.random.normal(kk, (2, 9, 3, 16), dtype) for kk in ks[:3])
    mask = None
    if masked:
        m = np.ones((2, 1, 1, 9), bool)
        m[0, ..., 6:] = False
        m[1] = False  # no visible key: the uniform average, as the reference
        mask = jnp.asarray(m)

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

    def got(q, k, v):
        return heads_first_attention(q, k, v, mask=mask, is_causal=causal)

    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(got(q, k, v), np.float32), np.asarray(ref(q, k, v), np.float32), atol=tol
    )
    w = jax.random.normal(ks[3], q.shape, jnp.float32)
    gr = jax.grad(lambda *a: jnp.sum(ref(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))
    gg = jax.grad(lambda *a: jnp.sum(got(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))
    for a, b in zip(gg(q, k, v), gr(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol)
