"""Key tables for CLIP: ``CLIPVisionModel``, ``CLIPTextModel`` and ``CLIPModel``.

Rule builders take a torch prefix (``"vision_tower.vision_model."``) and a jax prefix
(``"vision_tower/"``) so other families can mount a tower anywhere::

    vision_rules("vision_tower.vision_model.", "vision_tower/")
    text_rules("multi_modal_projector.clip_text_model.", "projector/clip_text/", extended=True)

Layouts: transformers 5 writes ``CLIPVisionModel`` / ``CLIPTextModel`` without the
``vision_model.`` / ``text_model.`` prefix that transformers 4 wrote; both are read (the
keymap looks at the checkpoint's keys), and export writes the transformers 5 layout.
The Long-CLIP text tower (``extended``) has raw parameters ``embeddings.position_embedding``
and ``embeddings.position_embedding_res`` (no ``.weight``), as in released PPLLaVA checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from ppllava_jax.convert.hf_config import clip_from_hf, clip_to_hf, tower_from_hf, tower_to_hf
from ppllava_jax.convert.mapping import KeyMap, Rule, layout_prefix, linear_rules, ln_rules
from ppllava_jax.convert.registry import Family, detect_type, family
from ppllava_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextTransformer,
    CLIPVisionTransformer,
)
from ppllava_jax.models.config import CLIPTextConfig, CLIPVisionConfig

IGNORE = (r"(^|\.)position_ids$",)


def encoder_rules(torch_prefix: str = "", jax_prefix: str = "") -> list[Rule]:
    """``{tp}encoder.layers.{i}.*`` <-> ``{jp}encoder/layers_{i}/*``."""
    t, j = f"{torch_prefix}encoder.layers.{{i}}", f"{jax_prefix}encoder/layers_{{i}}"
    rules = ln_rules(f"{t}.layer_norm1", f"{j}/layer_norm1") + ln_rules(
        f"{t}.layer_norm2", f"{j}/layer_norm2"
    )
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear_rules(f"{t}.self_attn.{p}", f"{j}/self_attn/{p}")
    for p in ("fc1", "fc2"):
        rules += linear_rules(f"{t}.mlp.{p}", f"{j}/mlp/{p}")
    return rules


def vision_rules(torch_prefix: str = "", jax_prefix: str = "") -> list[Rule]:
    """``CLIPVisionTransformer`` parameters (``embeddings``, ``pre_layrnorm``, ``encoder``,
    ``post_layernorm``) under the given prefixes."""
    t, j = torch_prefix, jax_prefix
    return [
        Rule(f"{t}embeddings.class_embedding", f"{j}embeddings/class_embedding"),
        Rule(
            f"{t}embeddings.patch_embedding.weight",
            f"{j}embeddings/patch_embedding/kernel",
            "conv2d",
        ),
        Rule(
            f"{t}embeddings.position_embedding.weight",
            f"{j}embeddings/position_embedding/embedding",
        ),
        *ln_rules(f"{t}pre_layrnorm", f"{j}pre_layrnorm"),
        *encoder_rules(t, j),
        *ln_rules(f"{t}post_layernorm", f"{j}post_layernorm"),
    ]


def text_rules(torch_prefix: str = "", jax_prefix: str = "", extended: bool = False) -> list[Rule]:
    """``CLIPTextTransformer`` parameters. ``extended``: the Long-CLIP raw position tables
    ``embeddings.position_embedding`` / ``embeddings.position_embedding_res``."""
    t, j = torch_prefix, jax_prefix
    if extended:
        pos = [
            Rule(f"{t}embeddings.position_embedding", f"{j}embeddings/position_embedding"),
            Rule(f"{t}embeddings.position_embedding_res", f"{j}embeddings/position_embedding_res"),
        ]
    else:
        pos = [
            Rule(
                f"{t}embeddings.position_embedding.weight",
                f"{j}embeddings/position_embedding/embedding",
            )
        ]
    return [
        Rule(f"{t}embeddings.token_embedding.weight", f"{j}embeddings/token_embedding/embedding"),
        *pos,
        *encoder_rules(t, j),
        *ln_rules(f"{t}final_layer_norm", f"{j}final_layer_norm"),
    ]


def clip_model_rules(
    torch_prefix: str = "", jax_prefix: str = "", extended: bool = False
) -> list[Rule]:
    """``CLIPModel``: ``vision_model``, ``text_model``, both projections and ``logit_scale``."""
    t, j = torch_prefix, jax_prefix
    return [
        *vision_rules(f"{t}vision_model.", f"{j}vision_model/"),
        *text_rules(f"{t}text_model.", f"{j}text_model/", extended),
        *linear_rules(f"{t}visual_projection", f"{j}visual_projection", bias=False),
        *linear_rules(f"{t}text_projection", f"{j}text_projection", bias=False),
        Rule(f"{t}logit_scale", f"{j}logit_scale"),
    ]


# ---- configs (omitted fields: transformers' class defaults) ----------------------------------

vision_config_from_hf = functools.partial(tower_from_hf, CLIPVisionConfig, hf_defaults=True)
text_config_from_hf = functools.partial(tower_from_hf, CLIPTextConfig, hf_defaults=True)


# ---- abstract parameters ---------------------------------------------------------------------


def abstract_of(model: Any, *inputs: jax.ShapeDtypeStruct) -> Any:
    """``jax.ShapeDtypeStruct`` tree of ``model``'s parameters (``eval_shape`` of its init on
    ``inputs``)."""

    def init(*args: Any) -> Any:
        return model.init(jax.random.PRNGKey(0), *args)["params"]

    return jax.eval_shape(init, *inputs)


def pixels_spec(cfg: Any) -> jax.ShapeDtypeStruct:
    """One image ``float32[1, S, S, C]`` for a vision tower config (``image_size``,
    ``num_channels``)."""
    return jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)


IDS_SPEC = jax.ShapeDtypeStruct((1, 1), jnp.int32)  # one token id, int32[1, 1]


def vision_abstract_params(cfg: CLIPVisionConfig) -> Any:
    return abstract_of(CLIPVisionTransformer(cfg), pixels_spec(cfg))


def text_abstract_params(cfg: CLIPTextConfig) -> Any:
    return abstract_of(CLIPTextTransformer(cfg), IDS_SPEC)


def clip_abstract_params(cfg: CLIPConfig) -> Any:
    return abstract_of(clip_model(cfg), pixels_spec(cfg.vision), IDS_SPEC)


def clip_model(cfg: CLIPConfig) -> Any:
    """The ``CLIPModel`` module of a ``CLIPConfig``."""
    return CLIPModel(cfg.vision, cfg.text, cfg.projection_dim, cfg.logit_scale_init_value)


# ---- key maps --------------------------------------------------------------------------------


def vision_keymap(cfg: CLIPVisionConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(vision_rules(layout_prefix(keys, "vision_model.")))


def text_keymap(cfg: CLIPTextConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(text_rules(layout_prefix(keys, "text_model."), extended=cfg.extended))


def clip_keymap(cfg: CLIPConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(clip_model_rules(extended=cfg.text.extended))


def model_families(
    name: str,
    arch: str,
    ignore: tuple[str, ...],
    model: tuple[Callable, Callable, Callable, Callable],
    vision: tuple[Callable, Callable, Callable],
    text: tuple[Callable, Callable, Callable],
) -> list[Family]:
    """The families of a two-tower model: ``name`` (the whole model: model type ``name`` or
    architecture ``arch``; ``model`` = config_from_hf, config_to_hf, abstract_params, keymap)
    and its towers ``{name}_vision`` / ``{name}_text`` (model types ``{name}_vision_model`` /
    ``{name}_text_model``; each config_from_hf, abstract_params, keymap; config.json written
    with the tower's own architecture)."""
    to_hf = functools.partial(tower_to_hf, standalone=True)
    out = [family(name, detect_type(name, arch), *model, ignore)]
    for part, (from_hf, abstract, keymap) in (("vision", vision), ("text", text)):
        detect = detect_type(f"{name}_{part}_model")
        out.append(family(f"{name}_{part}", detect, from_hf, to_hf, abstract, keymap, ignore))
    return out


FAMILIES = model_families(
    "clip",
    "CLIPModel",
    IGNORE,
    model=(clip_from_hf, clip_to_hf, clip_abstract_params, clip_keymap),
    vision=(vision_config_from_hf, vision_abstract_params, vision_keymap),
    text=(text_config_from_hf, text_abstract_params, text_keymap),
)
