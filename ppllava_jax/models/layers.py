"""Building blocks shared by every tower: dense layers with logical axes, norms, activations,
layer stacking (scan / remat) and rotary positions. Attention is ``models/attention.py``.

Conventions (read before adding a module):
- Parameters are float32 unless ``cfg.param_dtype`` says otherwise; activations are computed in
  ``cfg.dtype``; softmax, normalisation statistics and losses are computed in float32.
- Every parameter carries logical axis names (see ``ppllava_jax.sharding.LOGICAL_RULES``).
- Activations are ``[batch, length, ...]``; attention heads are ``[B, S, N, H]``.
- Dense kernels are ``(in, out)``: the transpose of PyTorch's ``nn.Linear.weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def widen_f16_on_cpu(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """float16 dot operands as float32 on the CPU, whose XLA backend has no float16 x float16 ->
    float32 dot (``preferred_element_type=float32``); the same result (a product of two float16
    numbers is exact in float32). Other dtypes and backends: unchanged."""
    if jax.default_backend() != "cpu":
        return xs
    return tuple(x.astype(jnp.float32) if x.dtype == jnp.float16 else x for x in xs)


# Logical axis names used by parameters (P) and activations (A). The rules that map them to mesh
# axes live in ppllava_jax/sharding/mesh.py; keep this list and that table in step.
#   P: vocab, embed, mlp, heads, kv_heads, norm, layers, patch, conv_in, time, pos
#   A: act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab, act_head_dim
ACT_BLE = ("act_batch", "act_length", "act_embed")


def dtype_of(name: str | Dtype) -> Dtype:
    """``'bfloat16'`` -> ``jnp.bfloat16``; dtypes pass through."""
    return jnp.dtype(name) if isinstance(name, str) else name


def constrain(x: Array, names: Sequence[str | None]) -> Array:
    """Logical sharding constraint on an activation; a no-op outside a mesh/rules context.

    Shared modules also run on inputs of another rank (the BT-Adapter feeds a class token
    ``[N, C]`` through a CLIP MLP written for ``[B, S, C]``); the constraint then applies to the
    trailing dimensions it names and the extra leading ones stay unconstrained."""
    names = tuple(names)
    if 0 < x.ndim < len(names):  # keep the batch name and the trailing ones
        names = (names[0], *names[len(names) - x.ndim + 1 :])
    elif x.ndim > len(names) > 0:  # batch name first, extra middle dims unconstrained
        names = (names[0], *([None] * (x.ndim - len(names))), *names[1:])
    return nn.with_logical_constraint(x, names)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    cfg: Any,
    *,
    use_bias: bool = True,
    name: str | None = None,
    kernel_init: Callable = default_kernel_init,
) -> nn.Dense:
    """``nn.Dense`` whose kernel ``(in, out)`` and bias ``(out,)`` carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def embed(
    num: int,
    features: int,
    cfg: Any,
    axes: tuple[str | None, str | None],
    *,
    stddev: float = 0.02,
    name: str | None = None,
) -> nn.Embed:
    """``nn.Embed`` of ``num`` rows ``(num, features)`` on logical ``axes``, normal(``stddev``)
    init, looked up in ``cfg.dtype``."""
    return nn.Embed(
        num,
        features,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev), axes),
        name=name,
    )


def embed_patches(pixel_values: Array, cfg: Any, *, use_bias: bool) -> Array:
    """The ViT patch conv ``patch_embedding``: ``patch_size`` windows at stride ``patch_size``,
    "valid" padding, kernel HWIO ``(p, p, 3, C)`` (bias on ``embed`` when ``use_bias``).

    pixel_values: channels-last ``float[B, H, W, 3]`` with ``H = W = cfg.image_size``. Returns
    ``cfg.dtype[B, P, C]``, patches row-major (torch's ``flatten(2)`` order)."""
    b, hh, ww, _ = pixel_values.shape
    if hh != cfg.image_size or ww != cfg.image_size:
        raise ValueError(
            f"pixel_values are {hh}x{ww}; the vision tower takes {cfg.image_size}x{cfg.image_size}"
        )
    p, dtype = cfg.patch_size, dtype_of(cfg.dtype)
    conv = nn.Conv(
        cfg.hidden_size,
        kernel_size=(p, p),
        strides=(p, p),
        padding="VALID",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(
            default_kernel_init, (None, None, "conv_in", "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="patch_embedding",
    )
    return conv(pixel_values.astype(dtype)).reshape(b, -1, cfg.hidden_size)


def layer_norm(cfg: Any, eps: float, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with ``scale``/``bias`` on the ``norm`` axis; statistics in float32."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        use_fast_variance=False,
        force_float32_reductions=True,
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm as transformers computes it:
    ``w * (x_f32 * rsqrt(mean(x^2) + eps)).astype(x)``."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (weight.astype(self.dtype) * xf.astype(x.dtype)).astype(self.dtype)


def l2_normalize(x: Array) -> Array:
    """``x / |x|`` over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf / jnp.linalg.norm(xf, axis=-1, keepdims=True)).astype(x.dtype)


def valid_frames(frame_mask: Array | None, n: int, t: int) -> Array:
    """``bool[N, T]`` frame mask: ``frame_mask`` as bool, or all True when None."""
    return jnp.ones((n, t), bool) if frame_mask is None else frame_mask.astype(bool)


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(
    layer_cls: type[nn.Module], cfg: Any, *, static_argnums: tuple[int, ...] = ()
) -> type[nn.Module]:
    """``layer_cls`` in ``nn.remat`` per ``cfg.remat_policy`` (unchanged for ``'none'``), for a
    layer that is not stacked (the BT-Adapter's): its backward then recomputes the layer instead
    of keeping its activations. Parameter names are unchanged. ``static_argnums`` counts
    ``self`` as 0 (flax's convention)."""
    policy_name = getattr(cfg, "remat_policy", "none")
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy_name!r} is not one of {sorted(REMAT_POLICIES)}")
    if policy_name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[policy_name], static_argnums=static_argnums)


def stack_layers(
    layer_cls: type[nn.Module],
    cfg: Any,
    length: int,
    *,
    in_axes: tuple = (),
    static_argnums: tuple[int, ...] = (),
) -> type[nn.Module]:
    """Wrap ``layer_cls`` in ``nn.remat`` (per ``cfg.remat_policy``) and, if ``cfg.scan_layers``,
    ``nn.scan`` over ``length`` layers with parameters stacked on a leading ``layers`` axis.

    ``layer_cls.__call__(carry, *args) -> (carry, y)``. ``in_axes`` gives, for each extra argument,
    ``nn.broadcast`` (same for every layer) or ``0`` (sliced per layer). ``static_argnums`` counts
    arguments after ``self`` for ``nn.remat``. Without scan the caller loops over ``length``
    instances named ``{name}_{i}``::

        Block = stack_layers(EncoderLayer, cfg, n, in_axes=(nn.broadcast,))
        if cfg.scan_layers:
            x, ys = Block(cfg, name="layers")(x, mask)
        else:
            for i in range(n):
                x, y = Block(cfg, name=f"layers_{i}")(x, mask)

    The two layouts hold the same numbers: ``layers/<leaf>[i] == layers_{i}/<leaf>``
    (``ppllava_jax.convert.mapping`` converts between them).
    """
    policy_name = getattr(cfg, "remat_policy", "none")
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy_name!r} is not one of {sorted(REMAT_POLICIES)}")
    block = layer_cls
    if policy_name != "none":
        block = nn.remat(
            block,
            policy=REMAT_POLICIES[policy_name],
            prevent_cse=not cfg.scan_layers,
            static_argnums=static_argnums,
        )
    if cfg.scan_layers:
        block = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=in_axes,
            length=length,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
    return block


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_cos_sin(
    positions: Array, head_dim: int, theta: float, dtype: Dtype = jnp.float32
) -> tuple[Array, Array]:
    """cos/sin tables ``[B, S, head_dim]`` for int ``positions[B, S]`` (transformers' layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x[B, S, N, H]`` by ``cos/sin[B, S, H]`` (rotate-half layout)."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]
