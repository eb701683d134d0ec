"""Weighted 3D pooling: the reference fixture cases and a property test against a NumPy loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppllava_jax.layout import pool_windows
from ppllava_jax.models.pooling import adaptive_avg_pool3d, weighted_pool3d

REF = Path(os.environ.get("PPLLAVA_REFERENCE_DIR", "tests/fixtures/reference_ppllava"))


def _cases() -> list[str]:
    with np.load(REF / "pooling.npz") as d:
        return sorted({k.split("_")[0] for k in d.files if k.endswith("_input")})


@pytest.mark.parametrize("case", _cases())
def test_reference_cases(case: str) -> None:
    with np.load(REF / "pooling.npz") as d:
        x = d[f"{case}_input"].transpose(0, 2, 3, 4, 1)  # (N,C,D,H,W) -> channels-last
        w = d[f"{case}_weights"] if f"{case}_weights" in d.files else None
        args = json.loads(str(d[f"{case}_args"]))
        ref = d[f"{case}_output"].transpose(0, 2, 3, 4, 1)
    k, s, o = pool_windows(
        x.shape[1:4], kernel=args["kernel"], stride=args["stride"], output_size=args["output_size"]
    )
    if args["output_size"] is not None:
        assert o == tuple(args["output_size"])
    y = weighted_pool3d(
        jnp.asarray(x), None if w is None else jnp.asarray(w), k, s, args["temperature"]
    )
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=0)


def _loop(x, w, k, s, temp):
    n, t, h, ww, c = x.shape
    o = [(i - kk) // ss + 1 for i, kk, ss in zip((t, h, ww), k, s)]
    out = np.zeros((n, *o, c), np.float64)
    for b in range(n):
        for a in range(o[0]):
            for i in range(o[1]):
                for j in range(o[2]):
                    sl = (
                        b,
                        slice(a * s[0], a * s[0] + k[0]),
                        slice(i * s[1], i * s[1] + k[1]),
                        slice(j * s[2], j * s[2] + k[2]),
                    )
                    region = x[sl].reshape(-1, c).astype(np.float64)
                    if w is None:
                        p = np.full(region.shape[0], 1.0 / region.shape[0])
                    else:
                        z = w[sl].reshape(-1).astype(np.float64) / temp
                        p = np.exp(z - z.max())
                        p /= p.sum()
                    out[b, a, i, j] = p @ region
    return out


# a few fixed input shapes (one compile each when run eagerly op by op), random windows
_SHAPES = [(1, 4, 5, 6, 2), (2, 5, 7, 4, 3), (1, 3, 6, 6, 1)]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from(_SHAPES),
    data=st.data(),
    weighted=st.booleans(),
    temp=st.sampled_from([0.01, 0.5, 1.0]),
)
def test_matches_numpy_loop(shape, data, weighted, temp) -> None:
    n, t, h, w, c = shape
    k = tuple(data.draw(st.integers(1, i), label=f"k{a}") for a, i in enumerate((t, h, w)))
    s = tuple(data.draw(st.integers(1, 3), label=f"s{a}") for a in range(3))
    rng = np.random.default_rng(sum(shape) + sum(k) + 10 * sum(s))
    x = rng.standard_normal(shape).astype(np.float32)
    wt = rng.standard_normal(shape[:4]).astype(np.float32) * 0.05 if weighted else None
    y = weighted_pool3d(jnp.asarray(x), None if wt is None else jnp.asarray(wt), k, s, temp)
    ref = _loop(x, wt, k, s, temp)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5, rtol=1e-5)


def test_adaptive_avg_pool_matches_torch() -> None:
    import torch

    x = np.random.default_rng(0).standard_normal((2, 7, 5, 6, 3)).astype(np.float32)
    ref = torch.nn.AdaptiveAvgPool3d((3, 2, 4))(torch.tensor(x).permute(0, 4, 1, 2, 3))
    y = adaptive_avg_pool3d(jnp.asarray(x), (3, 2, 4))
    np.testing.assert_allclose(np.asarray(y), ref.permute(0, 2, 3, 4, 1).numpy(), atol=1e-6, rtol=0)
