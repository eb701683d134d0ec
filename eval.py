"""Evaluate a checkpoint on a benchmark (greedy decoding, SPEC §8).

    python eval.py --checkpoint DIR --benchmark mvbench --data MVBench/ --out mvbench.json
    python eval.py --checkpoint DIR --benchmark videomme --data videomme/ --subtitles \\
        --out videomme_sub.json
    python eval.py --checkpoint DIR --benchmark openqa --data msvd_qa.json \\
        --video_dir MSVD/videos --out msvd.json          # + msvd_pred.json for the judge
    python eval.py --checkpoint DIR --benchmark vcgbench --data vcgbench/ --out vcg.json
    python eval.py --checkpoint runs/demo/final --benchmark synthetic --data runs/demo/data \\
        --out runs/demo/eval_synthetic.json --save-attention runs/demo/attention

Benchmarks (``ppllava_jax/evaluate/``): ``mvbench`` (20 task JSON files + videos, 32 frames,
accuracy per task), ``videomme`` (question file, 32 frames short / 64 medium+long, optional
subtitles, accuracy per duration), ``openqa`` and ``vcgbench`` (predictions for an LLM judge),
``synthetic`` (the demo dataset's held-out split).

Checkpoint directory ``DIR`` (what train.py's final export writes)::

    DIR/config.json, DIR/params/     the converted layout (convert_torch_weights.py)
    DIR/tokenizer/                   LLM tokenizer (or --tokenizer)
    DIR/clip_tokenizer/              CLIP tokenizer of the prompt encoder (or --clip_tokenizer)
    DIR/inference.json               optional defaults: {"template": ..., "num_frames": ...}

Runs are resumable: answers are appended to ``<out stem>.answers.jsonl`` and a rerun with the
same ``--out`` asks only the questions not answered yet. Data parallel over all devices
(``--mesh``) and hosts (each host its own shard of questions; ``--out`` on a shared disk).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "optional training config (configs/*.py): template, frames, mesh defaults"
)
flags.DEFINE_string("checkpoint", None, "checkpoint directory (see the module docstring)")
flags.DEFINE_enum(
    "benchmark", None, ["mvbench", "videomme", "openqa", "vcgbench", "synthetic"], "benchmark"
)
flags.DEFINE_string("data", None, "benchmark data: directory or question file")
flags.DEFINE_string("out", None, "results JSON (answers go to <out stem>.answers.jsonl)")
flags.DEFINE_integer("num_frames", 0, "frames per video (0: benchmark default; 32, synthetic 8)")
flags.DEFINE_integer("num_frames_long", 64, "videomme: frames for medium and long videos")
flags.DEFINE_integer("batch_size", 0, "questions per batch per host (0: max(8, local devices))")
flags.DEFINE_integer("max_new_tokens", 0, "answer length limit (0: benchmark default / 200)")
flags.DEFINE_string("video_dir", "", "videomme/openqa/vcgbench: where the videos are")
flags.DEFINE_string("subtitle_dir", "", "videomme: where <videoID>.srt are (default root/subtitle)")
flags.DEFINE_bool("subtitles", False, "videomme: add the subtitles shown at the sampled frames")
flags.DEFINE_string("split", "eval", "synthetic: split to score")
flags.DEFINE_string("tokenizer", "", "LLM tokenizer directory (default DIR/tokenizer)")
flags.DEFINE_string("clip_tokenizer", "", "CLIP tokenizer directory (default DIR/clip_tokenizer)")
flags.DEFINE_string("template", "", "conversation template (default plain_v1)")
flags.DEFINE_string("mesh", "", "mesh over local devices, e.g. 'data=1,fsdp=-1,tensor=1'")
flags.DEFINE_string("dtype", "", "compute dtype: float32 | bfloat16 (default: the config's)")
flags.DEFINE_integer("num_workers", 0, "video decoding worker processes")
flags.DEFINE_string("save_attention", "", "directory for per-frame relevance heatmaps (PNG)")
flags.DEFINE_integer("max_attention", 16, "heatmaps for at most this many questions per host")
flags.DEFINE_bool("no_progress", False, "no progress bar")
flags.mark_flags_as_required(["checkpoint", "benchmark", "data", "out"])

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from ppllava_jax.evaluate import cli

    names = [
        "num_frames", "num_frames_long", "batch_size", "max_new_tokens", "video_dir",
        "subtitle_dir", "subtitles", "split", "tokenizer", "clip_tokenizer", "template", "mesh",
        "dtype", "num_workers", "save_attention", "max_attention", "no_progress",
    ]  # fmt: skip
    cli.main(
        checkpoint=FLAGS.checkpoint,
        benchmark=FLAGS.benchmark,
        data=FLAGS.data,
        out=FLAGS.out,
        config=_CONFIG.value,
        **{n: FLAGS[n].value for n in names},
    )


if __name__ == "__main__":
    # --save-attention is accepted as a spelling of --save_attention
    import sys

    sys.argv = [a.replace("--save-attention", "--save_attention", 1) for a in sys.argv]
    app.run(main)
