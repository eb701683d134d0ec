"""Model configurations: frozen, hashable dataclasses (usable as static jit arguments).

Each config reads and writes the transformers ``config.json`` fields of its family
(``from_hf`` / ``to_hf``) and carries the runtime fields of ``Runtime`` (dtypes, scan, remat,
attention kernel). Defaults are the 7B PPLLaVA sizes (CLIP ViT-L/14-336, Vicuna-7B).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """How a tower runs; not part of the checkpoint.

    dtype: compute dtype of activations and matmuls ('float32', 'bfloat16').
    param_dtype: dtype parameters are created and stored in.
    scan_layers: stack repeated layers and ``nn.scan`` over them (compile time independent of
      depth); False keeps one sub-module per layer (``layers_0``, ``layers_1``, ...).
    remat_policy: 'none' | 'full' | 'dots' | 'dots_no_batch' (see layers.REMAT_POLICIES).
    attention_impl: 'xla' | 'cudnn' | 'auto' for ``jax.nn.dot_product_attention``.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def runtime(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _RUNTIME_FIELDS}

    def replace(self, **kw: Any) -> Any:
        return dataclasses.replace(self, **kw)


def _pick(cls: type, d: dict[str, Any], **overrides: Any) -> Any:
    """Build ``cls`` from the keys of ``d`` it knows; unknown keys are ignored (HF configs carry
    dozens of generation fields), ``None`` values keep the default."""
    names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
    # runtime fields come only from ``overrides``: HF configs carry "dtype" (the storage dtype)
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in list(kw.items()):
        if isinstance(v, list):
            kw[k] = _tuplify(v)
    return cls(**kw)


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig(Runtime):
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> CLIPVisionConfig:
        if "vision_config" in d:  # a CLIPModel config
            d = {**d["vision_config"], "projection_dim": d.get("projection_dim")}
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in _RUNTIME_FIELDS:
            d.pop(f)
        d["model_type"] = "clip_vision_model"
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig(Runtime):
    """CLIP text tower. ``max_position_embeddings`` is the table length actually used (248 for the
    Long-CLIP extension); ``position_keep`` rows (< 20) come from the frozen original table when
    ``extended`` is set (SPEC section 4)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    extended: bool = False
    position_keep: int = 20

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> CLIPTextConfig:
        if "text_config" in d:  # a CLIPModel config
            d = {**d["text_config"], "projection_dim": d.get("projection_dim")}
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in (*_RUNTIME_FIELDS, "extended", "position_keep"):
            d.pop(f)
        d["model_type"] = "clip_text_model"
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(Runtime):
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> LlamaConfig:
        d = dict(d)
        if d.get("rope_scaling") not in (None, {}) and d["rope_scaling"].get("rope_type", d[
            "rope_scaling"
        ].get("type")) not in (None, "default"):
            raise NotImplementedError(f"rope_scaling={d['rope_scaling']} is not supported")
        rp = d.get("rope_parameters")  # transformers 5 moves rope_theta here
        if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in d:
            d["rope_theta"] = rp["rope_theta"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in _RUNTIME_FIELDS:
            d.pop(f)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"])
        return d


LN_100 = math.log(100.0)
