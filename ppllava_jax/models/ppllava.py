"""The whole PPLLaVA model: vision tower (+BT-Adapter), projector, merge, LLaMA decoder.

Parameter tree (mirrors the released checkpoint's keys, see convert/ppllava_keys.py)::

    vision_tower/vision_model/...      CLIP ViT + BT-Adapter   (models/btadapter.py)
    multi_modal_projector/...          prompt-guided pooling   (models/projector.py)
    language_model/model/..., language_model/lm_head
    image_newline                      float[D]

Input: the static-shape batch of ``data.collate.collate`` (read its docstring). The visual
groups present in the batch (``video``, ``image``, ``multi``) are encoded and pooled, their tokens
concatenated into one pool (last row ``image_newline``), and ``visual_index`` gathers them into
the merged sequence in place of the image tokens. No Python control flow depends on data.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppllava_jax.layout import FRAME_MASK, GROUPS
from ppllava_jax.models import layers
from ppllava_jax.models.btadapter import PPLLaVAVisionModel
from ppllava_jax.models.config import PPLLaVAConfig
from ppllava_jax.models.llama import LlamaForCausalLM, init_cache
from ppllava_jax.models.projector import PPLLaVAProjector
from ppllava_jax.models.siglip import SiglipVisionTransformer

Array = jax.Array


class VisionTower(nn.Module):
    """``vision_tower``: holds ``vision_model`` so parameter paths match the checkpoint (CLIP +
    BT-Adapter, or SigLIP for the Qwen variant)."""

    cfg: PPLLaVAConfig

    def setup(self) -> None:
        if self.cfg.qwen:
            self.vision_model = SiglipVisionTransformer(self.cfg.vision)
        else:
            self.vision_model = PPLLaVAVisionModel(self.cfg)

    def __call__(self, pixel_values: Array, frame_mask: Array, deterministic: bool = True):
        """pixel_values ``float[N, T, S, S, 3]`` -> features ``float[N, T, P, C]``."""
        if not self.cfg.qwen:
            return self.vision_model(pixel_values, frame_mask, deterministic=deterministic)
        # SigLIP: frames are independent; hidden state vision_feature_layer (before
        # post_layernorm), every patch ("full"; "default" would drop the first one)
        n, t = pixel_values.shape[:2]
        out = self.vision_model(
            pixel_values.reshape(n * t, *pixel_values.shape[2:]),
            taps=(self.cfg.vision_feature_layer,),
        )
        feats = out["hidden_states"][0]
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats.reshape(n, t, *feats.shape[1:])


class PPLLaVA(nn.Module):
    """PPLLaVA for video, any-resolution image and multi-image inputs (batches may mix them)."""

    cfg: PPLLaVAConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.vision_tower = VisionTower(cfg)
        self.multi_modal_projector = PPLLaVAProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg.llm)
        self.image_newline = self.param(
            "image_newline",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed",)),
            (cfg.llm.hidden_size,),
            layers.dtype_of(cfg.llm.param_dtype),
        )

    # -- visual tokens ---------------------------------------------------------------------
    def encode_group(self, batch: dict[str, Array], group: str, deterministic: bool = True):
        """Tokens of one visual group: ``dict(tokens=float[N_g, t, h, w, D], ...)``.

        video: each item is one BT-Adapter sequence of T frames, pooled with the video kernel.
        image: each view of an any-resolution image runs alone (T = 1); the views of an item
          share one softmax and are pooled with the image kernel.
        multi: the N images of an item are one BT-Adapter sequence, pooled with the image kernel.
        """
        px = batch[f"{group}_pixels"]
        n, t = px.shape[:2]
        mask = layers.valid_frames(batch.get(FRAME_MASK[group]), n, t)
        if group == "image":
            feats = self.vision_tower(
                px.reshape(n * t, 1, *px.shape[2:]), mask.reshape(n * t, 1), deterministic
            )
            feats = feats.reshape(n, t, *feats.shape[2:])
        else:
            feats = self.vision_tower(px, mask, deterministic)
        return self.multi_modal_projector(
            feats,
            mask,
            batch.get(f"{group}_clip_ids"),
            batch.get(f"{group}_clip_mask"),
            video=group == "video",
        )

    def visual_pool(
        self, batch: dict[str, Array], deterministic: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        """``float[R, D]``: every group's tokens flattened in ``GROUPS`` order, then
        ``image_newline``; and the visual-attention maps per group (raw cosine, [N, T, h, w])."""
        pool, maps = [], {}
        d = self.cfg.llm.hidden_size
        for g in GROUPS:
            if f"{g}_pixels" not in batch:
                continue
            out = self.encode_group(batch, g, deterministic)
            pool.append(out["tokens"].reshape(-1, d))
            if "visual_attention" in out:
                maps[g] = out["visual_attention"]
        dtype = layers.dtype_of(self.cfg.llm.dtype)
        pool.append(self.image_newline[None])
        return jnp.concatenate([p.astype(dtype) for p in pool], axis=0), maps

    def embed_inputs(
        self, batch: dict[str, Array], deterministic: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        """Merged input embeddings ``float[B, L, D]`` (text embeddings, visual tokens in place of
        the image tokens, zeros on padding) and the visual-attention maps."""
        text = self.language_model.embed(batch["input_ids"])
        if self.is_initializing() or any(f"{g}_pixels" in batch for g in GROUPS):
            pool, maps = self.visual_pool(batch, deterministic)
            vis_idx = batch["visual_index"]
            vis = jnp.take(pool, jnp.maximum(vis_idx, 0), axis=0)
            x = jnp.where((vis_idx >= 0)[..., None], vis, text.astype(vis.dtype))
        else:
            x, maps = text, {}
        x = x * batch["attention_mask"][..., None].astype(x.dtype)
        return layers.constrain(x, layers.ACT_BLE), maps

    # -- full forward ----------------------------------------------------------------------
    def __call__(
        self,
        batch: dict[str, Array],
        *,
        deterministic: bool = True,
        return_visual_attention: bool = False,
        return_logits: bool = True,
    ) -> dict[str, Any]:
        """Forward pass over a collated batch.

        Returns dict: ``logits float32[B, L, V]``, ``attention_mask int32[B, L]`` (merged) and
        ``visual_attention`` (per group, raw cosine ``[N_g, T, h, w]``) on request. The losses
        live in ``train.losses`` (``labels`` in the batch are not read here).
        ``return_logits=False`` skips the LM head: no ``logits``, but ``hidden`` (final-norm
        states ``llm.dtype[B, L, D]``) and ``lm_head`` (kernel ``[D, V]``) for a loss that
        applies the head chunk by chunk (``train.losses.chunked_token_logps``).
        """
        x, maps = self.embed_inputs(batch, deterministic)
        out = self.language_model(
            inputs_embeds=x,
            positions=batch["positions"],
            attention_mask=batch["attention_mask"],
            return_logits=return_logits,
        )
        result: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
        if out["logits"] is None:
            result.update(hidden=out["hidden"], lm_head=out["lm_head"])
        else:
            result["logits"] = out["logits"]
        if return_visual_attention:
            result["visual_attention"] = maps
        return result

    # -- generation (see generate.py) ------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int) -> dict[str, Array]:
        return init_cache(self.cfg.llm, batch_size, max_len, self.cfg.llm.dtype)

    def prefill(self, batch: dict[str, Array], cache: dict[str, Array]):
        """Run the prompt (left-padded) into ``cache``; logits float32[B, V] of the last slot."""
        x, _ = self.embed_inputs(batch)
        b, lp = batch["attention_mask"].shape
        s_max = cache["k"].shape[2]
        mask = jnp.zeros((b, s_max), jnp.int32).at[:, :lp].set(batch["attention_mask"])
        out = self.language_model(
            inputs_embeds=x,
            positions=batch["positions"],
            attention_mask=mask,
            cache=cache,
            cache_index=0,
        )
        return out["logits"][:, -1], out["cache"]

    def decode_step(self, ids, positions, attention_mask, cache, cache_index):
        """One cached step: ids int32[B, 1] -> logits float32[B, V] and the updated cache."""
        out = self.language_model(
            ids,
            positions=positions,
            attention_mask=attention_mask,
            cache=cache,
            cache_index=cache_index,
        )
        return out["logits"][:, -1], out["cache"]


def _init_batch(cfg: PPLLaVAConfig, batch_size: int = 1, length: int = 8) -> dict[str, Any]:
    """A tiny batch with one item of every group, for ``init`` / ``eval_shape``."""
    import numpy as np

    s = cfg.vision.image_size
    out: dict[str, Any] = {
        "input_ids": np.zeros((batch_size, length), np.int32),
        "visual_index": np.full((batch_size, length), -1, np.int32),
        "attention_mask": np.ones((batch_size, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch_size, 1)),
    }
    frames = max(cfg.pooling_kernel[0] if cfg.pooling_kernel else 1, 1)
    for g, t in (("video", frames), ("image", 1), ("multi", 1)):
        out[f"{g}_pixels"] = np.zeros((1, t, s, s, 3), np.float32)
        out[FRAME_MASK[g]] = np.ones((1, t), bool)
        out[f"{g}_clip_ids"] = np.zeros((1, 4), np.int32)
        out[f"{g}_clip_mask"] = np.ones((1, 4), np.int32)
    return out


def init_params(cfg: PPLLaVAConfig, rng: Array) -> Any:
    """Random parameters (boxed with logical names; ``nn.unbox`` for plain arrays)."""
    return PPLLaVA(cfg).init(rng, _init_batch(cfg))["params"]


def abstract_params(cfg: PPLLaVAConfig) -> Any:
    """Boxed ``ShapeDtypeStruct`` tree of the parameters (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
