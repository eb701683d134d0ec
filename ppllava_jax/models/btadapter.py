"""PPLLaVA's vision tower: CLIP ViT with the BT-Adapter (SPEC section 2).

``PPLLaVAVisionModel`` sits at ``vision_tower/vision_model`` in the full model. Its parameters
mirror ``vision_tower.vision_model.*``: CLIP's ``embeddings``, ``pre_layrnorm``, ``encoder``,
``post_layernorm``, and the adapter's ``btadapter_S_layers_{j}`` (a CLIP encoder layer),
``btadapter_T_layers_{j}`` (``layer_norm1``, ``self_attn``, ``temporal_fc``),
``btadapter_cls_token`` ``(1, 1, C)`` and ``btadapter_time_embed`` (``max_T`` rows),
``j < btadapter_depth = D``.

Semantics (the original ``CLIPVisionTransformer_BTAdapter``, checked against the fixtures):

- The CLIP stream ``x`` is plain CLIP (frames folded into the batch) and never reads the adapter,
  so it runs as one encoder pass; the adapter reads its outputs. The adapter stream ``x2`` holds,
  per sample, one class token and ``P x T`` patches ("(p t)"; here stored ``[N, P, T, C]``).
- After CLIP layer ``i = L - D + j`` (output ``x_i``, per frame ``[cls_t; patches_t]``):
  - j = 0: ``x2.patches[p, t] = x_i.patches[t, p] + pos[1 + p] + time[t]`` (CLIP's position table,
    the adapter's time table), ``x2.cls = (mean_t x_i.cls_t + btadapter_cls_token + pos[0]) / 2``;
  - j > 0: ``x2.cls += mean_t x_i.cls_t``, ``x2.patches += x_i.patches`` (same layout);
  - temporal layer j: ``patches += temporal_fc(attn_T(ln1(patches)))``, attention across the T
    frames of each patch location, class token untouched, no MLP;
  - spatial layer j: per frame ``[cls; patches_t]`` -> ``attn(ln1(.))``; the class-token outputs
    are averaged over frames; residual; then ``+ mlp(ln2(.))`` on all tokens.
- Hidden state ``k`` (transformers indexing: 0 = encoder input, k = output of layer k-1) is, for
  ``k > L - D``, the combination ``[x_k.cls_t ; (x_k.patches_t + x2.patches[:, t]) / 2]`` with the
  ``x2`` of adapter ``j = k - 1 - (L - D)``; for ``k <= L - D`` plain CLIP. So the default
  ``vision_feature_layer = -2`` uses adapters ``0..D-2`` only.
- Padded frames (``frame_mask`` False; valid frames first) are excluded from every mean over
  frames and from the temporal attention keys, so valid frames get exactly what an unpadded run
  gives. Drop-path (per temporal sequence / per frame; rates from ``drop_path_rates``: spatial
  layer j ``linspace(0, 0.1, D)[j]``, every temporal layer 0.1, as the original passes them)
  acts only with ``deterministic=False``; in eval it is the identity. Dropouts after pos/time are
  p = 0.
- Quirk of the original, kept (``PPLLaVAConfig.legacy_three_frame_swap``, default True): a
  sample with exactly 3 frames/images is read as channels-first, i.e. frame t's colour c is
  taken from frame c's colour t (the fixtures' 3-image sample needs it).
- A still image is a 1-frame sample (``T = 1``); an any-resolution image's views are separate
  1-frame samples; a multi-image sample is one sample whose frames are its images.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.models import layers
from ppllava_jax.models.clip import CLIPVisionEmbeddings
from ppllava_jax.models.config import CLIPVisionConfig, PPLLaVAConfig
from ppllava_jax.models.encoder import CLIPMLP, CLIPAttention, CLIPEncoder, normalize_taps

Array = jax.Array

_ADAPTER_LN_EPS = 1e-5  # the adapter layers use nn.LayerNorm's default eps, not the config's


def _masked_mean(x: Array, mask: Array, axis: int) -> Array:
    """Mean of ``x`` over ``axis`` where ``mask`` (broadcast to x) is True."""
    m = mask.astype(x.dtype)
    return (x * m).sum(axis) / jnp.maximum(m.sum(axis), 1)


def _three_frame_swap(pixel_values: Array, frame_mask: Array) -> Array:
    """The original BT-Adapter takes a 5D input ``[B, T, 3, H, W]`` with ``T == 3`` for
    ``[B, 3, T, H, W]`` and permutes it: frame t's colour c becomes frame c's colour t. Done here
    for samples with exactly 3 valid frames (``PPLLaVAConfig.legacy_three_frame_swap``)."""
    first = pixel_values[:, :3]
    if first.shape[-1] != 3 or first.shape[2] != first.shape[3]:
        return pixel_values
    hit = frame_mask.sum(-1) == 3
    first = jnp.where(hit[:, None, None, None, None], jnp.swapaxes(first, 1, 4), first)
    return jnp.concatenate([first, pixel_values[:, 3:]], axis=1)


def drop_path_rates(depth: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Drop-path rates ``(spatial, temporal)`` of the ``depth`` adapter layers, as the original
    ``CLIPVisionTransformer_BTAdapter`` passes them: ``dpr = linspace(0, 0.1, depth)``; spatial
    layer j gets ``dpr[j]`` (0 for j = 0), while ``CLIPLayer_AttnTime(config, dpr[j])`` puts
    ``dpr[j]`` into its unused ``T`` argument, so every temporal layer keeps the default 0.1."""
    dpr = np.linspace(0, 0.1, depth)
    return tuple(float(r) for r in dpr), (0.1,) * depth


