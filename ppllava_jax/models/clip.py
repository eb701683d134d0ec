"""CLIP vision and text towers (transformers' ``CLIPVisionModel`` / ``CLIPTextModel`` /
``CLIPModel``) in Flax linen, at float32 parity with PyTorch.

Layout differences from PyTorch: pixels are channels-last ``float32[B, H, W, 3]``; dense kernels
are ``(in, out)``; the patch conv kernel is HWIO ``(p, p, 3, C)``; attention heads are
``[B, S, N, H]``. Hidden states are indexed as transformers does: 0 = encoder input (after
``pre_layrnorm`` for the vision tower), ``k`` = output of layer ``k - 1``.

The Long-CLIP text extension (SPEC section 4) is ``CLIPTextConfig.extended``: two raw
position tables ``position_embedding`` and ``position_embedding_res`` of
``max_position_embeddings`` rows; rows ``< position_keep`` come from the first, the rest from
the second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.models import layers
from ppllava_jax.models.config import CLIPTextConfig, CLIPVisionConfig

Array = jax.Array
Config = Any  # CLIPVisionConfig | CLIPTextConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """A whole ``CLIPModel``: both tower configs, the shared projection width and the initial
    logit scale. Runtime fields (dtype, scan, ...) live on the two tower configs. (Kept here
    rather than in ``config.py`` so the CLIP files stand alone.)"""

    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> CLIPConfig:
        """From a transformers ``CLIPModel`` config.json (missing fields take transformers'
        defaults, as its 4.x diff-only files need)."""
        from ppllava_jax.convert.clip_keys import clip_config_from_hf

        return clip_config_from_hf(d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "vision_config": self.vision.to_hf(),
            "text_config": self.text.to_hf(),
        }

    def replace(self, **kw: Any) -> CLIPConfig:
        return dataclasses.replace(self, **kw)


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
        o = layers.attention(q, k, v, mask=mask, is_causal=causal, impl=cfg.attention_impl)
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
    ) -> tuple[Array, Array]:
        """x: ``float[B, S, C]``; mask: ``bool`` broadcastable to ``[B, 1, S, S]``; taps:
        non-negative hidden-state indices (0 = ``x``, k = output of layer k-1).

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
        block = layers.stack_layers(
            CLIPEncoderLayer,
            cfg,
            n,
            in_axes=(nn.broadcast, nn.broadcast, 0),
            static_argnums=(3,),  # causal (flax counts self as 0)
        )
        x0 = x
        got: dict[int, Array] = {}
        if cfg.scan_layers:
            if wanted:
                slot_of = np.full((n,), len(wanted), np.int32)
                for j, t in enumerate(wanted):
                    slot_of[t - 1] = j
                buf = jnp.zeros((len(wanted) + 1, *x.shape), x.dtype)
                (x, buf), _ = block(cfg, name="layers")(
                    (x, buf), mask, causal, jnp.asarray(slot_of)
                )
                got = {t: buf[j] for j, t in enumerate(wanted)}
            else:
                x, _ = block(cfg, name="layers")(x, mask, causal, None)
        else:
            for i in range(n):
                x, _ = block(cfg, name=f"layers_{i}")(x, mask, causal, None)
                if i + 1 in wanted:
                    got[i + 1] = x
        if taps:
            tapped = jnp.stack([x0 if t == 0 else got[t] for t in taps])
        else:
            tapped = jnp.zeros((0, *x.shape), x.dtype)
        return x, tapped


def _embed(num: int, features: int, cfg: Config, axes: tuple[str, str], name: str) -> nn.Embed:
    return nn.Embed(
        num,
        features,
        dtype=layers.dtype_of(cfg.dtype),
        param_dtype=layers.dtype_of(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes),
        name=name,
    )


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned positions."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values: ``float[B, H, W, 3]`` (channels-last). Returns ``float[B, 1 + P, C]``."""
        cfg = self.cfg
        c, p = cfg.hidden_size, cfg.patch_size
        b, hh, ww, _ = pixel_values.shape
        if hh != cfg.image_size or ww != cfg.image_size:
            raise ValueError(
                f"pixel_values are {hh}x{ww}; the model takes {cfg.image_size}x{cfg.image_size}"
            )
        dtype = layers.dtype_of(cfg.dtype)
        patches = nn.Conv(
            c,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=layers.dtype_of(cfg.param_dtype),
            kernel_init=nn.with_logical_partitioning(
                layers.default_kernel_init, (None, None, "conv_in", "embed")
            ),
            name="patch_embedding",
        )(pixel_values.astype(dtype))
        patches = patches.reshape(b, -1, c)  # row-major (row, col) = torch's flatten(2)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed",)),
            (c,),
            layers.dtype_of(cfg.param_dtype),
        )
        cls = jnp.broadcast_to(cls.astype(dtype), (b, 1, c))
        x = jnp.concatenate([cls, patches], axis=1)
        pos = _embed(cfg.num_patches + 1, c, cfg, ("pos", "embed"), "position_embedding")
        x = x + pos(jnp.arange(cfg.num_patches + 1))[None]
        return layers.constrain(x, layers.ACT_BLE)


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


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionModel`` body."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array, taps: Sequence[int] = ()) -> dict[str, Array]:
        """pixel_values: ``float[B, H, W, 3]``; taps: hidden-state indices, negative allowed.

        Returns ``last_hidden_state float[B, 1+P, C]``, ``pooler_output float[B, C]``
        (post-LN class token) and ``hidden_states float[len(taps), B, 1+P, C]``.
        """
        cfg = self.cfg
        x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values)
        x = layers.layer_norm(cfg, cfg.layer_norm_eps, name="pre_layrnorm")(x)
        last, hidden = CLIPEncoder(cfg, name="encoder")(
            x, taps=normalize_taps(taps, cfg.num_hidden_layers)
        )
        pooled = layers.layer_norm(cfg, cfg.layer_norm_eps, name="post_layernorm")(last[:, 0])
        return {"last_hidden_state": last, "pooler_output": pooled, "hidden_states": hidden}


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings (Long-CLIP split tables when ``cfg.extended``)."""

    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array, position_ids: Array | None = None) -> Array:
        """input_ids: ``int[B, S]``, ``S <= max_position_embeddings``; position_ids:
        ``int[B, S]`` or None (``0..S-1``). Returns ``float[B, S, C]``."""
        cfg = self.cfg
        c, npos = cfg.hidden_size, cfg.max_position_embeddings
        s = input_ids.shape[-1]
        if s > npos:
            raise ValueError(f"sequence length {s} > max_position_embeddings {npos}")
        if position_ids is None:
            position_ids = jnp.arange(s)[None]
        tok = _embed(cfg.vocab_size, c, cfg, ("vocab", "embed"), "token_embedding")(input_ids)
        if cfg.extended:
            init = nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.01), ("pos", "embed")
            )
            pdt = layers.dtype_of(cfg.param_dtype)
            keep_tab = self.param("position_embedding", init, (npos, c), pdt)
            res_tab = self.param("position_embedding_res", init, (npos, c), pdt)
            pos = jnp.where(
                (position_ids < cfg.position_keep)[..., None],
                jnp.take(keep_tab, position_ids, axis=0),
                jnp.take(res_tab, position_ids, axis=0),
            ).astype(layers.dtype_of(cfg.dtype))
        else:
            pos = _embed(npos, c, cfg, ("pos", "embed"), "position_embedding")(position_ids)
        return layers.constrain(tok + pos, layers.ACT_BLE)


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """Index of the pooled token per row, as transformers picks it: ``argmax(ids)`` for the
    legacy ``eos_token_id == 2`` configs, else the first position holding ``eos_token_id``
    (0 if none). ``int[B, S] -> int32[B]``."""
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel`` body: causal encoder, final LN, end-of-text pooling."""

    cfg: CLIPTextConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
    ) -> dict[str, Array]:
        """input_ids: ``int32[B, S]``; attention_mask: ``int[B, S]`` (1 = token, 0 = padding) or
        None. Returns ``last_hidden_state float[B, S, C]`` and ``pooler_output float[B, C]``."""
        cfg = self.cfg
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids, position_ids)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.astype(bool)[:, None, None, :]
        x, _ = CLIPEncoder(cfg, name="encoder")(x, mask, True)
        x = layers.layer_norm(cfg, cfg.layer_norm_eps, name="final_layer_norm")(x)
        idx = eos_positions(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return {"last_hidden_state": x, "pooler_output": pooled}


def _l2_normalize(x: Array) -> Array:
    xf = x.astype(jnp.float32)
    return (xf / jnp.linalg.norm(xf, axis=-1, keepdims=True)).astype(x.dtype)


class CLIPModel(nn.Module):
    """Both towers, their projections (no bias) and the logit scale."""

    vision_cfg: CLIPVisionConfig
    text_cfg: CLIPTextConfig
    projection_dim: int
    logit_scale_init_value: float = 2.6592

    def setup(self) -> None:
        self.vision_model = CLIPVisionTransformer(self.vision_cfg)
        self.text_model = CLIPTextTransformer(self.text_cfg)
        self.visual_projection = layers.dense(
            self.projection_dim, ("embed", None), self.vision_cfg, use_bias=False
        )
        self.text_projection = layers.dense(
            self.projection_dim, ("embed", None), self.text_cfg, use_bias=False
        )
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init_value), ()),
            (),
            jnp.float32,
        )

    def get_image_features(self, pixel_values: Array) -> Array:
        """``float[B, H, W, 3] -> float[B, projection_dim]`` (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """``int32[B, S] -> float[B, projection_dim]`` (not normalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

    def __call__(
        self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None
    ) -> dict[str, Array]:
        """Returns normalised ``image_embeds float[Bi, D]``, ``text_embeds float[Bt, D]``,
        ``logits_per_image float[Bi, Bt]`` and ``logits_per_text float[Bt, Bi]``."""
        img = _l2_normalize(self.get_image_features(pixel_values))
        txt = _l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = (txt @ img.T) * jnp.exp(self.logit_scale).astype(txt.dtype)
        return {
            "image_embeds": img,
            "text_embeds": txt,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }
