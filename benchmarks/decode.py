"""Cached decoding speed of the demo model: prefill time and tokens per second at batch 1 and 8.

    python benchmarks/decode.py            # 64 new tokens, batch 1 and 8
    python benchmarks/decode.py --quick    # 32 new tokens
    python benchmarks/decode.py --smoke    # 4 new tokens, batch 2

Model: the ``model`` section of ``configs/demo.py`` (CLIP 4 x 96 + BT-Adapter depth 2 on 64 px
frames, prompt-guided pooling (2, 2, 2), LLaMA 4 x 128, vocab 513), random weights, float32.
Prompt per row: an 8-frame video (64 visual tokens) between ``bos`` + 7 and 40 text tokens,
left-padded by ``data.collate`` to a 128-token bucket.

- ``prefill_s``: the jitted ``PPLLaVA.prefill`` (vision tower, projector, merge, LLM over the
  prompt, KV cache filled), median after warm-up.
- ``generate_s``: the jitted ``generate.generate`` (prefill + N greedy steps in one
  ``while_loop``; EOS disabled so all N tokens are produced).
- ``decode_tokens_per_s`` = B x N / (generate_s - prefill_s): new tokens per second of the cached
  decoding loop; ``ms_per_step`` = its per-step latency.
Compile times apart; batch sizes round-robin per repeat.
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


def main() -> int:
    ap = common.base_parser(__doc__)
    args, size, s, repeats = common.parse_size(ap, SIZES)
    jax = common.setup_jax()
    import numpy as np

    from ppllava_jax.data.collate import Media, Planner, Sample, collate
    from ppllava_jax.generate import SamplingConfig
    from ppllava_jax.models.ppllava import PPLLaVA

    cfg, demo = common.demo_model_config()
    sc = SamplingConfig(max_new_tokens=s["new"], eos_token_id=-1, pad_token_id=cfg.pad_token_id)
    model = PPLLaVA(cfg)
    params = common.random_params(cfg)
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
        runs[bsz] = common.generate_run(model, params, batch, sc)
    common.time_generate_runs(runs, args.warmup, repeats)
    for bsz, r in runs.items():
        sg, sp = common.summary(r["tg"]), common.summary(r["tp"])
        dec = sg["median_s"] - sp["median_s"]  # <= 0 only when noise swamps a tiny run
        common.emit(
            "decode",
            size=size,
            model="configs/demo.py",
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
