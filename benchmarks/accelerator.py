"""Issue 15's accelerator figures at 7B width, in one run: the MFU of a 7B-shaped SFT step, the
time to answer a 32-frame video with pooled vs all visual tokens, and cached decoding tokens/s.

    python benchmarks/accelerator.py                  # on an NVIDIA GPU (or a TPU): every part
    python benchmarks/accelerator.py --parts step     # one part (probe, step, generate)
    python benchmarks/accelerator.py --smoke          # tiny shapes, any backend (smoke test)

(``--quick`` is ``--smoke`` here: the figures exist only at the 7B shapes.)

Every part prints its JSON lines as soon as it is measured; a part that fails prints one
``accelerator_error`` line (the exception, the attention implementation it ran) and is run
once more with the reference ``attention_impl='xla'`` (unless that failed); the next part runs
either way. ``--budget-s`` skips the parts that would start after that many seconds.

- ``probe``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (through
  ``models.attention``) at the shapes the 7B model runs, forward and backward: the CLIP tower
  (frames x 577 tokens, 16 heads of 64), the BT-Adapter's temporal attention (patches x 32
  frames), the LLM prefill with a dense padding + causal mask (32 heads of 128) and one cached
  decoding step (1 query); each ``ok`` or the error. What ``attention_impl='auto'`` chooses.
- ``step``: the SFT train step (``train.step.make_train_step``, AdamW + clipping, trainable set
  ``ppllava_sft``: CLIP trunk and text tower frozen, as the 7B recipes) of the 7B architecture
  (``PPLLaVAConfig()``: CLIP ViT-L/14-336 + BT-Adapter depth 4, CLIP text tower, prompt-guided
  pooling (2, 3, 3) -> 1,024 tokens per video, LLaVA MLP) with **4** LLaMA-7B-width layers
  (4096 wide, 32 heads, MLP 11,008, vocabulary 32,064), bf16 compute, float32 parameters and
  moments, scanned layers, remat ``--remat`` (none), ``attention_impl`` ``--attention`` (auto:
  cuDNN on NVIDIA); ``--videos`` (2) videos of 32 frames x 336 px per step, 64 text tokens, a
  40-token CLIP prompt (cut to 64 positions and the loss's LM head at the supervised positions,
  as ``train.py`` feeds it). MFU = analytic model FLOPs (``ppllava_jax.flops``; frozen trunk
  counted once, no remat recompute) / median step time / the chip's dense bf16 peak
  (``train.metrics.peak_flops_per_device``); ``fraction_of_matmul`` against an 8192^3 bf16
  matmul of the same run.
- ``generate``: first cached greedy decoding of the 7B model below with the pooled prompt at
  batch 1 and 8 (``--decode-batches``): tokens/s = B x N / (generate - prefill), N =
  ``--new-tokens`` (64); then the time to answer (one jitted ``generate.generate``: vision
  tower + BT-Adapter, projector, merge, prefill, N greedy cached steps, EOS off) one 32-frame
  336 px video with the whole LLaMA-7B (32 layers, bf16 parameters and compute, random weights),
  pooling ``ppllava`` (1,024 visual tokens) vs ``none`` (all 18,432): ``none_over_ppllava``.
  The decoder's weights per layer, as ``evaluate.model_setup.load_setup`` answers (``--layers
  scanned``: stacked, as training stores them; the H100 figures of session 7 are scanned).
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    "full": dict(frames=32, step_llm=4, answer_llm=32, text=64, clip_real=40, new=64, rep=10,
                 gen_rep=3, mm=8192, decode="1,8", tiny=False),
    "smoke": dict(frames=4, step_llm=2, answer_llm=2, text=16, clip_real=8, new=4, rep=1,
                  gen_rep=1, mm=256, decode="1,2", tiny=True),
}  # fmt: skip
PARTS = ("probe", "step", "generate")


def model_config(s: dict, llm_layers: int, **runtime):
    """The 7B recipes' model (``configs/common.vicuna7b_model``) with ``llm_layers`` decoder
    layers and the ``runtime`` fields; ``--smoke``: a tiny model of the same parts."""
    from configs import common as recipes
    from ppllava_jax.convert.api import with_runtime
    from ppllava_jax.train.model_config import preset_model_config

    if s["tiny"]:
        cfg = common.ppllava_config(
            vision_layers=2,
            vision_width=64,
            llm_layers=llm_layers,
            llm_width=128,
            image_size=42,
            vocab_size=256,
            text_width=64,
            clip_positions=32,
        )
    else:
        m = recipes.vicuna7b_model()
        m.llm_layers = llm_layers
        cfg = preset_model_config(m)
    return with_runtime(cfg, **runtime)


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of " + str(PARTS))
    ap.add_argument("--videos", type=int, default=2, help="videos per train step")
    ap.add_argument("--remat", default="none", help="remat_policy of the train step")
    ap.add_argument("--attention", default="auto", help="attention_impl (auto: cuDNN on GPU)")
    ap.add_argument("--new-tokens", type=int, default=0, help="decoded tokens (default 64)")
    ap.add_argument("--budget-s", type=float, default=0, help="start no part after this")
    ap.add_argument("--no-fallback", action="store_true", help="no xla rerun of a failed part")
    ap.add_argument("--decode-batches", default="", help="batch sizes of the decoding rate")
    ap.add_argument(
        "--layers", default="per_layer", choices=("per_layer", "scanned"), help="generate part"
    )
    args, size, s, repeats = common.parse_size(ap, {**SIZES, "quick": SIZES["smoke"]})
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    jax = common.setup_jax()
    accel = jax.default_backend() != "cpu"
    dtype = "bfloat16" if accel else "float32"
    t_start = time.perf_counter()
    common.emit("accelerator_start", size=size, parts=parts, dtype=dtype, jax=jax.__version__)
    for part in parts:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            common.emit("accelerator_skipped", part=part, reason=f"--budget-s {args.budget_s}")
            continue
        fallback = args.attention != "xla" and not args.no_fallback
        impls = [args.attention, "xla"] if fallback else [args.attention]
        for impl in impls if part != "probe" else [impl for impl in impls if impl != "xla"]:
            try:
                RUNS[part](args, s, repeats, dtype=dtype, impl=impl)
                break
            except Exception as e:  # noqa: BLE001 - report, try the reference kernel, go on
                common.emit(
                    "accelerator_error",
                    part=part,
                    attention_impl=impl,
                    error=f"{type(e).__name__}: {str(e)[:2000]}",
                    where=traceback.format_exc()[-1500:],
                )
            finally:
                gc.collect()
    common.emit("accelerator_done", seconds=round(time.perf_counter() - t_start, 1))
    return 0


# ----------------------------------------------------------------------------- probe


def probe(args, s: dict, repeats, *, dtype: str, impl: str) -> None:
    """cuDNN attention (and what ``auto`` picks) at the 7B model's attention shapes."""
    import jax
    import jax.numpy as jnp

    from ppllava_jax.models.attention import choose_impl

    cfg = model_config(s, 1)
    v, llm = cfg.vision, cfg.llm
    n_tok = v.num_patches + 1
    vh = v.hidden_size // v.num_attention_heads
    fr = s["frames"]
    prompt = 1024 + 88
    dt = jnp.dtype(dtype)
    causal = jnp.tril(jnp.ones((prompt, prompt), bool))
    pad = jnp.arange(prompt) >= 8  # 8 left-padding keys
    shapes = {  # name: (q [B,T,N,H], k [B,S,K,H], mask)
        "clip_tower": ((fr, n_tok, v.num_attention_heads, vh), None, None),
        "btadapter_temporal": ((v.num_patches, fr, v.num_attention_heads, vh), None, None),
        "llm_prefill_masked": (
            (1, prompt, llm.num_attention_heads, llm.head_dim),
            None,
            (causal & pad[None, :])[None, None],
        ),
        "llm_decode_step": (
            (8, 1, llm.num_attention_heads, llm.head_dim),
            (8, prompt + 64, llm.num_key_value_heads, llm.head_dim),
            (jnp.arange(prompt + 64) < prompt + 1)[None, None, None, :],
        ),
    }
    rows = {}
    for name, (qs, ks, mask) in shapes.items():
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(kq, qs, dt)
        k = jax.random.normal(kk, ks or qs, dt)
        val = jax.random.normal(kv, ks or qs, dt)
        rows[name] = {
            "q": list(qs),
            "k": list(ks or qs),
            "mask": mask is not None,
            "auto_chooses": choose_impl(q, k, mask=mask),
            **_probe_one(q, k, val, mask, impl),
        }
    common.emit("accelerator_probe", attention_impl=impl, dtype=dtype, shapes=rows)


