"""``models/layers.py``: the shared building blocks against their PyTorch / transformers
counterparts (RMSNorm, rotary positions, activations, the patch conv), and the scan / loop
layouts of ``stack_layers``."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from ppllava_jax.models import layers


def test_rms_norm_matches_transformers() -> None:
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3
    w = np.random.default_rng(1).normal(size=(16,)).astype(np.float32)
    ref = LlamaRMSNorm(16, eps=1e-5)
    ref.weight.data = torch.tensor(w)
    want = ref(torch.tensor(x)).detach().numpy()
    got = layers.RMSNorm(eps=1e-5).apply({"params": {"weight": w}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("theta", [10000.0, 1000000.0])
def test_rope_matches_transformers(theta: float) -> None:
    b, s, n, h = 2, 7, 3, 8
    rng = np.random.default_rng(0)
    q = rng.normal(size=(b, s, n, h)).astype(np.float32)
    pos = np.stack([np.arange(s), np.arange(s) + 5]).astype(np.int32)  # e.g. left padding
    hf = HFLlamaConfig(
        hidden_size=n * h, num_attention_heads=n, rope_theta=theta, max_position_embeddings=64
    )
    t_cos, t_sin = LlamaRotaryEmbedding(hf)(torch.tensor(q), torch.tensor(pos, dtype=torch.long))
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), h, theta)
    np.testing.assert_allclose(np.asarray(cos), t_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), t_sin.numpy(), atol=1e-6)
    qt = torch.tensor(q).transpose(1, 2)  # transformers: [B, N, S, H]
    want, _ = apply_rotary_pos_emb(qt, qt, t_cos, t_sin)
    got = layers.apply_rope(jnp.asarray(q), cos, sin)
    np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "torch_fn"),
    [
        ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
        ("gelu", torch.nn.functional.gelu),
        ("gelu_pytorch_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
        ("silu", torch.nn.functional.silu),
        ("relu", torch.relu),
    ],
)
def test_activations_match_torch(name, torch_fn) -> None:
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    got = layers.activation(name)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), torch_fn(torch.tensor(x)).numpy(), atol=1e-6)


def test_unknown_activation_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown activation 'swish'.*quick_gelu"):
        layers.activation("swish")


@dataclasses.dataclass(frozen=True)
class _Vision:
    image_size: int = 8
    patch_size: int = 4
    hidden_size: int = 5
    dtype: str = "float32"
    param_dtype: str = "float32"


class _Patches(nn.Module):
    cfg: _Vision
    use_bias: bool

    @nn.compact
    def __call__(self, px):
        return layers.embed_patches(px, self.cfg, use_bias=self.use_bias)


@pytest.mark.parametrize("use_bias", [False, True])
def test_patch_conv_is_a_matmul_per_patch(use_bias: bool) -> None:
    cfg = _Vision()
    px = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    params = nn.unbox(_Patches(cfg, use_bias).init(jax.random.key(0), px)["params"])
    kernel = params["patch_embedding"]["kernel"]  # HWIO
    assert kernel.shape == (4, 4, 3, 5) and ("bias" in params["patch_embedding"]) == use_bias
    got = np.asarray(_Patches(cfg, use_bias).apply({"params": params}, px))
    # torch's flatten(2) order: patches row-major, each patch (row, col, channel) . kernel
    blocks = px.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    want = blocks @ np.asarray(kernel).reshape(48, 5)
    if use_bias:
        want = want + np.asarray(params["patch_embedding"]["bias"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="pixel_values are 8x4; the vision tower takes 8x8"):
        _Patches(cfg, use_bias).apply({"params": params}, px[:, :, :4])


def test_l2_normalize_and_valid_frames() -> None:
    x = jnp.asarray([[3.0, 4.0], [0.0, 2.0]], jnp.bfloat16)
    y = layers.l2_normalize(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), [[0.6, 0.8], [0.0, 1.0]], atol=1e-2)
    assert layers.valid_frames(None, 2, 3).dtype == bool and bool(
        layers.valid_frames(None, 2, 3).all()
    )
    m = layers.valid_frames(jnp.asarray([[1, 0, 0], [1, 1, 0]], jnp.int32), 2, 3)
    np.testing.assert_array_equal(np.asarray(m), [[True, False, False], [True, True, False]])


@dataclasses.dataclass(frozen=True)
class _StackCfg:
    scan_layers: bool
    remat_policy: str = "none"


class _Affine(nn.Module):
    """``carry * w + b`` per layer; returns the layer's output as ``y`` too."""

    cfg: _StackCfg

    @nn.compact
    def __call__(self, x, shift):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1],))
        x = x * w + shift
        return x, x.sum()


class _Stack(nn.Module):
    cfg: _StackCfg
    n: int = 3

    @nn.compact
    def __call__(self, x):
        block = layers.stack_layers(_Affine, self.cfg, self.n, in_axes=(nn.broadcast,))
        if self.cfg.scan_layers:
            return block(self.cfg, name="layers")(x, 0.5)
        ys = []
        for i in range(self.n):
            x, y = block(self.cfg, name=f"layers_{i}")(x, 0.5)
            ys.append(y)
        return x, jnp.stack(ys)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_stack_layers_scan_and_loop_hold_the_same_numbers(policy: str) -> None:
    x = jnp.arange(4, dtype=jnp.float32) + 1
    loop, scan = _Stack(_StackCfg(False, policy)), _Stack(_StackCfg(True, policy))
    p_loop = loop.init(jax.random.key(0), x)["params"]
    stacked = jnp.stack([p_loop[f"layers_{i}"]["w"] for i in range(3)])
    p_scan = {"layers": {"w": stacked}}
    assert jax.tree.map(jnp.shape, scan.init(jax.random.key(0), x)["params"]) == {
        "layers": {"w": (3, 4)}
    }
    out_loop, ys_loop = loop.apply({"params": p_loop}, x)
    out_scan, ys_scan = scan.apply({"params": p_scan}, x)
    want = x
    for i in range(3):
        want = want * stacked[i] + 0.5
    np.testing.assert_allclose(out_loop, want, rtol=1e-6)
    np.testing.assert_allclose(out_scan, want, rtol=1e-6)
    np.testing.assert_allclose(ys_scan, ys_loop, rtol=1e-6)


def test_stack_layers_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="remat_policy='most'"):
        layers.stack_layers(_Affine, _StackCfg(True, "most"), 2)
