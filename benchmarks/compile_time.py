"""Compile time of the demo-sized PPLLaVA SFT train step vs LLM depth, scan on and off.

    python benchmarks/compile_time.py            # LLM depths 2 and 16, scan on and off
    python benchmarks/compile_time.py --quick    # depths 2 and 16, scan on only

A tiny PPLLaVA (the reference fixture's sizes: CLIP 4 layers / width 32, BT-Adapter depth 2,
LLaMA width 48) with the LLM at each depth; the train step of ``ppllava_jax.train.step``
(AdamW on the SPEC section 7 trainable set, remat 'full') is lowered and compiled ahead of time
on one CPU device, without the persistent compilation cache, ``--repeat`` times after
``jax.clear_caches()`` (the fastest counts: other processes share the CPU). Prints one JSON line
per point (``lower_s``, ``compile_s``) and a summary line with the 16/2 ratios. Never fails on
time.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests/fixtures/reference_ppllava"


def main() -> int:
    ap = common.script_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="scan on only")
    ap.add_argument("--depths", default="2,16", help="LLM depths")
    ap.add_argument("--repeat", type=int, default=2, help="compiles per point; the fastest counts")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))

    import flax.linen as nn
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)

    from ppllava_jax.convert.ppllava_config import ppllava_config_from_hf
    from ppllava_jax.models.ppllava import PPLLaVA, abstract_params
    from ppllava_jax.train.optimizer import make_optimizer, trainable_predicate
    from ppllava_jax.train.run import make_apply
    from ppllava_jax.train.state import create_train_state
    from ppllava_jax.train.step import make_train_step
    from ppllava_jax.train.trainer import default_config

    hf = json.loads((REF / "config.json").read_text())
    clip = json.loads((REF / "clip/config.json").read_text())
    config = default_config()
    tx, schedule = make_optimizer(config.optimizer, int(config.train.total_steps))
    pred = trainable_predicate(config.optimizer)
    b, length, frames = 2, 64, 8

    def batch_abstract(cfg):
        s = cfg.vision.image_size
        sd = jax.ShapeDtypeStruct
        out = {k: sd((b, length), np.int32) for k in ("input_ids", "visual_index", "positions")}
        out.update(
            attention_mask=sd((b, length), np.int32),
            labels=sd((b, length), np.int32),
            video_pixels=sd((b, frames, s, s, 3), np.float32),
            video_frames=sd((b, frames), np.bool_),
            video_clip_ids=sd((b, 16), np.int32),
            video_clip_mask=sd((b, 16), np.int32),
        )
        return out

    results = {}
    for scan in (True,) if args.quick else (True, False):
        for depth in (int(d) for d in args.depths.split(",")):
            base = ppllava_config_from_hf(hf, clip, scan_layers=scan, remat_policy="full")
            cfg = base.replace(llm=base.llm.replace(num_hidden_layers=depth))
            params = nn.unbox(abstract_params(cfg))
            state = jax.eval_shape(lambda p: create_train_state(p, tx, pred), params)
            apply_fn = make_apply(PPLLaVA(cfg))  # what train.py runs (dropout keyed by rng)
            step = make_train_step(apply_fn, config, "sft", tx=tx, schedule=schedule)
            rng = jax.ShapeDtypeStruct((2,), np.uint32)
            best = None
            for _ in range(max(args.repeat, 1)):
                jax.clear_caches()  # nothing traced or compiled is reused
                t0 = time.perf_counter()
                lowered = jax.jit(step).lower(state, batch_abstract(cfg), rng)
                t1 = time.perf_counter()
                compiled = lowered.compile()
                t2 = time.perf_counter()
                if best is None or t2 - t0 < best[1] - best[0] + best[2] - best[1]:
                    best = (t0, t1, t2)
            t0, t1, t2 = best
            cost = compiled.cost_analysis()
            cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
            rec = {
                "bench": "compile_time",
                "llm_layers": depth,
                "scan": scan,
                "remat": "full",
                "lower_s": round(t1 - t0, 2),
                "compile_s": round(t2 - t1, 2),
                "flops_xla": float(cost.get("flops", 0.0)),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__}",
            }
            results[(scan, depth)] = rec
            print(json.dumps(rec), flush=True)
    depths = [int(d) for d in args.depths.split(",")]
    summary = {"bench": "compile_time_summary"}
    for scan in (True, False):
        if (scan, depths[0]) in results and (scan, depths[-1]) in results:
            lo, hi = results[(scan, depths[0])], results[(scan, depths[-1])]
            summary[f"ratio_{depths[-1]}_over_{depths[0]}_scan_{str(scan).lower()}"] = round(
                (hi["lower_s"] + hi["compile_s"]) / max(lo["lower_s"] + lo["compile_s"], 1e-9), 2
            )
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
