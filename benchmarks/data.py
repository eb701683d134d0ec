"""Samples per second of the grain input pipeline on the synthetic dataset, 0 / 1 / 2 workers.

    python benchmarks/data.py            # 200 clips, 20 batches of 8 per worker count
    python benchmarks/data.py --quick    # 64 clips, 8 batches of 8
    python benchmarks/data.py --smoke    # 16 clips, 2 batches of 4, 0 and 1 workers

Generates the embedded synthetic video-QA dataset (``data.synthetic.generate``: mp4 clips of 16
frames at 64 px, its LLaMA and CLIP tokenizers) into a temporary directory (``--dir`` keeps one),
then reads it with ``data.pipeline.Pipeline`` configured like ``configs/demo.py`` (8 frames
sampled per clip, ``plain_v1`` template, CLIP prompt of 77, buckets 128/160, training order,
``prefetch_batches`` 2) and the demo model config. For each worker count: a fresh iterator;
``first_batch_s`` is the time to the first batch (worker start-up included), then
``samples_per_s`` = B x K / (time of the next K batches): decoding (PyAV), frame sampling,
resizing, tokenisation, templates, collation. The pipeline reads epochs forever, so K may
exceed the dataset.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    "full": dict(clips=200, batch=8, batches=20, workers=(0, 1, 2)),
    "quick": dict(clips=64, batch=8, batches=8, workers=(0, 1, 2)),
    "smoke": dict(clips=16, batch=4, batches=2, workers=(0, 1)),
}


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--dir", default="", help="dataset directory (kept; default: a temp dir)")
    ap.add_argument("--workers", default="", help="comma list of worker counts")
    args, size, s, _ = common.parse_size(ap, SIZES)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else s["workers"]
    from ppllava_jax.data import pipeline, synthetic

    cfg, demo = common.demo_model_config()
    tmp = None
    out = args.dir
    if not out:
        tmp = tempfile.TemporaryDirectory()
        out = tmp.name
    t0 = time.perf_counter()
    synthetic.ensure_dataset(out, num_train=s["clips"], num_eval=4, frames=16, size=64, seed=0)
    gen_s = time.perf_counter() - t0

    data = demo.data
    data.sources = [dict(path=os.path.join(out, "train.json"), data_root=out)]
    data.tokenizer = os.path.join(out, "tokenizer")
    data.clip_tokenizer = os.path.join(out, "clip_tokenizer")
    data.batch_size = s["batch"]
    try:
        for nw in workers:
            data.num_workers = nw
            pl = pipeline.Pipeline(data, cfg)
            it = pl.iterator()
            t0 = time.perf_counter()
            first = next(it)
            t1 = time.perf_counter()
            shapes = {k: list(v.shape) for k, v in first.items() if hasattr(v, "shape")}
            n = 0
            for _ in range(s["batches"]):
                b = next(it)
                n += int(b["input_ids"].shape[0])
            t2 = time.perf_counter()
            pl.close()
            common.emit(
                "data",
                size=size,
                num_workers=nw,
                batch_size=s["batch"],
                batches=s["batches"],
                samples=n,
                samples_per_s=round(n / (t2 - t1), 2),
                first_batch_s=round(t1 - t0, 3),
                dataset_clips=s["clips"],
                frames_per_sample=int(data.num_frames),
                image_size=int(cfg.vision.image_size),
                batch_shapes={k: shapes[k] for k in ("input_ids", "video_pixels") if k in shapes},
                dataset_generation_s=round(gen_s, 2),
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
