"""Convert Hugging Face / PyTorch checkpoints to JAX parameter directories and back.

    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint, export_checkpoint

    convert_checkpoint("hf/llava-v1.6-vicuna-7b-hf", "ckpt/vicuna", dtype="bfloat16")
    family, config, params = load_checkpoint("ckpt/vicuna")   # 'llama', LlamaConfig, dict
    export_checkpoint("ckpt/vicuna", "hf_out/")                # safetensors + config.json

Conversion reads one tensor at a time from the checkpoint (memory-mapped safetensors or an
mmap'ed ``.bin``) into the final parameter tree, so peak host memory stays near one copy of the
model; export streams tensors into shards the same way.

Both directions write into a temporary sibling of the output that replaces it only when complete
(``params_io.staged_output``): an interrupted run leaves the previous output whole, a re-export
leaves no stale shards, and an output that is (or holds) the source is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from ppllava_jax.convert import params_io, registry
from ppllava_jax.convert.mapping import convert_state_dict, export_state_dict
from ppllava_jax.convert.saved_tree import saved_metadata
from ppllava_jax.convert.torch_io import CheckpointError, TorchCheckpoint, write_safetensors
from ppllava_jax.models.config import Runtime

DTYPES = ("float32", "bfloat16", "float16")
_UNSCANNED = re.compile(r"^\w*layers_\d+$")
_SCANNED = re.compile(r"^\w*layers$")


def with_runtime(cfg: Any, **runtime: Any) -> Any:
    """Set runtime fields (``scan_layers``, ``dtype``, ...) on ``cfg`` and on every nested
    ``Runtime`` config (a CLIP or PPLLaVA config holds several towers)."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    kw = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            nv = with_runtime(v, **runtime)
            if nv is not v:
                kw[f.name] = nv
    if isinstance(cfg, Runtime):
        kw.update({k: v for k, v in runtime.items() if v is not None})
    return dataclasses.replace(cfg, **kw) if kw else cfg


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and str(dtype) not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "float32",
    family: str | None = None,
    scan_layers: bool = True,
) -> Path:
    """Convert a transformers checkpoint directory to a JAX parameter directory.

    Args:
      source: directory with ``config.json`` and ``*.safetensors`` (single, sharded with or
        without an index) or ``pytorch_model*.bin``.
      output: directory to write (``config.json`` + orbax ``params/``); replaced as a whole once
        complete (``params_io.staged_output``); must not be or hold ``source``.
      dtype: storage dtype of the parameters, ``'float32'`` | ``'bfloat16'`` | ``'float16'``.
      family: a name from ``registry.families()``; default: detected from ``config.json``.
      scan_layers: store repeated layers stacked (``layers``) or one per layer (``layers_i``).
    Returns:
      the absolute output path.
    Raises:
      FileNotFoundError (no such directory / no config.json), ValueError (unknown family or
      dtype), ``mapping.ConversionError`` (the weights do not fit the config; lists every
      missing, unused and mis-shaped tensor), ``torch_io.CheckpointError`` (a damaged file),
      ``params_io.OutputError`` (``output`` is the source or a directory of other files).
    """
    _check_dtype(dtype)
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {source} does not exist")
    params_io.check_output(output, [source])  # before the conversion's work
    cfg_path = source / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path} not found: --source must be a Hugging Face model directory "
            "(config.json next to the weights)"
        )
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(
            f"{cfg_path} is not valid JSON ({e}): fix or download it again"
        ) from None
    fam = registry.get_family(family) if family else registry.detect_family(hf)
    hf = fam.read_hf_config(source)
    cfg = with_runtime(fam.config_from_hf(hf), scan_layers=scan_layers)
    abstract = fam.abstract_params(cfg)
    ckpt = TorchCheckpoint(source)
    params = convert_state_dict(
        ckpt,
        fam.keymap(cfg, list(ckpt)),
        abstract,
        dtype=jnp.dtype(dtype),
        ignore=fam.ignore,
        source=str(source),
    )
    return params_io.save_converted(output, params, fam.name, fam.config_to_hf(cfg), [source])


def scan_layout(params: Any) -> bool | None:
    """True if the tree holds stacked ``layers``, False for ``layers_i``, None if neither
    (arrays or orbax metadata leaves)."""
    segs = {s for k in traverse_util.flatten_dict(params) for s in k}
    # stacks win: a scanned PPLLaVA still has unscanned BT-Adapter layers (btadapter_S_layers_0)
    if any(_SCANNED.match(s) for s in segs):
        return True
    if any(_UNSCANNED.match(s) for s in segs):
        return False
    return None


