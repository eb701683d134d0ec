"""Where the time of the jitted PPLLaVA SFT train step goes, part by part (``jax.profiler``).

    python benchmarks/profile_step.py                    # the "small" setting (issue 15)
    python benchmarks/profile_step.py --clip-length 248  # a CLIP prompt of 248 real tokens
    python benchmarks/profile_step.py --no-trim          # the text tower over all 248 positions
    python benchmarks/profile_step.py --smoke            # tiny (smoke test)
    python benchmarks/profile_step.py --full-logits      # LM head over every position

Setting ("small"): CLIP vision 12 x 384 at 168 px (12 x 12 patches) with a depth-2 BT-Adapter,
CLIP text tower 4 x 256 over 248 positions (a prompt of ``--clip-length`` tokens, 40 by default,
padded to 248 and cut to 64 on the host as ``train.py`` does:
``train.batches.with_trimmed_clip_prompts``; ``--no-trim``: all 248), LLaMA 8 x 512
with a 32,064-token vocabulary, 2 videos x 8 frames per step, prompt-guided pooling (2, 3, 3)
(64 visual tokens per video), 63 text tokens per row; float32, scanned layers, no remat. Step:
the trainer's (``train.program``, ``common.sft_program``: ``train.step.make_train_step``, SFT,
``grad_accum_steps=1``, ``loss_chunk_size=0``, the host batch prepared as ``train.py`` does)
with AdamW (constant lr 1e-5, no weight decay, global-norm clipping at 1.0) over the trainable set
``ppllava_sft`` (``train.optimizer.trainable_predicate``), random weights, state not donated;
the batch carries ``target_positions`` (``data.collate.target_positions``: the loss's LM head
runs at the 64 supervised positions of each row, not all 127; ``--full-logits``: every one).

Method: the step is lowered and compiled ahead of time (``compile_s``), run ``--warmup`` times,
then ``--steps`` steps are traced with ``jax.profiler`` (the wall time of the traced steps is
``step_s``). Every XLA op event of the trace is mapped to the HLO instruction of the same name in
the compiled program, and through its ``op_name`` metadata (the Flax module path of the traced
JAX operation; ``transpose(...)`` marks the backward pass) to a model part: ``vision_trunk``
(CLIP vision embeddings + encoder), ``btadapter``, ``clip_text``, ``pooling`` (the rest of the
prompt-guided pooling), ``projector``, ``llm`` (LLaMA embeddings + decoder), ``lm_head``,
``loss`` (log-softmax / token log-probabilities), each ``fwd`` or ``bwd``; ``optimizer`` (the
ops outside the micro-batch loop: gradient accumulators' zeros and average, global-norm
clipping, AdamW); ``other`` (the rest: merge, dropout keys, copies); ``unmapped`` (op events
without metadata). An op's time is its self time (minus the ops nested in it, e.g. a ``while``
op's body); the CPU runtime's own events (``ThunkExecutor``, thread-pool waits) are left
out. Printed: seconds per step and share of each part (shares of the summed op time, which can
exceed the step's wall time when XLA runs ops on several threads at once), the top ``--top``
ops, the device kind and the load average.
"""

from __future__ import annotations

import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    # vision layers x width, image px, text tower layers x width, LLM layers x width, vocab,
    # videos x frames, text tokens, CLIP positions
    "full": dict(vl=12, vw=384, img=168, tl=4, tw=256, ll=8, lw=512, vocab=32064, batch=2,
                 frames=8, text=63, clip_pos=248, clip_real=40, kernel=(2, 3, 3), steps=2),
    "smoke": dict(vl=2, vw=64, img=28, tl=1, tw=64, ll=2, lw=64, vocab=256, batch=1,
                  frames=2, text=16, clip_pos=16, clip_real=0, kernel=(2, 1, 1), steps=1),
}  # fmt: skip

# (substring of op_name, part) in order: the first match wins
PARTS = (
    ("btadapter", "btadapter"),
    ("vision_model", "vision_trunk"),
    ("clip_text_model", "clip_text"),
    ("visual_pool", "pooling"),
    ("multi_modal_projector", "projector"),
    ("lm_head", "lm_head"),  # also the loss's gathered head (named scope gathered_lm_head)
    ("language_model", "llm"),
    ("token_logps", "loss"),
    ("log_softmax", "loss"),
    ("logsumexp", "loss"),
)
# the CPU runtime's own events (executor, thread-pool waits): not ops
RUNTIME = ("ThunkExecutor", "SlinkyThreadPool")
_META = re.compile(r"%([\w.\-]+) = [^\n]*?metadata=\{[^}]*?op_name=\"([^\"]*)\"")


def part_of(op_name: str) -> str:
    """The model part of an HLO instruction's ``op_name`` metadata ('' -> ``unmapped``)."""
    if not op_name:
        return "unmapped"
    for key, part in PARTS:
        if key in op_name:
            return ("bwd " if "transpose(" in op_name else "fwd ") + part
    inner = op_name.split("/", 1)[-1]  # below jit(train_step)
    if "/" not in inner and not inner.startswith("while"):
        return "optimizer"  # outside the micro-batch loop: clipping, AdamW, grad accumulators
    return "other"


