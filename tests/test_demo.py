"""The demo configuration end to end, a few steps: data generation, training, resume, export,
held-out scoring, and the command line's errors for a bad config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import demo
from ppllava_jax.convert.api import load_checkpoint
from ppllava_jax.train import run

ROOT = Path(__file__).resolve().parents[1]


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
    cfg.data.image_size = 32
    cfg.data.image_grid_pinpoints = [[32, 64], [64, 32]]
    cfg.data.num_frames = 4
    cfg.data.batch_size = 8
    cfg.data.max_length = 128
    cfg.data.buckets = [128]
    cfg.eval.batch_size = 8
    cfg.eval.max_new_tokens = 3
    cfg.train.total_steps = steps
    cfg.train.log_every = 1
    cfg.checkpoint.save_every = 2
    cfg.checkpoint.async_save = False
    return cfg


def test_demo_trains_resumes_and_scores(tmp_path):
    work = tmp_path / "run"
    out = run.main(_small(demo.get_config(), 2), str(work))
    assert out["step"] == 2 and 0.0 <= out["eval_accuracy"] <= 1.0
    assert out["eval_num_questions"] == 8
    # resumed for two more steps from the checkpoint of step 2 (data position included)
    out = run.main(_small(demo.get_config(), 4), str(work))
    assert out["step"] == 4
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all("data/skipped" in r for r in lines if "loss" in r)
    family, cfg, params = load_checkpoint(work / "final")
    assert family == "ppllava" and cfg.llm.vocab_size == 513
    assert (work / "final" / "tokenizer").is_dir() and (work / "final" / "clip_tokenizer").is_dir()
    inference = json.loads((work / "final" / "inference.json").read_text())
    assert inference["num_frames"] == 4
    # the demo keeps its tokenizer file's own pre-tokenization; eval reads it back from here
    assert "tokenizer_legacy" in inference and inference["tokenizer_legacy"] is None
    res = json.loads((work / "eval_eval.json").read_text())
    assert res["summary"]["num_questions"] == 8 and len(res["records"]) == 8


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
