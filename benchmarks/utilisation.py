"""Achieved FLOP/s of the jitted PPLLaVA SFT train step vs a large dense matmul (and vs the chip's
bf16 peak on an accelerator: MFU).

    python benchmarks/utilisation.py            # vision 12 x 384 + BT-Adapter, LLM 8 x 512
    python benchmarks/utilisation.py --quick
    python benchmarks/utilisation.py --smoke
    python benchmarks/utilisation.py --small    # issue 15's "small" setting: step and forward

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

``--small``: issue 15's "small" setting, the SFT step that ``profile_step.py`` profiles (CLIP
vision 12 x 384 at 168 px + BT-Adapter, CLIP text 4 x 256 over 248 positions, LLaMA 8 x 512 with a
32,064 vocabulary, 2 videos x 8 frames, pooling (2, 3, 3), trainable set ``ppllava_sft``: the CLIP
trunk and text tower frozen, counted once; the loss's LM head at the supervised positions only,
counted there) and the model's forward (``deterministic``, logits over every position, counted
there); each as a fraction of the same run's matmul FLOP/s.
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
    ap.add_argument("--small", action="store_true", help="issue 15's small setting (above)")
    args, size, s, repeats = common.parse_size(ap, SIZES)
    if args.small:
        return small(args, repeats)
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


def small(args, repeats: int | None) -> int:
    """Utilisation of the train step and of the forward in the "small" setting (``--small``)."""
    import profile_step

    jax = common.setup_jax()
    import numpy as np

    from ppllava_jax.data.collate import TARGET_POSITIONS
    from ppllava_jax.models.ppllava import PPLLaVA
    from ppllava_jax.train.optimizer import merge_params

    s = profile_step.SIZES["full"]
    repeats = repeats or 5
    cfg = profile_step.setting_config(s)
    compiled, state, batch, rng, compile_s = profile_step.step_setup(s, s["clip_real"])
    length = batch["input_ids"].shape[1]
    clip_run = int(batch["video_clip_ids"].shape[1])  # cut to 64 as train.py does
    step_flops, fwd = common.sft_step_flops(cfg, state, batch, s["frames"])
    k = int(np.asarray(batch[TARGET_POSITIONS]).shape[1])

    model = PPLLaVA(cfg)
    params = merge_params(state.params, state.frozen)
    inputs = {k_: v for k_, v in batch.items() if k_ not in ("labels", TARGET_POSITIONS)}
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b)["logits"])
    forward = forward.lower(params, inputs).compile()

    def step():
        return compiled(state, batch, rng)

    n = args.matmul_n or 2048
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jax.numpy.float32)
    matmul = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    step_t, fwd_t, mm_t = [], [], []
    common.block(step())
    common.block(forward(params, inputs))
    common.block(matmul(a, a))
    for _ in range(repeats):  # alternating, so a shared machine's load hits all three alike
        step_t += common.time_calls(step, 1, warmup=0)
        fwd_t += common.time_calls(lambda: forward(params, inputs), 1, warmup=0)
        mm_t += common.time_calls(lambda: matmul(a, a), 1, warmup=0)
    st, ft, mt = common.summary(step_t), common.summary(fwd_t), common.summary(mm_t)
    mm = {"n": n, "dtype": "float32", **mt, "flops_per_s": 2 * n**3 / mt["median_s"]}
    common.emit("matmul", size="small", **mm)
    common.emit(
        "utilisation_small",
        **{k_: v for k_, v in s.items() if k_ != "steps"},
        seq_len=int(length),
        loss_positions=k,
        clip_positions_run=clip_run,
        trainable="ppllava_sft",
        step_s=st["median_s"],
        step_min_s=st["min_s"],
        forward_s=ft["median_s"],
        forward_min_s=ft["min_s"],
        compile_s=round(compile_s, 3),
        flops_step=step_flops,
        flops_forward=fwd["total"],
        matmul_flops_per_s=mm["flops_per_s"],
        step_fraction_of_matmul=round(step_flops / st["median_s"] / mm["flops_per_s"], 4),
        forward_fraction_of_matmul=round(fwd["total"] / ft["median_s"] / mm["flops_per_s"], 4),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
