"""Achieved FLOP/s of the jitted PPLLaVA SFT train step vs a large dense matmul (and vs the chip's
bf16 peak on an accelerator: MFU).

    python benchmarks/utilisation.py            # vision 12 x 384 + BT-Adapter, LLM 8 x 512
    python benchmarks/utilisation.py --quick
    python benchmarks/utilisation.py --smoke

Model: a small PPLLaVA with every part (CLIP vision tower + BT-Adapter depth 2, CLIP text tower,
prompt-guided pooling (2, 2, 2) of 8 frames of 112 px = 64 visual tokens per video, LLaMA
decoder), random weights, every parameter trained (AdamW, clipping), scanned layers, remat off;
float32 on CPU, bfloat16 compute on an accelerator (``--dtype`` overrides).

FLOPs of the step: the analytic count of ``ppllava_jax.flops`` (3 x the forward
matmuls/attention of what the loss depends on; no remat recompute, optimizer not counted),
cross-checked against XLA's ``cost_analysis()`` of the same step compiled with *unscanned*
layers (XLA counts a scanned loop body once, so the scanned program's count is also printed to
show the under-count). Achieved FLOP/s = analytic FLOPs / median step time of the scanned step.

Reference: the FLOP/s of a jitted ``[n, n] @ [n, n]`` matmul on the same device in the same run
(n = 2048 float32 on CPU, 8192 bfloat16 on an accelerator). ``fraction_of_matmul`` = achieved /
matmul. On a GPU/TPU ``mfu`` = achieved / ``train.metrics.peak_flops_per_device()`` (the chip's
published dense bf16 peak); None on CPU (no published peak).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    "full": dict(vl=12, vw=384, ll=8, lw=512, img=112, frames=8, text=64, batch=2, mm=2048, rep=5),
    "quick": dict(vl=4, vw=192, ll=4, lw=256, img=56, frames=8, text=32, batch=2, mm=1024, rep=3),
    "smoke": dict(vl=2, vw=64, ll=2, lw=64, img=28, frames=2, text=16, batch=1, mm=256, rep=1),
}


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--dtype", default="", help="default: float32 on CPU, else bfloat16")
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size (default per size)")
    args, size, s, repeats = common.parse_size(ap, SIZES)
    jax = common.setup_jax()
    import flax.linen as nn

    from ppllava_jax import flops
    from ppllava_jax.models.ppllava import abstract_params
    from ppllava_jax.train.metrics import compiled_flops, peak_flops_per_device

    accel = jax.devices()[0].platform != "cpu"
    dtype = args.dtype or ("bfloat16" if accel else "float32")
    mm_n = args.matmul_n or (8192 if accel else s["mm"])
    kernel = (2, 2, 2) if s["img"] // 14 >= 4 else (2, 1, 1)
    clip_len = 16

    def make_cfg(scan: bool):
        return common.setting_config(
            s, size, text_layers=2, kernel=kernel, btadapter_depth=2, dtype=dtype, scan_layers=scan
        )

    cfg = make_cfg(True)
    batch = common.video_sft_batch(
        cfg, batch=s["batch"], frames=s["frames"], text_len=s["text"], clip_len=clip_len
    )
    length = int(batch["input_ids"].shape[1])
    videos = [(s["batch"], s["frames"], False)]  # one clip per row
    flops_model = flops.train_flops(cfg, s["batch"], length, videos, clip_len)
    parts = flops.forward_flops(cfg, s["batch"], length, videos, clip_len)
    jbatch = jax.tree.map(jax.numpy.asarray, batch)
    rng = jax.random.PRNGKey(0)

    # XLA's count of the unscanned step (abstract: nothing is allocated or run)
    cfg_u = make_cfg(False)
    init_u, step_u = common.sft_step(cfg_u)
    state_abs = jax.eval_shape(init_u, nn.unbox(abstract_params(cfg_u)))
    t0 = time.perf_counter()
    compiled_u = step_u.lower(state_abs, jbatch, rng).compile()
    flops_xla_unscanned = compiled_flops(compiled_u)
    unscanned_compile_s = time.perf_counter() - t0

    # the scanned step (what training runs): compile, run, time. --smoke times the unscanned
    # one instead (one compile less).
    timed_cfg = cfg_u if size == "smoke" else cfg
    params = common.random_params(timed_cfg)
    if size == "smoke":
        state, compiled, compile_s = init_u(params), compiled_u, unscanned_compile_s
        flops_xla_scanned = None
    else:
        init_state, step = common.sft_step(cfg)
        state = init_state(params)
        t0 = time.perf_counter()
        compiled = step.lower(state, jbatch, rng).compile()
        compile_s = time.perf_counter() - t0
        flops_xla_scanned = compiled_flops(compiled)
    holder = {"state": state}

    def run():
        holder["state"], m = compiled(holder["state"], jbatch, rng)
        return m

    times = common.time_calls(run, repeats, warmup=args.warmup)
    st = common.summary(times)
    mm = common.matmul_flops_per_s(mm_n, max(repeats, 3), dtype)
    common.emit("matmul", size=size, **mm)
    achieved = flops_model / st["median_s"]
    peak = peak_flops_per_device()
    common.emit(
        "utilisation",
        size=size,
        batch=s["batch"],
        frames=s["frames"],
        seq_len=length,
        **common.model_shape(s),
        pooling=f"ppllava{kernel}",
        dtype=dtype,
        step_s=st["median_s"],
        timed_step_scanned=timed_cfg.scan_layers,
        **{f"step_{k}": v for k, v in st.items() if k != "median_s"},
        compile_s=round(compile_s, 3),
        flops_model=flops_model,
        flops_model_forward_parts=parts,
        flops_xla_unscanned=flops_xla_unscanned,
        flops_xla_scanned=flops_xla_scanned,
        model_over_xla_unscanned=(
            round(flops_model / flops_xla_unscanned, 3) if flops_xla_unscanned else None
        ),
        unscanned_compile_s=round(unscanned_compile_s, 3),
        achieved_flops_per_s=achieved,
        matmul_flops_per_s=mm["flops_per_s"],
        fraction_of_matmul=round(achieved / mm["flops_per_s"], 4),
        peak_flops_per_s=peak,
        mfu=(round(achieved / peak, 4) if peak else None),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