def _probe_one(q, k, val, mask, impl: str) -> dict:
    """Forward (error relative to the ``xla`` path, milliseconds) and backward of one shape."""
    import jax
    import jax.numpy as jnp

    from ppllava_jax.models.attention import dot_product_attention

    # the loss reads only query rows that see a key: a row that sees none (left padding) is
    # defined differently by the kernels, and no training loss reads it
    seen = jnp.ones((1, q.shape[1], 1, 1)) if mask is None else jnp.any(mask, -1)
    seen = seen if mask is None else jnp.moveaxis(seen, 1, 2)[..., None].astype(jnp.float32)

    def loss(q, k, val):
        out = dot_product_attention(q, k, val, mask=mask, impl=impl)
        return jnp.sum((out.astype(jnp.float32) * seen) ** 2)

    row = {}
    attend = jax.jit(lambda q, k, val: dot_product_attention(q, k, val, mask=mask, impl=impl))
    ref = jax.jit(lambda q, k, val: dot_product_attention(q, k, val, mask=mask))
    try:
        got = attend(q, k, val).astype(jnp.float32)
        want = ref(q, k, val).astype(jnp.float32)
        row["forward"] = "ok"
        err = jnp.linalg.norm((got - want) * seen) / jnp.linalg.norm(want * seen)
        row["rel_err_vs_xla"] = float(err)
        times = common.time_calls(lambda: attend(q, k, val), 5)
        row["ms"] = round(1e3 * common.summary(times)["median_s"], 3)
    except Exception as e:  # noqa: BLE001 - the probe's finding
        row["forward"] = f"{type(e).__name__}: {str(e)[:300]}"

    def ref_loss(q, k, val):
        out = dot_product_attention(q, k, val, mask=mask)
        return jnp.sum((out.astype(jnp.float32) * seen) ** 2)

    try:
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, val)
        want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, val)
        row["backward"] = "ok"
        row["grad_rel_err_vs_xla"] = [
            float(jnp.linalg.norm((a - e).astype(jnp.float32)) / jnp.linalg.norm(e))
            for a, e in zip(grads, want)
        ]
    except Exception as e:  # noqa: BLE001
        row["backward"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


# ----------------------------------------------------------------------------- the train step


def step(args, s: dict, repeats, *, dtype: str, impl: str) -> None:
    """The 7B-shaped SFT step's time, model FLOPs and MFU."""
    import jax

    from ppllava_jax.train.batches import with_target_positions, with_trimmed_clip_prompts
    from ppllava_jax.train.metrics import peak_flops_per_device

    cfg = model_config(
        s,
        s["step_llm"],
        dtype=dtype,
        param_dtype="float32",
        scan_layers=True,
        remat_policy=args.remat,
        attention_impl=impl,
    )
    batch = common.video_sft_batch(
        cfg,
        batch=args.videos,
        frames=s["frames"],
        text_len=s["text"],
        clip_len=cfg.clip_text.max_position_embeddings,
        clip_real=s["clip_real"],
    )
    batch = jax.tree.map(jax.numpy.asarray, with_trimmed_clip_prompts(with_target_positions(batch)))
    init_state, step_fn = common.sft_step(cfg, trainable="ppllava_sft")
    t0 = time.perf_counter()
    state = init_state(common.random_params(cfg))
    common.block(state)
    init_s = time.perf_counter() - t0
    flops_step, flops_fwd = common.sft_step_flops(cfg, state, batch, s["frames"])
    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    del state

    def run():
        holder["state"], m = compiled(holder["state"], batch, rng)
        return m

    losses = [float(run()["loss"]) for _ in range(2)]
    st = common.summary(common.time_calls(run, repeats, warmup=args.warmup))
    mm = common.matmul_flops_per_s(s["mm"], 10, "bfloat16" if dtype == "bfloat16" else dtype)
    common.emit("matmul", **mm)
    peak = peak_flops_per_device()
    achieved = flops_step / st["median_s"]
    mem = _memory_gib()
    common.emit(
        "accelerator_step",
        model=_model_name(cfg),
        videos=args.videos,
        frames=s["frames"],
        seq_len=int(batch["input_ids"].shape[1]),
        loss_positions=int(batch["target_positions"].shape[1]),
        clip_positions_run=int(batch["video_clip_ids"].shape[1]),
        trainable="ppllava_sft",
        dtype=dtype,
        remat=args.remat,
        attention_impl=impl,
        step_s=st["median_s"],
        step_min_s=st["min_s"],
        repeats=st["repeats"],
        compile_s=round(compile_s, 2),
        init_s=round(init_s, 2),
        first_losses=losses,
        flops_step=flops_step,
        flops_forward_parts={k: v for k, v in flops_fwd.items() if v},
        achieved_flops_per_s=achieved,
        matmul_flops_per_s=mm["flops_per_s"],
        fraction_of_matmul=round(achieved / mm["flops_per_s"], 4),
        peak_flops_per_s=peak,
        mfu=round(achieved / peak, 4) if peak else None,
        **mem,
    )


def _model_name(cfg) -> str:
    v, llm = cfg.vision, cfg.llm
    return (
        f"CLIP {v.num_hidden_layers} x {v.hidden_size} at {v.image_size} px + BT-Adapter "
        f"{cfg.btadapter_depth}, LLaMA {llm.num_hidden_layers} x {llm.hidden_size}"
    )


def _memory_gib() -> dict:
    """Peak and in-use device memory (GiB) where the backend reports it."""
    import jax

    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        st = {}
    g = lambda k: round(st[k] / 2**30, 2) if k in st else None  # noqa: E731
    return {"peak_gib": g("peak_bytes_in_use"), "in_use_gib": g("bytes_in_use")}


# ----------------------------------------------------------------------------- answer, decode


def _prompts(cfg, frames: int, batch: int, clip_len: int, seed: int = 0):
    """A left-padded generation batch of ``batch`` videos with their questions (24 + b text
    tokens in row b) and CLIP prompts of ``clip_len`` tokens."""
    import jax
    import numpy as np

    from ppllava_jax.data.collate import Media, Sample, collate

    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    v = cfg.llm.vocab_size
    samples = []
    for b in range(batch):
        text = rng.integers(3, min(v - 1, cfg.image_token_index) - 1, 24 + b)
        ids = np.concatenate([[1], text[:7], [cfg.image_token_index], text[7:]])
        pixels = rng.standard_normal((frames, size, size, 3)).astype(np.float32)
        samples.append(
            Sample(
                ids.astype(np.int32),
                media=Media("video", pixels),
                clip_ids=rng.integers(3, 500, clip_len).astype(np.int32),
                clip_mask=np.ones(clip_len, np.int32),
            )
        )
    out = collate(samples, cfg, padding_side="left")
    return {k: jax.numpy.asarray(x) for k, x in out.items() if k != "labels"}


def _generation(args, s: dict, pooling: str, batches, *, dtype: str, impl: str, prefill: bool):
    """``{batch: (generate summary, prefill summary or None, info)}`` for the 7B model."""
    import dataclasses

    from ppllava_jax.convert.api import per_layer
    from ppllava_jax.generate import SamplingConfig
    from ppllava_jax.models.ppllava import PPLLaVA

    runtime = dict(dtype=dtype, param_dtype=dtype, scan_layers=True, attention_impl=impl)
    cfg = dataclasses.replace(model_config(s, s["answer_llm"], **runtime), pooling=pooling)
    new = args.new_tokens or s["new"]
    sc = SamplingConfig(max_new_tokens=new, eos_token_id=-1, pad_token_id=cfg.pad_token_id)
    params = common.random_params(cfg)
    if args.layers == "per_layer":  # as evaluate.model_setup.load_setup answers
        cfg, params = per_layer(cfg, params)
    model = PPLLaVA(cfg)
    out = {}
    for bsz in batches:
        batch = _prompts(cfg, s["frames"], bsz, s["clip_real"])
        run = common.generate_run(model, params, batch, sc, prefill=prefill)
        common.time_generate_runs({bsz: run}, args.warmup, s["gen_rep"])
        out[bsz] = (
            common.summary(run["tg"]),
            common.summary(run["tp"]) if prefill else None,
            {**run["info"], "new_tokens": new, "model": _model_name(cfg), "layers": args.layers},
        )
        del run
        gc.collect()
    out["memory"] = _memory_gib()
    return out


def generate(args, s: dict, repeats, *, dtype: str, impl: str) -> None:
    """Cached decoding tokens/s at batch 1 and 8 with the pooled prompt, then the time to answer
    one video pooled (1,024 tokens at 32 frames) vs with all its tokens."""
    decode_batches = sorted({1, *(int(x) for x in (args.decode_batches or s["decode"]).split(","))})
    res = {}
    for pooling in ("ppllava", "none"):
        batches = decode_batches if pooling == "ppllava" else (1,)
        pre = pooling == "ppllava"  # the decoding rate needs it; time to answer does not
        r = _generation(args, s, pooling, batches, dtype=dtype, impl=impl, prefill=pre)
        for bsz in batches:
            g, p, info = r[bsz]
            loop = g["median_s"] - p["median_s"] if p else 0.0
            n = info["new_tokens"]
            common.emit(
                "accelerator_generate",
                pooling=pooling,
                batch=bsz,
                dtype=dtype,
                attention_impl=impl,
                frames=s["frames"],
                **info,
                answer_s=g["median_s"],
                answer_min_s=g["min_s"],
                prefill_s=p["median_s"] if p else None,
                decode_tokens_per_s=round(bsz * n / loop, 1) if loop > 0 else None,
                ms_per_step=round(1e3 * loop / n, 3) if loop > 0 else None,
                **r["memory"],
            )
        res[pooling] = r[1][0]["median_s"]
    common.emit(
        "accelerator_answer_ratio",
        answer_s=res,
        none_over_ppllava=round(res["none"] / res["ppllava"], 3),
    )


RUNS = {"probe": probe, "step": step, "generate": generate}


if __name__ == "__main__":
    sys.exit(main())
