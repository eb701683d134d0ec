"""The demo configuration end to end, a few steps: data generation, training, resume, export,
held-out scoring, and the command line's errors for a bad config."""

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import demo
from ppllava_jax.convert.api import load_checkpoint
from ppllava_jax.train import run
from ppllava_jax.train.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```\n", start)]


def _small(cfg, steps):
    cfg.synthetic.num_train = 24
    cfg.synthetic.num_eval = 8
    cfg.synthetic.frames = 8
    cfg.synthetic.size = 32
    cfg.model.vision = dict(cfg.model.vision, image_size=32, hidden_size=32, num_hidden_layers=2)
    cfg.model.frame_shape = (4, 4)
    cfg.model.pooling_kernel = cfg.model.pooling_stride = (1, 4, 4)
    cfg.model.btadapter_depth = 1
    cfg.model.image_grid_pinpoints = ((32, 64), (64, 32))
    cfg.model.llm = dict(cfg.model.llm, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg.model.clip_text = dict(cfg.model.clip_text, hidden_size=32, intermediate_size=64)
    cfg.data.num_frames = 4
    cfg.data.batch_size = 8
    cfg.data.max_length = 128
    cfg.data.buckets = [128]
    cfg.eval.batch_size = 8
    cfg.eval.max_new_tokens = 3
    cfg.train.total_steps = steps
    cfg.train.log_every = 1
    cfg.optimizer.warmup_steps = 1  # a few steps that move the loss
    cfg.checkpoint.save_every = 2
    cfg.checkpoint.async_save = False
    return cfg


# train.py on the small demo: a config file that applies _small to configs/demo.py
SMALL_CONFIG = """
from configs import demo
from tests.test_demo import _small


def get_config():
    return _small(demo.get_config(), 4)
"""


def _sigterm_train_py(tmp_path, work):
    """``train.py`` on the small demo, sent SIGTERM once it logged its first step: returns its
    exit status, its output and the step it stopped after."""
    config = tmp_path / "small_demo.py"
    config.write_text(SMALL_CONFIG)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
    cmd = [sys.executable, "train.py", "--config", str(config), "--workdir", str(work)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 1/4"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=600)
    out = "".join(lines) + rest
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", out)
    return proc.returncode, out, int(stopped.group(1)) if stopped else None


def test_demo_trains_resumes_and_scores(tmp_path):
    work = tmp_path / "run"
    # preempted: saved, said so, and exit status 75 (requeue) instead of 0
    status, out, stopped = _sigterm_train_py(tmp_path, work)
    assert status == REQUEUE_EXIT_CODE, out
    assert stopped is not None and 1 <= stopped < 4, out
    assert "generating the demo dataset in" in out
    assert re.search(r"^step 1/4 \| loss [0-9.]+ \| .* \| elapsed \d+:\d\d:\d\d \| ETA ", out, re.M)
    assert "Exit status 75" in out and not (work / "final").exists()
    saved = json.loads((work / "config.json").read_text())  # the resolved config, at the top
    assert saved["train"]["total_steps"] == 4
    assert saved["data"]["sources"][0]["path"] == str(work / "data" / "train.json")

    # resumed to the end from the checkpoint the signal wrote (data position included)
    out = run.main(_small(demo.get_config(), 4), str(work))
    assert out["step"] == 4 and not out["preempted"]
    assert out["eval_num_questions"] == 8 and 0.0 <= out["eval_accuracy"] <= 1.0
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4]
    losses = [r["loss"] for r in lines if "loss" in r]
    # from a random start the model predicts about uniformly over the 513 tokens; four updates
    # at lr 2e-3 take it well below (measured 6.22 -> 5.92; batch-to-batch noise ~0.03)
    assert abs(losses[0] - math.log(513)) < 0.15, losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert all("data/skipped" in r for r in lines if "loss" in r)
    # the held-out accuracy is logged beside the training curves
    evals = [r for r in lines if "eval/accuracy" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4
    assert evals[0]["eval/accuracy"] == out["eval_accuracy"]
    assert evals[0]["eval/num_questions"] == 8
    family, cfg, params = load_checkpoint(work / "final")
    assert family == "ppllava" and cfg.llm.vocab_size == 513
    assert (work / "final" / "tokenizer").is_dir() and (work / "final" / "clip_tokenizer").is_dir()
    inference = json.loads((work / "final" / "inference.json").read_text())
    assert inference["num_frames"] == 4
    # chat and the web demo stop the demo model after a few tokens (its answers are one word)
    assert inference["max_new_tokens"] == run.SYNTHETIC_MAX_NEW_TOKENS
    # the demo keeps its tokenizer file's own pre-tokenization; eval reads it back from here
    assert "tokenizer_legacy" in inference and inference["tokenizer_legacy"] is None
    res = json.loads((work / "results_eval.json").read_text())
    assert res["summary"]["num_questions"] == 8 and len(res["records"]) == 8
    # the held-out conversations' later turns, scored beside it (one conversation per clip)
    convs = json.loads((work / "data" / "eval_multiturn.json").read_text())
    later = sum(len(c["QA"]) - 1 for c in convs)
    assert len(convs) == 8 and out["eval_multiturn_num_questions"] == later
    res = json.loads((work / "results_eval_multiturn.json").read_text())
    assert len(res["records"]) == later and {r["turn"] for r in res["records"]} <= {2, 3}
    multi = [r for r in lines if "eval_multiturn/accuracy" in r]
    assert len(multi) == 1 and multi[0]["eval_multiturn/accuracy"] == out["eval_multiturn_accuracy"]
    # no scratch left: the scoring's answers files go once the results are written
    assert sorted(p.name for p in work.iterdir()) == [
        "checkpoints",
        "config.json",
        "data",
        "final",
        "metrics.jsonl",
        "results_eval.json",
        "results_eval_multiturn.json",
        "tensorboard",
    ]

    # the README's forward-pass snippet runs as written on the demo model
    snippet = _readme_block("## One forward pass on a video").replace("runs/demo", str(work))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    logits, attention, answer = printed.getvalue().splitlines()
    assert re.fullmatch(r"\(1, \d+, 513\)", logits), logits
    assert attention == str((1, 4, *cfg.frame_shape)), attention
    assert answer.strip(), "the snippet decodes a token"


def test_outputs_message_names_the_files(tmp_path):
    summary = {"step": 4, "final": str(tmp_path / "final"), "eval_accuracy": 0.75}
    summary["eval_num_questions"] = 8
    summary.update(eval_multiturn_accuracy=0.5, eval_multiturn_num_questions=12)
    text = run.outputs_message(str(tmp_path), summary, "eval", "eval_multiturn")
    assert f"{tmp_path / 'final'}" in text and f"{tmp_path / 'results_eval.json'}" in text
    assert "accuracy 75.0% of 8 questions" in text
    assert f"{tmp_path / 'results_eval_multiturn.json'}, accuracy 50.0% of 12 questions" in text
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in text


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.image_token_index=7", "image_token_index"),
        ("--config.mesh.tensor=3", "mesh"),
        ("--config.model.pooling_kernel=(64,2,2)", "kernel"),
        ("--config.no_such_field=1", "no_such_field"),
        ("--config.train.mode=dpo", "data.dpo"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, override, message):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(tmp_path / "w"),
        "--config.synthetic.num_train=8",
        "--config.synthetic.num_eval=4",
        override,
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert "compiled the step" not in res.stdout
