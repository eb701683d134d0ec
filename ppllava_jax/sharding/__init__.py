"""Placement on devices: ``from ppllava_jax import sharding; sharding.make_mesh(...)``.

- ``mesh``: mesh construction and the one ``LOGICAL_RULES`` table (logical axis -> mesh axes);
- ``params``: parameter (and KV cache) shardings, initialisation in place;
- ``batch``: batch shardings, each host's rows into global arrays;
- ``restore``: a converted checkpoint restored straight into its shards;
- ``report``: where every parameter and batch row goes (for ``plan``);
- ``distributed``: ``jax.distributed`` set-up and host-side synchronisation.

The names below are the package's interface; the modules may be imported directly too.
"""

from ppllava_jax.sharding.batch import (
    abstract_batch,
    batch_devices,
    batch_shardings,
    check_batch_rows,
    shard_batch,
)
from ppllava_jax.sharding.distributed import (
    distributed_settings,
    max_over_processes,
    maybe_initialize_distributed,
    process_barrier,
)
from ppllava_jax.sharding.mesh import (
    BATCH_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    make_mesh,
    mesh_context,
    replicated,
)
from ppllava_jax.sharding.params import (
    ShardingError,
    cache_shardings,
    fit_spec,
    init_sharded_cache,
    param_shardings,
    place,
    sharded_init,
    unboxed_values,
    unnamed_params,
)
from ppllava_jax.sharding.report import (
    format_host_layout,
    format_report,
    host_layout,
    sharding_report,
)
from ppllava_jax.sharding.restore import restore_onto_mesh, restore_params_onto_mesh

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "ShardingError",
    "abstract_batch",
    "batch_devices",
    "batch_shardings",
    "cache_shardings",
    "check_batch_rows",
    "distributed_settings",
    "fit_spec",
    "format_host_layout",
    "format_report",
    "host_layout",
    "init_sharded_cache",
    "make_mesh",
    "max_over_processes",
    "maybe_initialize_distributed",
    "mesh_context",
    "param_shardings",
    "place",
    "process_barrier",
    "replicated",
    "restore_onto_mesh",
    "restore_params_onto_mesh",
    "shard_batch",
    "sharded_init",
    "sharding_report",
    "unboxed_values",
    "unnamed_params",
]
