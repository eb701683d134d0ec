"""Key tables of PPLLaVA's own parts: the BT-Adapter vision tower and the projector.

``ppllava_vision_rules`` covers ``vision_tower.vision_model.*`` (CLIP trunk + BT-Adapter) and
``projector_rules`` covers ``multi_modal_projector.*`` (CLIP text tower, CLIP projections, the
LLaVA MLP, ``logit_scale``), each under movable prefixes. The CLIP parts reuse ``clip_keys``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ppllava_jax.convert.clip_keys import encoder_rules, text_rules, vision_rules
from ppllava_jax.convert.mapping import KeyMap, Rule, convert_state_dict
from ppllava_jax.models.config import PPLLaVAConfig


def _ln(torch: str, jax_: str) -> list[Rule]:
    return [Rule(f"{torch}.weight", f"{jax_}/scale"), Rule(f"{torch}.bias", f"{jax_}/bias")]


def _linear(torch: str, jax_: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch}.weight", f"{jax_}/kernel", "linear")]
    return rules + [Rule(f"{torch}.bias", f"{jax_}/bias")] if bias else rules


def btadapter_rules(torch_prefix: str = "", jax_prefix: str = "") -> list[Rule]:
    """``btadapter_S_layers.{i}`` (a CLIP encoder layer), ``btadapter_T_layers.{i}``
    (``layer_norm1``, ``self_attn``, ``temporal_fc``), ``btadapter_cls_token``,
    ``btadapter_time_embed``."""
    t, j = torch_prefix, jax_prefix
    spatial = [
        Rule(
            r.torch.replace(f"{t}encoder.layers.", f"{t}btadapter_S_layers."),
            r.jax.replace(f"{j}encoder/layers_", f"{j}btadapter_S_layers_"),
            r.transform,
        )
        for r in encoder_rules(t, j)
    ]
    tt, tj = f"{t}btadapter_T_layers.{{i}}", f"{j}btadapter_T_layers_{{i}}"
    temporal = _ln(f"{tt}.layer_norm1", f"{tj}/layer_norm1")
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        temporal += _linear(f"{tt}.self_attn.{p}", f"{tj}/self_attn/{p}")
    temporal += _linear(f"{tt}.temporal_fc", f"{tj}/temporal_fc")
    return [
        *spatial,
        *temporal,
        Rule(f"{t}btadapter_cls_token", f"{j}btadapter_cls_token"),
        Rule(f"{t}btadapter_time_embed.weight", f"{j}btadapter_time_embed/embedding"),
    ]


def ppllava_vision_rules(
    torch_prefix: str = "vision_tower.vision_model.",
    jax_prefix: str = "vision_tower/vision_model/",
    btadapter: bool = True,
) -> list[Rule]:
    """``PPLLaVAVisionModel``: the CLIP vision transformer plus (``btadapter``) the adapter."""
    rules = vision_rules(torch_prefix, jax_prefix)
    if btadapter:
        rules += btadapter_rules(torch_prefix, jax_prefix)
    return rules


def projector_rules(
    torch_prefix: str = "multi_modal_projector.",
    jax_prefix: str = "multi_modal_projector/",
    pooling: str = "ppllava",
    extended: bool = True,
) -> list[Rule]:
    """``PPLLaVAProjector``: ``linear_1``/``linear_2`` and, for ``pooling='ppllava'``, the CLIP
    text tower (``extended``: Long-CLIP position tables), projections, ``clip_visual_ln`` and
    ``logit_scale``."""
    t, j = torch_prefix, jax_prefix
    rules = _linear(f"{t}linear_1", f"{j}linear_1") + _linear(f"{t}linear_2", f"{j}linear_2")
    if pooling == "ppllava":
        rules += [
            *text_rules(f"{t}clip_text_model.", f"{j}clip_text_model/", extended),
            *_linear(f"{t}clip_text_projection", f"{j}clip_text_projection", bias=False),
            *_linear(f"{t}clip_visual_projection", f"{j}clip_visual_projection", bias=False),
            *_ln(f"{t}clip_visual_ln", f"{j}clip_visual_ln"),
            Rule(f"{t}logit_scale", f"{j}logit_scale"),
        ]
    return rules


IGNORE = (r"(^|\.)position_ids$",)


def vision_keymap(
    cfg: PPLLaVAConfig, torch_prefix: str = "vision_tower.vision_model.", jax_prefix: str = ""
) -> KeyMap:
    """Key map of a ``PPLLaVAVisionModel`` whose tree starts at ``jax_prefix``."""
    return KeyMap(ppllava_vision_rules(torch_prefix, jax_prefix, cfg.btadapter))


def projector_keymap(
    cfg: PPLLaVAConfig, torch_prefix: str = "multi_modal_projector.", jax_prefix: str = ""
) -> KeyMap:
    """Key map of a ``PPLLaVAProjector`` whose tree starts at ``jax_prefix``."""
    return KeyMap(projector_rules(torch_prefix, jax_prefix, cfg.pooling, cfg.clip_text.extended))


def vision_abstract_params(cfg: PPLLaVAConfig) -> Any:
    """``jax.ShapeDtypeStruct`` tree of ``PPLLaVAVisionModel(cfg)``'s parameters."""
    from ppllava_jax.models.btadapter import PPLLaVAVisionModel

    s = cfg.vision.image_size
    x = jax.ShapeDtypeStruct((1, 1, s, s, cfg.vision.num_channels), jnp.float32)
    return jax.eval_shape(
        lambda a: PPLLaVAVisionModel(cfg).init(jax.random.PRNGKey(0), a)["params"], x
    )


def projector_abstract_params(cfg: PPLLaVAConfig) -> Any:
    """``jax.ShapeDtypeStruct`` tree of ``PPLLaVAProjector(cfg)``'s parameters."""
    from ppllava_jax.models.projector import PPLLaVAProjector

    p = cfg.frame_shape[0] * cfg.frame_shape[1]
    f = jax.ShapeDtypeStruct((1, 1, p, cfg.vision.hidden_size), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)

    def init(f: Any, ids: Any) -> Any:
        one = (1, 1, 1)
        m = PPLLaVAProjector(cfg)
        return m.init(jax.random.PRNGKey(0), f, None, ids, ids, kernel=one, stride=one)["params"]

    return jax.eval_shape(init, f, ids)


class _Prefixed(Mapping):
    """The keys of a checkpoint under one prefix (read lazily)."""

    def __init__(self, checkpoint: Mapping[str, Any], prefix: str):
        self._ck, self._keys = checkpoint, [k for k in checkpoint if k.startswith(prefix)]

    def __getitem__(self, key: str) -> Any:
        return self._ck[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def convert_vision_and_projector(
    checkpoint: Mapping[str, Any], cfg: PPLLaVAConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameters of ``PPLLaVAVisionModel`` and ``PPLLaVAProjector`` from a PPLLaVA state dict
    (``vision_tower.vision_model.*``, ``multi_modal_projector.*``; other keys are left alone)."""
    vision = convert_state_dict(
        _Prefixed(checkpoint, "vision_tower."),
        vision_keymap(cfg),
        vision_abstract_params(cfg),
        ignore=IGNORE,
        source="vision_tower",
    )
    projector = convert_state_dict(
        _Prefixed(checkpoint, "multi_modal_projector."),
        projector_keymap(cfg),
        projector_abstract_params(cfg),
        ignore=IGNORE,
        source="multi_modal_projector",
    )
    return vision, projector
