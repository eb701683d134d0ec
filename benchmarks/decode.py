"""Cached decoding speed: prefill time and tokens per second at batch 1 and 8, with the decoder's
layers as ``evaluate.model_setup.load_setup`` answers (per layer) and as training stores them
(scanned: stacked, sliced per layer inside the decoding loop).

    python benchmarks/decode.py                                  # the demo model, 64 new tokens
    python benchmarks/decode.py --llm-layers 8 --llm-width 768   # a wider decoder
    python benchmarks/decode.py --quick                          # 32 new tokens
    python benchmarks/decode.py --smoke                          # 4 new tokens, batch 2

Model: the ``model`` section of ``configs/demo.py`` (random weights, float32), its LLaMA
optionally ``--llm-layers`` deep and ``--llm-width`` wide (heads of 64, MLP 8/3 x). Both layouts
hold the same numbers (``convert.api.unstack_layers``). Prompt per row: an 8-frame video
between ``bos`` + 7 and 40 text tokens, left-padded by ``data.collate`` to a 128-token bucket.

- ``prefill_s``: the jitted ``PPLLaVA.prefill`` (vision tower, projector, merge, LLM over the
  prompt, KV cache filled), median after warm-up.
- ``generate_s``: the jitted ``generate.generate`` (prefill + N greedy steps in one
  ``while_loop``; EOS disabled so all N tokens are produced).
- ``decode_tokens_per_s`` = B x N / (generate_s - prefill_s): new tokens per second of the cached
  decoding loop; ``ms_per_step`` = its per-step latency.
Compile times apart; layouts and batch sizes round-robin per repeat.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    "full": dict(new=64, batches=(1, 8), rep=5),
    "quick": dict(new=32, batches=(1, 8), rep=3),
    "smoke": dict(new=4, batches=(2,), rep=1),
}
FRAMES = 8
LAYOUTS = ("per_layer", "scanned")  # as load_setup answers (unstacked) / as training stores


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="per_layer and/or scanned")
    ap.add_argument("--llm-layers", type=int, default=0, help="decoder layers (default demo's)")
    ap.add_argument("--llm-width", type=int, default=0, help="decoder width (heads of 64)")
    args, size, s, repeats = common.parse_size(ap, SIZES)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or set(layouts) - set(LAYOUTS):
        ap.error(f"--layouts: a comma-separated list of {', '.join(LAYOUTS)}")
    jax = common.setup_jax()
    import dataclasses

    import numpy as np

    from ppllava_jax.convert.api import per_layer, with_runtime
    from ppllava_jax.data.collate import Media, Planner, Sample, collate
    from ppllava_jax.generate import SamplingConfig
    from ppllava_jax.models.ppllava import PPLLaVA

    cfg, _ = common.demo_model_config()
    llm = cfg.llm
    if args.llm_width:
        llm = dataclasses.replace(llm, **common.llm_width_fields(args.llm_width), head_dim=0)
    if args.llm_layers:
        llm = dataclasses.replace(llm, num_hidden_layers=args.llm_layers)
    cfg = with_runtime(dataclasses.replace(cfg, llm=llm), scan_layers=True)
    sc = SamplingConfig(max_new_tokens=s["new"], eos_token_id=-1, pad_token_id=cfg.pad_token_id)
    stacked = common.random_params(cfg)
    flat_cfg, flat = per_layer(cfg, stacked)
    models = {"scanned": (PPLLaVA(cfg), stacked), "per_layer": (PPLLaVA(flat_cfg), flat)}
    size_px = cfg.vision.image_size
    t, h, w = Planner(cfg).item_grid("video", FRAMES)
    rng_np = np.random.default_rng(0)

    runs = {}
    for bsz in s["batches"]:
        samples = []
        for _ in range(bsz):
            text = rng_np.integers(3, 500, 47)
            ids = np.concatenate([[1], text[:7], [cfg.image_token_index], text[7:]])
            ids = ids.astype(np.int32)
            px = rng_np.standard_normal((FRAMES, size_px, size_px, 3)).astype(np.float32)
            samples.append(
                Sample(
                    ids,
                    media=Media("video", px),
                    clip_ids=rng_np.integers(3, 600, 32).astype(np.int32),
                    clip_mask=np.ones(32, np.int32),
                )
            )
        batch = collate(samples, cfg, padding_side="left", buckets=[128, 256])
        batch = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "labels"}
        for layout in layouts:
            model, params = models[layout]
            runs[(layout, bsz)] = common.generate_run(model, params, batch, sc)
    common.time_generate_runs(runs, args.warmup, repeats)
    for (layout, bsz), r in runs.items():
        sg, sp = common.summary(r["tg"]), common.summary(r["tp"])
        dec = sg["median_s"] - sp["median_s"]  # <= 0 only when noise swamps a tiny run
        common.emit(
            "decode",
            size=size,
            model=f"configs/demo.py, LLaMA {llm.num_hidden_layers} x {llm.hidden_size}",
            layers=layout,
            batch=bsz,
            frames=FRAMES,
            visual_tokens=t * h * w,
            **r["info"],
            new_tokens=sc.max_new_tokens,
            prefill_s=sp["median_s"],
            generate_s=sg["median_s"],
            decode_tokens_per_s=round(bsz * sc.max_new_tokens / dec, 2) if dec > 0 else None,
            ms_per_step=round(1000 * dec / sc.max_new_tokens, 3) if dec > 0 else None,
            repeats=sg["repeats"],
            dtype=cfg.dtype,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
