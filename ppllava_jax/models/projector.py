"""PPLLaVA's projector: prompt-guided pooling (SPEC section 3) and the other pooling modes.

Parameters mirror the checkpoint's ``multi_modal_projector.*``: ``clip_text_model`` (a CLIP text
transformer, 248 positions with Long-CLIP), ``clip_text_projection`` and
``clip_visual_projection`` (no bias), ``clip_visual_ln`` (the projector's own copy of CLIP's
post-LN), ``linear_1``/``linear_2`` (the LLaVA MLP), ``logit_scale`` (scalar, frozen).

Computation for one sample with features ``F[T, P, C]`` (class token dropped) and CLIP prompt:

1. ``e = clip_visual_projection(clip_visual_ln(F))``, ``c = clip_text_projection(pooled text)``;
2. ``s = cos(c, e)`` per patch: the "visual attention" ``[T, h, w]`` (raw cosine);
3. ``a = softmax(exp(logit_scale) * s)`` over *all* valid ``T * P`` patches of the sample;
4. ``V = linear_2(gelu(linear_1(F)))`` and ``weighted_pool3d(V[T, h, w], a, kernel, stride,
   pooling_temp)``: tokens ``[T', h', w']``, flattened (t, row, col).

What the original does with each media type (read from its code and checked against the
fixtures ``forward_*_batch.npz`` -> ``visual_tokens_i`` at <= 1e-5, tests/models/test_projector.py,
tests/models/test_btadapter.py). This is the contract for the visual-token merge:

- **video** (T frames): the vision tower runs the T frames as *one* BT-Adapter sequence; the
  projector pools the sample with the *video* kernel/stride (``pooling_kernel`` (2,3,3)) and one
  softmax over all ``T*P`` patches. Tokens: ``T' * h' * w'`` in (t, row, col) order; frames that
  do not fill a temporal window are dropped. Nothing else is appended.
- **any-resolution image** (``V = 1 + rows*cols`` views: base view, then the grid crops row-major):
  the vision tower runs every view *separately* (BT-Adapter with T = 1 per view); the projector
  then treats the V views as the V "frames" of *one* sample: one softmax over all ``V*P`` patches
  (base and crops together), pooled with the *image* kernel (``image_pooling_kernel`` (1,3,3)),
  i.e. each view on its own grid ``h' x w'``. The merged tokens are
  ``base view tokens (h'*w', no newline)``, then the crops' pooled grids tiled into a
  ``(rows*h', cols*w')`` grid, *unpadded* to the image's aspect ratio (transformers 4.45
  ``unpad_image`` on the pooled grid, ``image_sizes`` = (height, width), grid from
  ``select_best_resolution(image_size, image_grid_pinpoints)`` / vision ``image_size``), with
  ``image_newline`` appended after every row; row-major. A single-view image (no crops) gives its
  ``h'*w'`` tokens followed by one ``image_newline``. ``anyres_token_order`` plans this on the
  host and ``collate`` writes it into ``visual_index``.
- **multi-image** (N images): the vision tower runs the N images as *one* BT-Adapter sequence of
  N frames (temporal attention across images, time embeddings 0..N-1); the projector uses the
  *image* kernel with one softmax over all ``N*P`` patches; image ``i``'s ``h'*w'`` tokens replace
  the sample's ``i``-th image token. No newline.

Static shapes: samples are padded to a common T with ``frame_mask`` (valid frames first). Padded
frames are excluded from the softmax; output frames whose window reaches a padded frame are
flagged False in ``token_mask`` and must not be merged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppllava_jax.layout import pool_windows
from ppllava_jax.models import layers
from ppllava_jax.models.clip import CLIPTextTransformer
from ppllava_jax.models.config import PPLLaVAConfig
from ppllava_jax.models.pooling import adaptive_avg_pool3d, weighted_pool3d
from ppllava_jax.models.siglip import (
    SiglipAttentionPoolingHead,
    SiglipTextTransformer,
    last_valid_index,
)

Array = jax.Array


class PPLLaVAProjector(nn.Module):
    """The projector (``multi_modal_projector`` in the full model)."""

    cfg: PPLLaVAConfig

    def setup(self) -> None:
        cfg = self.cfg
        d_llm = cfg.llm.hidden_size
        vcfg = cfg.vision
        self.linear_1 = layers.dense(d_llm, ("embed", "mlp"), vcfg)
        self.linear_2 = layers.dense(d_llm, ("mlp", "embed"), vcfg)
        if cfg.pooling == "ppllava" and cfg.qwen:  # SigLIP (see _siglip_setup)
            self._siglip_setup()
        elif cfg.pooling == "ppllava":
            pd = cfg.clip_projection_dim
            self.clip_text_model = CLIPTextTransformer(cfg.clip_text)
            self.clip_text_projection = layers.dense(
                pd, ("embed", None), cfg.clip_text, use_bias=False
            )
            self.clip_visual_ln = layers.layer_norm(vcfg, vcfg.layer_norm_eps)
            self.clip_visual_projection = layers.dense(pd, ("embed", None), vcfg, use_bias=False)
            self.logit_scale = self.param(
                "logit_scale",
                nn.with_logical_partitioning(nn.initializers.constant(math.log(100.0)), ()),
                (),
                jnp.float32,
            )

    def _siglip_setup(self) -> None:
        """The Qwen variant's prompt encoder: SigLIP's text tower (with its ``head``), SigLIP's
        attention-pooling head (``clip_visual_head``: only its value projection, layernorm and
        mlp act), SigLIP's post-LN (``clip_visual_ln``), ``logit_scale`` and ``logit_bias``
        (float32[1] each; checkpoints overwrite them. From scratch the scale starts at ln 100,
        as the Vicuna projector's: SigLIP's own initial ln 10 leaves the pooling weights of an
        untrained prompt encoder nearly uniform, and the demo's colours then wash out)."""
        cfg = self.cfg
        self.clip_text_model = SiglipTextTransformer(cfg.clip_text)
        self.clip_visual_head = SiglipAttentionPoolingHead(cfg.vision)
        self.clip_visual_ln = layers.layer_norm(cfg.vision, cfg.vision.layer_norm_eps)
        init = lambda v: nn.with_logical_partitioning(nn.initializers.constant(v), (None,))  # noqa: E731
        self.logit_scale = self.param("logit_scale", init(math.log(100.0)), (1,), jnp.float32)
        self.logit_bias = self.param("logit_bias", init(-10.0), (1,), jnp.float32)

    def mlp(self, features: Array) -> Array:
        """The LLaVA MLP ``linear_2(act(linear_1(F)))``: ``float[..., C] -> float[..., D]``."""
        # keep the items' axis batch-sharded (else the partitioner all-gathers every item's
        # [T, P, D] values onto every device to meet the fsdp-sharded kernels)
        mid = (None,) * (features.ndim - 2)
        features = layers.constrain(features, ("act_batch", *mid, "act_embed"))
        y = layers.constrain(self.linear_1(features), ("act_batch", *mid, "act_mlp"))
        y = layers.activation(self.cfg.projector_hidden_act)(y)
        return layers.constrain(self.linear_2(y), ("act_batch", *mid, "act_embed"))

    def text_embeds(self, clip_ids: Array, clip_mask: Array) -> Array:
        """``int32[N, L], int[N, L] -> float[N, d]``: projected pooled CLIP text (not normalised).
        The recipe freezes the text tower (the original runs it under ``torch.no_grad``); that is
        the optimizer's choice (``optimizer.trainable``), so a from-scratch run may train it."""
        if self.cfg.qwen:
            # SigLIP: bidirectional, no mask in the original (each prompt runs alone, unpadded);
            # here clip_mask hides the batch's own padding and the last real token is pooled
            out = self.clip_text_model(clip_ids, clip_mask, pool_index=last_valid_index(clip_mask))
            return out["pooler_output"]
        pooled = self.clip_text_model(clip_ids, clip_mask)["pooler_output"]
        return self.clip_text_projection(pooled)

    def visual_attention(self, features: Array, clip_ids: Array, clip_mask: Array) -> Array:
        """Cosine similarity of every patch with the prompt: ``float32[N, T, P]``."""
        if self.cfg.qwen:
            y = self.clip_visual_ln(features)
            if self.is_initializing():  # create the head's probe / out_proj too
                self.clip_visual_head(y[:, 0])
            e = self.clip_visual_head.value_embed(y).astype(jnp.float32)
        else:
            e = self.clip_visual_projection(self.clip_visual_ln(features)).astype(jnp.float32)
        c = self.text_embeds(clip_ids, clip_mask).astype(jnp.float32)
        return jnp.einsum(
            "nd,ntpd->ntp",
            layers.l2_normalize(c),
            layers.l2_normalize(e),
            precision=jax.lax.Precision.HIGHEST,
        )

    def __call__(
        self,
        features: Array,
        frame_mask: Array | None = None,
        clip_ids: Array | None = None,
        clip_mask: Array | None = None,
        *,
        video: bool = True,
        kernel: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
    ) -> dict[str, Array]:
        """Pool the features of N samples.

        Args:
          features: ``float[N, T, P, C]``, ``P = frame_shape[0] * frame_shape[1]`` (no class
            token); for an any-resolution image T counts its views.
          frame_mask: ``bool[N, T]``, valid frames first; None = all valid.
          clip_ids, clip_mask: ``int32[N, L]``, the CLIP prompt (pooling 'ppllava' only).
          video: pick the video (True) or image (False) kernel/stride from the config.
          kernel, stride: static overrides of the window (3 ints each).
        Returns dict:
          ``tokens float[N, T', h', w', D]`` (pooling 'ppllava'/'pllava'; ``[N, 1, h, w, D]`` for
          'avp' on video, ``[N, T, h, w, D]`` for 'none' and for 'avp' on images);
          ``token_mask bool[N, T']``: output frames computed from valid frames only;
          ``visual_attention float32[N, T, h, w]`` (raw cosine; pooling 'ppllava' only).
        """
        cfg = self.cfg
        n, t, p, _ = features.shape
        fh, fw = cfg.frame_shape
        if p != fh * fw:
            raise ValueError(
                f"features have {p} patches per frame; frame_shape {cfg.frame_shape} needs "
                f"{fh * fw} (drop the class token: vision_feature_select_strategy='default')"
            )
        frame_mask = layers.valid_frames(frame_mask, n, t)
        n_valid = frame_mask.sum(-1)
        out: dict[str, Array] = {}

        if cfg.pooling == "ppllava":
            if clip_ids is None or clip_mask is None:
                raise ValueError("pooling='ppllava' needs clip_ids and clip_mask (the CLIP prompt)")
            sim = self.visual_attention(features, clip_ids, clip_mask)  # [N, T, P]
            logits = jnp.exp(self.logit_scale.astype(jnp.float32)) * sim
            if cfg.qwen:  # SigLIP: scale [1] and a bias (which cancels in the softmax)
                logits = logits + self.logit_bias.astype(jnp.float32)
            logits = jnp.where(frame_mask[:, :, None], logits, -jnp.inf).reshape(n, t * p)
            attn = jax.nn.softmax(logits, axis=-1).reshape(n, t, fh, fw)
            attn = jnp.where(frame_mask[:, :, None, None], attn, 0.0)
            values = self.mlp(features).reshape(n, t, fh, fw, -1)
            if kernel is None or stride is None:
                k0, s0 = cfg.pool_kernel_stride(video)
                kernel = k0 if kernel is None else kernel
                stride = s0 if stride is None else stride
            k, s, _ = pool_windows((t, fh, fw), kernel=kernel, stride=stride)
            tokens = weighted_pool3d(values, attn, k, s, cfg.pooling_temp)
            tokens = layers.constrain(tokens, ("act_batch", None, None, None, "act_embed"))
            t_out = tokens.shape[1]
            out["tokens"] = tokens
            out["token_mask"] = jnp.arange(t_out)[None] * s[0] + k[0] <= n_valid[:, None]
            out["visual_attention"] = sim.reshape(n, t, fh, fw)
            return out

        values = self.mlp(features).reshape(n, t, fh, fw, -1)
        if cfg.pooling == "none" or (cfg.pooling == "avp" and not video):
            out["tokens"], out["token_mask"] = values, frame_mask
        elif cfg.pooling == "avp":
            w = frame_mask.astype(jnp.float32)[:, :, None, None, None]
            mean = (values.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
            out["tokens"] = mean[:, None].astype(values.dtype)
            out["token_mask"] = n_valid[:, None] > 0
        elif cfg.pooling == "pllava":
            # AdaptiveAvgPool3d over (T, h, w): windows depend on T, so frames must be unpadded.
            if cfg.pllava_pooling_shape is None:
                raise ValueError("pooling='pllava' needs pllava_pooling_shape in config.json")
            tokens = adaptive_avg_pool3d(values, cfg.pllava_pooling_shape)
            out["tokens"] = tokens
            out["token_mask"] = jnp.ones((n, tokens.shape[1]), bool)
        else:  # pragma: no cover - PPLLaVAConfig validates
            raise ValueError(f"unknown pooling {cfg.pooling!r}")
        return out
