"""A tiny Flax LM standing in for PPLLaVA in the training tests.

Parameter names follow the real model's layout so path-based freezing is exercised:
``vision_tower/vision_model/{embeddings,encoder,btadapter_*,post_layernorm}``,
``multi_modal_projector/{linear_1,linear_2,clip_visual_ln,clip_text_model,logit_scale}``,
``language_model/{model/{embed_tokens,layers_0,norm},lm_head}``, ``image_newline``.

Batch: ``input_ids int32[B, L]``, ``attention_mask int32[B, L]``, ``labels int32[B, L]``,
``pixel_values float32[B, P, C]`` (P "patches" of C features).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax.layout import IGNORE_INDEX

VOCAB, HIDDEN, VIS, PATCHES, CH = 32, 16, 8, 4, 6


class VisionModel(nn.Module):
    @nn.compact
    def __call__(self, pix):
        x = nn.Dense(VIS, name="embeddings")(pix)
        x = x + self.param("class_embedding", nn.initializers.normal(0.02), (VIS,))
        x = jnp.tanh(nn.Dense(VIS, name="encoder")(x))
        x = x + nn.Dense(VIS, name="btadapter_fc")(x)
        return nn.LayerNorm(name="post_layernorm")(x)


class Projector(nn.Module):
    @nn.compact
    def __call__(self, v, ids_emb):
        v = nn.LayerNorm(name="clip_visual_ln")(v)
        t = nn.Dense(VIS, name="clip_text_model")(ids_emb)
        scale = self.param("logit_scale", nn.initializers.ones, ())
        w = jax.nn.softmax(scale * jnp.einsum("bpc,blc->bp", v, t), axis=-1)
        pooled = jnp.einsum("bp,bpc->bc", w, v)
        return nn.Dense(HIDDEN, name="linear_2")(nn.gelu(nn.Dense(HIDDEN, name="linear_1")(pooled)))


class Layer(nn.Module):
    dropout: float

    @nn.compact
    def __call__(self, x, mask, train):
        h = nn.RMSNorm(name="input_layernorm")(x)
        b, n = x.shape[0], x.shape[1]
        q = nn.Dense(HIDDEN, name="q_proj")(h).reshape(b, n, 2, HIDDEN // 2)
        k = nn.Dense(HIDDEN, name="k_proj")(h).reshape(b, n, 2, HIDDEN // 2)
        v = nn.Dense(HIDDEN, name="v_proj")(h).reshape(b, n, 2, HIDDEN // 2)
        causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
        keep = causal & (mask[:, None, None, :] != 0)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HIDDEN // 2)
        a = jax.nn.softmax(jnp.where(keep, s, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, HIDDEN)
        x = x + nn.Dense(HIDDEN, name="o_proj")(o)
        h = nn.RMSNorm(name="post_attention_layernorm")(x)
        h = nn.Dense(HIDDEN, name="down_proj")(nn.silu(nn.Dense(2 * HIDDEN, name="up_proj")(h)))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + h


class LanguageModel(nn.Module):
    dropout: float

    @nn.compact
    def __call__(self, ids, vis, mask, train):
        emb = nn.Embed(VOCAB, HIDDEN, name="embed_tokens")
        x = emb(ids) + vis[:, None, :]
        for i in range(2):
            x = Layer(self.dropout, name=f"layers_{i}")(x, mask, train)
        x = nn.RMSNorm(name="norm")(x)
        return x


class ToyPPLLaVA(nn.Module):
    dropout: float = 0.0

    def setup(self):
        self.vision_tower = VisionModelWrap()
        self.multi_modal_projector = Projector()
        self.language_model = LMWrap(self.dropout)
        self.image_newline = self.param("image_newline", nn.initializers.normal(0.02), (HIDDEN,))

    def __call__(self, batch, train=False):
        v = self.vision_tower(batch["pixel_values"])
        ids_emb = jax.nn.one_hot(batch["input_ids"], VOCAB)[..., :VIS]
        vis = self.multi_modal_projector(v, ids_emb) + self.image_newline
        return self.language_model(batch["input_ids"], vis, batch["attention_mask"], train)


class VisionModelWrap(nn.Module):
    @nn.compact
    def __call__(self, pix):
        return VisionModel(name="vision_model")(pix)


class LMWrap(nn.Module):
    dropout: float

    @nn.compact
    def __call__(self, ids, vis, mask, train):
        x = LanguageModel(self.dropout, name="model")(ids, vis, mask, train)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


def make_toy(dropout: float = 0.0, seed: int = 0, batch: int = 2, length: int = 8):
    """``(apply_fn, init_params_fn)`` for the toy model."""
    model = ToyPPLLaVA(dropout)

    def apply_fn(params, batch, *, train, rng):
        logits = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
        return {"logits": logits}

    def init_params():
        b = make_batch(np.random.default_rng(0), batch, length)
        return jax.jit(model.init)(jax.random.key(seed), b)["params"]

    return apply_fn, init_params


def make_batch(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    """A random SFT batch with right padding and unsupervised prompts."""
    ids = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    prompt = rng.integers(1, length // 2, size=batch)
    labels = np.where((np.arange(length)[None] >= prompt[:, None]) & (mask == 1), ids, IGNORE_INDEX)
    pix = rng.normal(size=(batch, PATCHES, CH)).astype(np.float32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels.astype(np.int32),
        "pixel_values": pix,
    }


class CountingIterator:
    """Deterministic batches from a seed and a position; ``get_state``/``set_state``."""

    def __init__(self, seed: int = 0, batch: int = 4, length: int = 8, delay: float = 0.0):
        self.seed, self.batch, self.length, self.pos, self.delay = seed, batch, length, 0, delay
        self.seen: list[int] = []

    def __iter__(self):
        return self

    def __next__(self):
        if self.delay:
            import time

            time.sleep(self.delay)
        b = make_batch(np.random.default_rng((self.seed, self.pos)), self.batch, self.length)
        self.seen.append(self.pos)
        self.pos += 1
        return b

    def get_state(self) -> dict:
        return {"pos": self.pos, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        self.pos, self.seed = int(state["pos"]), int(state["seed"])
