"""Model families the converter knows, each described once by a ``Family``.

Family modules (``ppllava_family``, ``llama_keys``, ``qwen2_keys``, ``clip_keys``,
``siglip_keys``) each expose ``FAMILIES``; the converter detects which one a Hugging Face
``config.json`` belongs to with ``Family.detect``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ppllava_jax.convert.mapping import KeyMap

FAMILY_MODULES = (
    "ppllava_jax.convert.ppllava_family",
    "ppllava_jax.convert.llama_keys",
    "ppllava_jax.convert.qwen2_keys",
    "ppllava_jax.convert.clip_keys",
    "ppllava_jax.convert.siglip_keys",
)


def read_json_config(source: Path) -> dict:
    """The ``config.json`` of a Hugging Face model directory."""
    return json.loads((Path(source) / "config.json").read_text())


@dataclasses.dataclass(frozen=True)
class Family:
    """How to convert one model family.

    name: short name written to the converted directory ('llama', 'clip', ...).
    detect: ``hf_config_dict -> bool``; True when a transformers config.json is this family.
    config_from_hf: ``hf_config_dict -> model config`` (a dataclass from models/config.py;
      the translations are ``hf_config`` / ``ppllava_config``).
    config_to_hf: ``model config -> hf_config_dict`` that transformers loads back.
    abstract_params: ``model config -> pytree of jax.ShapeDtypeStruct`` (eval_shape of init).
    keymap: ``(model config, checkpoint keys) -> KeyMap``; the keys let it pick between the
      transformers 4 and 5 layouts.
    export_keymap: ``model config -> KeyMap`` used to write PyTorch names back.
    ignore: regexes of checkpoint keys that are buffers, not parameters.
    read_hf_config: ``source dir -> hf_config_dict`` (default: its config.json; PPLLaVA also
      reads the CLIP config its ``clip_weight`` names).
    write_hf_extras: ``(model config, out dir) -> None``, files besides config.json on export.
    """

    name: str
    detect: Callable[[dict], bool]
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any], dict]
    abstract_params: Callable[[Any], Any]
    keymap: Callable[[Any, Iterable[str]], KeyMap]
    export_keymap: Callable[[Any], KeyMap]
    ignore: tuple[str, ...] = ()
    read_hf_config: Callable[[Path], dict] = read_json_config
    write_hf_extras: Callable[[Any, Path], None] | None = None


def detect_type(model_type: str, arch_prefix: str | None = None) -> Callable[[dict], bool]:
    """``Family.detect`` of a config.json with ``model_type`` or an architecture starting with
    ``arch_prefix``."""

    def detect(d: dict) -> bool:
        archs = d.get("architectures") or ()
        by_arch = arch_prefix is not None and any(a.startswith(arch_prefix) for a in archs)
        return d.get("model_type") == model_type or by_arch

    return detect


def family(
    name: str,
    detect: Callable[[dict], bool],
    config_from_hf: Callable[..., Any],
    config_to_hf: Callable[[Any], dict],
    abstract_params: Callable[[Any], Any],
    keymap: Callable[..., KeyMap],
    ignore: tuple[str, ...] = (),
    **extra: Any,
) -> Family:
    """A ``Family`` whose export key map is its import key map given no checkpoint keys (the
    layout export writes). extra: ``read_hf_config``, ``write_hf_extras``."""
    return Family(
        name=name,
        detect=detect,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        abstract_params=abstract_params,
        keymap=keymap,
        export_keymap=lambda cfg: keymap(cfg, ()),
        ignore=ignore,
        **extra,
    )


def families() -> list[Family]:
    out: list[Family] = []
    for mod in FAMILY_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that family is not written yet
                continue
            raise
        out.extend(getattr(m, "FAMILIES", ()))
    return out


def get_family(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise ValueError(f"unknown model family {name!r}; known: {[f.name for f in families()]}")


def detect_family(hf_config: dict) -> Family:
    hits = [f for f in families() if f.detect(hf_config)]
    if not hits:
        raise ValueError(
            f"config.json with model_type={hf_config.get('model_type')!r} and architectures="
            f"{hf_config.get('architectures')} is not a family this converter knows "
            f"({[f.name for f in families()]})"
        )
    return hits[0]
