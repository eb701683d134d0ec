"""Device meshes and the one table that maps logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter/optimizer
sharding, ZeRO-3 style), ``tensor`` (Megatron-style model parallel over heads and MLP).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
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


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Mesh with axes ``(data, fsdp, tensor)``; one entry of ``shape`` may be -1 (the rest).

    ``make_mesh({"fsdp": -1})`` puts every device on ``fsdp``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = {"data": 1, "fsdp": -1, "tensor": 1, **(shape or {})}
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; use {MESH_AXES}")
    sizes = [shape[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"{len(devices)} are present"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Map a pytree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """Activate ``mesh`` and the logical rules, so ``layers.constrain`` shards activations."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield mesh


def logical_specs(abstract_tree: Any) -> Any:
    """Logical ``PartitionSpec`` of every leaf of a boxed (``nn.LogicallyPartitioned``) tree."""
    return nn.get_partition_spec(abstract_tree)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """``NamedSharding`` per parameter (unboxed tree layout) from an ``eval_shape`` of init."""
    return logical_to_sharding(logical_specs(abstract_boxed), mesh, rules)


def sharded_init(
    init_fn: Callable[..., Any], mesh: Mesh, *args: Any, rules=LOGICAL_RULES
) -> tuple[Any, Any]:
    """Initialise parameters directly in their shards: ``jax.eval_shape`` finds shapes and logical
    names, then ``jit(init, out_shardings=...)`` materialises each shard on its device, so no
    host or device ever holds the whole model. Returns ``(params, shardings)`` (unboxed)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    with mesh_context(mesh, rules):
        params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return params, shardings


def abstract_with_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """``ShapeDtypeStruct``s carrying their target shardings (for AOT lowering and for restoring
    checkpoints straight onto a mesh)."""
    shardings = param_shardings(abstract_boxed, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract_boxed),
        shardings,
    )


def place(tree: Any, shardings: Any) -> Any:
    """Put host arrays (e.g. a converted checkpoint) onto the mesh, one leaf at a time."""
    return jax.tree.map(lambda a, s: jax.device_put(a, s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over ``data`` x ``fsdp``; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each host's slice of the batch (``make_array_from_process_local_data``).

    On one host this is a plain sharded ``device_put``; on many hosts each process passes its
    own rows and the global batch is their concatenation in process order.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local_batch.items()
    }


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process job
    (a coordinator address, SLURM, or a multi-host TPU slice). Returns True when it did."""
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False
