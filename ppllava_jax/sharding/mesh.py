"""Device meshes and the one table that maps logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter/optimizer
sharding, ZeRO-3 style), ``tensor`` (Megatron-style model parallel over heads and MLP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """Activate ``mesh`` and the logical rules, so ``layers.constrain`` shards activations.

    Activation constraints may be uneven (XLA pads); parameters and inputs may not (see
    ``fit_spec``)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield mesh
