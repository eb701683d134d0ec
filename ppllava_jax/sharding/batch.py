"""Batches on a mesh: the leading (batch) axis split over ``data`` x ``fsdp``, each host feeding
its own rows (``shard_batch``)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ppllava_jax.sharding.mesh import BATCH_AXES
from ppllava_jax.sharding.params import ShardingError, fit_spec


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