def _drop_path(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
    """Stochastic depth per row of ``x`` (its leading axis), as timm / the original."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    rng = module.make_rng("dropout")
    u = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x / keep * u.astype(x.dtype)


def _ln(cfg: CLIPVisionConfig, name: str) -> nn.LayerNorm:
    return layers.layer_norm(cfg, _ADAPTER_LN_EPS, name=name)


class BTAdapterTemporalLayer(nn.Module):
    """``btadapter_T_layers_{j}``: attention across frames per patch location, ``temporal_fc``,
    residual on the patches. No MLP."""

    cfg: CLIPVisionConfig
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, patches: Array, frame_mask: Array, deterministic: bool = True) -> Array:
        """patches: ``float[N, P, T, C]``; frame_mask: ``bool[N, T]``. Returns the same shape."""
        cfg = self.cfg
        n, p, t, c = patches.shape
        seq = patches.reshape(n * p, t, c)
        h = _ln(cfg, "layer_norm1")(seq)
        keys = frame_mask | ~frame_mask.any(
            -1, keepdims=True
        )  # an all-padding sample: no -inf rows
        mask = jnp.broadcast_to(keys[:, None, :], (n, p, t)).reshape(n * p, 1, 1, t)
        h = CLIPAttention(cfg, name="self_attn")(h, mask)
        h = _drop_path(self, h, self.drop_path, deterministic)
        h = layers.dense(c, ("heads", "embed"), cfg, name="temporal_fc")(h)
        return patches + h.reshape(n, p, t, c)


class BTAdapterSpatialLayer(nn.Module):
    """``btadapter_S_layers_{j}``: a CLIP encoder layer run per frame, the class token copied to
    every frame and averaged back."""

    cfg: CLIPVisionConfig
    drop_path: float = 0.0

    @nn.compact
    def __call__(
        self, cls: Array, patches: Array, frame_mask: Array, deterministic: bool = True
    ) -> tuple[Array, Array]:
        """cls: ``float[N, C]``; patches: ``float[N, P, T, C]``; frame_mask: ``bool[N, T]``."""
        cfg = self.cfg
        n, p, t, c = patches.shape
        frames = jnp.swapaxes(patches, 1, 2)  # [N, T, P, C]
        cls_t = jnp.broadcast_to(cls[:, None, None, :], (n, t, 1, c))
        x = jnp.concatenate([cls_t, frames], axis=2).reshape(n * t, 1 + p, c)
        h = _ln(cfg, "layer_norm1")(x)
        h = CLIPAttention(cfg, name="self_attn")(h)
        h = _drop_path(self, h, self.drop_path, deterministic).reshape(n, t, 1 + p, c)
        cls = cls + _masked_mean(h[:, :, 0], frame_mask[:, :, None], axis=1)
        patches = patches + jnp.swapaxes(h[:, :, 1:], 1, 2)
        ln2, mlp = _ln(cfg, "layer_norm2"), CLIPMLP(cfg, name="mlp")
        cls = cls + mlp(ln2(cls))
        patches = patches + mlp(ln2(patches))
        return cls, patches


class PPLLaVAVisionModel(nn.Module):
    """CLIP vision transformer + BT-Adapter; returns the features the projector pools."""

    cfg: PPLLaVAConfig

    def setup(self) -> None:
        cfg, vcfg = self.cfg, self.cfg.vision
        self.embeddings = CLIPVisionEmbeddings(vcfg)
        self.pre_layrnorm = layers.layer_norm(vcfg, vcfg.layer_norm_eps)
        self.encoder = CLIPEncoder(vcfg)
        self.post_layernorm = layers.layer_norm(vcfg, vcfg.layer_norm_eps)
        if cfg.btadapter:
            d, c = cfg.btadapter_depth, vcfg.hidden_size
            s_rates, t_rates = drop_path_rates(d)
            # trained layers over every frame's tokens: rematerialised like the towers' stacks
            # (cfg.remat_policy), so the backward keeps only their inputs; deterministic static
            spatial = layers.remat_layer(BTAdapterSpatialLayer, vcfg, static_argnums=(4,))
            temporal = layers.remat_layer(BTAdapterTemporalLayer, vcfg, static_argnums=(3,))
            self.btadapter_S_layers = [
                spatial(vcfg, s_rates[j], name=f"btadapter_S_layers_{j}") for j in range(d)
            ]
            self.btadapter_T_layers = [
                temporal(vcfg, t_rates[j], name=f"btadapter_T_layers_{j}") for j in range(d)
            ]
            self.btadapter_cls_token = self.param(
                "btadapter_cls_token",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, "embed")),
                (1, 1, c),
                layers.dtype_of(vcfg.param_dtype),
            )
            self.btadapter_time_embed = layers.embed(cfg.max_T, c, vcfg, ("time", "embed"))

    def feature_layer(self) -> int:
        """The non-negative hidden-state index the LLM uses (``vision_feature_layer``)."""
        return normalize_taps((self.cfg.vision_feature_layer,), self.cfg.vision.num_hidden_layers)[
            0
        ]

    def __call__(
        self,
        pixel_values: Array,
        frame_mask: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """pixel_values: ``float[N, T, H, W, 3]`` (T frames of one sample, channels-last);
        frame_mask: ``bool[N, T]`` (valid frames first) or None (all valid).

        Returns ``float[N, T, P, C]``: hidden state ``vision_feature_layer`` per frame, class
        token dropped (``vision_feature_select_strategy='default'``; ``'full'`` keeps it:
        ``1 + P``). The CLIP trunk is frozen by the optimizer (``optimizer.trainable``), not here:
        differentiating only the trainable parameters skips its backward pass anyway.
        """
        cfg, vcfg = self.cfg, self.cfg.vision
        n, t = pixel_values.shape[:2]
        if cfg.btadapter and t > cfg.max_T:
            raise ValueError(
                f"{t} frames per sample, but the BT-Adapter has max_T={cfg.max_T} time "
                f"embeddings; sample at most {cfg.max_T} frames"
            )
        frame_mask = layers.valid_frames(frame_mask, n, t)
        total = vcfg.num_hidden_layers
        k = self.feature_layer()
        depth = cfg.btadapter_depth if cfg.btadapter else 0
        first = total - depth  # adapter j runs after CLIP layer first + j (0-based)
        init = self.is_initializing()
        # hidden states: adapter j reads tap first + j + 1; the output reads tap k
        n_adapt = max(0, k - first) if not init else depth
        taps = tuple(range(first + 1, first + 1 + n_adapt))
        if k not in taps:
            taps = (*taps, k)

        if cfg.btadapter and cfg.legacy_three_frame_swap and t >= 3:
            pixel_values = _three_frame_swap(pixel_values, frame_mask)
        x = self.embeddings(pixel_values.reshape(n * t, *pixel_values.shape[2:]))
        x = self.pre_layrnorm(x)
        last, hidden = self.encoder(x, taps=taps, upto_taps=True)  # nothing reads above k
        if init:
            self.post_layernorm(last[:, 0])
        hidden = hidden.reshape(len(taps), n, t, *x.shape[1:])
        tap = dict(zip(taps, hidden))
        x_k = tap[k]  # [N, T, 1+P, C]
        if n_adapt == 0:
            out = x_k
        else:
            pos = nn.meta.unbox(self.embeddings.variables["params"]["position_embedding"])
            pos = pos["embedding"].astype(x.dtype)
            cls, patches = None, None
            for j in range(n_adapt):
                xi = tap[first + j + 1]
                xi_cls = _masked_mean(xi[:, :, 0], frame_mask[:, :, None], axis=1)  # [N, C]
                xi_patches = jnp.swapaxes(xi[:, :, 1:], 1, 2)  # [N, P, T, C]
                if j == 0:
                    time = self.btadapter_time_embed(jnp.arange(t))  # [T, C]
                    patches = xi_patches + pos[1:, None, :] + time[None, None]
                    cls = (xi_cls + self.btadapter_cls_token[0, 0].astype(x.dtype) + pos[0]) / 2
                else:
                    cls = cls + xi_cls
                    patches = patches + xi_patches
                patches = self.btadapter_T_layers[j](patches, frame_mask, deterministic)
                cls, patches = self.btadapter_S_layers[j](cls, patches, frame_mask, deterministic)
            if k > first:
                # patches of hidden state k: (CLIP + adapter) / 2; CLIP's own class token
                mixed = (x_k[:, :, 1:] + jnp.swapaxes(patches, 1, 2)) / 2
                out = jnp.concatenate([x_k[:, :, :1], mixed], axis=2)
            else:  # only reached at init, where every adapter layer is run to create it
                out = x_k
        if cfg.vision_feature_select_strategy == "default":
            out = out[:, :, 1:]
        return out