def op_metadata(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata, from the compiled program's text."""
    return {m.group(1): m.group(2) for m in _META.finditer(hlo_text)}


def xla_op_seconds(trace_dir: str) -> dict[str, float]:
    """Summed self seconds (minus the events nested in it on the same thread, e.g. a ``while``
    op's body) of each XLA op event in the ``jax.profiler`` trace under ``trace_dir``."""
    import jax

    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    dur: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLA Ops" not in line.name and not line.name.startswith("tf_XLA"):
                continue
            evs = sorted(
                ((e.start_ns, -e.duration_ns, e.name) for e in line.events),
                key=lambda e: (e[0], e[1]),
            )
            stack: list[tuple[float, str]] = []  # (end_ns, name) of the enclosing events
            for start, neg, name in evs:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                if stack and stack[-1][1] != "":
                    dur[stack[-1][1]] += neg * 1e-9  # the parent's self time loses this
                dur[name] += -neg * 1e-9
                stack.append((start - neg, name))
    return {n: v for n, v in dur.items() if not n.startswith(RUNTIME)}


def setting_config(s: dict):
    """The ``PPLLaVAConfig`` of setting ``s`` (``SIZES``)."""
    return common.ppllava_config(
        vision_layers=s["vl"],
        vision_width=s["vw"],
        llm_layers=s["ll"],
        llm_width=s["lw"],
        image_size=s["img"],
        vocab_size=s["vocab"],
        text_layers=s["tl"],
        text_width=s["tw"],
        clip_positions=s["clip_pos"],
        kernel=s["kernel"],
    )


def step_setup(s: dict, clip_real: int, full_logits: bool = False, trim: bool = True):
    """``(compiled_step, state, batch, rng)``: the SFT step of setting ``s`` compiled ahead of
    time, its initial state (trainable set ``ppllava_sft``) and a batch whose CLIP prompts have
    ``clip_real`` tokens (0: all), padded to ``s["clip_pos"]``; plus the compile seconds. The
    trainer's step, apply and host batch preparation (``train.program``, as ``train.py`` feeds
    it): the prompts cut to a power of two >= 64 (unless not ``trim``) and ``target_positions``
    (the loss's LM head at the supervised positions only) unless ``full_logits``. The state is
    not donated (the timed calls reuse it)."""
    import jax

    from ppllava_jax.train.program import prepare_batch, step_rng

    cfg = setting_config(s)
    config = common.sft_config(
        trainable="ppllava_sft",
        loss_chunk_size=0,
        logits_at_targets_only=not full_logits,
        trim_clip_prompts=trim,
    )
    batch = common.video_sft_batch(
        cfg,
        batch=s["batch"],
        frames=s["frames"],
        text_len=s["text"],
        clip_len=s["clip_pos"],
        clip_real=clip_real,
    )
    batch = jax.tree.map(jax.numpy.asarray, prepare_batch(batch, config, cfg))
    setup, compiled_step = common.sft_program(cfg, config)
    step = jax.jit(compiled_step.step_fn)
    state = setup.create(common.random_params(cfg))
    rng = step_rng(0, 0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    return compiled, state, batch, rng, time.perf_counter() - t0


def main() -> int:
    ap = common.script_parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (smoke test)")
    ap.add_argument("--clip-length", type=int, default=0, help="real CLIP prompt tokens (40)")
    ap.add_argument("--no-trim", action="store_true", help="CLIP text over all 248 positions")
    ap.add_argument("--steps", type=int, default=0, help="traced steps (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    ap.add_argument("--top", type=int, default=15, help="ops listed")
    ap.add_argument(
        "--full-logits", action="store_true", help="LM head over every position (no gather)"
    )
    args = ap.parse_args()
    s = SIZES["smoke" if args.smoke else "full"]
    clip_len = args.clip_length or s["clip_real"] or s["clip_pos"]
    steps = args.steps or s["steps"]
    if clip_len > s["clip_pos"]:
        ap.error(f"--clip-length at most {s['clip_pos']} (the text tower's positions)")
    jax = common.setup_jax()

    compiled, state, batch, rng, compile_s = step_setup(
        s, clip_len, args.full_logits, trim=not args.no_trim
    )
    meta = op_metadata(compiled.as_text())
    common.time_calls(lambda: compiled(state, batch, rng), 0, warmup=args.warmup)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        times = common.time_calls(lambda: compiled(state, batch, rng), steps, warmup=0)
        jax.profiler.stop_trace()
        dur = xla_op_seconds(trace_dir)

    parts: collections.Counter = collections.Counter()
    for name, sec in dur.items():
        parts[part_of(meta.get(name, ""))] += sec / steps
    total = sum(parts.values())
    shape = dict(
        vision=f"{s['vl']}x{s['vw']}+btadapter2",
        image_size=s["img"],
        clip_text=f"{s['tl']}x{s['tw']}",
        clip_positions=s["clip_pos"],
        llm=f"{s['ll']}x{s['lw']}",
        vocab=s["vocab"],
        videos=s["batch"],
        frames=s["frames"],
        text_tokens=s["text"],
        kernel=list(s["kernel"]),
    )
    step = common.summary(times)
    common.emit(
        "profile_step",
        **shape,
        clip_length=clip_len,
        clip_positions_run=int(batch["video_clip_ids"].shape[1]),
        full_logits=args.full_logits,
        trainable="ppllava_sft",
        steps=steps,
        compile_s=round(compile_s, 3),
        step_s=step["median_s"],
        step_min_s=step["min_s"],
        op_s_per_step=round(total, 4),
        parts_s={k: round(v, 4) for k, v in parts.most_common()},
        parts_share={k: round(v / total, 4) for k, v in parts.most_common()} if total else {},
        ops_traced=len(dur),
        ops_mapped=sum(1 for n in dur if meta.get(n)),
    )
    top = sorted(dur.items(), key=lambda kv: -kv[1])[: args.top]
    common.emit(
        "profile_step_top_ops",
        clip_length=clip_len,
        top_ops=[
            dict(
                op=n,
                part=part_of(meta.get(n, "")),
                s_per_step=round(v / steps, 5),
                op_name=meta.get(n, "")[-120:],
            )
            for n, v in top
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
