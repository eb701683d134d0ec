"""Every config in configs/ loads, builds its model config, validates its data section, mesh,
schedule and trainable selection against the abstract parameter tree (``jax.eval_shape``: no
7B array is materialised), and the 7B recipes train what SPEC section 7 says."""

import importlib
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import linen as nn

from ppllava_jax import sharding
from ppllava_jax.convert.ppllava_config import ppllava_config_to_hf
from ppllava_jax.data import pipeline as pl
from ppllava_jax.models.config import PPLLaVAConfig, ppllava_qwen7b_config
from ppllava_jax.models.ppllava import init_params
from ppllava_jax.train import optimizer as opt
from ppllava_jax.train import run

ROOT = Path(__file__).resolve().parents[1]
# every recipe (configs/common.py holds their shared sections and is not one)
CONFIGS = sorted(
    p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common")
)
RECIPES_7B = [n for n in CONFIGS if n.startswith("ppllava_vicuna7b")]


def _start_point(tmp_path, preset: str = "") -> str:
    """A directory with the config.json that ``convert_torch_weights.py --source
    llava-v1.6-vicuna-7b-hf --clip clip-vit-large-patch14-336`` writes (7B defaults) and an empty
    ``params/``: ``run.model_config`` reads only the config."""
    d = tmp_path / "start"
    (d / "params").mkdir(parents=True)
    qwen = preset == "ppllava_qwen7b"  # the Qwen2 + SigLIP start point (LLaVA-OneVision)
    hf = ppllava_config_to_hf(ppllava_qwen7b_config() if qwen else PPLLaVAConfig())
    (d / "config.json").write_text(json.dumps({"family": "ppllava", "config": hf}))
    return str(d)


def _abstract_params(mcfg):
    """The parameter tree as ``ShapeDtypeStruct``s, logical-axis boxes removed (as trained)."""
    return nn.meta.unbox(jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0))))


def _counts(abstract, predicate) -> dict[str, list[int]]:
    """{top-level module: [trainable, frozen]} parameter counts of an abstract tree."""
    out: dict[str, list[int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        p = "/".join(str(k.key) for k in path)
        n = int(np.prod(leaf.shape))
        out.setdefault(p.split("/")[0], [0, 0])[0 if predicate(p, leaf) else 1] += n
    return out


def _load(name, tmp_path):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    cfg = type(cfg)(cfg.to_dict())  # resolved, unlocked copy (as run.main makes)
    if cfg.get("init_from"):
        cfg.init_from = _start_point(tmp_path, cfg.model.get("preset", ""))
    if not cfg.data.sources and cfg.get("synthetic") is not None:  # the demo fills these in
        cfg.data.sources = ["<synthetic>/train.json"]
    if not cfg.data.sources:  # the user's own files (configs/finetune_own.py): the example's
        example = ROOT / "examples" / "my_videos" / "train.json"
        cfg.data.sources = [dict(path=str(example), data_root="my_videos")]
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_by_path_as_train_py_does(name, monkeypatch):
    """``train.py --config configs/X.py`` loads the file by its path (``config_flags``), not as
    the module ``configs.X``: its ``from configs import common`` must resolve all the same."""
    from absl import flags
    from ml_collections import config_flags

    path = str(ROOT / "configs" / f"{name}.py")
    monkeypatch.setattr(sys, "argv", ["train.py", f"--config={path}"])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
    fv(["train.py", f"--config={path}"])
    want = importlib.import_module(f"configs.{name}").get_config()
    assert fv.config.to_dict() == want.to_dict()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_validates(name, tmp_path):
    cfg = _load(name, tmp_path)
    mcfg = run.model_config(cfg)
    data = pl.default_config()
    data.update(cfg.data.to_dict())  # an unknown data field fails here
    pl.validate_config(data, mcfg)
    sharding.make_mesh(dict(cfg.mesh))  # -1 axes take the 8 test devices
    total = int(cfg.train.total_steps)
    assert total > 0
    sched = opt.make_schedule(cfg.optimizer, total)
    assert float(sched(total)) <= float(cfg.optimizer.lr) * 1e-6 + 1e-12 or (
        cfg.optimizer.schedule == "constant"
    )
    assert cfg.train.mode in ("sft", "dpo")
    assert (cfg.train.mode == "dpo") == bool(data.dpo), "train.mode='dpo' needs data.dpo=True"
    abstract = _abstract_params(mcfg)
    opt.check_selection(abstract, cfg.optimizer)
    counts = _counts(abstract, opt.trainable_predicate(cfg.optimizer))
    tr, fr = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    print(f"\n{name}: trainable {tr:,}  frozen {fr:,}")
    for mod, (t, f) in sorted(counts.items()):
        print(f"  {mod:<24} {t:>15,} {f:>15,}")
    assert tr > 0


@pytest.mark.parametrize("name", RECIPES_7B)
def test_7b_recipe(name, tmp_path):
    cfg = _load(name, tmp_path)
    mcfg = run.model_config(cfg)
    assert mcfg.llm.num_hidden_layers == 32 and mcfg.llm.hidden_size == 4096
    assert mcfg.dtype == "bfloat16" and mcfg.remat_policy != "none"  # bf16, remat (SPEC §7)
    assert cfg.mesh.fsdp != 1  # parameters and optimizer state sharded
    assert cfg.data.num_frames == 32 and cfg.data.clip_max_length == 248
    o = cfg.optimizer
    assert o.weight_decay == 0.0
    dpo = cfg.train.mode == "dpo"
    if dpo:
        assert (o.lr, o.schedule, o.warmup_ratio, o.trainable) == (5e-6, "linear", 0.1, "llm_only")
        assert cfg.dpo.beta == 0.1 and cfg.data.dpo
    else:
        assert (o.lr, o.schedule, o.warmup_ratio, o.trainable) == (
            2e-5,
            "cosine",
            0.03,
            "ppllava_sft",
        )
        # the original's epochs (1; the video-only recipe 2) of the global batch of 128
        epochs = cfg.train.get("epochs", 1)
        assert cfg.train.total_steps == -(-cfg.train.num_samples * epochs // 128)
    abstract = _abstract_params(mcfg)
    pred = opt.trainable_predicate(o)
    c = _counts(abstract, pred)
    llm = c["language_model"]
    assert 6.6e9 < llm[0] < 6.8e9 and llm[1] == 0  # Vicuna-7B (32064-token vocabulary)
    # the CLIP trunk and text tower are frozen, whatever else trains
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        p = "/".join(str(k.key) for k in path)
        trunk = p.startswith("vision_tower/") and "btadapter_" not in p
        if trunk or "clip_text_model" in p or p.endswith("logit_scale"):
            assert not pred(p, leaf), p
    vision = c["vision_tower"]
    assert vision[1] > 2.9e8  # ViT-L/14 trunk, ~300M, frozen
    if dpo:  # LLM only
        assert c["vision_tower"][0] == c["multi_modal_projector"][0] == 0
    else:  # + BT-Adapter, projector MLP / projections, image_newline
        assert vision[0] > 0 and c["multi_modal_projector"][0] > 0 and c["image_newline"][0] > 0
