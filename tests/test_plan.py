"""``python -m ppllava_jax.plan`` on a small model: the figures it reports against an independent
count (parameters from the abstract tree, bytes from the shapes), the per-device memory fields,
and the ``--processes`` host layout; the program it compiles against the one ``train.py``
compiles for the demo (same arguments, same computation)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import demo
from ppllava_jax import plan, sharding
from ppllava_jax.data import clip_prompts, collate
from ppllava_jax.models.ppllava import abstract_params
from ppllava_jax.train import program, run
from ppllava_jax.train.compiled_step import CompiledStep
from ppllava_jax.train.model_config import model_config
from ppllava_jax.train.optimizer import split_params, trainable_predicate
from tests.test_demo import _small

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


# one visual token per frame (pooling kernel (1, 4, 4) over the 4 x 4 patch grid); every text
# token after the video supervised: 43 targets, rounded up to 64 and capped at LENGTH - 1
TARGETS = LENGTH - 1


def _batch_bytes(rows):
    """Bytes of ``rows`` rows of the planned video batch (``train.program.planned_host_batch``
    as ``train.py`` prepares it: with the loss's target positions)."""
    text = 5 * rows * LENGTH * 4  # input_ids, visual_index, positions, attention_mask, labels
    targets = rows * TARGETS * 4  # target_positions
    video = rows * FRAMES * SIZE * SIZE * 3 * 4 + rows * FRAMES  # float32 pixels + bool frames
    clip = 2 * rows * CLIP * 4  # CLIP prompt ids and mask (16 positions: nothing to trim)
    return text + targets + video + clip


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
    assert (r["target_positions"], r["clip_positions"], r["mode"]) == (TARGETS, CLIP, "sft")
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
    ``return_logits=False``; without ``train.logits_at_targets_only``, whose batch's
    ``target_positions`` take the gathered LM head instead) and blockwise attention compile in
    the planner."""
    (r,), out = _plan(
        config_file,
        "--devices",
        "1",
        "--mesh",
        "fsdp=1",
        "--set",
        "train.loss_chunk_size=16",
        "--set",
        "train.logits_at_targets_only=False",
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
    assert r["target_positions"] == 0  # the batch has none: the step chunks the loss
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


class _Lowered(Exception):
    """Stops the trainer once its first step is lowered."""


def _main_function(text: str) -> list[str]:
    """The lines of the ``main`` function of a lowered program's StableHLO text (its signature:
    every argument's and result's type, sharding and donation; its body), with the numbers
    the lowering appends to private functions' names (an order artefact) removed."""
    text = re.sub(r"(@[A-Za-z_]\w*?)_\d+\b", r"\1", text)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "func.func public @main" in line)
    end = lines.index("  }", start)
    return lines[start : end + 1]


def _args(lowered) -> list[tuple]:
    """(path, shape, dtype, donated) of every argument of a lowered program."""
    leaves = jax.tree_util.tree_flatten_with_path(lowered.args_info)[0]
    return [(jax.tree_util.keystr(p), a.shape, str(a.dtype), a.donated) for p, a in leaves]


def test_planned_step_is_the_trainers(tmp_path, monkeypatch):
    """The planner lowers the program ``train.py`` runs: the demo trained through
    ``run.resolve`` / ``run.fit`` (its data pipeline, parameters on the 8-device mesh, the
    trainer's compiled step) is stopped at the lowering of its first step; the planner's program
    for a batch of that shape (the same supervised-target count and CLIP prompt length) has the
    same arguments (state, batch with ``target_positions``, step key: shapes, dtypes, shardings,
    donation), the same results and the same body."""
    seen = {}

    def lower_and_stop(self, state, batch, rng, host_batch, step):
        seen["lowered"], seen["host"] = self.jitted.lower(state, batch, rng), host_batch
        raise _Lowered

    monkeypatch.setattr(CompiledStep, "get", lower_and_stop)
    cfg = _small(demo.get_config(), 1)
    cfg.synthetic.num_train = 8
    work = str(tmp_path / "run")
    cfg, mcfg, mesh = run.resolve(cfg, work)
    with sharding.mesh_context(mesh), pytest.raises(_Lowered):
        run.fit(cfg, mcfg, mesh, work)
    host, trained = seen["host"], seen["lowered"]

    shape = {
        "max_length": host["input_ids"].shape[1],
        "frames": host["video_pixels"].shape[1],
        "clip_length": host["video_clip_ids"].shape[1],
        "targets": collate.count_targets(host["labels"], host["attention_mask"]),
        "clip_tokens": clip_prompts.clip_prompt_length(host),
    }
    per_device = host["input_ids"].shape[0] // mesh.devices.size
    planned = plan.planned_program(cfg, mesh, per_device, shape)
    with sharding.mesh_context(mesh):
        lowered = planned.lower()
    assert "[0][1]['target_positions']" in {a[0] for a in _args(trained)}  # (state, batch, rng)
    assert _args(lowered) == _args(trained)
    a, b = _main_function(trained.as_text()), _main_function(lowered.as_text())
    assert a[0] == b[0]  # the signature: shardings and donation of every argument and result
    assert a == b
    # the planned batch is what train.py's pipeline collated, as train.py prepares it
    assert {k: v.shape for k, v in planned.host_batch.items()} == {
        k: v.shape for k, v in program.prepare_batch(host, cfg, mcfg).items()
    }


