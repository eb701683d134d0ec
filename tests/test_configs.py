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


def test_multi_image_recipe_is_the_image_video_one_plus_m4():
    """The original's ``ppllava_vicuna7b_image_video_multiimage.yaml`` is its
    ``ppllava_vicuna7b_image_video.yaml`` with ``m4_multi_image`` (a ``multi-image`` corpus of
    ``instruction_data.py``) first in ``interleave_datasets``: the same model, schedule and
    optimizer, one more source, every batch with a multi-image group of up to 32 images (the
    raw-frame reader's cap) whose 2,048 visual tokens fit the longest bucket."""
    from configs import ppllava_vicuna7b_image_video as iv
    from configs import ppllava_vicuna7b_image_video_multiimage as mi
    from ppllava_jax.layout import num_pooled

    a, b = iv.get_config().to_dict(), mi.get_config().to_dict()
    da, db = a.pop("data"), b.pop("data")
    a["train"].pop("num_samples"), b["train"].pop("num_samples")
    a["train"].pop("total_steps"), b["train"].pop("total_steps")
    assert a == b
    assert db["sources"][0] == dict(
        path="data/annotations/m4_multi_image.json",
        data_root="data/media/m4_multi_image",
        media_type="multi-image",
        weight=1.0,
        name="m4_multi_image",
    )
    assert db["sources"][1:] == da["sources"]
    assert db["fixed_groups"] == ("video", "image", "multi") and db["max_images"] == 32
    changed = {k for k in da if da[k] != db[k]}
    assert {"sources", "fixed_groups"} <= changed
    assert changed <= {"sources", "fixed_groups", "max_images", "max_length", "buckets"}
    tokens = int(np.prod(num_pooled(PPLLaVAConfig(), 32, False)))  # (32, 8, 8): 64 per image
    assert tokens == 2048 and max(db["buckets"]) == db["max_length"] > tokens + 512


def test_qwen_recipe_trains_and_encodes_as_the_original(tmp_path):
    """``config/qwen/ppllava_qwen7b_videoonly.yaml`` as the original runs it: the original's
    training samples (``Interleave_sft_dataset`` with its Qwen switch), the per-device token
    mean of 8-row micro-batches, and every projector parameter trained except ``logit_scale``,
    ``logit_bias`` and the SigLIP text tower's kept position table (``position_embedding``,
    ``requires_grad=False`` in its context extension; ``position_embedding_res`` trains)."""
    cfg = _load("ppllava_qwen7b_videoonly", tmp_path)
    mcfg = run.model_config(cfg)
    assert mcfg.qwen and cfg.data.template == "plain_qwen" and cfg.data.text_encoding == "original"
    assert not cfg.data.get("training_bounds", False)  # the original reads whole videos
    assert cfg.train.loss_normalization == "per_device_mean" and cfg.train.loss_group_size == 8
    pred = opt.trainable_predicate(cfg.optimizer)
    frozen_in_projector = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(mcfg))[0]:
        p = "/".join(str(k.key) for k in path)
        if p.startswith("vision_tower/"):
            assert not pred(p, leaf), p
        elif p.startswith("multi_modal_projector/") and not pred(p, leaf):
            frozen_in_projector.add(p)
        else:
            assert pred(p, leaf), p
    text = "multi_modal_projector/clip_text_model/embeddings/"
    assert frozen_in_projector == {
        text + "position_embedding",
        "multi_modal_projector/logit_scale",
        "multi_modal_projector/logit_bias",
    }
    assert pred(text + "position_embedding_res")
