"""Where parameters (and the KV cache) live on a mesh: logical names through ``LOGICAL_RULES``,
with a fallback for dimensions the mesh does not divide, and initialisation straight into the
shards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ppllava_jax.convert.saved_tree import path_str
from ppllava_jax.sharding.distributed import process_barrier
from ppllava_jax.sharding.mesh import LOGICAL_RULES, mesh_context


class ShardingError(ValueError):
    """A parameter/input dimension does not divide its mesh axes (``strict=True``)."""


def _axes_tuple(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(
    shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, *, strict: bool = False, what: str = ""
) -> tuple[PartitionSpec, list[str]]:
    """Make ``spec`` valid for an array of ``shape``: a dimension that its mesh axes do not
    divide keeps the longest prefix of those axes that does (``("data", "fsdp")`` -> ``"data"``)
    and otherwise is replicated. Returns the fitted spec and one note per change.

    Decision: parameters and inputs fall back (and the change is reported by
    ``sharding_report``) rather than fail, because tiny test models and odd vocabularies (CLIP's
    49408, a 99-token test vocabulary) must still run on any mesh; ``strict=True`` raises a
    ``ShardingError`` naming the array, dimension and axes instead, before anything compiles.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out, notes = [], []
    for dim, (size, entry) in enumerate(zip(shape, entries)):
        axes = _axes_tuple(entry)
        keep = axes
        while keep and size % int(np.prod([mesh.shape[a] for a in keep])):
            keep = keep[:-1]
        if keep != axes:
            msg = (
                f"{what or 'array'} {tuple(shape)}: dim {dim} (size {size}) does not divide mesh "
                f"axes {axes} (x{int(np.prod([mesh.shape[a] for a in axes]))})"
            )
            if strict:
                raise ShardingError(msg + "; change the mesh or the rules (or strict=False)")
            notes.append(msg + f" -> {keep or 'replicated'}")
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out), notes


def is_boxed(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def unboxed_values(tree: Any) -> Any:
    """The plain leaves of a boxed tree, without the sharding constraint ``nn.unbox`` applies
    inside a mesh context (which an abstract ``ShapeDtypeStruct`` leaf cannot take)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if is_boxed(x) else x, tree, is_leaf=is_boxed
    )


def _dedup(names: Sequence[str | None]) -> tuple[str | None, ...]:
    """A name repeated within one array (the patch kernel's ``("patch", "patch", ...)``) is
    kept on its first dimension only: one mesh axis cannot split two dimensions."""
    seen: set[str] = set()
    out = []
    for n in names:
        out.append(None if n in seen else n)
        if n is not None:
            seen.add(n)
    return tuple(out)


def unnamed_params(abstract_boxed: Any) -> list[str]:
    """Paths of parameters without logical axis names (should be empty; every parameter is
    created through ``layers.dense``/``layer_norm``/``RMSNorm``/``with_logical_partitioning``)."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_boxed, is_leaf=is_boxed)[0]
    return [path_str(p) for p, leaf in leaves if not is_boxed(leaf) and np.ndim(leaf) > 0]


def param_shardings(
    abstract_boxed: Any,
    mesh: Mesh,
    rules=LOGICAL_RULES,
    *,
    strict: bool = False,
    notes: list[str] | None = None,
) -> Any:
    """``NamedSharding`` per parameter (unboxed tree layout) from an ``eval_shape`` of init.

    Logical names go through ``rules``; a dimension its mesh axes do not divide falls back as
    ``fit_spec`` says (appending to ``notes`` when given) or, with ``strict``, raises.
    A leaf without names is replicated (``unnamed_params`` lists them).
    """
    rules = list(rules)

    def one(path, leaf):
        if is_boxed(leaf):
            value, names = leaf.value, leaf.names
            spec = nn.logical_to_mesh_axes(_dedup(names), rules)
        else:
            value, spec = leaf, PartitionSpec()
        spec, n = fit_spec(np.shape(value), spec, mesh, strict=strict, what=path_str(path))
        if notes is not None:
            notes.extend(n)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_boxed, is_leaf=is_boxed)


def sharded_init(
    init_fn: Callable[..., Any], mesh: Mesh, *args: Any, rules=LOGICAL_RULES, strict: bool = False
) -> tuple[Any, Any]:
    """Initialise parameters directly in their shards: ``jax.eval_shape`` finds shapes and logical
    names, then ``jit(init, out_shardings=...)`` materialises each shard on its device, so no
    host or device ever holds the whole model. Returns ``(params, shardings)`` (unboxed)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules, strict=strict)
    with mesh_context(mesh, rules):
        init = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)
        if jax.process_count() > 1:  # compiled apart, run together (see process_barrier)
            init = init.lower(*args).compile()
            process_barrier("sharded_init")
        params = init(*args)
    return params, shardings


def place(tree: Any, shardings: Any) -> Any:
    """Put host arrays (e.g. a converted checkpoint) onto the mesh, one leaf at a time."""
    return jax.tree.map(lambda a, s: jax.device_put(a, s), tree, shardings)


def cache_shardings(
    llm_cfg: Any, batch: int, max_len: int, mesh: Mesh, rules=LOGICAL_RULES
) -> dict[str, NamedSharding]:
    """Shardings of ``llama.init_cache(llm_cfg, batch, max_len)``'s ``k``/``v``
    ``[L, B, S_max, K, H]`` from ``llama.CACHE_AXES``: batch over ``data`` x ``fsdp``, KV heads
    over ``tensor`` (each falling back as ``fit_spec`` says: a batch of 1 is replicated)."""
    from ppllava_jax.models.llama import CACHE_AXES

    shape = (
        llm_cfg.num_hidden_layers,
        batch,
        max_len,
        llm_cfg.num_key_value_heads,
        llm_cfg.head_dim,
    )
    spec = nn.logical_to_mesh_axes(CACHE_AXES, list(rules))
    spec, _ = fit_spec(shape, spec, mesh, what="kv cache")
    sh = NamedSharding(mesh, spec)
    return {"k": sh, "v": sh}


def init_sharded_cache(
    llm_cfg: Any, batch: int, max_len: int, mesh: Mesh, dtype: Any = None, rules=LOGICAL_RULES
) -> dict[str, jax.Array]:
    """A zero KV cache created directly in its shards (``cache_shardings``)."""
    from ppllava_jax.models.llama import init_cache

    dtype = llm_cfg.dtype if dtype is None else dtype
    sh = cache_shardings(llm_cfg, batch, max_len, mesh, rules)
    return jax.jit(lambda: init_cache(llm_cfg, batch, max_len, dtype), out_shardings=sh)()
