"""Test helpers: convert the vision tower and the projector of a PPLLaVA state dict on their own
(the parity tests of ``models/btadapter.py`` and ``models/projector.py`` run those modules apart
from the whole model). Moved here from ``ppllava_jax/convert/ppllava_keys.py``: only tests use
them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ppllava_jax.convert.mapping import KeyMap, convert_state_dict
from ppllava_jax.convert.ppllava_keys import ppllava_vision_rules, projector_rules
from ppllava_jax.models.config import PPLLaVAConfig

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
