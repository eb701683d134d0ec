"""``python -m ppllava_jax.plan`` on a small model: the figures it reports against an independent
count (parameters from the abstract tree, bytes from the shapes), the per-device memory fields,
and the ``--processes`` host layout."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from ppllava_jax.models.ppllava import abstract_params
from ppllava_jax.train.model_config import model_config
from ppllava_jax.train.optimizer import split_params, trainable_predicate

ROOT = Path(__file__).resolve().parents[1]

# the demo's model, smaller, the recipe's trainable split (so frozen parameters exist), and the
# batch section plan reads for a config without model.preset
CONFIG = """
import ml_collections

from configs import demo


def get_config():
    c = demo.get_config()
    c.model.vision = dict(c.model.vision, image_size=32, hidden_size=32, num_hidden_layers=2)
    c.model.frame_shape = (4, 4)
    c.model.pooling_kernel = c.model.pooling_stride = (1, 4, 4)
    c.model.image_grid_pinpoints = ((32, 64), (64, 32))
    c.model.llm = dict(c.model.llm, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    c.model.clip_text = dict(c.model.clip_text, hidden_size=32, intermediate_size=64)
    c.optimizer.trainable = "ppllava_sft"
    c.batch = ml_collections.ConfigDict(
        dict(max_length=48, per_device=2, num_frames=4, clip_length=16)
    )
    return c
"""
ROWS, LENGTH, FRAMES, CLIP, SIZE = 2, 48, 4, 16, 32


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tiny_plan.py"
    path.write_text(CONFIG)
    return path


def _plan(config_file, *args):
    cmd = [sys.executable, "-m", "ppllava_jax.plan", "--config", str(config_file), *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    return rows, res.stdout


def _counts(config_file):
    """(trainable, frozen) parameter counts of the config's model, from its abstract tree."""
    spec = importlib.util.spec_from_file_location("tiny_plan_config", config_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    params = nn.unbox(abstract_params(model_config(cfg)))
    trainable, frozen = split_params(params, trainable_predicate(cfg.optimizer))
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    return n(trainable), n(frozen)


def _batch_bytes(rows):
    """Bytes of ``rows`` rows of the planned video batch (plan.abstract_batch_arrays)."""
    text = 5 * rows * LENGTH * 4  # input_ids, visual_index, positions, attention_mask, labels
    video = rows * FRAMES * SIZE * SIZE * 3 * 4 + rows * FRAMES  # float32 pixels + bool frames
    clip = 2 * rows * CLIP * 4  # CLIP prompt ids and mask
    return text + video + clip


def test_figures_match_an_independent_count_and_host_layout(config_file):
    # data=2: the parameters are replicated, so each device's bytes are the whole model's
    (r,), out = _plan(
        config_file,
        "--devices",
        "2",
        "--mesh",
        "data=2,fsdp=1",
        "--processes",
        "2",
        "--hbm-gib",
        "1",
    )
    trainable, frozen = _counts(config_file)
    assert frozen > 0 and trainable > 0  # ppllava_sft freezes the CLIP trunk and text tower
    assert (r["trainable_params"], r["frozen_params"]) == (trainable, frozen)
    # float32 parameters; AdamW keeps two moments of each trainable one (+ a few step counts)
    assert r["params_bytes"] == 4 * (trainable + frozen)
    assert 8 * trainable <= r["opt_state_bytes"] <= 8 * trainable + 64
    assert r["batch_bytes"] == _batch_bytes(ROWS)  # each device: its rank's rows
    assert r["global_batch"] == 2 * ROWS and r["seq_len"] == LENGTH and r["frames"] == FRAMES
    for k in ("argument_bytes", "output_bytes", "temp_bytes"):
        assert r[k] > 0, k
    assert r["total_bytes"] == (
        r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    )
    # the arguments are the state (donated, so aliased by the output) and the batch
    assert r["argument_bytes"] >= r["params_bytes"] + r["opt_state_bytes"] + r["batch_bytes"]
    assert r["flops_per_device_xla"] > 0 and r["flops_per_device_model"] > 0
    assert r["fits"] is True and r["hbm_gib"] == 1.0
    # two hosts, one device each: host i feeds (and holds) global rows [2i, 2i + 2)
    assert r["rows_per_host"] == ROWS
    assert r["hosts"] == [
        {"process": 0, "devices": [0], "rows": [0, ROWS], "device_rows": [[0, ROWS]]},
        {"process": 1, "devices": [1], "rows": [ROWS, 2 * ROWS], "device_rows": [[ROWS, 2 * ROWS]]},
    ]
    assert "PPLLaVA SFT plan: 2 devices" in out and "per device, GiB" in out
    assert "data.batch_size=2 rows per host" in out
    assert "process 1: devices [1]; feeds global rows [2, 4)" in out


def test_overrides_chunked_loss_blockwise_attention_and_scheduler(config_file):
    """``--set``, ``--attention`` and ``--cpu-scheduler`` reach the planned program: the row
    reports them, and the chunked loss (``train.loss_chunk_size``, which needs the model's
    ``return_logits=False``) and blockwise attention compile in the planner."""
    (r,), out = _plan(
        config_file,
        "--devices",
        "1",
        "--mesh",
        "fsdp=1",
        "--set",
        "train.loss_chunk_size=16",
        "--attention",
        "blockwise",
        "--cpu-scheduler",
        "concurrency",
    )
    assert (r["loss_chunk_size"], r["attention"], r["cpu_scheduler"]) == (
        16,
        "blockwise",
        "concurrency",
    )
    assert "attention=blockwise, loss_chunk_size=16" in out
    (r,), _ = _plan(config_file, "--devices", "1", "--mesh", "fsdp=1")
    assert r["cpu_scheduler"] == "memory"  # the default: memory-minimising schedule


def test_set_field_parses_literals_and_names_unknown_fields():
    import ml_collections

    from ppllava_jax.plan import set_field

    c = ml_collections.ConfigDict(dict(train=dict(loss_chunk_size=0), model=dict(dtype="f")))
    set_field(c, "train.loss_chunk_size=512")
    set_field(c, "model.dtype=bfloat16")  # not a literal: the string
    assert c.train.loss_chunk_size == 512 and c.model.dtype == "bfloat16"
    with pytest.raises(ValueError, match="no field 'loss_chunk'"):
        set_field(c, "train.loss_chunk=1")
    with pytest.raises(ValueError, match="no section 'optim'"):
        set_field(c, "optim.lr=1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        set_field(c, "train.loss_chunk_size")
