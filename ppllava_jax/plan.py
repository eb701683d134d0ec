r"""Memory and cost plan of the real 7B SFT train step, before renting a slice.

    python -m ppllava_jax.plan --config configs/ppllava_vicuna7b_videoonly.py \
        --devices 64 --mesh fsdp=64 --batch-per-device 1,2,4 --hbm-gib 16

Simulates ``--devices`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``, set
here before JAX is imported, so this module imports nothing from JAX at the top), builds the
PPLLaVA config of the file's ``model`` section (7B: CLIP ViT-L/14-336 24 layers + BT-Adapter
depth 4, CLIP text 12 layers / 248 positions, Vicuna-7B 32 layers, vocab 32064), the train state
(trainable / frozen split and AdamW moments of the trainable set, docs/MODEL.md §7) and a batch of
``per-device x data-parallel ranks`` 32-frame 336px videos with merged sequences of
``batch.max_length`` tokens, all as abstract arrays with their shardings; then
``jax.jit(train_step).lower(...).compile()`` ahead of time and prints, per device: parameter
bytes (trainable + frozen), optimizer-state bytes, the batch, the compiler's temporary memory
(``memory_analysis()``), their total, and FLOPs per step (``cost_analysis()`` and the analytic
count of ``ppllava_jax.flops`` for what the recipe trains), as a table and one JSON line per
batch size.

A config without ``model.preset`` (e.g. a small model to try the tool on) is planned with the
model ``train.py`` would build from it (``train.model_config``) and its ``batch`` section's
``max_length``, ``per_device``, ``num_frames`` and ``clip_length``.

``--attention`` and ``--set KEY=VALUE`` (e.g. ``train.loss_chunk_size=0``) plan other settings.
The figures come from XLA's CPU compiler: buffer assignment, fusion and rematerialisation differ
on TPU and GPU, so treat them as estimates (typically within tens of percent); leave headroom.
By default (``--cpu-scheduler memory``) the CPU compiler's concurrency-optimised scheduler is
turned off, so the program is ordered to minimise memory as the accelerators' memory-limited
schedulers do (``set_device_count``; docs/plan_figures.md has figures with both).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
from typing import Any

from ppllava_jax import command_line
from ppllava_jax.launch import simulate_cpu_devices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = command_line.argument_parser(__doc__, "python -m ppllava_jax.plan")
    p.add_argument("--config", required=True, help="ml_collections config file (get_config())")
    p.add_argument("--devices", type=int, required=True, help="simulated devices (chips/GPUs)")
    p.add_argument(
        "--mesh",
        default="",
        help="axis sizes, e.g. fsdp=64 or data=2,fsdp=16,tensor=2[,dcn_data=2]; "
        "default: the config's mesh section",
    )
    p.add_argument(
        "--batch-per-device",
        default="",
        help="samples per data-parallel rank; a comma list plans several (default: config)",
    )
    p.add_argument("--remat", default=None, help="remat policy: none | full | dots | ...")
    p.add_argument("--attention", default=None, help="attention_impl: xla | blockwise | auto ...")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config field (repeat)"
    )
    p.add_argument("--scan", default=None, choices=("true", "false"), help="override scan_layers")
    p.add_argument("--hbm-gib", type=float, default=None, help="device memory to check against")
    p.add_argument("--max-length", type=int, default=None, help="merged sequence length")
    p.add_argument("--frames", type=int, default=None, help="frames per video")
    p.add_argument("--llm-layers", type=int, default=None, help="LLM depth (experiments)")
    p.add_argument(
        "--cpu-scheduler",
        default="memory",
        choices=("memory", "concurrency"),
        help="XLA CPU schedule of the planned program: memory-minimising (default, like the "
        "accelerators' memory-limited schedulers) or XLA CPU's concurrency-optimised default",
    )
    p.add_argument("--params", action="store_true", help="also print every parameter's layout")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="hosts (JAX processes) the devices are spread over, in equal blocks: prints which "
        "devices each owns and which rows of the global batch it feeds",
    )
    return p.parse_args(argv)


CONCURRENCY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def set_device_count(n: int, scheduler: str = "memory") -> None:
    """Simulated host devices; must run before JAX is imported. ``scheduler='memory'`` turns
    off the XLA CPU compiler's concurrency-optimised scheduler (on by default: it orders the
    program for thread parallelism on the host, e.g. rematerialised forward passes of the
    vision tower early, during the LLM backward, holding their activations), so that the
    schedule minimises memory as the TPU/GPU compilers' memory-limited schedulers do;
    ``'concurrency'`` keeps XLA's CPU default."""
    if "jax" in sys.modules:
        raise RuntimeError("set_device_count must run before jax is imported")
    simulate_cpu_devices(n)
    flags = [f for f in os.environ["XLA_FLAGS"].split() if CONCURRENCY_SCHEDULER_FLAG not in f]
    if scheduler == "memory":
        flags.append(f"{CONCURRENCY_SCHEDULER_FLAG}=false")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def set_field(config: Any, assignment: str) -> None:
    """Apply one ``--set KEY=VALUE``: ``config.<KEY> = VALUE`` (a Python literal, else the
    string); an unknown field is a ValueError naming it."""
    key, eq, text = assignment.partition("=")
    if not eq:
        raise ValueError(f"--set {assignment!r}: use KEY=VALUE, e.g. train.loss_chunk_size=0")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *path, leaf = key.strip().split(".")
    node = config
    for part in path:
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            raise ValueError(f"--set {key}: the config has no section {part!r}")
    if leaf not in node:
        raise ValueError(f"--set {key}: the config has no field {leaf!r}")
    node[leaf] = value


def cpu_scheduler() -> str:
    """``'memory'`` or ``'concurrency'``: the XLA CPU schedule ``XLA_FLAGS`` asks for."""
    off = f"{CONCURRENCY_SCHEDULER_FLAG}=false" in os.environ.get("XLA_FLAGS", "")
    return "memory" if off else "concurrency"


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("_plan_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = part.partition("=")
        if not v:
            raise ValueError(f"--mesh entry {part!r}: use axis=size")
        out[k.strip()] = int(v)
    return out


def abstract_batch_arrays(cfg: Any, batch: int, length: int, frames: int, clip_len: int) -> dict:
    """``ShapeDtypeStruct``s of a video-only SFT batch in ``data.collate`` format."""
    import jax
    import numpy as np

    s = cfg.vision.image_size
    sd = jax.ShapeDtypeStruct
    txt = {k: sd((batch, length), np.int32) for k in ("input_ids", "visual_index", "positions")}
    return {
        **txt,
        "attention_mask": sd((batch, length), np.int32),
        "labels": sd((batch, length), np.int32),
        "video_pixels": sd((batch, frames, s, s, 3), np.float32),
        "video_frames": sd((batch, frames), np.bool_),
        "video_clip_ids": sd((batch, clip_len), np.int32),
        "video_clip_mask": sd((batch, clip_len), np.int32),
    }


def _nbytes_per_device(tree: Any, shardings: Any) -> int:
    import jax
    import numpy as np

    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
    return total


def planned_model(config: Any) -> Any:
    """The ``PPLLaVAConfig`` to plan: the 7B recipe of ``model.preset``, else the model
    ``train.py`` builds from the config (``train.model_config``)."""
    from ppllava_jax.train.model_config import model_config, preset_model_config

    if config.model.get("preset"):
        return preset_model_config(config.model)
    return model_config(config)


def plan_shape(config: Any) -> dict[str, int]:
    """The planned batch: ``max_length`` (merged tokens per row), ``per_device`` (rows per
    data-parallel rank), ``frames`` (per video) and ``clip_length`` (CLIP prompt tokens): the
    ``batch`` section's, the frames and prompt length of a preset from its ``model`` section."""
    b = config.get("batch")
    if b is None:
        raise ValueError(
            "the config has no batch section: plan needs batch.max_length, batch.per_device "
            "(and, without model.preset, batch.num_frames and batch.clip_length)"
        )
    src = config.model if config.model.get("preset") else b
    return {
        "max_length": int(b.max_length),
        "per_device": int(b.per_device),
        "frames": int(src.num_frames),
        "clip_length": int(src.clip_length),
    }


def plan_one(
    config: Any,
    mesh: Any,
    per_device: int,
    *,
    shape: dict[str, int] | None = None,
    show_params: bool = False,
    processes: int = 1,
) -> dict:
    """Lower and compile the train step for one batch size; returns the figures (bytes per
    device, FLOPs) and ``hosts`` (``sharding.host_layout`` for ``processes`` hosts: each one's
    devices and the rows of the global batch it feeds, ``data.batch_size`` = rows per host)
    as a dict. ``shape``: ``plan_shape(config)`` (with the command line's changes)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from ppllava_jax import flops, sharding
    from ppllava_jax.models.ppllava import PPLLaVA, abstract_params
    from ppllava_jax.train.optimizer import make_optimizer, param_paths, trainable_predicate
    from ppllava_jax.train.state import create_train_state, state_shardings
    from ppllava_jax.train.step import make_train_step

    t0 = time.perf_counter()
    cfg = planned_model(config)
    shape = shape or plan_shape(config)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = per_device * dp
    length, frames, clip_len = shape["max_length"], shape["frames"], shape["clip_length"]

    boxed = abstract_params(cfg)
    if global_batch % processes:
        raise ValueError(
            f"a global batch of {global_batch} rows does not split over {processes} processes"
        )
    report = sharding.sharding_report(
        boxed, mesh, processes=processes, rows_per_host=global_batch // processes
    )
    if show_params:
        print(sharding.format_report(report))
    if report["unnamed"]:
        raise ValueError(f"parameters without logical axis names: {report['unnamed']}")
    p_sh = sharding.param_shardings(boxed, mesh)
    params_abs = nn.unbox(boxed)

    tx, schedule = make_optimizer(config.optimizer, int(config.train.total_steps))
    pred = trainable_predicate(config.optimizer)
    st_sh = state_shardings(p_sh, tx, pred, params_abstract=params_abs)
    st_abs = jax.eval_shape(lambda p: create_train_state(p, tx, pred), params_abs)
    st_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st_abs, st_sh
    )
    batch_abs = sharding.abstract_batch(
        abstract_batch_arrays(cfg, global_batch, length, frames, clip_len), mesh
    )
    rep = sharding.replicated(mesh)
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=rep)

    model = PPLLaVA(cfg)

    def apply_fn(params, batch, *, train, rng, **kw):  # kw: return_logits (loss_chunk_size)
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # the step computes the loss
        return model.apply(
            {"params": params}, inputs, deterministic=not train, rngs={"dropout": rng}, **kw
        )

    step = make_train_step(
        apply_fn, config, "sft", tx=tx, schedule=schedule, param_shardings=st_sh.params
    )
    jitted = jax.jit(
        step,
        in_shardings=(st_sh, {k: v.sharding for k, v in batch_abs.items()}, rep),
        out_shardings=(st_sh, rep),
        donate_argnums=(0,),
    )
    with sharding.mesh_context(mesh):
        t1 = time.perf_counter()
        lowered = jitted.lower(st_in, batch_abs, rng)
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    params_b = _nbytes_per_device(st_abs.params, st_sh.params) + _nbytes_per_device(
        st_abs.frozen, st_sh.frozen
    )
    opt_b = _nbytes_per_device(st_abs.opt_state, st_sh.opt_state)
    batch_b = sum(
        int(np.prod(v.sharding.shard_shape(v.shape))) * np.dtype(v.dtype).itemsize
        for v in batch_abs.values()
    )
    arg_b = int(getattr(mem, "argument_size_in_bytes", 0))
    out_b = int(getattr(mem, "output_size_in_bytes", 0))
    alias_b = int(getattr(mem, "alias_size_in_bytes", 0))
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = arg_b + out_b - alias_b + temp_b
    n_dev = mesh.devices.size
    flops_xla = float(cost.get("flops", 0.0)) if cost else 0.0
    trained = [p for p in param_paths(params_abs) if pred(p)]
    flops_model = flops.train_flops(
        cfg, global_batch, length, [(global_batch, frames, False)], clip_len, trained
    )
    trainable_n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(st_abs.params))
    frozen_n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(st_abs.frozen))
    return {
        "devices": int(n_dev),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch_per_device": per_device,
        "global_batch": global_batch,
        "seq_len": length,
        "frames": frames,
        "remat": cfg.remat_policy,
        "attention": cfg.attention_impl,
        "loss_chunk_size": int(config.train.get("loss_chunk_size", 0)),
        "scan": cfg.scan_layers,
        "dtype": cfg.dtype,
        "cpu_scheduler": cpu_scheduler(),
        "trainable_params": trainable_n,
        "frozen_params": frozen_n,
        "params_bytes": params_b,
        "opt_state_bytes": opt_b,
        "batch_bytes": batch_b,
        "argument_bytes": arg_b,
        "output_bytes": out_b,
        "alias_bytes": alias_b,
        "temp_bytes": temp_b,
        "code_bytes": code_b,
        "total_bytes": total,
        "flops_per_device_xla": flops_xla,
        "flops_per_device_model": flops_model / n_dev,
        "fallbacks": len(report["fallbacks"]),
        "processes": processes,
        "rows_per_host": global_batch // processes,
        "hosts": [
            {k: e[k] for k in ("process", "devices", "rows", "device_rows") if k in e}
            for e in report["hosts"]
        ],
        "build_s": round(t1 - t0, 1),
        "lower_s": round(t2 - t1, 1),
        "compile_s": round(t3 - t2, 1),
    }


def _gib(b: float) -> str:
    return f"{b / 2**30:8.2f}"


def format_table(rows: list[dict], hbm_gib: float | None) -> str:
    head = (
        f"{'batch/dev':>9} {'params':>8} {'opt':>8} {'batch':>8} {'temp':>8} {'total':>8} "
        f"{'TFLOP/dev(xla)':>14} {'TFLOP/dev(model)':>16} {'fits':>5} {'compile s':>9}"
    )
    lines = ["per device, GiB", head]
    for r in rows:
        fits = "-" if hbm_gib is None else ("yes" if r["total_bytes"] <= hbm_gib * 2**30 else "no")
        lines.append(
            f"{r['batch_per_device']:>9} {_gib(r['params_bytes'])} {_gib(r['opt_state_bytes'])} "
            f"{_gib(r['batch_bytes'])} {_gib(r['temp_bytes'])} {_gib(r['total_bytes'])} "
            f"{r['flops_per_device_xla'] / 1e12:>14.1f} {r['flops_per_device_model'] / 1e12:>16.1f}"
            f" {fits:>5} {r['compile_s']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_device_count(args.devices, args.cpu_scheduler)
    config = load_config(args.config)  # may import jax: after set_device_count
    import jax

    from ppllava_jax import sharding

    for assignment in args.set:
        set_field(config, assignment)
    if args.remat is not None:
        config.model.remat_policy = args.remat
    if args.attention is not None:
        config.model.attention_impl = args.attention
    if args.scan is not None:
        config.model.scan_layers = args.scan == "true"
    if args.llm_layers is not None:
        if config.model.get("preset"):
            config.model.llm_layers = args.llm_layers
        else:
            config.model.llm.num_hidden_layers = args.llm_layers
    shape = plan_shape(config)
    if args.max_length is not None:
        shape["max_length"] = args.max_length
    if args.frames is not None:
        shape["frames"] = args.frames
    mesh_shape = parse_mesh(args.mesh) if args.mesh else dict(config.mesh.to_dict())
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: args.devices])
    sizes = args.batch_per_device or str(shape["per_device"])
    rows = []
    t0 = time.perf_counter()
    for i, n in enumerate(int(s) for s in sizes.split(",")):
        r = plan_one(
            config,
            mesh,
            n,
            shape=shape,
            show_params=args.params and i == 0,
            processes=args.processes,
        )
        if args.hbm_gib is not None:
            r["hbm_gib"] = args.hbm_gib
            r["fits"] = r["total_bytes"] <= args.hbm_gib * 2**30
        rows.append(r)
        print(json.dumps(r), flush=True)
    r0 = rows[0]
    print(
        f"\nPPLLaVA SFT plan: {r0['devices']} devices, mesh {r0['mesh']}, "
        f"{r0['frames']} frames x {r0['seq_len']} tokens, {r0['dtype']} compute, "
        f"remat={r0['remat']}, scan={r0['scan']}, attention={r0['attention']}, "
        f"loss_chunk_size={r0['loss_chunk_size']}; trainable {r0['trainable_params'] / 1e9:.2f}B, "
        f"frozen {r0['frozen_params'] / 1e9:.2f}B parameters"
    )
    print(format_table(rows, args.hbm_gib))
    for r in rows:
        print(
            f"\nbatch {r['batch_per_device']}/device on {r['processes']} host(s): "
            f"data.batch_size={r['rows_per_host']} rows per host"
        )
        print(sharding.format_host_layout(r["hosts"]))
    print(
        "(XLA CPU compiler's figures on simulated devices: TPU/GPU buffer assignment differs; "
        f"planning took {time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
