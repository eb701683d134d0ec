"""Device meshes and the one table that maps logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter/optimizer
sharding, ZeRO-3 style), ``tensor`` (Megatron-style model parallel over heads and MLP).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None = replicated). The first rule whose mesh
# axes are still free in the spec wins, so a name may be listed more than once.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("layers", None),
    ("patch", None),
    ("conv_in", None),
    ("time", None),
    ("pos", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_head_dim", None),
)


MeshShape = dict[str, int]


def _resolve_sizes(shape: MeshShape, n: int) -> list[int]:
    """Sizes of ``MESH_AXES`` from ``shape`` (one entry may be -1: the rest) for ``n`` devices."""
    shape = {"data": 1, "fsdp": -1, "tensor": 1, **shape}
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; use {MESH_AXES} (+ dcn_data)")
    sizes = [int(shape[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {shape} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"{n} are present"
        )
    return sizes


def _granule_mesh(devices: list, sizes: list[int]) -> np.ndarray:
    """Devices of one slice (or of everything) as an array of ``sizes``; topology-aware on TPU."""
    if devices and getattr(devices[0], "platform", "") == "tpu":
        try:
            return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        except Exception:  # odd sub-slices: fall back to the plain order
            pass
    return np.asarray(devices, dtype=object).reshape(sizes)


def _slices(devices: list, n: int) -> list[list]:
    """Split ``devices`` into ``n`` slices: by ``slice_index`` (multi-slice TPU), else by
    ``process_index`` (one process per slice/node), else in order (simulated devices)."""
    for attr in ("slice_index", "process_index"):
        keys = sorted({getattr(d, attr, None) for d in devices}, key=str)
        if None not in keys and len(keys) == n:
            return [[d for d in devices if getattr(d, attr) == k] for k in keys]
    if len(devices) % n:
        raise ValueError(f"{len(devices)} devices do not split into dcn_data={n} slices")
    per = len(devices) // n
    return [devices[i * per : (i + 1) * per] for i in range(n)]


def make_mesh(shape: MeshShape | None = None, devices: Sequence | None = None) -> Mesh:
    """Mesh with axes ``(data, fsdp, tensor)``; one entry of ``shape`` may be -1 (the rest).

    ``make_mesh({"fsdp": -1})`` puts every device on ``fsdp``.

    Multi-slice TPU (or several nodes over a slow network): ``shape["dcn_data"] = S`` splits the
    devices into ``S`` slices (by ``slice_index``, else ``process_index``, else in order), lays out
    ``data x fsdp x tensor`` (sizes *per slice*, -1 allowed) inside each slice, and stacks the
    slices along ``data``: the mesh's ``data`` axis has ``S * data`` entries and only the
    data-parallel gradient reduction crosses the slow network. Axis names, and so the rules, do
    not change. (``jax.experimental.mesh_utils.create_hybrid_device_mesh`` does the same when
    every device has a ``slice_index``.)
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {})
    dcn = int(shape.pop("dcn_data", 1) or 1)
    if dcn < 1:
        raise ValueError(f"dcn_data={dcn} must be >= 1")
    if len(devices) % dcn:
        raise ValueError(f"{len(devices)} devices do not split into dcn_data={dcn} slices")
    sizes = _resolve_sizes(shape, len(devices) // dcn)
    if dcn == 1:
        return Mesh(_granule_mesh(devices, sizes), MESH_AXES)
    blocks = [_granule_mesh(g, sizes) for g in _slices(devices, dcn)]
    return Mesh(np.concatenate(blocks, axis=0), MESH_AXES)


def mesh_from_config(mesh_cfg: Any, devices: Sequence | None = None) -> Mesh:
    """``make_mesh`` from a config section with fields ``data``, ``fsdp``, ``tensor`` and
    optionally ``dcn_data`` (an ``ml_collections.ConfigDict`` or a dict)."""
    d = dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg)
    return make_mesh({k: int(v) for k, v in d.items() if k in (*MESH_AXES, "dcn_data")}, devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Map a pytree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh`` (no
    divisibility check; see ``param_shardings`` for shapes that may not divide)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """Activate ``mesh`` and the logical rules, so ``layers.constrain`` shards activations.

    Activation constraints may be uneven (XLA pads); parameters and inputs may not (see
    ``fit_spec``)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield mesh


def logical_specs(abstract_tree: Any) -> Any:
    """Logical ``PartitionSpec`` of every leaf of a boxed (``nn.LogicallyPartitioned``) tree."""
    return nn.get_partition_spec(abstract_tree)


# --------------------------------------------------------------------------- divisibility


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


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


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
    leaves = jax.tree_util.tree_flatten_with_path(abstract_boxed, is_leaf=_is_box)[0]
    return [_path(p) for p, leaf in leaves if not _is_box(leaf) and np.ndim(leaf) > 0]


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
        if _is_box(leaf):
            value, names = leaf.value, leaf.names
            spec = nn.logical_to_mesh_axes(_dedup(names), rules)
        else:
            value, spec = leaf, PartitionSpec()
        spec, n = fit_spec(np.shape(value), spec, mesh, strict=strict, what=_path(path))
        if notes is not None:
            notes.extend(n)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_boxed, is_leaf=_is_box)


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


def abstract_with_shardings(
    abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES, *, strict: bool = False
) -> Any:
    """``ShapeDtypeStruct``s carrying their target shardings (for AOT lowering and for restoring
    checkpoints straight onto a mesh)."""
    shardings = param_shardings(abstract_boxed, mesh, rules, strict=strict)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract_boxed),
        shardings,
    )


def sharding_report(
    abstract_boxed: Any,
    mesh: Mesh,
    rules=LOGICAL_RULES,
    *,
    processes: int | None = None,
    rows_per_host: int | None = None,
) -> dict[str, Any]:
    """Where every parameter goes: ``dict(rows, unnamed, fallbacks, bytes_per_device,
    bytes_total, hosts)``; ``rows`` = ``(path, shape, logical names, mesh spec, bytes per
    device)``, ``hosts`` = ``host_layout(mesh, rows_per_host, processes)`` (each host's devices
    and the batch rows it feeds). ``format_report`` prints it."""
    notes: list[str] = []
    shardings = param_shardings(abstract_boxed, mesh, rules, notes=notes)
    rows, per_dev, total = [], 0, 0
    leaves = jax.tree_util.tree_flatten_with_path(abstract_boxed, is_leaf=_is_box)[0]
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        value = leaf.value if _is_box(leaf) else leaf
        names = tuple(leaf.names) if _is_box(leaf) else None
        nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        local = int(np.prod(sh.shard_shape(value.shape))) * np.dtype(value.dtype).itemsize
        rows.append((_path(path), tuple(value.shape), names, sh.spec, local))
        per_dev += local
        total += nbytes
    return {
        "rows": rows,
        "unnamed": unnamed_params(abstract_boxed),
        "fallbacks": notes,
        "bytes_per_device": per_dev,
        "bytes_total": total,
        "hosts": host_layout(mesh, rows_per_host, processes),
    }


def format_report(report: dict[str, Any], max_rows: int | None = None) -> str:
    lines = [f"{'parameter':<90} {'shape':<22} {'mesh spec':<28} {'MiB/dev':>9}"]
    rows = report["rows"] if max_rows is None else report["rows"][:max_rows]
    for path, shape, _names, spec, local in rows:
        lines.append(f"{path:<90} {str(shape):<22} {str(spec):<28} {local / 2**20:>9.2f}")
    lines.append(
        f"total {report['bytes_total'] / 2**30:.3f} GiB, per device "
        f"{report['bytes_per_device'] / 2**30:.3f} GiB"
    )
    lines.append(f"without logical names: {report['unnamed'] or 'none'}")
    lines.append(f"fallbacks (indivisible): {len(report['fallbacks'])}")
    lines.extend("  " + n for n in report["fallbacks"])
    if report.get("hosts"):
        lines.append(f"hosts ({len(report['hosts'])}):")
        lines.extend("  " + x for x in format_host_layout(report["hosts"]).splitlines())
    return "\n".join(lines)


def place(tree: Any, shardings: Any) -> Any:
    """Put host arrays (e.g. a converted checkpoint) onto the mesh, one leaf at a time."""
    return jax.tree.map(lambda a, s: jax.device_put(a, s), tree, shardings)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_layout(ckpt_dir: str | os.PathLike) -> bool | None:
    """Whether a converted directory stores scanned layers (True), per-layer ones (False), or
    no repeated layers (None), read from the orbax metadata (no array is loaded)."""
    import orbax.checkpoint as ocp

    from ppllava_jax.convert.api import _scan_layout

    path = Path(ckpt_dir).absolute() / "params"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    return _scan_layout(dict(tree))


def restore_params_onto_mesh(
    ckpt_dir: str | os.PathLike,
    mesh: Mesh,
    rules=LOGICAL_RULES,
    *,
    strict: bool = False,
    **runtime: Any,
) -> tuple[Any, Any, Any]:
    """Read a converted directory (``convert_checkpoint`` / ``params_io.save_params``) straight
    into its shards on ``mesh``: each host reads only the pieces its devices hold.

    runtime: config runtime fields (``dtype='bfloat16'``, ``remat_policy=...``); ``scan_layers``
      follows the stored layout. ``param_dtype`` (when given) is the dtype restored into.
    Returns ``(model config, params, shardings)``.
    """
    from ppllava_jax.convert import params_io, registry
    from ppllava_jax.convert.api import with_runtime

    name, hf = params_io.read_config(ckpt_dir)
    fam = registry.get_family(name)
    scan = checkpoint_layout(ckpt_dir)
    cfg = with_runtime(fam.config_from_hf(hf), **{**runtime, "scan_layers": scan})
    boxed = fam.abstract_params(cfg)
    shardings = param_shardings(boxed, mesh, rules, strict=strict)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed),
        shardings,
    )
    return cfg, params_io.load_params(ckpt_dir, target), shardings


# --------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over ``data`` x ``fsdp``; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch axis is split: the size of ``data`` x ``fsdp``."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_rows(rows: int, mesh: Mesh, *, what: str = "the batch", setting: str = "") -> None:
    """Refuse (``ShardingError``) a batch whose ``rows`` the ``data`` x ``fsdp`` axes do not
    divide: ``batch_shardings`` would replicate it, every device computing every row (and FLOP/s
    per device would be overstated). Call it before compiling. The message names ``setting`` (the
    config field or flag to change) and what divides: the nearest multiples of the data-parallel
    size, and the data-parallel sizes that divide ``rows``."""
    n = batch_devices(mesh)
    if rows > 0 and rows % n == 0:
        return
    lo, hi = rows // n * n, -(-max(rows, 1) // n) * n
    near = " or ".join(str(m) for m in dict.fromkeys((lo, hi)) if m > 0)
    divs = [d for d in range(1, max(rows, 1) + 1) if rows % d == 0 and d <= len(mesh.devices.flat)]
    axes = ", ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
    raise ShardingError(
        f"{what}: {rows} rows do not split over the mesh's data x fsdp = {n} devices ({axes}); "
        f"a batch is not replicated over data-parallel devices. Use a multiple of {n} rows "
        f"({near}){f' via {setting}' if setting else ''}, or a mesh whose data x fsdp divides "
        f"{rows} ({', '.join(map(str, divs))})"
    )


def batch_shardings(batch: dict[str, Any], mesh: Mesh, *, strict: bool = False) -> dict:
    """Per key: the leading axis over ``data`` x ``fsdp`` where that divides it, else the longest
    dividing prefix of those axes, else replicated (a visual group of 1 item in a batch of 4).
    ``batch`` holds arrays or ``ShapeDtypeStruct``s."""
    out = {}
    for k, v in batch.items():
        shape = np.shape(v)
        spec = PartitionSpec(BATCH_AXES) if len(shape) else PartitionSpec()
        spec, _ = fit_spec(shape, spec, mesh, strict=strict, what=f"batch[{k!r}]")
        out[k] = NamedSharding(mesh, spec)
    return out


def abstract_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """``ShapeDtypeStruct``s with ``batch_shardings`` (for AOT lowering)."""
    sh = batch_shardings(batch, mesh)
    return {
        k: jax.ShapeDtypeStruct(
            np.shape(v), np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype, sharding=sh[k]
        )
        for k, v in batch.items()
    }


def process_barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process gets here (no-op on one process), through the coordination
    service (gRPC, ``timeout_s``) rather than a device collective: gloo creates its context for
    a set of devices on their first collective and gives up when the processes arrive more
    than 30 s apart (one still compiling, loading or decoding), so call this before a first
    collective that may be reached at different times. Each ``name`` is used once per run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client of jax.distributed.initialize

    client = distributed.global_state.client
    if client is None:  # not started by jax.distributed (cannot happen with process_count > 1)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def max_over_processes(value: int) -> int:
    """The largest ``value`` of all processes (a host-side all-gather; ``value`` on one)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each host's slice of the batch (``make_array_from_process_local_data``).

    On one host this is a sharded ``device_put`` (keys whose leading axis does not divide the
    batch axes are replicated, see ``batch_shardings``). On many hosts each process passes its
    own rows and the global batch is their concatenation in process order; every key must then
    divide (a replicated key would need the same rows on every host), else a ``ShardingError``.

    Multi-host: ``visual_index`` must point into the *global* pool of visual items; shift each
    host's batch with ``data.collate.globalize_visual_index`` first (``train.py`` does).
    """
    local_batch = {k: np.asarray(v) for k, v in local_batch.items()}
    if jax.process_count() > 1:
        global_shapes = {
            k: (v.shape[0] * jax.process_count(), *v.shape[1:]) for k, v in local_batch.items()
        }
        shardings = batch_shardings(
            {k: jax.ShapeDtypeStruct(s, local_batch[k].dtype) for k, s in global_shapes.items()},
            mesh,
            strict=True,
        )
    else:
        shardings = batch_shardings(local_batch, mesh)
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local_batch.items()
    }


# --------------------------------------------------------------------------- KV cache


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


def distributed_settings(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for ``jax.distributed.initialize`` from the environment, or None for a
    single-process run.

    A multi-process job is recognised by ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``: what ``python -m ppllava_jax.launch`` sets, and what a Kubernetes
    pod spec sets, e.g. ``JAX_PROCESS_ID`` from the indexed Job's completion index), by SLURM
    (``SLURM_NTASKS`` > 1: JAX reads the rest from ``srun``'s variables) or by a multi-host TPU
    slice (``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_COORDINATOR_ADDRESS``: JAX asks the TPU
    metadata). Values left out are auto-detected by JAX. ``PPLLAVA_HEARTBEAT_TIMEOUT`` (seconds,
    JAX's default 100) bounds how long the others wait for a process that died without a word
    (SIGKILL, a lost host) before they stop with an error; ``PPLLAVA_INIT_TIMEOUT`` how long
    processes wait for each other at start-up (default 300).
    """
    env = dict(os.environ if env is None else env)
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )
    if not multi:
        return None
    kw: dict[str, Any] = {}
    for name, key in (
        ("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
        ("num_processes", "JAX_NUM_PROCESSES"),
        ("process_id", "JAX_PROCESS_ID"),
        ("heartbeat_timeout_seconds", "PPLLAVA_HEARTBEAT_TIMEOUT"),
        ("initialization_timeout", "PPLLAVA_INIT_TIMEOUT"),
    ):
        value = env.get(key, "")
        if value == "":
            continue
        if name == "coordinator_address":
            kw[name] = value
            continue
        try:
            kw[name] = int(value)
        except ValueError:
            raise ValueError(f"environment variable {key}={value!r} must be an integer") from None
    n, i = kw.get("num_processes"), kw.get("process_id")
    if n is not None and i is not None and not 0 <= i < n:
        raise ValueError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
    return kw


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when the environment describes a multi-process job
    (``distributed_settings``); CPU collectives across processes go through gloo. Must run
    before anything touches a JAX device. Returns True when it initialised."""
    kw = distributed_settings()
    if kw is None or jax.distributed.is_initialized():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    sys.excepthook = _exit_on_error(sys.excepthook)
    return True


def _exit_on_error(previous: Callable[..., Any]) -> Callable[..., None]:
    """An uncaught exception in one process of a multi-process job: print it and exit at once.
    The normal exit would first wait (up to JAX's shutdown timeout, 5 minutes) in a shutdown
    barrier the other processes, still running, never reach; a launcher or scheduler that stops
    the job when one process fails needs that process to end."""

    def hook(kind, value, tb) -> None:
        previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return hook


def host_layout(
    mesh: Mesh, rows_per_host: int | None = None, processes: int | None = None
) -> list[dict[str, Any]]:
    """Which devices each process owns in ``mesh`` and which rows of the global batch it feeds.

    processes: plan for this many hosts (the planner's simulated devices all belong to one
      process: host ``p`` is given the ``p``-th equal block of the devices in id order, as
      ``jax.devices()`` orders them by process); None: the devices' own ``process_index``.

    ``shard_batch`` concatenates the processes' rows in process order, so process ``p`` with
    ``r`` rows per host feeds global rows ``[p * r, (p + 1) * r)``; the batch axis is split over
    ``data`` x ``fsdp``, so those rows must land on that process's own devices (else
    ``make_array_from_process_local_data`` moves them across hosts). Returns one dict per
    process: ``process``, ``devices`` (ids), ``coords`` (mesh coordinates of each device, by axis
    name), ``batch_shards`` (indices along ``data`` x ``fsdp`` its devices hold) and, with
    ``rows_per_host``, ``rows`` (first, end) and ``device_rows`` (rows each device holds).
    """
    names = mesh.axis_names
    by_proc: dict[int, dict[str, Any]] = {}
    n_batch = batch_devices(mesh)
    ids = sorted(int(d.id) for d in mesh.devices.flat)
    if processes is not None and len(ids) % int(processes):
        raise ValueError(f"{len(ids)} devices do not split over {processes} processes")
    per_host = len(ids) // int(processes) if processes else 0
    for idx in np.ndindex(*mesh.devices.shape):
        d = mesh.devices[idx]
        proc = ids.index(int(d.id)) // per_host if per_host else int(d.process_index)
        coords = dict(zip(names, (int(x) for x in idx)))
        shard = coords.get("data", 0) * mesh.shape.get("fsdp", 1) + coords.get("fsdp", 0)
        e = by_proc.setdefault(
            proc, {"process": proc, "devices": [], "coords": [], "batch_shards": []}
        )
        e["devices"].append(int(d.id))
        e["coords"].append(coords)
        if shard not in e["batch_shards"]:
            e["batch_shards"].append(shard)
    out = [by_proc[p] for p in sorted(by_proc)]
    if rows_per_host is not None:
        total = rows_per_host * len(out)
        per_shard = total // n_batch if total % n_batch == 0 else None
        for e in out:
            p = e["process"]
            e["rows"] = (p * rows_per_host, (p + 1) * rows_per_host)
            if per_shard is not None:
                e["device_rows"] = [
                    (s * per_shard, (s + 1) * per_shard) for s in sorted(e["batch_shards"])
                ]
    return out


def format_host_layout(layout: list[dict[str, Any]]) -> str:
    """One line per process: its devices, their mesh coordinates and the rows it feeds."""
    lines = []
    for e in layout:
        coords = " ".join(
            "(" + ",".join(f"{k}={v}" for k, v in c.items()) + ")" for c in e.get("coords", [])
        )
        line = f"process {e['process']}: devices {e['devices']}" + (
            f" at {coords}" if coords else ""
        )
        if "rows" in e:
            line += f"; feeds global rows [{e['rows'][0]}, {e['rows'][1]})"
        if "device_rows" in e:
            line += " held as " + ", ".join(f"[{a}, {b})" for a, b in e["device_rows"])
        lines.append(line)
    return "\n".join(lines)
