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

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from ppllava_jax.convert.mapping import KeyMap, Rule
from ppllava_jax.convert.registry import Family
from ppllava_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextTransformer,
    CLIPVisionTransformer,
)
from ppllava_jax.models.config import CLIPTextConfig, CLIPVisionConfig

IGNORE = (r"(^|\.)position_ids$",)

# transformers' class defaults: its config.json files (4.x ``to_diff_dict``) omit fields equal
# to these, and they differ from the ViT-L/14-336 defaults of our dataclasses.
HF_VISION_DEFAULTS: dict[str, Any] = {
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
HF_TEXT_DEFAULTS: dict[str, Any] = {
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


def _ln(torch: str, jax_: str) -> list[Rule]:
    return [Rule(f"{torch}.weight", f"{jax_}/scale"), Rule(f"{torch}.bias", f"{jax_}/bias")]


def _linear(torch: str, jax_: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch}.weight", f"{jax_}/kernel", "linear")]
    if bias:
        rules.append(Rule(f"{torch}.bias", f"{jax_}/bias"))
    return rules


def encoder_rules(torch_prefix: str = "", jax_prefix: str = "") -> list[Rule]:
    """``{tp}encoder.layers.{i}.*`` <-> ``{jp}encoder/layers_{i}/*``."""
    t, j = f"{torch_prefix}encoder.layers.{{i}}", f"{jax_prefix}encoder/layers_{{i}}"
    rules = _ln(f"{t}.layer_norm1", f"{j}/layer_norm1") + _ln(
        f"{t}.layer_norm2", f"{j}/layer_norm2"
    )
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear(f"{t}.self_attn.{p}", f"{j}/self_attn/{p}")
    for p in ("fc1", "fc2"):
        rules += _linear(f"{t}.mlp.{p}", f"{j}/mlp/{p}")
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
        *_ln(f"{t}pre_layrnorm", f"{j}pre_layrnorm"),
        *encoder_rules(t, j),
        *_ln(f"{t}post_layernorm", f"{j}post_layernorm"),
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
        *_ln(f"{t}final_layer_norm", f"{j}final_layer_norm"),
    ]


def clip_model_rules(
    torch_prefix: str = "", jax_prefix: str = "", extended: bool = False
) -> list[Rule]:
    """``CLIPModel``: ``vision_model``, ``text_model``, both projections and ``logit_scale``."""
    t, j = torch_prefix, jax_prefix
    return [
        *vision_rules(f"{t}vision_model.", f"{j}vision_model/"),
        *text_rules(f"{t}text_model.", f"{j}text_model/", extended),
        *_linear(f"{t}visual_projection", f"{j}visual_projection", bias=False),
        *_linear(f"{t}text_projection", f"{j}text_projection", bias=False),
        Rule(f"{t}logit_scale", f"{j}logit_scale"),
    ]


# ---- configs ---------------------------------------------------------------------------------


def vision_config_from_hf(d: dict, **runtime: Any) -> CLIPVisionConfig:
    if "vision_config" in d:
        d = {**d["vision_config"], "projection_dim": d.get("projection_dim")}
    return CLIPVisionConfig.from_hf({**HF_VISION_DEFAULTS, **d}, **runtime)


def text_config_from_hf(d: dict, **runtime: Any) -> CLIPTextConfig:
    if "text_config" in d:
        d = {**d["text_config"], "projection_dim": d.get("projection_dim")}
    return CLIPTextConfig.from_hf({**HF_TEXT_DEFAULTS, **d}, **runtime)


def clip_config_from_hf(d: dict, **runtime: Any) -> CLIPConfig:
    proj = d.get("projection_dim") or 512
    return CLIPConfig(
        vision=vision_config_from_hf({**d, "projection_dim": proj}, **runtime),
        text=text_config_from_hf({**d, "projection_dim": proj}, **runtime),
        projection_dim=proj,
        logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
    )


def vision_config_to_hf(cfg: CLIPVisionConfig) -> dict:
    return {**cfg.to_hf(), "architectures": ["CLIPVisionModel"]}


def text_config_to_hf(cfg: CLIPTextConfig) -> dict:
    return {**cfg.to_hf(), "architectures": ["CLIPTextModel"]}


def clip_config_to_hf(cfg: CLIPConfig) -> dict:
    return cfg.to_hf()


# ---- abstract parameters ---------------------------------------------------------------------


def _abstract(model: Any, *shapes: jax.ShapeDtypeStruct) -> Any:
    def init(*args: Any) -> Any:
        return model.init(jax.random.PRNGKey(0), *args)["params"]

    return jax.eval_shape(init, *shapes)


def _pixels(cfg: CLIPVisionConfig) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)


_IDS = jax.ShapeDtypeStruct((1, 1), jnp.int32)


def vision_abstract_params(cfg: CLIPVisionConfig) -> Any:
    return _abstract(CLIPVisionTransformer(cfg), _pixels(cfg))


def text_abstract_params(cfg: CLIPTextConfig) -> Any:
    return _abstract(CLIPTextTransformer(cfg), _IDS)


def clip_abstract_params(cfg: CLIPConfig) -> Any:
    return _abstract(clip_model(cfg), _pixels(cfg.vision), _IDS)


def clip_model(cfg: CLIPConfig) -> Any:
    """The ``CLIPModel`` module of a ``CLIPConfig``."""
    return CLIPModel(cfg.vision, cfg.text, cfg.projection_dim, cfg.logit_scale_init_value)


# ---- key maps --------------------------------------------------------------------------------


def _layout_prefix(keys: Iterable[str], prefix: str) -> str:
    """``prefix`` when the checkpoint uses the transformers 4 layout (keys under it), else ''."""
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def vision_keymap(cfg: CLIPVisionConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(vision_rules(_layout_prefix(keys, "vision_model.")))


def text_keymap(cfg: CLIPTextConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(text_rules(_layout_prefix(keys, "text_model."), extended=cfg.extended))


def clip_keymap(cfg: CLIPConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(clip_model_rules(extended=cfg.text.extended))


FAMILIES = [
    Family(
        name="clip",
        detect=lambda d: (
            d.get("model_type") == "clip" or "CLIPModel" in (d.get("architectures") or ())
        ),
        config_from_hf=clip_config_from_hf,
        config_to_hf=clip_config_to_hf,
        abstract_params=clip_abstract_params,
        keymap=clip_keymap,
        export_keymap=clip_keymap,
        ignore=IGNORE,
    ),
    Family(
        name="clip_vision",
        detect=lambda d: d.get("model_type") == "clip_vision_model",
        config_from_hf=vision_config_from_hf,
        config_to_hf=vision_config_to_hf,
        abstract_params=vision_abstract_params,
        keymap=vision_keymap,
        export_keymap=vision_keymap,
        ignore=IGNORE,
    ),
    Family(
        name="clip_text",
        detect=lambda d: d.get("model_type") == "clip_text_model",
        config_from_hf=text_config_from_hf,
        config_to_hf=text_config_to_hf,
        abstract_params=text_abstract_params,
        keymap=text_keymap,
        export_keymap=text_keymap,
        ignore=IGNORE,
    ),
]
