"""Time to answer for a 32-frame video with prompt-guided pooling ('ppllava') vs all tokens
('none') vs frame averaging ('avp'), at the same model size.

    python benchmarks/compression.py            # vision 12 x 384 + BT-Adapter, LLM 8 x 512
    python benchmarks/compression.py --quick    # vision 4 x 192 + BT-Adapter, LLM 4 x 256
    python benchmarks/compression.py --smoke    # tiny, 4 frames, 4 new tokens

One PPLLaVA architecture, random weights per mode, only ``pooling`` changing: a 32-frame video
of 168 px (12 x 12 patches of 14 px, i.e. the 7B model's 24 x 24 grid at half the side) gives
- ``ppllava``: kernel = stride (2, 3, 3) -> 16 x 4 x 4 = 256 visual tokens (18x fewer, as the
  7B model's 1,024 of 18,432);
- ``none``: every patch of every frame, 32 x 144 = 4,608 tokens;
- ``avp``: the mean over frames, 144 tokens.
Prompt: ``bos``, 7 text tokens, the video, 16 text tokens, left-padded by ``data.collate``.
Time to answer = one call of the jitted ``generate.generate`` (vision tower + BT-Adapter,
projector, merge, LLM prefill, then 32 greedy cached decoding steps; EOS disabled so all 32
tokens are produced), median of ``--repeats`` after warm-up, compile apart. The prefill alone
(``PPLLaVA.prefill``, jitted) is timed too (not with ``--smoke``). Modes run round-robin per
repeat so each sees the same load. Ratios: none / ppllava and avp / ppllava (> 1: ppllava is
faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    "full": dict(vl=12, vw=384, ll=8, lw=512, img=168, frames=32, new=32, rep=3),
    "quick": dict(vl=4, vw=192, ll=4, lw=256, img=168, frames=32, new=32, rep=3),
    "smoke": dict(vl=2, vw=64, ll=2, lw=64, img=42, frames=4, new=4, rep=1),
}
MODES = ("ppllava", "none", "avp")


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--modes", default=",".join(MODES))
    args, size, s, repeats = common.parse_size(ap, SIZES)
    jax = common.setup_jax()
    import numpy as np

    from ppllava_jax.data.collate import Media, Planner, Sample, collate
    from ppllava_jax.generate import SamplingConfig
    from ppllava_jax.models.ppllava import PPLLaVA

    sc = SamplingConfig(max_new_tokens=s["new"], eos_token_id=-1, pad_token_id=0)
    rng_np = np.random.default_rng(0)
    frames = s["frames"]
    pixels = rng_np.standard_normal((frames, s["img"], s["img"], 3)).astype(np.float32)
    runs = {}
    for mode in args.modes.split(","):
        cfg = common.setting_config(s, size, pooling=mode, kernel=(2, 3, 3), btadapter_depth=2)
        ids = np.concatenate(
            [[1], rng_np.integers(3, 200, 7), [cfg.image_token_index], rng_np.integers(3, 200, 16)]
        ).astype(np.int32)
        sample = Sample(
            ids,
            media=Media("video", pixels),
            clip_ids=rng_np.integers(3, 500, 24).astype(np.int32),
            clip_mask=np.ones(24, np.int32),
        )
        batch = collate([sample], cfg, padding_side="left")
        batch = {k: jax.numpy.asarray(v) for k, v in batch.items() if k not in ("labels",)}
        t, h, w = Planner(cfg).item_grid("video", frames)
        model = PPLLaVA(cfg)
        params = common.random_params(cfg)
        runs[mode] = common.generate_run(model, params, batch, sc, prefill=size != "smoke")
        runs[mode]["info"].update(visual_tokens=t * h * w, visual_grid=[t, h, w])
    common.time_generate_runs(runs, args.warmup, repeats)
    shape = dict(
        size=size,
        frames=frames,
        **common.model_shape(s),
        new_tokens=sc.max_new_tokens,
        dtype="float32",
    )
    med = {}
    for mode, r in runs.items():
        sg, sp = common.summary(r["tg"]), common.summary(r["tp"])
        med[mode] = sg["median_s"]
        common.emit(
            "compression",
            pooling=mode,
            **shape,
            **r["info"],
            answer_s=sg["median_s"],
            answer_min_s=sg["min_s"],
            answer_max_s=sg["max_s"],
            prefill_s=sp["median_s"] if size != "smoke" else None,
            repeats=sg["repeats"],
        )
    ratio = {}
    if "ppllava" in med:
        for m in med:
            if m != "ppllava":
                ratio[f"{m}_over_ppllava"] = round(med[m] / med["ppllava"], 3)
    common.emit(
        "compression_ratio",
        **shape,
        answer_s=med,
        visual_tokens={m: r["info"]["visual_tokens"] for m, r in runs.items()},
        **ratio,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
