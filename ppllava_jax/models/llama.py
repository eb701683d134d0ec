"""LLaMA / Vicuna decoder (transformers' ``LlamaForCausalLM``) with a KV cache; also Qwen2
(``Qwen2ForCausalLM``: a ``Qwen2Config``, i.e. ``qkv_bias`` set, GQA, its own ``rope_theta``).

Parameter tree (unscanned names; scanned: ``layers`` with a leading ``layers`` axis)::

    model/embed_tokens/embedding                 (V, D)
    model/layers_{i}/input_layernorm/weight      (D,)
    model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel (+ bias when attention_bias;
                                                 q/k/v only when qkv_bias)
    model/layers_{i}/post_attention_layernorm/weight
    model/layers_{i}/mlp/{gate,up,down}_proj/kernel (+ bias when mlp_bias)
    model/norm/weight                            (D,)
    lm_head/kernel                               (D, V)   absent when tie_word_embeddings

Attention masks are built from absolute *slots*: a query in slot ``s`` attends to key slots
``<= s`` whose ``attention_mask`` is set. Positions (RoPE) are passed explicitly and need not
equal slots (left padding, PPLLaVA's running count of attended tokens).

KV cache: ``init_cache`` gives ``dict(k, v)`` of ``[L, B, S_max, K, H]`` (logical names
``CACHE_AXES``). A call with ``cache`` and ``cache_index=c`` writes its ``S`` new keys/values to
slots ``[c, c + S)`` and attends over all ``S_max`` slots (``attention_mask`` is then
``[B, S_max]``). Prefill is a call with ``S`` = prompt length, decoding one call per token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppllava_jax.models import layers
from ppllava_jax.models.attention import dot_product_attention
from ppllava_jax.models.config import LlamaConfig

Array = jax.Array

CACHE_AXES = ("layers", "act_batch", "act_length", "act_kv_heads", "act_head_dim")
"""Logical names of the cache arrays ``[L, B, S_max, K, H]``."""


def init_cache(
    cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32
) -> dict[str, Array]:
    """Zero KV cache ``dict(k=dtype[L, B, max_len, K, H], v=...)``; axes ``CACHE_AXES``."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = layers.dtype_of(dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional per-layer KV cache."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        kv: tuple[Array, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """x: ``[B, S, D]``; cos/sin: float32 ``[B, S, H]``; mask: bool ``[B, 1, S, S_kv]``;
        kv: this layer's cache ``([B, S_max, K, H], [B, S_max, K, H])`` or None.
        Returns ``([B, S, D], updated kv or None)``."""
        cfg = self.cfg
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, s, _ = x.shape
        dtype = layers.dtype_of(cfg.dtype)
        bias = cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias  # Qwen2: q/k/v biased, o not
        q = layers.dense(n * h, ("embed", "heads"), cfg, use_bias=qkv_bias, name="q_proj")(x)
        kk = layers.dense(k * h, ("embed", "kv_heads"), cfg, use_bias=qkv_bias, name="k_proj")(x)
        vv = layers.dense(k * h, ("embed", "kv_heads"), cfg, use_bias=qkv_bias, name="v_proj")(x)
        q = q.reshape(b, s, n, h)
        kk = kk.reshape(b, s, k, h)
        vv = vv.reshape(b, s, k, h)
        # RoPE in float32 (transformers' rotate-half layout), back to the compute dtype.
        q = layers.apply_rope(q.astype(jnp.float32), cos, sin).astype(dtype)
        kk = layers.apply_rope(kk.astype(jnp.float32), cos, sin).astype(dtype)
        q = layers.constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        kk = layers.constrain(kk, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        vv = layers.constrain(vv, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        new_kv = None
        if kv is not None:
            ck, cv = kv
            idx = (0, cache_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, kk.astype(ck.dtype), idx)
            cv = jax.lax.dynamic_update_slice(cv, vv.astype(cv.dtype), idx)
            new_kv = (ck, cv)
            kk, vv = ck.astype(dtype), cv.astype(dtype)
        out = dot_product_attention(q, kk, vv, mask=mask, impl=cfg.attention_impl)
        out = out.reshape(b, s, n * h)
        out = layers.dense(cfg.hidden_size, ("heads", "embed"), cfg, use_bias=bias, name="o_proj")(
            out
        )
        return out, new_kv


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        bias = cfg.mlp_bias
        act = layers.activation(cfg.hidden_act)
        g = layers.dense(
            cfg.intermediate_size, ("embed", "mlp"), cfg, use_bias=bias, name="gate_proj"
        )(x)
        u = layers.dense(
            cfg.intermediate_size, ("embed", "mlp"), cfg, use_bias=bias, name="up_proj"
        )(x)
        y = layers.constrain(act(g) * u, ("act_batch", "act_length", "act_mlp"))
        return layers.dense(
            cfg.hidden_size, ("mlp", "embed"), cfg, use_bias=bias, name="down_proj"
        )(y)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; ``(x, cos, sin, mask, kv, cache_index) -> (x, kv)`` for ``stack_layers``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, cache_index):
        cfg = self.cfg
        dtype = layers.dtype_of(cfg.dtype)
        pdtype = layers.dtype_of(cfg.param_dtype)
        norm = lambda name: layers.RMSNorm(  # noqa: E731
            eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=pdtype, name=name
        )
        h, kv = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, kv, cache_index
        )
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        x = layers.constrain(x, layers.ACT_BLE)
        return x, kv


class LlamaModel(nn.Module):
    """The decoder stack without the head (transformers' ``LlamaModel``)."""

    cfg: LlamaConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, cfg, ("vocab", "embed"))
        block = layers.stack_layers(
            LlamaDecoderLayer,
            cfg,
            cfg.num_hidden_layers,
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
        )
        if cfg.scan_layers:
            self.layers = block(cfg)
        else:  # sub-modules named layers_0 .. layers_{L-1}
            self.layers = [block(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = layers.RMSNorm(
            eps=cfg.rms_norm_eps,
            dtype=layers.dtype_of(cfg.dtype),
            param_dtype=layers.dtype_of(cfg.param_dtype),
        )

    def embed(self, input_ids: Array) -> Array:
        """int32[B, S] -> ``cfg.dtype[B, S, D]``."""
        return self.embed_tokens(input_ids)

    def attend(self, x: Array) -> Array:
        """Tied head: ``x @ embedding.T``."""
        return self.embed_tokens.attend(x)

    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        cache: dict[str, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """x: ``[B, S, D]`` embeddings; mask: bool ``[B, 1, S, S_kv]``. Returns the final-norm
        hidden states ``[B, S, D]`` and the updated cache."""
        cfg = self.cfg
        x = layers.constrain(x.astype(layers.dtype_of(cfg.dtype)), layers.ACT_BLE)
        cos, sin = layers.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        kv = None if cache is None else (cache["k"], cache["v"])
        if cfg.scan_layers:
            x, kv = self.layers(x, cos, sin, mask, kv, cache_index)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                kv_i = None if kv is None else (kv[0][i], kv[1][i])
                x, kv_i = layer(x, cos, sin, mask, kv_i, cache_index)
                outs.append(kv_i)
            if kv is not None:
                kv = (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]))
        new_cache = None
        if kv is not None:
            new_cache = {
                "k": layers.constrain(kv[0], CACHE_AXES),
                "v": layers.constrain(kv[1], CACHE_AXES),
            }
        return self.norm(x), new_cache


class LlamaForCausalLM(nn.Module):
    """transformers' ``LlamaForCausalLM``: ``model`` (``LlamaModel``) + ``lm_head``."""

    cfg: LlamaConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), cfg, use_bias=False)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings: int32[B, S] -> ``cfg.dtype[B, S, D]`` (for merging visual tokens)."""
        return self.model.embed(input_ids)

    def __call__(
        self,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array,
        attention_mask: Array | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | int | None = None,
        return_hidden: bool = False,
        return_logits: bool = True,
    ) -> dict[str, Any]:
        """Decoder forward.

        Args:
          input_ids: int32[B, S]; or ``inputs_embeds``: float[B, S, D] (exactly one of them).
          positions: int32[B, S] RoPE positions.
          attention_mask: bool/int ``[B, S_kv]`` key padding mask (1 = real token); ``S_kv`` is
            ``S`` without a cache and ``S_max`` with one. None: every key is real.
          cache: ``init_cache(...)`` dict or None; cache_index: int32 scalar, first slot written.
          return_hidden: also return the final-norm hidden states.
          return_logits: False skips the LM head (for a loss that applies it chunk by chunk):
            ``logits`` is then None, ``hidden`` is set and ``lm_head`` holds the head's kernel.
        Returns:
          ``dict(logits=float32[B, S, V], cache=updated cache or None,
          hidden=cfg.dtype[B, S, D] or None)``; with ``return_logits=False`` also
          ``lm_head=param_dtype[D, V]`` (``logits = hidden @ lm_head`` in ``cfg.dtype``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            x = self.embed(input_ids)
        else:
            x = inputs_embeds
            if self.is_initializing():  # create the embedding table too
                self.embed(jnp.zeros((1, 1), jnp.int32))
        b, s = x.shape[:2]
        if cache is None:
            s_kv = s
            q_slot = jnp.arange(s, dtype=jnp.int32)
        else:
            if cache_index is None:
                raise ValueError("cache_index is required with a cache")
            s_kv = cache["k"].shape[2]
            q_slot = jnp.asarray(cache_index, jnp.int32) + jnp.arange(s, dtype=jnp.int32)
            cache_index = jnp.asarray(cache_index, jnp.int32)
        k_slot = jnp.arange(s_kv, dtype=jnp.int32)
        mask = (k_slot[None, :] <= q_slot[:, None])[None, None]  # [1, 1, S, S_kv]
        if attention_mask is not None:
            if attention_mask.shape != (b, s_kv):
                raise ValueError(
                    f"attention_mask has shape {attention_mask.shape}; expected {(b, s_kv)} "
                    "(all key slots: the cache length when a cache is given)"
                )
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        else:
            mask = jnp.broadcast_to(mask, (b, 1, s, s_kv))
        hidden, new_cache = self.model(x, positions, mask, cache, cache_index)
        if not return_logits and not self.is_initializing():
            return {"logits": None, "cache": new_cache, "hidden": hidden, "lm_head": self.head()}
        if self.cfg.tie_word_embeddings:
            logits = self.model.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = layers.constrain(
            logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab")
        )
        return {"logits": logits, "cache": new_cache, "hidden": hidden if return_hidden else None}

    def head(self) -> Array:
        """The LM head as a kernel ``[D, V]`` (the embedding table transposed when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.embedding.T
        return nn.unbox(self.lm_head.variables["params"]["kernel"])


def abstract_params(cfg: LlamaConfig) -> Any:
    """Boxed pytree of ``jax.ShapeDtypeStruct`` (with logical names) of the parameters."""
    model = LlamaForCausalLM(cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, positions=ids)["params"])
