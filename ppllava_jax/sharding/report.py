"""Reports for people: where every parameter goes (``sharding_report``) and which devices and
batch rows each host owns (``host_layout``); ``python -m ppllava_jax.plan`` prints both."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ppllava_jax.convert.saved_tree import path_str
from ppllava_jax.sharding.batch import batch_devices
from ppllava_jax.sharding.mesh import LOGICAL_RULES
from ppllava_jax.sharding.params import is_boxed, param_shardings, unnamed_params


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
    leaves = jax.tree_util.tree_flatten_with_path(abstract_boxed, is_leaf=is_boxed)[0]
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        value = leaf.value if is_boxed(leaf) else leaf
        names = tuple(leaf.names) if is_boxed(leaf) else None
        nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        local = int(np.prod(sh.shard_shape(value.shape))) * np.dtype(value.dtype).itemsize
        rows.append((path_str(path), tuple(value.shape), names, sh.spec, local))
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
