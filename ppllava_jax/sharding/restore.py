"""Checkpoint restore onto a mesh, in one place: a converted directory
(``convert_torch_weights.py``, training's export) read straight into its shards, each host
reading only the pieces its devices hold. What the directory holds and how it is read are
``convert/`` (``api.converted_config``, ``params_io.load_params``); here they meet the mesh."""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.sharding import Mesh

from ppllava_jax.convert import params_io
from ppllava_jax.convert.api import converted_config
from ppllava_jax.sharding.mesh import LOGICAL_RULES
from ppllava_jax.sharding.params import param_shardings, unboxed_values


def restore_onto_mesh(
    ckpt_dir: str | os.PathLike,
    abstract_boxed: Any,
    mesh: Mesh,
    rules=LOGICAL_RULES,
    *,
    strict: bool = False,
) -> tuple[Any, Any]:
    """The parameters of a converted directory placed as ``param_shardings`` places the model's
    boxed abstract tree (``jax.eval_shape`` of its init). Returns ``(params, shardings)``; the
    arrays take the abstract tree's dtypes."""
    target, shardings = placed_abstract(abstract_boxed, mesh, rules, strict=strict)
    return params_io.load_params(ckpt_dir, target), shardings


def placed_abstract(
    abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES, *, strict: bool = False
) -> tuple[Any, Any]:
    """``(target, shardings)``: the model's boxed abstract tree as ``jax.ShapeDtypeStruct``
    leaves carrying the shardings ``param_shardings`` gives them (what a restore reads into)."""
    shardings = param_shardings(abstract_boxed, mesh, rules, strict=strict)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        unboxed_values(abstract_boxed),
        shardings,
    )
    return target, shardings


def restore_params_onto_mesh(
    ckpt_dir: str | os.PathLike,
    mesh: Mesh,
    rules=LOGICAL_RULES,
    *,
    strict: bool = False,
    **runtime: Any,
) -> tuple[Any, Any, Any]:
    """Read a converted directory straight into its shards on ``mesh``, the model config from its
    ``config.json``.

    runtime: config runtime fields (``dtype='bfloat16'``, ``remat_policy=...``); ``scan_layers``
      follows the stored layout. ``param_dtype`` (when given) is the dtype restored into.
    Returns ``(model config, params, shardings)``.
    """
    fam, cfg = converted_config(ckpt_dir, **runtime)
    params, shardings = restore_onto_mesh(
        ckpt_dir, fam.abstract_params(cfg), mesh, rules, strict=strict
    )
    return cfg, params, shardings
