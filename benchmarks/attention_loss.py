"""The demo's SFT train step with each attention implementation and loss layout (CPU figures).

    python benchmarks/attention_loss.py                  # configs/demo.py shapes, 10 timed rounds
    python benchmarks/attention_loss.py --rounds 3 --batch 8

Builds the demo model (``configs/demo.py``: CLIP-style tower + BT-Adapter, prompt-guided
pooling, 4-layer LLaMA; random weights) and a synthetic batch of its shapes (``--batch`` clips of
8 frames, 64 text positions with 12 supervised, CLIP prompts of 32), then times the jitted step
(forward + backward + AdamW) for every variant: ``attention_impl`` in (xla, blockwise) x
``train.loss_chunk_size`` in (0, 16). Variants alternate within each round so they see the same
machine load; medians are printed as one JSON line with the load average and the first step's
loss of each variant (equal up to float rounding: the paths compute the same function).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = common.script_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    from configs import demo
    from configs.common import DEMO_FRAMES
    from ppllava_jax.data.collate import Media, Sample, collate
    from ppllava_jax.models.ppllava import PPLLaVA, init_params
    from ppllava_jax.train.optimizer import make_optimizer, trainable_predicate
    from ppllava_jax.train.run import make_apply, model_config
    from ppllava_jax.train.state import create_train_state
    from ppllava_jax.train.step import make_train_step

    cfg = demo.get_config()
    base = model_config(cfg)
    rng = np.random.default_rng(0)
    s, length, supervised = base.vision.image_size, 64, 12
    samples = []
    for _ in range(args.batch):
        ids = rng.integers(4, base.image_token_index, length - 7).astype(np.int32)
        ids[1] = base.image_token_index
        labels = np.full(len(ids), -100, np.int32)
        labels[-supervised:] = ids[-supervised:]
        px = rng.random((DEMO_FRAMES, s, s, 3), np.float32)
        clip = rng.integers(3, 600, 20).astype(np.int32)
        samples.append(Sample(ids, labels=labels, media=Media("video", px), clip_ids=clip))
    batch = collate(samples, base, padding_side="right", clip_length=32)
    params = nn.unbox(init_params(base, jax.random.PRNGKey(0)))

    steps, states, times, losses = {}, {}, {}, {}
    for impl in ("xla", "blockwise"):
        for chunk in (0, 16):
            name = f"{impl}/chunk{chunk}"
            cfg.train.loss_chunk_size = chunk
            model = PPLLaVA(base.replace(attention_impl=impl))
            tx, _ = make_optimizer(cfg.optimizer, 100)
            states[name] = create_train_state(params, tx, trainable_predicate(cfg.optimizer))
            steps[name] = jax.jit(make_train_step(make_apply(model), cfg, tx=tx))
            _, m = steps[name](states[name], batch, jax.random.key(0))  # compile + warm-up
            losses[name] = float(m["loss"])
            times[name] = []
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            _, m = step(states[name], batch, jax.random.key(0))
            jax.block_until_ready(m["loss"])
            times[name].append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "rounds": args.rounds,
                "step_s_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
                "first_loss": losses,
                "loadavg": os.getloadavg(),
                "devices": str(jax.devices()),
            }
        )
    )


if __name__ == "__main__":
    main()
