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

from ppllava_jax.models import layers
from ppllava_jax.models.config import CLIPTextConfig, CLIPVisionConfig
from ppllava_jax.models.encoder import CLIPEncoder, normalize_taps

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """A whole ``CLIPModel``: both tower configs, the shared projection width and the initial
    logit scale. Runtime fields (dtype, scan, ...) live on the two tower configs. (Kept here
    rather than in ``config.py`` so the CLIP files stand alone; its config.json is
    ``convert/hf_config.py``'s ``clip_from_hf`` / ``clip_to_hf``.)"""

    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned positions."""

    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values: ``float[B, H, W, 3]`` (channels-last). Returns ``float[B, 1 + P, C]``."""
        cfg = self.cfg
        c = cfg.hidden_size
        patches = layers.embed_patches(pixel_values, cfg, use_bias=False)
        b, dtype = patches.shape[0], layers.dtype_of(cfg.dtype)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed",)),
            (c,),
            layers.dtype_of(cfg.param_dtype),
        )
        cls = jnp.broadcast_to(cls.astype(dtype), (b, 1, c))
        x = jnp.concatenate([cls, patches], axis=1)
        pos = layers.embed(cfg.num_patches + 1, c, cfg, ("pos", "embed"), name="position_embedding")
        x = x + pos(jnp.arange(cfg.num_patches + 1))[None]
        return layers.constrain(x, layers.ACT_BLE)


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
        tok = layers.embed(cfg.vocab_size, c, cfg, ("vocab", "embed"), name="token_embedding")
        tok = tok(input_ids)
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
            pos = layers.embed(npos, c, cfg, ("pos", "embed"), name="position_embedding")
            pos = pos(position_ids)
        return layers.constrain(tok + pos, layers.ACT_BLE)


def text_states(
    cfg: Any,
    input_ids: Array,
    key_mask: Array | None,
    position_ids: Array | None,
    *,
    causal: bool,
) -> Array:
    """The text-tower body shared by CLIP and SigLIP, run inside the calling module (parameters
    ``embeddings``, ``encoder``, ``final_layer_norm``): embeddings, the encoder over
    ``key_mask`` (``bool[B, S]``, True = may be attended; None = all), the final LayerNorm.
    ``int[B, S] -> float[B, S, C]``."""
    x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids, position_ids)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    x, _ = CLIPEncoder(cfg, name="encoder")(x, mask, causal)
    return layers.layer_norm(cfg, cfg.layer_norm_eps, name="final_layer_norm")(x)


def at_positions(x: Array, idx: Array) -> Array:
    """Row ``b`` of ``x[B, S, C]`` at position ``idx[b]``: ``float[B, C]``."""
    return jnp.take_along_axis(x, idx.astype(jnp.int32)[:, None, None], axis=1)[:, 0]


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
        keys = None if attention_mask is None else attention_mask.astype(bool)
        x = text_states(cfg, input_ids, keys, position_ids, causal=True)
        pooled = at_positions(x, eos_positions(input_ids, cfg.eos_token_id))
        return {"last_hidden_state": x, "pooler_output": pooled}


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
        img = layers.l2_normalize(self.get_image_features(pixel_values))
        txt = layers.l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = (txt @ img.T) * jnp.exp(self.logit_scale).astype(txt.dtype)
        return {
            "image_embeds": img,
            "text_embeds": txt,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }
