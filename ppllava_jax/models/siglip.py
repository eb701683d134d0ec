"""SigLIP vision and text towers (transformers' ``SiglipVisionModel`` / ``SiglipTextModel`` /
``SiglipModel``) in Flax linen, at float32 parity with PyTorch.

The encoder layer of SigLIP is CLIP's (pre-LN, ``layer_norm1`` / ``self_attn`` with biased
``q,k,v,out_proj`` / ``layer_norm2`` / ``mlp.fc1,fc2``), so both towers run
``encoder.CLIPEncoder`` (scan, remat, taps, logical axes shared). What differs from CLIP:

- vision: no class token, no pre-LayerNorm, the patch conv has a bias; ``post_layernorm`` on every
  token; optional attention-pooling ``head`` (a probe attending to the patches, then
  ``x + mlp(layernorm(x))``) giving ``pooler_output``;
- text: bidirectional attention (no causal mask), final LayerNorm, the hidden state at the *last*
  position through the ``head`` Linear (no separate projection);
- the model: ``logits = exp(logit_scale) * cos + logit_bias``; ``logit_scale`` and
  ``logit_bias`` are float32[1] as in PyTorch.

Layouts as in ``clip.py``: pixels channels-last ``float32[B, H, W, 3]``, dense kernels (in, out),
the conv kernel HWIO. The head's ``torch.nn.MultiheadAttention`` keeps its packed input
projection: ``attention/in_proj_kernel`` ``(C, 3C)`` (q, k, v thirds) and
``attention/in_proj_bias`` ``(3C,)``, plus ``attention/out_proj``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppllava_jax.models import layers
from ppllava_jax.models.attention import dot_product_attention
from ppllava_jax.models.clip import at_positions, text_states
from ppllava_jax.models.config import SiglipTextConfig, SiglipVisionConfig
from ppllava_jax.models.encoder import CLIPMLP, CLIPEncoder, normalize_taps

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipConfig:
    """A whole ``SiglipModel``: both tower configs (runtime fields live on them)."""

    vision: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig)
    text: SiglipTextConfig = dataclasses.field(default_factory=SiglipTextConfig)


class SiglipVisionEmbeddings(nn.Module):
    """Patch conv (with bias, "valid" padding) + learned positions; no class token."""

    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values: ``float[B, H, W, 3]`` with ``H = W = image_size``. Returns
        ``float[B, P, C]``, ``P = (image_size // patch_size) ** 2``, patches row-major."""
        cfg = self.cfg
        patches = layers.embed_patches(pixel_values, cfg, use_bias=True)
        pos = layers.embed(
            cfg.num_patches, cfg.hidden_size, cfg, ("pos", "embed"), name="position_embedding"
        )(jnp.arange(cfg.num_patches))
        return layers.constrain(patches + pos[None], layers.ACT_BLE)


