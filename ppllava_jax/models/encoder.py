"""The pre-LayerNorm transformer encoder of CLIP, shared by CLIP's vision and text towers,
SigLIP's towers and the BT-Adapter: attention, MLP, encoder layer, the stack (scan / remat /
hidden-state taps) and transformers-style hidden-state indexing.

Parameter names mirror transformers' ``CLIPEncoderLayer``: ``layer_norm1``, ``self_attn``
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, all biased), ``layer_norm2``, ``mlp``
(``fc1``, ``fc2``). Activations ``float[B, S, C]``, attention heads ``[B, S, N, H]``. Hidden
states are indexed as transformers does: 0 = encoder input, ``k`` = output of layer ``k - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.models import layers
from ppllava_jax.models.attention import choose_impl, dot_product_attention

Array = jax.Array
Config = Any  # a tower config: CLIPVisionConfig | CLIPTextConfig | Siglip*Config


def heads_first_attention(
    q: Array, k: Array, v: Array, *, mask: Array | None = None, is_causal: bool = False
) -> Array:
    """``jax.nn.dot_product_attention(implementation='xla')`` (scale ``H ** -0.5``, scores and
    softmax in float32, masked scores ``-0.7 * float32.max``) with the heads moved in front
    first: ``[B, N, T, H] @ [B, N, S, H]^T``. The same function; on the CPU the batched matmuls
    of this layout run about 1.5x faster than the reference's ``BTNH,BSNH->BNTS`` einsum.

    q, k, v: ``[B, T, N, H]`` (same N); mask: bool broadcastable to ``[B, N, T, S]`` or None.
    Returns ``[B, T, N, H]`` in q's dtype.
    """
    h = q.shape[-1]
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    qt, kt = layers.widen_f16_on_cpu(qt, kt)
    logits = jnp.einsum("bnth,bnsh->bnts", qt, kt, precision=precision, preferred_element_type=f32)
    logits = logits * jnp.asarray(h**-0.5, f32)
    if mask is not None or is_causal:
        keep = jnp.ones(logits.shape, bool)
        if mask is not None:
            keep = keep & mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if is_causal:
            t, s = logits.shape[2:]
            keep = keep & jnp.tril(jnp.ones((t, s), bool))
        big = min(float(jnp.finfo(f32).max), float(jnp.finfo(jnp.float32).max))
        logits = jnp.where(keep, logits, jnp.asarray(-0.7 * big, f32))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", probs, vt), 1, 2)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biases on q/k/v/out (scale ``head_dim ** -0.5``)."""

    cfg: Config

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False) -> Array:
        """x: ``float[B, S, C]``; mask: ``bool`` broadcastable to ``[B, 1, S, S]`` (True = may
        attend); causal: also apply a causal mask. Returns ``float[B, S, C]``."""
        cfg = self.cfg
        c, n = cfg.hidden_size, cfg.num_attention_heads
        h = c // n
        b, s, _ = x.shape

        def heads(name: str) -> Array:
            y = layers.dense(c, ("embed", "heads"), cfg, name=name)(x)
            return layers.constrain(
                y.reshape(b, s, n, h), ("act_batch", "act_length", "act_heads", "act_head_dim")
            )

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        impl = cfg.attention_impl
        if impl == "auto":
            impl = choose_impl(q, k, mask=mask, is_causal=causal)
        if impl == "xla" and jax.default_backend() == "cpu":
            o = heads_first_attention(q, k, v, mask=mask, is_causal=causal)
        else:
            o = dot_product_attention(q, k, v, mask=mask, is_causal=causal, impl=impl)
        o = o.reshape(b, s, c)
        o = layers.dense(c, ("heads", "embed"), cfg, name="out_proj")(o)
        return layers.constrain(o, layers.ACT_BLE)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with ``act = cfg.hidden_act``; ``x: float[B, ..., C]``."""

    cfg: Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        # any rank: the BT-Adapter runs it on class tokens [N, C] and patches [N, P, T, C]
        mid = ("act_length",) if x.ndim == 3 else (None,) * (x.ndim - 2)
        y = layers.dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="fc1")(x)
        y = layers.constrain(y, ("act_batch", *mid, "act_mlp"))
        y = layers.activation(cfg.hidden_act)(y)
        y = layers.dense(cfg.hidden_size, ("mlp", "embed"), cfg, name="fc2")(y)
        return layers.constrain(y, ("act_batch", *mid, "act_embed"))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    Scan body (``layers.stack_layers``): ``__call__(carry, mask, causal, slot) -> (carry, None)``.
    ``carry`` is either the activation ``x: float[B, S, C]`` (plain use:
    ``x, _ = CLIPEncoderLayer(cfg)(x, mask)``) or a pair ``(x, buf)`` with a tap buffer
    ``buf: float[K, B, S, C]``; then the layer's output is also written to ``buf[slot]``
    (``slot``: int32 scalar, per layer).
    """

    cfg: Config

    @nn.compact
    def __call__(
        self,
        carry: Array | tuple[Array, Array],
        mask: Array | None = None,
        causal: bool = False,
        slot: Array | None = None,
    ) -> tuple[Array | tuple[Array, Array], None]:
        cfg = self.cfg
        x, buf = carry if isinstance(carry, tuple) else (carry, None)
        y = layers.layer_norm(cfg, cfg.layer_norm_eps, name="layer_norm1")(x)
        x = x + CLIPAttention(cfg, name="self_attn")(y, mask, causal)
        y = layers.layer_norm(cfg, cfg.layer_norm_eps, name="layer_norm2")(x)
        x = x + CLIPMLP(cfg, name="mlp")(y)
        x = layers.constrain(x, layers.ACT_BLE)
        if buf is None:
            return x, None
        buf = jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), slot, 0)
        return (x, buf), None


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` ``CLIPEncoderLayer``s (scanned ``layers`` or ``layers_0..N-1``)."""

    cfg: Config

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        causal: bool = False,
        taps: tuple[int, ...] = (),
        upto_taps: bool = False,
    ) -> tuple[Array, Array]:
        """x: ``float[B, S, C]``; mask: ``bool`` broadcastable to ``[B, 1, S, S]``; taps:
        non-negative hidden-state indices (0 = ``x``, k = output of layer k-1); upto_taps: run
        only the layers up to the last tapped one (outside ``init``); ``last`` is then that
        layer's output (for a caller that reads the taps only, e.g. a feature layer below the
        top: the layers above it would be computed for nothing).

        Returns ``(last float[B, S, C], tapped float[len(taps), B, S, C])``. With scan, only the
        tapped layers are kept (a ``[len(set(taps)) + 1, B, S, C]`` buffer in the carry, the
        extra slot a dump), not every layer's output.
        """
        cfg = self.cfg
        n = cfg.num_hidden_layers
        taps = tuple(int(t) for t in taps)
        bad = [t for t in taps if not 0 <= t <= n]
        if bad:
            raise ValueError(f"taps {bad} out of range [0, {n}] for a {n}-layer encoder")
        wanted = sorted({t for t in taps if t > 0})
        run = max(wanted, default=0) if upto_taps and not self.is_initializing() else n
        block = _stack(cfg, n)
        if run < n and cfg.scan_layers:  # the first `run` slices of the stacked parameters
            block = nn.map_variables(
                _stack(cfg, run),
                "params",
                trans_in_fn=lambda v: jax.tree.map(lambda a: a[:run], v),
                mutable=False,
            )
        x0 = x
        got: dict[int, Array] = {}
        if cfg.scan_layers and run > 0:
            if wanted:
                slot_of = np.full((run,), len(wanted), np.int32)
                for j, t in enumerate(wanted):
                    slot_of[t - 1] = j
                buf = jnp.zeros((len(wanted) + 1, *x.shape), x.dtype)
                (x, buf), _ = block(cfg, name="layers")(
                    (x, buf), mask, causal, jnp.asarray(slot_of)
                )
                got = {t: buf[j] for j, t in enumerate(wanted)}
            else:
                x, _ = block(cfg, name="layers")(x, mask, causal, None)
        elif not cfg.scan_layers:
            for i in range(run):
                x, _ = block(cfg, name=f"layers_{i}")(x, mask, causal, None)
                if i + 1 in wanted:
                    got[i + 1] = x
        if taps:
            tapped = jnp.stack([x0 if t == 0 else got[t] for t in taps])
        else:
            tapped = jnp.zeros((0, *x.shape), x.dtype)
        return x, tapped


def _stack(cfg: Config, length: int) -> type[nn.Module]:
    """``length`` encoder layers as ``layers.stack_layers`` wraps them (scan / remat)."""
    return layers.stack_layers(
        CLIPEncoderLayer,
        cfg,
        length,
        in_axes=(nn.broadcast, nn.broadcast, 0),
        static_argnums=(3,),  # causal (flax counts self as 0)
    )


def normalize_taps(taps: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Map transformers-style hidden-state indices (negative allowed, ``-1`` = last layer's
    output) onto ``0..num_layers``."""
    out = []
    for t in taps:
        u = int(t) + (num_layers + 1 if int(t) < 0 else 0)
        if not 0 <= u <= num_layers:
            raise ValueError(f"hidden state {t} does not exist ({num_layers + 1} hidden states)")
        out.append(u)
    return tuple(out)
