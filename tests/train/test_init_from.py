"""``init_from``: an export / converted directory and a training checkpoint step give the run the
same parameters they hold, on a mesh; anything else is refused in one line."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo
from ppllava_jax import sharding
from ppllava_jax.convert import params_io
from ppllava_jax.convert.ppllava_config import ppllava_config_to_hf
from ppllava_jax.models.ppllava import init_params
from ppllava_jax.train import init_from
from ppllava_jax.train.checkpoint import Checkpointer
from ppllava_jax.train.model_config import model_config
from ppllava_jax.train.optimizer import split_params, trainable_predicate
from ppllava_jax.train.state import TrainState
from tests.test_demo import _small


def _run_config(init: str = "") -> ml_collections.ConfigDict:
    cfg = _small(demo.get_config(), 2)
    cfg.init_from = init
    return cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random model saved as a training checkpoint step (trainable 'ppllava_sft': the LLM and
    projector trained, the towers frozen) and as an export; returns (paths, params)."""
    root = tmp_path_factory.mktemp("init_from")
    cfg = _run_config()
    mcfg = model_config(cfg)
    params = jax.device_get(
        jax.tree.map(np.asarray, sharding.unboxed_values(init_params(mcfg, jax.random.key(3))))
    )
    trainable, frozen = split_params(params, trainable_predicate({"trainable": "ppllava_sft"}))
    assert trainable and frozen
    state = TrainState(step=np.int32(7), params=trainable, frozen=frozen, opt_state={})
    ckpt = Checkpointer(root / "run" / "checkpoints", async_save=False)
    ckpt.save(7, state, config=cfg, force=True)
    ckpt.close()
    params_io.save_params(root / "export", params, "ppllava", ppllava_config_to_hf(mcfg))
    return root, params


def _restored(path: str):
    cfg = _run_config(path)
    mcfg = model_config(cfg)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    abstract = jax.eval_shape(lambda: init_params(mcfg, jax.random.key(0)))
    with sharding.mesh_context(mesh):
        params, shardings = init_from.restore_params(init_from.locate(path), abstract, mesh)
    return mcfg, params, shardings


@pytest.mark.parametrize("kind", ["export", "checkpoint"])
def test_restores_the_saved_parameters_onto_the_mesh(saved, kind):
    root, params = saved
    path = root / "export" if kind == "export" else root / "run" / "checkpoints" / "7"
    assert init_from.locate(str(path)).kind == ("converted" if kind == "export" else kind)
    mcfg, got, shardings = _restored(str(path))
    # the export's config.json names the CLIP directory (clip_weight 'clip'); nothing else differs
    assert dataclasses.replace(mcfg, clip_weight=None) == model_config(_run_config())
    flat_want = jax.tree_util.tree_leaves_with_path(params)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    assert len(flat_got) == len(flat_want)
    for p, want in flat_want:
        np.testing.assert_array_equal(np.asarray(flat_got[p]), want, err_msg=str(p))
    # placed as the logical rules place the model (the embedding's vocab split over fsdp)
    leaves = jax.tree.leaves(got)
    assert all(a.sharding == s for a, s in zip(leaves, jax.tree.leaves(shardings)))
    assert any(not a.sharding.is_fully_replicated for a in leaves)


def test_anything_else_is_refused_in_one_line(saved, tmp_path):
    root, _ = saved
    (tmp_path / "notes").mkdir()
    cases = {
        str(tmp_path / "missing"): "not found",
        str(tmp_path / "notes"): "neither config.json + params/ nor a checkpoint step",
        str(root / "run"): "give one step, e.g. " + str(root / "run" / "checkpoints" / "7"),
        str(root / "run" / "checkpoints"): "(steps: 7)",
    }
    for path, words in cases.items():
        with pytest.raises(init_from.InitFromError) as e:
            init_from.locate(path)
        msg = str(e.value)
        assert words in msg and "\n" not in msg, msg
        assert msg.startswith(f"init_from={path}"), msg


def test_a_checkpoint_of_another_model_is_refused_by_name(saved, tmp_path):
    root, _ = saved
    cfg = _run_config()
    cfg.model.llm = dict(cfg.model.llm, num_hidden_layers=3)  # the new run's model section
    start = init_from.locate(str(root / "run" / "checkpoints" / "7"))
    other = model_config(cfg)
    mesh = sharding.make_mesh({"data": 8})
    abstract = jax.eval_shape(lambda: init_params(other, jax.random.key(0)))
    with pytest.raises(init_from.InitFromError, match="does not fit the model"):
        init_from.restore_params(start, abstract, mesh)
