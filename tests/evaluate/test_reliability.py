"""Evaluation and resumption under misuse (issue 13, items 1 and 6): answers files keyed on the
checkpoint and the protocol settings; a non-PPLLaVA or mismatched checkpoint, and a training
resume after a model change, reported by name before anything is restored."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from ppllava_jax import sharding
from ppllava_jax.convert import params_io
from ppllava_jax.evaluate import answers, runner
from ppllava_jax.evaluate.checkpoint_check import CheckpointMismatchError
from ppllava_jax.evaluate.model_setup import load_setup
from ppllava_jax.evaluate.synthetic import Synthetic
from tests.evaluate.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MESH = "data=1,fsdp=1,tensor=1"
KW = dict(batch_size=4, max_new_tokens=2, progress=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrel")
    ckpt = make_tiny_checkpoint(str(root / "ckpt"), str(root / "data"))
    # another checkpoint of the same model (e.g. a later training run exported to the same
    # place): other weights, same tokenizers and config
    ckpt2 = str(root / "ckpt2")
    shutil.copytree(ckpt, ckpt2)
    shutil.rmtree(os.path.join(ckpt2, "params"))
    family, hf = params_io.read_config(ckpt)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.25, params_io.load_params(ckpt))
    params_io.save_params(ckpt2, params, family, hf)
    return root, ckpt, ckpt2


def _answer_lines(out):
    with open(answers.answers_path(out)) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_answers_are_keyed_on_checkpoint_and_protocol(env):
    root, ckpt, ckpt2 = env
    data = str(root / "data")
    bench = Synthetic(data, num_frames=8)
    a = load_setup(ckpt, mesh=MESH)
    b = load_setup(ckpt2, mesh=MESH)
    out = str(root / "keyed" / "res.json")
    assert runner.run(bench, a, out, max_new_answers=4, **KW) is None  # "killed" after 4
    header, where = answers.read_protocol(out)
    assert where == os.path.realpath(ckpt)
    assert header["checkpoint_id"] == answers.checkpoint_id(ckpt)
    assert header["benchmark"] == "synthetic" and header["num_frames"] == 8

    # another checkpoint, same --out: refused (the old code reported a's answers as b's)
    with pytest.raises(answers.AnswersMismatchError) as e:
        runner.run(bench, b, out, **KW)
    msg = str(e.value)
    assert "checkpoint_id" in msg and ckpt in msg and ckpt2 in msg and "--fresh" in msg
    # other protocol settings: refused, each difference named with both values
    with pytest.raises(answers.AnswersMismatchError, match="max_new_tokens: 2 in the file, 3"):
        runner.run(bench, a, out, **{**KW, "max_new_tokens": 3})
    with pytest.raises(answers.AnswersMismatchError, match="num_frames: 8 in the file, 4 now"):
        runner.run(Synthetic(data, num_frames=4), a, out, **KW)
    with pytest.raises(answers.AnswersMismatchError, match="split"):
        runner.run(Synthetic(data, num_frames=8, split="train"), a, out, **KW)
    assert len(_answer_lines(out)) == 4  # nothing was written by the refused runs
    assert answers.read_protocol(out)[0] == header

    # --fresh: the old answers are deleted, every question is asked of the new checkpoint
    res = runner.run(bench, b, out, fresh=True, **KW)
    assert answers.read_protocol(out)[0]["checkpoint_id"] == answers.checkpoint_id(ckpt2)
    assert [r["id"] for r in _answer_lines(out)] == [f"eval:{i}" for i in range(8)]
    assert res["protocol"]["checkpoint_id"] == answers.checkpoint_id(ckpt2)
    assert res["summary"]["num_questions"] == 8 and len(res["records"]) == 8


def test_checkpoint_id_follows_the_saved_parameters(env, tmp_path):
    root, ckpt, ckpt2 = env
    moved = str(tmp_path / "moved")
    shutil.copytree(ckpt, moved)  # the same save elsewhere: the same id, answers resumable
    assert answers.checkpoint_id(moved) == answers.checkpoint_id(ckpt)
    assert answers.checkpoint_id(ckpt2) != answers.checkpoint_id(ckpt)
    # a tokenizer compares by content, not by where it lies
    assert answers.directory_id(os.path.join(moved, "tokenizer")) == answers.directory_id(
        os.path.join(ckpt, "tokenizer")
    )


def test_answers_without_protocol_are_not_resumed(tmp_path):
    out = str(tmp_path / "old.json")
    with open(answers.answers_path(out), "w") as f:  # answers of an earlier version
        f.write(json.dumps({"id": "eval:0", "prediction": "(A)"}) + "\n")
        f.write('{"id": "eval:1", "predic')  # and a line cut by a kill
    proto = {"checkpoint_id": "x", "benchmark": "synthetic"}
    with pytest.raises(answers.AnswersMismatchError, match=r"(?s)hold 1 answers.*is missing"):
        answers.check_answers(out, proto)
    answers.write_protocol(out, proto, "/ckpt")
    assert answers.check_answers(out, proto) == []  # recorded and equal: resumable
    with pytest.raises(answers.AnswersMismatchError, match='benchmark: "synthetic" in the'):
        answers.check_answers(out, {**proto, "benchmark": "mvbench"})
    gone = answers.check_answers(out, proto, fresh=True)
    assert gone == [answers.answers_path(out), answers.protocol_path(out)]
    assert not os.path.exists(gone[0]) and not os.path.exists(gone[1])
    assert answers.check_answers(out, {"other": 1}) == []  # no answers: nothing to check


def _no_restore(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a restore was attempted")

    monkeypatch.setattr(sharding, "restore_params_onto_mesh", fail)
    monkeypatch.setattr(params_io, "load_params", fail)


def test_non_ppllava_checkpoint_named_before_restore(env, tmp_path, monkeypatch):
    _, ckpt, _ = env
    # a converted LLaMA (the decoder alone): the old code restored it, then failed with
    # AttributeError: 'LlamaConfig' object has no attribute 'pooling'
    llama = str(tmp_path / "llama")
    _, hf = params_io.read_config(ckpt)
    params_io.save_params(
        llama, params_io.load_params(ckpt)["language_model"], "llama", hf["text_config"]
    )
    _no_restore(monkeypatch)
    with pytest.raises(CheckpointMismatchError, match=r"holds a 'llama' checkpoint") as e:
        load_setup(llama, mesh=MESH)
    assert llama in str(e.value) and "'ppllava'" in str(e.value)
    # a training workdir instead of its export
    (tmp_path / "workdir" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointMismatchError, match="training workdir.*final"):
        load_setup(str(tmp_path / "workdir"), mesh=MESH)
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nope not found"):
        load_setup(str(tmp_path / "nope"), mesh=MESH)


def test_params_unlike_config_named_before_restore(env, tmp_path, monkeypatch):
    _, ckpt, _ = env
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpt, bad)
    d = json.loads(Path(bad, "config.json").read_text())
    d["config"]["text_config"]["intermediate_size"] = 96  # params/ holds 64
    Path(bad, "config.json").write_text(json.dumps(d))
    _no_restore(monkeypatch)
    with pytest.raises(CheckpointMismatchError) as e:
        load_setup(bad, mesh=MESH)
    msg = str(e.value)
    assert os.path.join(bad, "params") in msg
    # the parameter by name, both shapes (a scanned layer stack: [layers, in, out])
    assert "language_model/model/layers/mlp/up_proj/kernel: saved (2, 32, 64), config.json " in msg
    assert "(2, 32, 96)" in msg


def test_eval_command_missing_checkpoint_no_traceback(env, tmp_path):
    root, _, _ = env
    env_vars = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env_vars.pop("PPLLAVA_TRACEBACK", None)
    res = subprocess.run(
        [sys.executable, "eval.py", "--checkpoint", str(tmp_path / "nope"), "--benchmark",
         "synthetic", "--data", str(root / "data"), "--out", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env_vars,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert f"error: checkpoint directory {tmp_path / 'nope'} not found" in res.stderr


class _DataPosition:
    """Stands in for the pipeline iterator whose position a real checkpoint holds."""

    def get_state(self):
        return {"batches": 2}


def test_training_resume_after_model_change_names_parameter(tmp_path):
    """run.main with a checkpoint of another model in its workdir: the parameter and both
    shapes, before the trainer restores anything (orbax's error named no parameter)."""
    from configs import demo
    from ppllava_jax.models.ppllava import init_params
    from ppllava_jax.train import resume_check, run
    from ppllava_jax.train.checkpoint import Checkpointer
    from ppllava_jax.train.optimizer import make_optimizer, trainable_predicate
    from ppllava_jax.train.state import create_train_state
    from tests.test_demo import _small

    def config(mlp):
        c = _small(demo.get_config(), 2)
        c.synthetic.num_train, c.synthetic.num_eval = 8, 4
        c.model.llm = dict(c.model.llm, intermediate_size=mlp)
        return c

    work = tmp_path / "run"
    old = config(64)  # the run that saved step 2
    tx, _ = make_optimizer(old.optimizer, 2)
    params = nn.unbox(init_params(run.model_config(old), jax.random.PRNGKey(0)))
    state = create_train_state(params, tx, trainable_predicate(old.optimizer))
    ck = Checkpointer(str(work / "checkpoints"), async_save=False)
    ck.save(2, state, data_iterator=_DataPosition(), config=old, force=True)
    ck.close()

    with pytest.raises(resume_check.ResumeMismatchError) as e:
        run.main(config(96), str(work))
    msg = str(e.value)
    assert str(work / "checkpoints" / "2") in msg
    assert "language_model/model/layers/mlp/up_proj/kernel: checkpoint (2, 32, 64), model " in msg
    assert "(2, 32, 96)" in msg and "config" in msg

    # the same model with another trainable selection: named too
    other = config(64)
    other.optimizer.trainable = "projector_only"
    with pytest.raises(resume_check.ResumeMismatchError, match="trainable in the checkpoint"):
        resume_check.check_resume(str(work / "checkpoints"), params, other)
    resume_check.check_resume(str(work / "checkpoints"), params, old)  # fits: no error
