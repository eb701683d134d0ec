"""Transformers ``config.json`` <-> the tower and decoder configs of ``models/config.py`` (and the
whole ``CLIPModel`` / ``SiglipModel`` configs), each translation written once.

    cfg = tower_from_hf(CLIPVisionConfig, json.load(f), scan_layers=False)
    d = tower_to_hf(cfg)          # {"hidden_size": 1024, ..., "model_type": "clip_vision_model"}

Reading: the fields a dataclass knows are taken, unknown ones ignored (config.json files carry
dozens of generation fields), ``null`` keeps the default, lists become tuples; runtime fields
(``dtype``, ``scan_layers``, ...) come only from the keyword arguments (a config.json's "dtype"
is the storage dtype). ``hf_defaults=True`` fills what transformers' 4.x diff-only files omit
with transformers' class defaults (they differ from our ViT-L/14-336 defaults).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ppllava_jax.models.clip import CLIPConfig
from ppllava_jax.models.config import (
    RUNTIME_FIELDS,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    Qwen2Config,
    SiglipTextConfig,
    SiglipVisionConfig,
)
from ppllava_jax.models.siglip import SiglipConfig

C = TypeVar("C")

# transformers' CLIP class defaults (omitted from its 4.x config.json files)
HF_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
HF_CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

# per tower: (model_type, architecture of the stand-alone model, fields not in config.json,
# the key of a whole-model config.json holding it, whether it takes that config's
# projection_dim); SigLIP's defaults are transformers' own, so none are filled in.
_TOWERS: dict[type, tuple[str, str, tuple[str, ...], str, bool]] = {
    CLIPVisionConfig: ("clip_vision_model", "CLIPVisionModel", (), "vision_config", True),
    CLIPTextConfig: (
        "clip_text_model",
        "CLIPTextModel",
        ("extended", "position_keep"),
        "text_config",
        True,
    ),
    SiglipVisionConfig: ("siglip_vision_model", "SiglipVisionModel", (), "vision_config", False),
    SiglipTextConfig: (
        "siglip_text_model",
        "SiglipTextModel",
        ("extended", "position_keep"),
        "text_config",
        False,
    ),
}
_HF_DEFAULTS = {CLIPVisionConfig: HF_CLIP_VISION_DEFAULTS, CLIPTextConfig: HF_CLIP_TEXT_DEFAULTS}


def tuplify(v: Any) -> Any:
    """Nested lists (JSON) as nested tuples (hashable dataclass fields)."""
    return tuple(tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def listify(v: Any) -> Any:
    """Nested tuples as nested lists (JSON)."""
    return [listify(x) for x in v] if isinstance(v, (list, tuple)) else v


def pick(cls: type[C], d: dict[str, Any], **overrides: Any) -> C:
    """``cls`` from the keys of ``d`` it knows (runtime fields only from ``overrides``; ``None``
    values keep the default, lists become tuples)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**{k: tuplify(v) for k, v in kw.items()})


