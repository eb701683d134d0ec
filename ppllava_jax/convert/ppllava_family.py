"""Converter families for whole models: released PPLLaVA checkpoints, LLaVA-NeXT, LLaVA-OneVision.

- ``ppllava``: a released PPLLaVA directory (``config.json`` with the PPLLaVA fields, weights with
  ``vision_tower.vision_model.*`` incl. ``btadapter_*``, ``multi_modal_projector.*`` incl.
  ``clip_text_model``, ``language_model.*``, ``image_newline``; the CLIP config in the directory
  its ``clip_weight`` names, e.g. ``clip/config.json``). The Qwen2 + SigLIP variant is written
  in the LLaVA-OneVision layout (``model_type: llava_onevision``, ``qwen: true``; its
  ``clip/config.json`` a ``SiglipModel`` config, ``post_layernorm`` of the vision tower stored
  but not on the LLM path, the projector's ``clip_visual_head`` and ``logit_bias``).
- ``llava_next``: a LLaVA-NeXT checkpoint (``LlavaNextForConditionalGeneration``) as the PPLLaVA
  model without BT-Adapter and without pooling (``pooling='none'``) — the special case
  transformers implements.
- ``llava_onevision``: a LLaVA-OneVision checkpoint (``LlavaOnevisionForConditionalGeneration``)
  as PPLLaVA-Qwen without prompt-guided pooling. PPLLaVA's merge is used: LLaVA-OneVision's own
  ``anyres_max_9`` downscaling and 2x2 video pooling are not.

All accept the key layouts transformers 4 and 5 write (``ppllava_keys.detect_layout``) and export
the original (transformers 4.45) layout. The config.json translations are ``ppllava_config``;
the training start points ``start_point``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ppllava_jax.convert.clip_keys import IGNORE as CLIP_IGNORE
from ppllava_jax.convert.llama_keys import IGNORE as LLAMA_IGNORE
from ppllava_jax.convert.mapping import KeyMap
from ppllava_jax.convert.ppllava_config import (
    llava_config_from_hf,
    llava_config_to_hf,
    ppllava_clip_config_to_hf,
    ppllava_config_from_hf,
    ppllava_config_to_hf,
)
from ppllava_jax.convert.ppllava_keys import detect_layout, ppllava_rules
from ppllava_jax.convert.registry import family, read_json_config
from ppllava_jax.models.config import PPLLaVAConfig

IGNORE = (*CLIP_IGNORE, *LLAMA_IGNORE)  # SigLIP's are CLIP's


def ppllava_keymap(cfg: PPLLaVAConfig, keys: Iterable[str] = ()) -> KeyMap:
    """Key map of a PPLLaVA (or LLaVA-NeXT / -OneVision) checkpoint with ``keys``; no keys: the
    original layout (export)."""
    return KeyMap(ppllava_rules(cfg, detect_layout(keys)))


def ppllava_abstract_params(cfg: PPLLaVAConfig) -> Any:
    """``jax.ShapeDtypeStruct`` tree (boxed) of ``PPLLaVA(cfg)``'s parameters."""
    from ppllava_jax.models.ppllava import abstract_params

    return abstract_params(cfg)


def read_ppllava_config(source: Path) -> dict:
    """config.json plus, under ``clip_config``, the CLIP config ``clip_weight`` points to (a
    directory relative to the checkpoint, ``clip/`` by default) when present."""
    d = read_json_config(source)
    if "clip_config" not in d:
        for name in (d.get("clip_weight"), "clip"):
            if not name:
                continue
            p = Path(source) / str(name) / "config.json"
            if p.exists():
                d["clip_config"] = json.loads(p.read_text())
                break
    return d


def write_clip_config(cfg: PPLLaVAConfig, out: Path) -> None:
    """``out/clip/config.json`` of an exported PPLLaVA."""
    (out / "clip").mkdir(parents=True, exist_ok=True)
    (out / "clip" / "config.json").write_text(json.dumps(ppllava_clip_config_to_hf(cfg), indent=2))


def is_ppllava(d: dict) -> bool:
    # the Qwen variant is written in the LLaVA-OneVision layout (``qwen: true``)
    return d.get("model_type") in ("llava_next", "llava_onevision") and (
        "pooling" in d or "btadapter" in d
    )


def _is_llava(d: dict, model_type: str, arch: str, markers: tuple[str, ...]) -> bool:
    archs = d.get("architectures") or []
    return not any(m in d for m in markers) and (d.get("model_type") == model_type or arch in archs)


FAMILIES = [
    family(
        "ppllava",
        is_ppllava,
        ppllava_config_from_hf,
        ppllava_config_to_hf,
        ppllava_abstract_params,
        ppllava_keymap,
        IGNORE,
        read_hf_config=read_ppllava_config,
        write_hf_extras=write_clip_config,
    ),
    family(
        "llava_next",
        functools.partial(
            _is_llava,
            model_type="llava_next",
            arch="LlavaNextForConditionalGeneration",
            markers=("pooling", "btadapter"),
        ),
        llava_config_from_hf,
        llava_config_to_hf,
        ppllava_abstract_params,
        ppllava_keymap,
        IGNORE,
    ),
    family(
        "llava_onevision",
        functools.partial(
            _is_llava,
            model_type="llava_onevision",
            arch="LlavaOnevisionForConditionalGeneration",
            markers=("pooling", "btadapter", "qwen"),
        ),
        functools.partial(llava_config_from_hf, qwen=True),
        llava_config_to_hf,
        ppllava_abstract_params,
        ppllava_keymap,
        IGNORE,
    ),
]
