"""Converted parameters on disk: an orbax checkpoint of the parameter tree plus ``config.json``.

Layout of a converted directory::

    DIR/config.json      {"family": "llama" | "clip" | "clip_vision" | "clip_text" | "ppllava",
                          "config": <the model config, transformers field names>}
    DIR/params/          orbax (OCDBT) checkpoint of the nested parameter dict
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(out_dir: str | os.PathLike, params: Any, family: str, config: dict) -> Path:
    """Write ``params`` (numpy or jax arrays, nested dict) and the config; overwrites."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"family": family, "config": config}, indent=1))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params, force=True)
    return out


def read_config(ckpt_dir: str | os.PathLike) -> tuple[str, dict]:
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a directory written by convert_torch_weights.py"
        )
    d = json.loads(path.read_text())
    return d["family"], d["config"]


def load_params(ckpt_dir: str | os.PathLike, abstract: Any = None) -> Any:
    """Restore the parameter tree. ``abstract`` (a pytree of ``jax.ShapeDtypeStruct`` with
    shardings) places each array on a mesh as it is read; without it arrays land on one device."""
    path = Path(ckpt_dir).absolute() / "params"
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            return ckptr.restore(path)
        return ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract))