def test_planned_host_batch_micro_batches_fixed_groups_and_dpo():
    """The pipeline's layout without data: ``train.grad_accum_steps`` micro-batches, every row's
    targets by default, a fixed empty group, DPO pairs sharing their video; pixel arrays are
    views (no memory of their size)."""
    import ml_collections

    cfg = ml_collections.ConfigDict(demo.get_config().to_dict())
    mcfg = model_config(cfg)
    cfg.train.grad_accum_steps = 2
    cfg.data.fixed_groups = ("video", "multi")
    cfg.data.max_images = 3
    kw = dict(rows=4, length=64, frames=8, clip_length=32)
    b = program.planned_host_batch(cfg, mcfg, **kw)
    # 8 frames pooled to 8 visual tokens: 64 - 1 - 8 = 55 supervised tokens per row
    assert collate.count_targets(b["labels"], b["attention_mask"]) == 55
    assert b["input_ids"].shape == (4, 64) and b["video_pixels"].shape == (4, 8, 48, 48, 3)
    assert b["multi_pixels"].shape == (4, 3, 48, 48, 3) and not b["multi_frames"].any()
    assert b["video_pixels"].strides == (0,) * 5  # a view of one zero
    # micro-batch j = rows j, j + 2: its rows point into its own pool of 2 videos x 8 tokens
    assert b["visual_index"].max() == 2 * 8 - 1
    prepared = program.prepare_batch(b, cfg, mcfg)
    assert prepared["target_positions"].shape == (4, 63)  # 55 -> 64, capped at L - 1
    assert prepared["video_clip_ids"].shape == (4, 32)  # 32 positions: nothing to trim
    few = program.prepare_batch(
        program.planned_host_batch(cfg, mcfg, **kw, targets=5, clip_tokens=3), cfg, mcfg
    )
    assert few["target_positions"].shape == (4, 16)
    cfg.train.mode = "dpo"
    d = program.planned_host_batch(cfg, mcfg, **kw)
    assert d["input_ids"].shape == (4, 64) and d["video_pixels"].shape[0] == 2  # 2 pairs
    with pytest.raises(ValueError, match="no text after"):
        program.planned_host_batch(cfg, mcfg, rows=2, length=9, frames=8, clip_length=32)


# the multi-image recipe with the demo's model, smaller (its BT-Adapter holds 32 time steps, as
# the 7B start point's 64 do), and the recipe's compute dtype, remat, data and train sections
MULTI_IMAGE_CONFIG = """
import ml_collections

from configs import demo
from configs import ppllava_vicuna7b_image_video_multiimage as recipe


def get_config():
    c = recipe.get_config()
    m = demo.get_config().model
    m.vision = dict(m.vision, image_size=32, hidden_size=32, num_hidden_layers=2)
    m.frame_shape = (4, 4)
    m.pooling_kernel = m.pooling_stride = (1, 4, 4)
    m.image_grid_pinpoints = ((32, 64), (64, 32))
    m.llm = dict(m.llm, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    m.clip_text = dict(m.clip_text, hidden_size=32, intermediate_size=64)
    m.max_T = c.data.max_images
    m.dtype, m.remat_policy = c.model.dtype, c.model.remat_policy
    c.model, c.init_from = m, ""
    c.batch = ml_collections.ConfigDict(
        dict(max_length=48, per_device=4, num_frames=4, clip_length=16)
    )
    return c
"""


def test_multi_image_recipe_compiles_in_the_planner(tmp_path):
    """``configs/ppllava_vicuna7b_image_video_multiimage.py`` (the original's
    ``ppllava_vicuna7b_image_video_multiimage.yaml``) planned with a tiny model: its step
    compiles with every batch's video, image and multi-image groups, the multi-image group
    holding ``data.max_images`` images per row, and the recipe's micro-batches, loss settings,
    compute dtype and remat."""
    from configs import ppllava_vicuna7b_image_video_multiimage as recipe

    path = tmp_path / "multi_plan.py"
    path.write_text(MULTI_IMAGE_CONFIG)
    cfg = recipe.get_config()
    (r,), out = _plan(path, "--devices", "2", "--mesh", "fsdp=2")
    accum = cfg.train.grad_accum_steps
    assert (r["mode"], r["grad_accum_steps"], r["global_batch"]) == ("sft", accum, 4 * 2 * accum)
    assert (r["dtype"], r["remat"]) == (cfg.model.dtype, cfg.model.remat_policy)
    assert r["loss_chunk_size"] == cfg.train.loss_chunk_size
    rows = r["global_batch"] // 2  # per device
    images = rows * cfg.data.max_images * SIZE * SIZE * 3 * 4  # float32 multi-image pixels
    video = rows * FRAMES * SIZE * SIZE * 3 * 4
    assert r["batch_bytes"] > images + video > 0
    assert r["compile_s"] > 0 and "PPLLaVA SFT plan" in out
