"""What ``eval.py`` runs: flags -> benchmark + checkpoint -> ``runner.run``."""

from __future__ import annotations

from typing import Any

from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.model_setup import FROM_CHECKPOINT, load_setup

BENCHMARKS = ("mvbench", "videomme", "openqa", "vcgbench", "synthetic")
# the share of questions that may go unanswered (unreadable videos, malformed annotation items)
# before eval.py fails (``--max_missing``)
DEFAULT_MAX_MISSING = 0.05


def make_benchmark(name: str, data: str, **kw: Any) -> Benchmark:
    """The benchmark ``name`` over ``data``. kw: qwen (the model family: ``PPLLaVAConfig.qwen``,
    which picks the original's Qwen or Vicuna prompts, reply splits and decoding), num_frames
    (negative: 32 or 64 by each video's length, as the original's ``get_index``),
    num_frames_long, video_dir, subtitle_dir, use_subtitles (or subtitles), split,
    mvbench_system, qa_dataset, vcg_system, vcg_legacy_labels (unused ones are ignored)."""
    nf = int(kw.get("num_frames") or 0)
    qwen = bool(kw.get("qwen", False))
    if name == "mvbench":
        from ppllava_jax.evaluate.mvbench import MVBench

        return MVBench(data, nf or 32, system_llm=bool(kw.get("mvbench_system", False)), qwen=qwen)
    if name == "videomme":
        from ppllava_jax.evaluate.videomme import VideoMME

        return VideoMME(  # nf 0: 32 frames short, num_frames_long (64) medium / long
            data,
            nf,
            int(kw.get("num_frames_long") or 64),
            video_dir=kw.get("video_dir", ""),
            subtitle_dir=kw.get("subtitle_dir", ""),
            subtitles=bool(kw.get("use_subtitles") or kw.get("subtitles")),
            qwen=qwen,
        )
    if name == "openqa":
        from ppllava_jax.evaluate.openqa import OpenQA

        return OpenQA(
            data,
            nf or 32,
            video_dir=kw.get("video_dir", ""),
            dataset=kw.get("qa_dataset") or "",
            qwen=qwen,
        )
    if name == "vcgbench":
        from ppllava_jax.evaluate.openqa import VCGBench

        return VCGBench(
            data,
            nf or 32,
            video_dir=kw.get("video_dir", ""),
            system_vcg=bool(kw.get("vcg_system", False)),
            legacy_consistency_labels=bool(kw.get("vcg_legacy_labels", False)),
            qwen=qwen,
        )
    if name == "synthetic":
        from ppllava_jax.evaluate.synthetic import Synthetic

        return Synthetic(data, nf or 8, split=kw.get("split") or "eval")
    raise ValueError(f"unknown benchmark {name!r}; use one of {BENCHMARKS}")


def parse_legacy(value: str | bool | None) -> bool | None | str:
    """``--tokenizer_legacy``: checkpoint (default: what the checkpoint's ``inference.json``
    records, else true) | true | false | file (as the tokenizer file says)."""
    if value is None or isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("", "checkpoint"):
        return FROM_CHECKPOINT
    if v in ("true", "1", "yes", "legacy"):
        return True
    if v in ("false", "0", "no", "nonlegacy", "non-legacy"):
        return False
    if v in ("file", "none"):
        return None
    raise ValueError(f"--tokenizer_legacy={value!r}: use checkpoint, true, false or file")


def main(
    *,
    checkpoint: str,
    benchmark: str,
    data: str,
    out: str,
    config: Any = None,
    **kw: Any,
) -> dict[str, Any] | None:
    """Evaluate ``checkpoint`` on ``benchmark``; see eval.py for the flags. ``max_missing``
    (default :data:`DEFAULT_MAX_MISSING`): a ``runner.MissingAnswersError`` after the results
    are written when a larger share of the questions has no answer."""
    from ppllava_jax import sharding
    from ppllava_jax.evaluate import runner

    max_missing = float(kw.get("max_missing", DEFAULT_MAX_MISSING))
    if not 0.0 <= max_missing <= 1.0:
        raise ValueError(f"--max_missing={max_missing:g}: give a share between 0 and 1")
    sharding.maybe_initialize_distributed()
    template = kw.get("template", "")
    mesh = kw.get("mesh") or None
    num_frames = kw.get("num_frames") or 0
    if config is not None:  # a training config: its data/mesh sections give defaults
        d = config.get("data", {})
        template = template or d.get("template", "")
        num_frames = num_frames or (d.get("num_frames", 0) if benchmark == "synthetic" else 0)
        if mesh is None and config.get("mesh") is not None:
            mesh = dict(config.mesh)
    setup = load_setup(
        checkpoint,
        tokenizer=kw.get("tokenizer", ""),
        clip_tokenizer=kw.get("clip_tokenizer", ""),
        template=template,
        mesh=mesh,
        dtype=kw.get("dtype") or None,
        tokenizer_legacy=parse_legacy(kw.get("tokenizer_legacy", "checkpoint")),
    )
    if not num_frames and benchmark == "synthetic":
        num_frames = setup.defaults.get("num_frames", 0)
    # the family's protocol comes from the checkpoint's model config, never from a flag
    qwen = bool(getattr(setup.cfg, "qwen", False))
    bench = make_benchmark(benchmark, data, **{**kw, "num_frames": num_frames, "qwen": qwen})
    result = runner.run(
        bench,
        setup,
        out,
        batch_size=int(kw.get("batch_size") or 0),
        max_new_tokens=kw.get("max_new_tokens") or None,
        num_workers=int(kw.get("num_workers") or 0),
        save_attention=kw.get("save_attention") or "",
        max_attention=int(kw.get("max_attention") or 16),
        progress=not kw.get("no_progress", False),
        fresh=bool(kw.get("fresh", False)),
    )
    if result is not None:  # after the results are written: they name what is missing
        runner.check_missing(result, out, max_missing)
    return result