def unstack_layers(params: Any) -> Any:
    """The per-layer layout (``layers_i``) of a tree with stacked ``layers`` (a model with
    ``scan_layers=True``): each stacked subtree split along its leading axis, the rest as it is.
    A model with ``scan_layers=False`` takes the result (the same numbers:
    ``layers.stack_layers``). Works on NumPy and (sharded) JAX arrays alike."""
    if not isinstance(params, dict):
        return params
    out: dict[str, Any] = {}
    for key, node in params.items():
        if _SCANNED.match(key) and isinstance(node, dict):
            leaves = traverse_util.flatten_dict(node)
            n = {int(a.shape[0]) for a in leaves.values()}
            if len(n) != 1:
                raise ValueError(f"{key}: stacked leaves of different lengths {sorted(n)}")
            for i in range(n.pop()):
                row = {k: a[i] for k, a in leaves.items()}
                out[f"{key}_{i}"] = traverse_util.unflatten_dict(row)
        else:
            out[key] = unstack_layers(node)
    return out


def per_layer(cfg: Any, params: Any) -> tuple[Any, Any]:
    """``(cfg, params)`` of a model with its repeated layers one per layer: a scanned model's
    config with ``scan_layers=False`` and its parameters unstacked (``unstack_layers``); an
    unscanned model as it is."""
    if not cfg.scan_layers:
        return cfg, params
    return with_runtime(cfg, scan_layers=False), unstack_layers(params)


def checkpoint_layout(ckpt_dir: str | os.PathLike) -> bool | None:
    """Whether a converted directory stores scanned layers (True), per-layer ones (False), or
    no repeated layers (None), read from the orbax metadata (no array is loaded). Raises
    ``saved_tree.TreeMismatchError`` when ``params/`` is not a readable checkpoint."""
    return scan_layout(dict(saved_metadata(Path(ckpt_dir) / "params")))


def converted_config(ckpt_dir: str | os.PathLike, **runtime: Any) -> tuple[registry.Family, Any]:
    """``(family, model config)`` of a converted directory (``convert_checkpoint``, training's
    export): its ``config.json`` with ``runtime`` fields set (``dtype='bfloat16'``, ...) and
    ``scan_layers`` as stored (``checkpoint_layout``). Reads no array."""
    name, hf = params_io.read_config(ckpt_dir)
    fam = registry.get_family(name)
    runtime = {**runtime, "scan_layers": checkpoint_layout(ckpt_dir)}
    return fam, with_runtime(fam.config_from_hf(hf), **runtime)


def load_checkpoint(
    ckpt_dir: str | os.PathLike, *, abstract: Any = None, **runtime: Any
) -> tuple[str, Any, Any]:
    """Read a directory written by ``convert_checkpoint`` (or training).

    Args:
      ckpt_dir: the converted directory.
      abstract: optional pytree of ``jax.ShapeDtypeStruct`` with shardings to restore onto a mesh
        (``sharding.restore_params_onto_mesh`` builds it from the config).
      runtime: runtime config fields to set (``dtype='bfloat16'``, ``attention_impl=...``).
        ``scan_layers`` is taken from the stored layout.
    Returns:
      ``(family name, model config, params)``; params is the nested dict the model's ``apply``
      takes. ``registry.get_family(name)`` gives the family.
    """
    fam, cfg = converted_config(ckpt_dir, **runtime)
    return fam.name, cfg, params_io.load_params(ckpt_dir, abstract)


def export_checkpoint(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a converted directory back as a transformers checkpoint: safetensors with the
    original tensor names (``model-0000k-of-0000n.safetensors`` + index when larger than
    ``max_shard_bytes``) and a ``config.json`` that ``from_pretrained`` loads.

    dtype: dtype of the written tensors (default: as stored).
    out_dir: replaced as a whole once complete (``params_io.staged_output``), so no shard of an
      earlier export survives; must not be or hold ``ckpt_dir`` (``params_io.OutputError``).
    """
    _check_dtype(dtype)
    out = params_io.check_output(out_dir, [ckpt_dir])
    name, cfg, params = load_checkpoint(ckpt_dir)
    fam = registry.get_family(name)
    np_dtype = jnp.dtype(dtype) if dtype else None
    written: set[str] = set()

    def tensors():
        for key, arr in export_state_dict(params, fam.export_keymap(cfg), dtype=np_dtype):
            written.add(str(arr.dtype))
            yield key, arr

    with params_io.staged_output(out, [ckpt_dir]) as tmp:
        write_safetensors(tensors(), tmp, max_shard_bytes=max_shard_bytes)
        hf = fam.config_to_hf(cfg)
        if len(written) == 1:
            hf["dtype"] = written.pop()
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if fam.write_hf_extras is not None:
            fam.write_hf_extras(cfg, tmp)
    return out
