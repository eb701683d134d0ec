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

import functools
from collections.abc import Iterable
from typing import Any

from ppllava_jax.convert.clip_keys import (  # SigLIP's buffers (IGNORE) are CLIP's
    IDS_SPEC,
    IGNORE,
    abstract_of,
    encoder_rules,
    model_families,
    pixels_spec,
    text_rules,
)
from ppllava_jax.convert.hf_config import siglip_from_hf, siglip_to_hf, tower_from_hf
from ppllava_jax.convert.mapping import KeyMap, Rule, layout_prefix, linear_rules, ln_rules
from ppllava_jax.models.config import SiglipTextConfig, SiglipVisionConfig
from ppllava_jax.models.siglip import (
    SiglipConfig,
    SiglipModel,
    SiglipTextTransformer,
    SiglipVisionTransformer,
)


def head_rules(torch_prefix: str = "head.", jax_prefix: str = "head/") -> list[Rule]:
    """``SiglipMultiheadAttentionPoolingHead``: ``probe``, packed ``attention`` projections,
    ``out_proj``, ``layernorm``, ``mlp``."""
    t, j = torch_prefix, jax_prefix
    return [
        Rule(f"{t}probe", f"{j}probe"),
        Rule(f"{t}attention.in_proj_weight", f"{j}attention/in_proj_kernel", "linear"),
        Rule(f"{t}attention.in_proj_bias", f"{j}attention/in_proj_bias"),
        *linear_rules(f"{t}attention.out_proj", f"{j}attention/out_proj"),
        *ln_rules(f"{t}layernorm", f"{j}layernorm"),
        *linear_rules(f"{t}mlp.fc1", f"{j}mlp/fc1"),
        *linear_rules(f"{t}mlp.fc2", f"{j}mlp/fc2"),
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
        *ln_rules(f"{t}post_layernorm", f"{j}post_layernorm"),
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
    return [*text_rules(t, j, extended), *linear_rules(f"{t}head", f"{j}head")]


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


# ---- configs (omitted fields: transformers' class defaults = the dataclasses') ------------

vision_config_from_hf = functools.partial(tower_from_hf, SiglipVisionConfig)
text_config_from_hf = functools.partial(tower_from_hf, SiglipTextConfig)


# ---- abstract parameters ---------------------------------------------------------------------


def vision_abstract_params(cfg: SiglipVisionConfig) -> Any:
    return abstract_of(SiglipVisionTransformer(cfg), pixels_spec(cfg))


def text_abstract_params(cfg: SiglipTextConfig) -> Any:
    return abstract_of(SiglipTextTransformer(cfg), IDS_SPEC)


def siglip_abstract_params(cfg: SiglipConfig) -> Any:
    return abstract_of(SiglipModel(cfg.vision, cfg.text), pixels_spec(cfg.vision), IDS_SPEC)


# ---- key maps --------------------------------------------------------------------------------


def vision_keymap(cfg: SiglipVisionConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(
        siglip_vision_rules(layout_prefix(keys, "vision_model."), use_head=cfg.vision_use_head)
    )


def text_keymap(cfg: SiglipTextConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(siglip_text_rules(layout_prefix(keys, "text_model."), extended=cfg.extended))


def siglip_keymap(cfg: SiglipConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(siglip_model_rules(use_head=cfg.vision.vision_use_head))


FAMILIES = model_families(
    "siglip",
    "SiglipModel",
    IGNORE,
    model=(siglip_from_hf, siglip_to_hf, siglip_abstract_params, siglip_keymap),
    vision=(vision_config_from_hf, vision_abstract_params, vision_keymap),
    text=(text_config_from_hf, text_abstract_params, text_keymap),
)
