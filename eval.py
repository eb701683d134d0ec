"""Evaluate a checkpoint on a benchmark (greedy decoding, SPEC §8).

    python eval.py --checkpoint DIR --benchmark mvbench --data MVBench/ --out mvbench.json
    python eval.py --checkpoint DIR --benchmark videomme --data Video-MME/ --use_subtitles \\
        --out videomme_sub.json      # + videomme_sub_videomme_results_with_subtitles.json
    python eval.py --checkpoint DIR --benchmark openqa --data MSVD-QA/new_test_qa.json \\
        --video_dir MSVD/YouTubeClips --qa_dataset msvd --out msvd.json  # + msvd_pred.json
    python eval.py --checkpoint DIR --benchmark openqa --data video_chatgpt/test_q.json \\
        --video_dir ActivityNet/activitynet_frames --out anet.json     # frame folders, 3 fps
    python eval.py --checkpoint DIR --benchmark vcgbench --data video_chatgpt/ --out vcg.json
                                          # + vcg_general.json, vcg_temporal.json, vcg_consist.json
    python eval.py --checkpoint runs/demo/final --benchmark synthetic --data runs/demo/data \\
        --out runs/demo/eval/results_eval.json --save-attention runs/demo/eval/attention

Benchmarks (``ppllava_jax/evaluate/``): ``mvbench`` (20 task JSON files + videos, 32 frames,
accuracy per task), ``videomme`` (question file, 32 frames short / 64 medium+long, optional
subtitles, accuracy per duration), ``openqa`` and ``vcgbench`` (predictions for an LLM judge),
``synthetic`` (the demo dataset's held-out split).

The protocol of the checkpoint's model family is used, read from its ``config.json``
(``qwen``): the original's Vicuna prompts (``plain_v1``, ``conv_videoqa_v1``, ``conv_vcg_v1``)
or Qwen ones (``plain_qwen``, ``conv_videoqa_qwen``, ``conv_vcg_qwen``, VCGBench replies split
on ``assistant\\n``), with no flag to set.

Checkpoint directory ``DIR`` (what train.py's final export writes)::

    DIR/config.json, DIR/params/     the converted layout (convert_torch_weights.py)
    DIR/tokenizer/                   LLM tokenizer (or --tokenizer)
    DIR/clip_tokenizer/              CLIP tokenizer of the prompt encoder (or --clip_tokenizer)
    DIR/inference.json               optional defaults: {"template": ..., "num_frames": ...}

Runs are resumable: answers are appended to ``<out stem>.answers.jsonl`` and a rerun with the
same ``--out`` asks only the questions not answered yet. ``<out stem>.answers.protocol.json``
records the checkpoint (a hash of its config.json and orbax save metadata) and the settings
that change a prompt, its frames or its answer (benchmark and its data, frames, subtitles,
system prompts, split, template, tokenizers and --tokenizer_legacy, dtype, --max_new_tokens).
A rerun with the same ``--out`` but another checkpoint or other such settings REFUSES to
start, naming each difference; ``--fresh`` deletes the old answers and starts afresh (or choose
another ``--out``).
Data parallel over all devices (``--mesh``) and hosts (each host its own shard of questions;
``--out`` on a shared disk).

Unreadable videos and malformed annotation items (a missing field, a wrong type) are skipped,
logged and listed in the results file (``missing_ids``; ``bad_annotations`` with file, item and
reason); when more than ``--max_missing`` (default 5%) of the questions have no answer, eval.py
exits with status 1 after writing the results.

A mistake (a missing checkpoint or data, a checkpoint that is not a PPLLaVA one or whose
parameters do not fit its config.json, a bad flag) is printed as one ``error: ...`` line without
a traceback (``PPLLAVA_TRACEBACK=1`` shows it).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ppllava_jax import command_line

command_line.allow_list_overrides()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "optional training config (configs/*.py): template, frames, mesh defaults"
)
flags.DEFINE_string("checkpoint", None, "checkpoint directory (see the module docstring)")
flags.DEFINE_enum(
    "benchmark", None, ["mvbench", "videomme", "openqa", "vcgbench", "synthetic"], "benchmark"
)
flags.DEFINE_string("data", None, "benchmark data: directory or question file")
flags.DEFINE_string("out", None, "results JSON (answers go to <out stem>.answers.jsonl)")
flags.DEFINE_bool(
    "fresh",
    False,
    "delete the answers already in <out stem>.answers*.jsonl (and .answers.protocol.json) and "
    "start afresh. Without it a rerun "
    "resumes them if they were given by the same checkpoint under the same settings, and "
    "refuses to start (naming what differs) if not",
)
flags.DEFINE_integer(
    "num_frames",
    0,
    "frames per video (0: benchmark default: 32; videomme 32 short / "
    "--num_frames_long medium+long; synthetic 8; negative -N: the original's 1 fps rule, 32 "
    "frames for a video of at most 32*N seconds, else 64)",
)
flags.DEFINE_float(
    "max_missing",
    0.05,
    "the share of questions (0..1) that may go without an answer: unreadable videos and "
    "malformed annotation items (a missing field, a wrong type) are skipped, logged, counted and "
    "listed in the results file (missing_ids, bad_annotations); above this share eval.py exits "
    "with status 1 and one error line after writing the results (1: never)",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_integer("num_frames_long", 64, "videomme, --num_frames 0: frames of medium / long")
flags.DEFINE_integer("batch_size", 0, "questions per batch per host (0: max(8, local devices))")
flags.DEFINE_integer("max_new_tokens", 0, "answer length limit (0: benchmark default / 200)")
flags.DEFINE_string("video_dir", "", "videomme/openqa/vcgbench: where the videos are")
flags.DEFINE_string("subtitle_dir", "", "videomme: where <videoID>.srt are (default root/subtitle)")
flags.DEFINE_bool(
    "use_subtitles",
    False,
    "videomme: the subtitles of the frames read in the prompt (the original's --use_subtitles)",
)
flags.DEFINE_alias("subtitles", "use_subtitles")
flags.DEFINE_enum(
    "qa_dataset",
    "",
    ["", "msvd", "msrvtt", "activitynet"],
    "openqa: the dataset's layout (default: activitynet with test_q.json + test_a.json, else msvd)",
)
flags.DEFINE_bool(
    "vcg_system", False, "vcgbench: the conv_vcg_v1 / conv_vcg_qwen prompt (Video-ChatGPT system)"
)
flags.DEFINE_bool(
    "vcg_legacy_labels",
    False,
    "vcgbench: write consistency records as the original does (its Q1 holds Q2 and vice versa)",
)
flags.DEFINE_string("split", "eval", "synthetic: split to score")
flags.DEFINE_string("tokenizer", "", "LLM tokenizer directory (default DIR/tokenizer)")
flags.DEFINE_string("clip_tokenizer", "", "CLIP tokenizer directory (default DIR/clip_tokenizer)")
flags.DEFINE_string(
    "template",
    "",
    "synthetic: conversation template (default: inference.json's, else plain_v1 / plain_qwen by "
    "the checkpoint's family); the exact benchmarks always use their family's",
)
flags.DEFINE_enum(
    "tokenizer_legacy",
    "checkpoint",
    ["checkpoint", "true", "false", "file"],
    "Llama pre-tokenization of prompts: as the checkpoint was trained (its inference.json; "
    "legacy when it records none, as for converted released checkpoints), legacy (the "
    "released tokenizers), non-legacy, or as the tokenizer file says",
)
flags.DEFINE_bool(
    "mvbench_system",
    False,
    "mvbench: put the MVBench system text in the prompt (the shipped script leaves it out)",
)
flags.DEFINE_string("mesh", "", "mesh over local devices, e.g. 'data=1,fsdp=-1,tensor=1'")
flags.DEFINE_enum(
    "dtype",
    "",
    ["", "float32", "bfloat16", "float16"],
    "the model's dtype while answering, compute and weights: float16 as the original evaluates "
    "(default: the checkpoint config's compute dtype, weights as stored)",
)
flags.DEFINE_integer("num_workers", 0, "video decoding worker processes")
flags.DEFINE_string(
    "save_attention",
    "",
    "directory for one relevance picture per question (<question id>.png: the frames, the "
    "prompt-to-patch relevance over each, a colour bar, the question and the answer)",
)
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
        "subtitle_dir", "use_subtitles", "split", "tokenizer", "clip_tokenizer", "template", "mesh",
        "dtype", "num_workers", "save_attention", "max_attention", "no_progress",
        "tokenizer_legacy", "mvbench_system", "qa_dataset", "vcg_system", "vcg_legacy_labels",
        "fresh", "max_missing",
    ]  # fmt: skip
    command_line.report_user_errors(
        cli.main,
        checkpoint=FLAGS.checkpoint,
        benchmark=FLAGS.benchmark,
        data=FLAGS.data,
        out=FLAGS.out,
        config=_CONFIG.value,
        **{n: FLAGS[n].value for n in names},
    )


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
