"""Key tables for SigLIP: ``SiglipVisionModel``, ``SiglipTextModel`` and ``SiglipModel``.

Rule builders take a torch prefix and a jax prefix (as ``clip_keys``) so other families mount a
tower anywhere::

    siglip_vision_rules("vision_tower.vision_model.", "vision_tower/vision_model/")
    siglip_text_rules("multi_modal_projector.clip_text_model.", "...", extended=True)

The encoder layers are CLIP's (``clip_keys.encoder_rules``). Layouts: transformers 5 writes
``SiglipVisionModel`` / ``SiglipTextModel`` without the ``vision_model.`` / ``text_model.``
prefix of transformers 4; both are read, export writes the transformers 5 layout. The attention
pooling head keeps PyTorch's packed ``attention.in_proj_weight`` / ``in_proj_bias``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ppllava_jax.convert.clip_keys import (
    _IDS,
    _abstract,
    _layout_prefix,
    _linear,
    _ln,
    _pixels,
    encoder_rules,
    text_rules,
)
from ppllava_jax.convert.mapping import KeyMap, Rule
from ppllava_jax.convert.registry import Family
from ppllava_jax.models.config import SiglipTextConfig, SiglipVisionConfig
from ppllava_jax.models.siglip import (
    SiglipConfig,
    SiglipModel,
    SiglipTextTransformer,
    SiglipVisionTransformer,
)

IGNORE = (r"(^|\.)position_ids$",)


def head_rules(torch_prefix: str = "head.", jax_prefix: str = "head/") -> list[Rule]:
    """``SiglipMultiheadAttentionPoolingHead``: ``probe``, packed ``attention`` projections,
    ``out_proj``, ``layernorm``, ``mlp``."""
    t, j = torch_prefix, jax_prefix
    return [
        Rule(f"{t}probe", f"{j}probe"),
        Rule(f"{t}attention.in_proj_weight", f"{j}attention/in_proj_kernel", "linear"),
        Rule(f"{t}attention.in_proj_bias", f"{j}attention/in_proj_bias"),
        *_linear(f"{t}attention.out_proj", f"{j}attention/out_proj"),
        *_ln(f"{t}layernorm", f"{j}layernorm"),
        *_linear(f"{t}mlp.fc1", f"{j}mlp/fc1"),
        *_linear(f"{t}mlp.fc2", f"{j}mlp/fc2"),
    ]


def siglip_vision_rules(
    torch_prefix: str = "", jax_prefix: str = "", use_head: bool = True
) -> list[Rule]:
    """``SiglipVisionTransformer`` parameters (``embeddings``, ``encoder``, ``post_layernorm``,
    and ``head`` when ``use_head``) under the given prefixes."""
    t, j = torch_prefix, jax_prefix
    rules = [
        Rule(
            f"{t}embeddings.patch_embedding.weight",
            f"{j}embeddings/patch_embedding/kernel",
            "conv2d",
        ),
        Rule(f"{t}embeddings.patch_embedding.bias", f"{j}embeddings/patch_embedding/bias"),
        Rule(
            f"{t}embeddings.position_embedding.weight",
            f"{j}embeddings/position_embedding/embedding",
        ),
        *encoder_rules(t, j),
        *_ln(f"{t}post_layernorm", f"{j}post_layernorm"),
    ]
    if use_head:
        rules += head_rules(f"{t}head.", f"{j}head/")
    return rules


def siglip_text_rules(
    torch_prefix: str = "", jax_prefix: str = "", extended: bool = False
) -> list[Rule]:
    """``SiglipTextTransformer`` parameters; ``extended``: the raw position tables
    ``embeddings.position_embedding`` / ``embeddings.position_embedding_res`` (PPLLaVA's
    context extension)."""
    t, j = torch_prefix, jax_prefix
    # CLIP's text tower (token + position embeddings, encoder, final LayerNorm) plus the head
    return [*text_rules(t, j, extended), *_linear(f"{t}head", f"{j}head")]


def siglip_model_rules(
    torch_prefix: str = "", jax_prefix: str = "", use_head: bool = True
) -> list[Rule]:
    """``SiglipModel``: ``vision_model``, ``text_model``, ``logit_scale``, ``logit_bias``."""
    t, j = torch_prefix, jax_prefix
    return [
        *siglip_vision_rules(f"{t}vision_model.", f"{j}vision_model/", use_head),
        *siglip_text_rules(f"{t}text_model.", f"{j}text_model/"),
        Rule(f"{t}logit_scale", f"{j}logit_scale"),
        Rule(f"{t}logit_bias", f"{j}logit_bias"),
    ]


# ---- configs ---------------------------------------------------------------------------------


def vision_config_from_hf(d: dict, **runtime: Any) -> SiglipVisionConfig:
    return SiglipVisionConfig.from_hf(d, **runtime)


def text_config_from_hf(d: dict, **runtime: Any) -> SiglipTextConfig:
    return SiglipTextConfig.from_hf(d, **runtime)


def siglip_config_from_hf(d: dict, **runtime: Any) -> SiglipConfig:
    """From a transformers ``SiglipModel`` config.json (omitted fields: transformers' defaults)."""
    return SiglipConfig(
        vision=SiglipVisionConfig.from_hf(d.get("vision_config") or {}, **runtime),
        text=SiglipTextConfig.from_hf(d.get("text_config") or {}, **runtime),
    )


def vision_config_to_hf(cfg: SiglipVisionConfig) -> dict:
    return {**cfg.to_hf(), "architectures": ["SiglipVisionModel"]}


def text_config_to_hf(cfg: SiglipTextConfig) -> dict:
    return {**cfg.to_hf(), "architectures": ["SiglipTextModel"]}


# ---- abstract parameters ---------------------------------------------------------------------


def vision_abstract_params(cfg: SiglipVisionConfig) -> Any:
    return _abstract(SiglipVisionTransformer(cfg), _pixels(cfg))


def text_abstract_params(cfg: SiglipTextConfig) -> Any:
    return _abstract(SiglipTextTransformer(cfg), _IDS)


def siglip_abstract_params(cfg: SiglipConfig) -> Any:
    return _abstract(SiglipModel(cfg.vision, cfg.text), _pixels(cfg.vision), _IDS)


# ---- key maps --------------------------------------------------------------------------------


def vision_keymap(cfg: SiglipVisionConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(
        siglip_vision_rules(_layout_prefix(keys, "vision_model."), use_head=cfg.vision_use_head)
    )


def text_keymap(cfg: SiglipTextConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(siglip_text_rules(_layout_prefix(keys, "text_model."), extended=cfg.extended))


def siglip_keymap(cfg: SiglipConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(siglip_model_rules(use_head=cfg.vision.vision_use_head))


FAMILIES = [
    Family(
        name="siglip",
        detect=lambda d: (
            d.get("model_type") == "siglip" or "SiglipModel" in (d.get("architectures") or ())
        ),
        config_from_hf=siglip_config_from_hf,
        config_to_hf=lambda cfg: cfg.to_hf(),
        abstract_params=siglip_abstract_params,
        keymap=siglip_keymap,
        export_keymap=siglip_keymap,
        ignore=IGNORE,
    ),
    Family(
        name="siglip_vision",
        detect=lambda d: d.get("model_type") == "siglip_vision_model",
        config_from_hf=vision_config_from_hf,
        config_to_hf=vision_config_to_hf,
        abstract_params=vision_abstract_params,
        keymap=vision_keymap,
        export_keymap=vision_keymap,
        ignore=IGNORE,
    ),
    Family(
        name="siglip_text",
        detect=lambda d: d.get("model_type") == "siglip_text_model",
        config_from_hf=text_config_from_hf,
        config_to_hf=text_config_to_hf,
        abstract_params=text_abstract_params,
        keymap=text_keymap,
        export_keymap=text_keymap,
        ignore=IGNORE,
    ),
]