def hf_fields(cfg: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass fields of ``cfg`` as config.json values, less runtime fields and ``skip``."""
    drop = {*RUNTIME_FIELDS, *skip}
    return {
        f.name: listify(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in drop
    }


def _first_eos(d: dict[str, Any]) -> dict[str, Any]:
    """A list of ``eos_token_id``s (newer config.json files) as its first id."""
    if isinstance(d.get("eos_token_id"), list):
        d = {**d, "eos_token_id": d["eos_token_id"][0]}
    return d


def tower_from_hf(cls: type[C], d: dict[str, Any], hf_defaults: bool = False, **runtime: Any) -> C:
    """A CLIP / SigLIP vision or text tower config from its config.json ``d`` (or from a whole
    ``CLIPModel`` / ``SiglipModel`` config.json, whose ``vision_config`` / ``text_config`` it
    takes; CLIP's then gets the model's ``projection_dim``). ``hf_defaults``: omitted fields take
    transformers' class defaults (CLIP), else the dataclass defaults."""
    _, _, _, key, projection = _TOWERS[cls]
    if key in d:
        d = {**d[key], "projection_dim": d.get("projection_dim")} if projection else d[key]
    if hf_defaults:
        d = {**_HF_DEFAULTS.get(cls, {}), **d}
    return pick(cls, _first_eos(d) if key == "text_config" else d, **runtime)


def tower_to_hf(cfg: Any, standalone: bool = False) -> dict[str, Any]:
    """The config.json fields of a tower config; ``standalone``: with the ``architectures`` of
    its own model (``CLIPVisionModel``, ...), as a checkpoint of that tower alone needs."""
    model_type, arch, skip, _, _ = _TOWERS[type(cfg)]
    d = {**hf_fields(cfg, skip), "model_type": model_type}
    return {**d, "architectures": [arch]} if standalone else d


def llama_from_hf(d: dict[str, Any], cls: type[C] = LlamaConfig, **runtime: Any) -> C:
    """A ``LlamaConfig`` (or ``cls``, e.g. ``Qwen2Config``) from a decoder's config.json: rope
    scaling is refused, transformers 5's ``rope_parameters`` read, a missing
    ``num_key_value_heads`` is ``num_attention_heads``."""
    d = _first_eos(dict(d))
    scaling = d.get("rope_scaling")
    if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) not in (
        None,
        "default",
    ):
        raise NotImplementedError(f"rope_scaling={scaling} is not supported")
    rp = d.get("rope_parameters")  # transformers 5 moves rope_theta here
    if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in d:
        d["rope_theta"] = rp["rope_theta"]
    if d.get("num_key_value_heads") is None:
        d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
    return pick(cls, d, **runtime)


def qwen2_from_hf(d: dict[str, Any], **runtime: Any) -> Qwen2Config:
    """A ``Qwen2Config`` from a Qwen2 config.json; sliding-window attention is refused."""
    if d.get("use_sliding_window"):
        raise NotImplementedError(
            "use_sliding_window=true in the Qwen2 config.json: sliding-window attention is "
            "not supported (set it false if the model never attends past sliding_window)"
        )
    return llama_from_hf(d, Qwen2Config, **runtime)


def decoder_from_hf(d: dict[str, Any], qwen: bool, **runtime: Any) -> LlamaConfig:
    """The LLM of a PPLLaVA: ``Qwen2Config`` when ``qwen``, else ``LlamaConfig``."""
    return qwen2_from_hf(d, **runtime) if qwen else llama_from_hf(d, **runtime)


def llama_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """config.json of a ``LlamaForCausalLM`` or (a ``Qwen2Config``) ``Qwen2ForCausalLM``."""
    d = hf_fields(cfg, ("qkv_bias",))
    if not isinstance(cfg, Qwen2Config):
        return {**d, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for f in ("attention_bias", "mlp_bias"):
        d.pop(f)
    if cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads:
        d.pop("head_dim")
    return {
        **d,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": False,
    }


def clip_from_hf(d: dict[str, Any], **runtime: Any) -> CLIPConfig:
    """A ``CLIPConfig`` from a transformers ``CLIPModel`` config.json (omitted fields:
    transformers' defaults)."""
    proj = d.get("projection_dim") or 512
    d = {**d, "projection_dim": proj}
    return CLIPConfig(
        vision=tower_from_hf(CLIPVisionConfig, d, hf_defaults=True, **runtime),
        text=tower_from_hf(CLIPTextConfig, d, hf_defaults=True, **runtime),
        projection_dim=proj,
        logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
    )


def clip_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": cfg.logit_scale_init_value,
        "vision_config": tower_to_hf(cfg.vision),
        "text_config": tower_to_hf(cfg.text),
    }


def siglip_from_hf(d: dict[str, Any], **runtime: Any) -> SiglipConfig:
    """A ``SiglipConfig`` from a transformers ``SiglipModel`` config.json (omitted fields:
    transformers' defaults, which are the dataclasses')."""
    return SiglipConfig(
        vision=tower_from_hf(SiglipVisionConfig, d.get("vision_config") or {}, **runtime),
        text=tower_from_hf(SiglipTextConfig, d.get("text_config") or {}, **runtime),
    )


def siglip_to_hf(cfg: SiglipConfig) -> dict[str, Any]:
    return {
        "model_type": "siglip",
        "architectures": ["SiglipModel"],
        "vision_config": tower_to_hf(cfg.vision),
        "text_config": tower_to_hf(cfg.text),
    }