class MultiheadAttentionPooling(nn.Module):
    """``torch.nn.MultiheadAttention(C, heads, batch_first=True)`` as SigLIP's head uses it, with
    the packed input projection kept packed (``in_proj_kernel (C, 3C)``, ``in_proj_bias``)."""

    cfg: SiglipVisionConfig

    def setup(self) -> None:
        cfg = self.cfg
        c = cfg.hidden_size
        pdt = layers.dtype_of(cfg.param_dtype)
        self.in_proj_kernel = self.param(
            "in_proj_kernel",
            nn.with_logical_partitioning(layers.default_kernel_init, ("embed", "heads")),
            (c, 3 * c),
            pdt,
        )
        self.in_proj_bias = self.param(
            "in_proj_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads",)),
            (3 * c,),
            pdt,
        )
        self.out_proj = layers.dense(c, ("heads", "embed"), cfg)

    def project(self, x: Array, which: int) -> Array:
        """Input projection ``which`` (0 = query, 1 = key, 2 = value): ``float[..., C]``."""
        c = self.cfg.hidden_size
        dtype = layers.dtype_of(self.cfg.dtype)
        w = self.in_proj_kernel[:, which * c : (which + 1) * c].astype(dtype)
        b = self.in_proj_bias[which * c : (which + 1) * c].astype(dtype)
        return jnp.matmul(x.astype(dtype), w) + b

    def __call__(self, query: Array, kv: Array) -> Array:
        """query: ``float[B, Q, C]``, kv: ``float[B, S, C]`` -> ``float[B, Q, C]``."""
        cfg = self.cfg
        c, n = cfg.hidden_size, cfg.num_attention_heads
        b, q_len, _ = query.shape
        s = kv.shape[1]
        q = self.project(query, 0).reshape(b, q_len, n, c // n)
        k = self.project(kv, 1).reshape(b, s, n, c // n)
        v = self.project(kv, 2).reshape(b, s, n, c // n)
        o = dot_product_attention(q, k, v, impl=cfg.attention_impl).reshape(b, q_len, c)
        return self.out_proj(o)


class SiglipAttentionPoolingHead(nn.Module):
    """``SiglipMultiheadAttentionPoolingHead``: a learned ``probe`` attends to the tokens, then
    ``x + mlp(layernorm(x))``. ``value_embed`` is the per-token path PPLLaVA-Qwen uses (the value
    projection alone, no attention to the probe, no ``out_proj``)."""

    cfg: SiglipVisionConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.probe = self.param(
            "probe",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), (None, None, "embed")
            ),
            (1, 1, cfg.hidden_size),
            layers.dtype_of(cfg.param_dtype),
        )
        self.attention = MultiheadAttentionPooling(cfg)
        self.layernorm = layers.layer_norm(cfg, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def __call__(self, x: Array) -> Array:
        """x: ``float[B, S, C]`` (post-LayerNorm tokens) -> ``float[B, C]``."""
        probe = jnp.broadcast_to(self.probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]

    def value_embed(self, y: Array) -> Array:
        """``v = y @ W_v + b_v`` then ``v + mlp(layernorm(v))``: ``float[..., C] -> [..., C]``."""
        v = self.attention.project(y, 2)
        return v + self.mlp(self.layernorm(v))


class SiglipVisionTransformer(nn.Module):
    """transformers' ``SiglipVisionModel`` body."""

    cfg: SiglipVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array, taps: Sequence[int] = ()) -> dict[str, Array]:
        """pixel_values: ``float[B, H, W, 3]``; taps: hidden-state indices (negative allowed;
        0 = embeddings, k = output of layer k-1, before ``post_layernorm``).

        Returns ``last_hidden_state float[B, P, C]`` (after ``post_layernorm``),
        ``pooler_output float[B, C]`` (the head's; only with ``vision_use_head``) and
        ``hidden_states float[len(taps), B, P, C]``.
        """
        cfg = self.cfg
        x = SiglipVisionEmbeddings(cfg, name="embeddings")(pixel_values)
        last, hidden = CLIPEncoder(cfg, name="encoder")(
            x, taps=normalize_taps(taps, cfg.num_hidden_layers)
        )
        last = layers.layer_norm(cfg, cfg.layer_norm_eps, name="post_layernorm")(last)
        out = {"last_hidden_state": last, "hidden_states": hidden}
        if cfg.vision_use_head:
            out["pooler_output"] = SiglipAttentionPoolingHead(cfg, name="head")(last)
        return out


def last_valid_index(attention_mask: Array) -> Array:
    """Index of the last attended position per row: ``int[B, S] -> int32[B]`` (0 if none)."""
    return jnp.maximum(attention_mask.astype(jnp.int32).sum(-1) - 1, 0)


class SiglipTextTransformer(nn.Module):
    """transformers' ``SiglipTextModel`` body (bidirectional; pooled at the last position)."""

    cfg: SiglipTextConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        pool_index: Array | None = None,
    ) -> dict[str, Array]:
        """input_ids: ``int32[B, S]``; attention_mask: ``int[B, S]`` key mask (1 = attend) or None
        (attend everywhere, as SigLIP's tokenizer gives no mask); pool_index: ``int[B]``, the
        pooled position per row (None: the last, ``S - 1``, as transformers).

        Returns ``last_hidden_state float[B, S, C]`` and ``pooler_output
        float[B, projection_size]`` (after ``head``).
        """
        cfg = self.cfg
        keys = None
        if attention_mask is not None:
            keys = attention_mask.astype(bool)
            keys = keys | ~keys.any(-1, keepdims=True)  # an all-padding row: no -inf row
        x = text_states(cfg, input_ids, keys, position_ids, causal=False)
        pooled = x[:, -1] if pool_index is None else at_positions(x, pool_index)
        pooled = layers.dense(cfg.projection_size, ("embed", None), cfg, name="head")(pooled)
        return {"last_hidden_state": x, "pooler_output": pooled}


class SiglipModel(nn.Module):
    """Both towers, ``logit_scale`` and ``logit_bias`` (transformers' ``SiglipModel``)."""

    vision_cfg: SiglipVisionConfig
    text_cfg: SiglipTextConfig

    def setup(self) -> None:
        self.vision_model = SiglipVisionTransformer(self.vision_cfg)
        self.text_model = SiglipTextTransformer(self.text_cfg)
        init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,))
        self.logit_scale = self.param("logit_scale", init, (1,), jnp.float32)
        self.logit_bias = self.param("logit_bias", init, (1,), jnp.float32)

    def get_image_features(self, pixel_values: Array) -> Array:
        """``float[B, H, W, 3] -> float[B, C]`` (the head's output, not normalised)."""
        return self.vision_model(pixel_values)["pooler_output"]

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """``int32[B, S] -> float[B, projection_size]`` (not normalised)."""
        return self.text_model(input_ids, attention_mask)["pooler_output"]

    def __call__(
        self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None
    ) -> dict[str, Array]:
        """Returns normalised ``image_embeds float[Bi, D]``, ``text_embeds float[Bt, D]``,
        ``logits_per_text float32[Bt, Bi] = exp(logit_scale) * cos + logit_bias`` and
        ``logits_per_image`` (its transpose)."""
        img = layers.l2_normalize(self.get_image_features(pixel_values)).astype(jnp.float32)
        txt = self.get_text_features(input_ids, attention_mask)
        txt = layers.l2_normalize(txt).astype(jnp.float32)
        cos = jnp.matmul(txt, img.T, precision=jax.lax.Precision.HIGHEST)
        logits_per_text = cos * jnp.exp(self.logit_scale) + self.logit_bias
        return {
            "image_embeds": img,
            "text_embeds": txt,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }
