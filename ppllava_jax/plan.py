r"""Memory and cost plan of the real 7B SFT train step, before renting a slice.

    python -m ppllava_jax.plan --config configs/ppllava_vicuna7b_videoonly.py \
        --devices 64 --mesh fsdp=64 --batch-per-device 1,2,4 --hbm-gib 16

Simulates ``--devices`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``, set
here before JAX is imported, so this module imports nothing from JAX at the top), builds the
PPLLaVA config of the file's ``model`` section (7B: CLIP ViT-L/14-336 24 layers + BT-Adapter
depth 4, CLIP text 12 layers / 248 positions, Vicuna-7B 32 layers, vocab 32064), the train state
(trainable / frozen split and AdamW moments of the trainable set, docs/MODEL.md §7) and a batch of
``per-device x data-parallel ranks x train.grad_accum_steps`` 32-frame 336px videos with merged
sequences of ``batch.max_length`` tokens, all as abstract arrays with their shardings. The step
is the trainer's own (``train.program.train_program``: ``train.py``'s set-up, apply and
``CompiledStep``) and the batch is what ``train.py`` feeds it (``train.program``: collated as the
pipeline does, with the loss's ``target_positions`` when ``train.logits_at_targets_only``, CLIP
prompts trimmed when ``train.trim_clip_prompts``; every text token after the video supervised
and whole CLIP prompts unless ``--targets`` / ``--clip-tokens`` say how many a row has). It
lowers and compiles that step ahead of time and prints, per device: parameter
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
    p.add_argument(
        "--targets",
        type=int,
        default=0,
        help="supervised tokens per row (the loss's target_positions; default: every text "
        "token after the video, the most a row holds)",
    )
    p.add_argument(
        "--clip-tokens",
        type=int,
        default=0,
        help="real CLIP prompt tokens (train.py trims the prompts to them, rounded up to a "
        "power of two >= 64; default: the whole prompt length)",
    )
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


def _nbytes_per_device(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s ``ShapeDtypeStruct``s (each by its sharding)."""
    import jax
    import numpy as np

    return sum(
        int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(tree)
    )


def planned_model(config: Any) -> Any:
    """The ``PPLLaVAConfig`` to plan: the 7B recipe of ``model.preset``, else the model
    ``train.py`` builds from the config (``train.model_config``)."""
    from ppllava_jax.train.model_config import model_config, preset_model_config

    if config.model.get("preset"):
        return preset_model_config(config.model)
    return model_config(config)


def plan_shape(config: Any) -> dict[str, int]:
    """The planned batch: ``max_length`` (merged tokens per row), ``per_device`` (rows per
    data-parallel rank and micro-batch), ``frames`` (per video) and ``clip_length`` (CLIP prompt
    positions): the ``batch`` section's, the frames and prompt length of a preset from its
    ``model`` section; ``targets`` (supervised tokens per row) and ``clip_tokens`` (real CLIP
    prompt tokens) 0: the most a row holds (``train.program.planned_host_batch``)."""
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
        "targets": 0,
        "clip_tokens": 0,
    }


def planned_program(config: Any, mesh: Any, per_device: int, shape: dict[str, int]) -> Any:
    """The trainer's step and its abstract arguments (``train.program.train_program``) for
    ``per_device`` rows per data-parallel rank and micro-batch, ``train.grad_accum_steps``
    micro-batches, of ``planned_host_batch`` rows of ``shape`` (``plan_shape``)."""
    from ppllava_jax.train import program

    cfg = planned_model(config)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    host = program.planned_host_batch(
        config,
        cfg,
        rows=per_device * dp * program.micro_batches(config),
        length=shape["max_length"],
        frames=shape["frames"],
        clip_length=shape["clip_length"],
        targets=shape.get("targets", 0),
        clip_tokens=shape.get("clip_tokens", 0),
    )
    return program.train_program(config, cfg, mesh, host)


def plan_one(
    config: Any,
    mesh: Any,
    per_device: int,
    *,
    shape: dict[str, int] | None = None,
    show_params: bool = False,
    processes: int = 1,
) -> dict:
    """Lower and compile the trainer's step (``planned_program``) for one batch size; returns
    the figures (bytes per device, FLOPs) and ``hosts`` (``sharding.host_layout`` for
    ``processes`` hosts: each one's devices and the rows of the global batch it feeds,
    ``data.batch_size`` = rows per host) as a dict. ``shape``: ``plan_shape(config)`` (with the
    command line's changes)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from ppllava_jax import flops, sharding
    from ppllava_jax.data.collate import TARGET_POSITIONS
    from ppllava_jax.models.ppllava import abstract_params
    from ppllava_jax.train.optimizer import param_paths

    t0 = time.perf_counter()
    cfg = planned_model(config)
    shape = shape or plan_shape(config)
    prog = planned_program(config, mesh, per_device, shape)
    host = prog.host_batch
    global_batch, length = (int(n) for n in host["input_ids"].shape)
    if global_batch % processes:
        raise ValueError(
            f"a global batch of {global_batch} rows does not split over {processes} processes"
        )
    report = sharding.sharding_report(
        abstract_params(cfg), mesh, processes=processes, rows_per_host=global_batch // processes
    )
    if show_params:
        print(sharding.format_report(report))
    if report["unnamed"]:
        raise ValueError(f"parameters without logical axis names: {report['unnamed']}")
    with sharding.mesh_context(mesh):
        t1 = time.perf_counter()
        lowered = prog.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    st = prog.state
    arg_b = int(getattr(mem, "argument_size_in_bytes", 0))
    out_b = int(getattr(mem, "output_size_in_bytes", 0))
    alias_b = int(getattr(mem, "alias_size_in_bytes", 0))
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    n_dev = mesh.devices.size
    pred = prog.setup.predicate
    trained = [p for p in param_paths(nn.unbox(abstract_params(cfg))) if pred(p)]
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    return {
        "devices": int(n_dev),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "mode": prog.setup.mode,
        "batch_per_device": per_device,
        "grad_accum_steps": int(config.train.get("grad_accum_steps", 1)),
        "global_batch": global_batch,
        "seq_len": length,
        "frames": int(host["video_pixels"].shape[1]),
        "target_positions": int(host[TARGET_POSITIONS].shape[1]) if TARGET_POSITIONS in host else 0,
        "clip_positions": int(host["video_clip_ids"].shape[1]) if "video_clip_ids" in host else 0,
        "remat": cfg.remat_policy,
        "attention": cfg.attention_impl,
        "loss_chunk_size": int(config.train.get("loss_chunk_size", 0)),
        "scan": cfg.scan_layers,
        "dtype": cfg.dtype,
        "cpu_scheduler": cpu_scheduler(),
        "trainable_params": count(st.params),
        "frozen_params": count(st.frozen),
        "params_bytes": _nbytes_per_device(st.params) + _nbytes_per_device(st.frozen),
        "opt_state_bytes": _nbytes_per_device(st.opt_state),
        "batch_bytes": _nbytes_per_device(prog.batch),
        "argument_bytes": arg_b,
        "output_bytes": out_b,
        "alias_bytes": alias_b,
        "temp_bytes": temp_b,
        "code_bytes": int(getattr(mem, "generated_code_size_in_bytes", 0)),
        "total_bytes": arg_b + out_b - alias_b + temp_b,
        "flops_per_device_xla": float(cost.get("flops", 0.0)) if cost else 0.0,
        # the trainer's count (MFU): the prepared batch, trimmed CLIP prompts included
        "flops_per_device_model": flops.batch_train_flops(cfg, host, trained) / n_dev,
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
    shape["targets"], shape["clip_tokens"] = args.targets, args.clip_tokens
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
        f"\nPPLLaVA {r0['mode'].upper()} plan: {r0['devices']} devices, mesh {r0['mesh']}, "
        f"{r0['frames']} frames x {r0['seq_len']} tokens ({r0['target_positions']} loss "
        f"positions, CLIP prompts of {r0['clip_positions']}), {r0['dtype']} compute, "
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
    sys.exit(command_line.report_user_errors(main))
