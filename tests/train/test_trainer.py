"""The training loop: exact resume, SIGTERM, metrics, restoring onto another mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ppllava_jax.sharding import make_mesh
from ppllava_jax.train.checkpoint import Checkpointer
from ppllava_jax.train.optimizer import make_optimizer, trainable_predicate
from ppllava_jax.train.state import create_train_state, state_shardings, with_shardings
from ppllava_jax.train.trainer import default_config, train
from tests.train.toy_model import CountingIterator, make_toy

TOTAL = 6


def _config():
    # keep in sync with the SIGTERM child below (same compiled step -> compilation cache hit)
    cfg = default_config()
    cfg.train.total_steps = TOTAL
    cfg.train.log_every = 1
    cfg.checkpoint.save_every = 100  # only the end (or a stop/SIGTERM) saves
    cfg.optimizer.lr = 1e-2
    cfg.optimizer.warmup_steps = 1
    cfg.optimizer.weight_decay = 0.01
    return cfg


def _run(workdir, it, **kw):
    apply_fn, init = make_toy(dropout=0.1)  # dropout: the per-step rng matters
    logs = []
    res = train(
        _config(),
        str(workdir),
        model_apply=apply_fn,
        init_params=init,
        data_iterator=it,
        log=logs.append,
        **kw,
    )
    return res, logs


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.opt_state)))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight")
    it = CountingIterator()
    res, _ = _run(wd, it)
    return wd, it, res


def test_resume_is_exact(straight, tmp_path):
    wd_a, it_a, res_a = straight
    assert res_a.step == TOTAL and not res_a.preempted
    assert it_a.seen == list(range(TOTAL))

    it1 = CountingIterator()
    res1, _ = _run(tmp_path, it1, stop_at_step=TOTAL // 2)
    assert res1.step == TOTAL // 2 and it1.seen == list(range(TOTAL // 2))
    it2 = CountingIterator()
    res2, logs = _run(tmp_path, it2)
    assert any(f"resumed from step {TOTAL // 2}" in m for m in logs)
    assert it2.seen == list(range(TOTAL // 2, TOTAL))  # the data continues where it stopped
    assert res2.step == TOTAL
    for a, b in zip(_leaves(res_a.state), _leaves(res2.state), strict=True):
        assert np.array_equal(a, b)  # bitwise
    ckpts = Checkpointer(tmp_path / "checkpoints")
    assert ckpts.all_steps() == [TOTAL // 2, TOTAL]
    ckpts.close()


def test_metrics_jsonl(straight):
    wd, _, _ = straight
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert [r["step"] for r in lines] == list(range(1, TOTAL + 1))
    keys = {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "num_tokens",
        "num_samples",
        "tokens_per_sec",
        "samples_per_sec",
        "step_time",
        "flops_per_step",
        "mfu",
    }
    assert keys <= set(lines[0])
    assert lines[0]["mfu"] is None  # CPU: no peak FLOP/s
    assert lines[0]["flops_per_step"] > 0 and np.isfinite(lines[-1]["loss"])
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(1e-2)  # 1 warmup step
    assert os.listdir(os.path.join(wd, "tensorboard"))


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, {root!r})
    from ppllava_jax.launch import size_cpu_thread_pool
    size_cpu_thread_pool()  # PJRT_NPROC for the simulated devices
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from tests.train.toy_model import CountingIterator, make_toy
    from tests.train.test_trainer import _config
    from ppllava_jax.train.trainer import train
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal

    class Slow(CountingIterator):  # a batch every {first}s, then every {later}s
        def __next__(self):
            time.sleep({first} if self.pos == 0 else {later})
            return super().__next__()

    apply_fn, init = make_toy(dropout=0.1)
    res = train(_config(), {workdir!r}, model_apply=apply_fn, init_params=init,
                data_iterator=Slow())
    print("RESULT", res.step, res.preempted, res.signal_name, flush=True)
    """
)


def _child(tmp_path, first=1.0, later=1.0):
    """The toy training in a child process, started; returns it and its workdir."""
    here = os.path.dirname(os.path.abspath(__file__))
    cache = jax.config.jax_compilation_cache_dir or os.path.expanduser("~/.cache/ppllava_jax/xla")
    script = tmp_path / "child.py"
    wd = tmp_path / "wd"
    root = os.path.dirname(os.path.dirname(here))
    script.write_text(
        CHILD.format(root=root, cache=cache, workdir=str(wd), first=first, later=later)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, wd


def _wait_for_first_step(proc, wd):
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the child never logged a step"
        time.sleep(0.05)


def _stopped_and_saved(proc, out, wd, signal_name):
    """The step the child stopped at, checking it said it was stopped by ``signal_name`` and
    that the checkpoint of that step (only: save_every=100) was written."""
    assert proc.returncode == 0, out
    line = [x for x in out.splitlines() if x.startswith("RESULT")][0].split()
    stopped = int(line[1])
    assert line[2:] == ["True", signal_name] and 1 <= stopped < TOTAL, out
    ck = Checkpointer(wd / "checkpoints")
    assert ck.all_steps() == [stopped]  # written because of the signal (save_every=100)
    ck.close()
    return stopped


def test_sigterm_saves_and_next_run_continues(straight, tmp_path):
    proc, wd = _child(tmp_path)
    _wait_for_first_step(proc, wd)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    stopped = _stopped_and_saved(proc, out, wd, "SIGTERM")

    it = CountingIterator()
    res, logs = _run(wd, it)
    assert any(f"resumed from step {stopped}" in m for m in logs)
    assert it.seen == list(range(stopped, TOTAL)) and res.step == TOTAL
    for a, b in zip(_leaves(straight[2].state), _leaves(res.state), strict=True):
        assert np.array_equal(a, b)  # preempted + resumed == straight run


def test_ctrl_c_saves_like_sigterm(tmp_path):
    proc, wd = _child(tmp_path)
    _wait_for_first_step(proc, wd)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    _stopped_and_saved(proc, out, wd, "SIGINT")
    assert "Ctrl-C again aborts at once" in out


def test_second_ctrl_c_aborts_at_once(tmp_path):
    proc, wd = _child(tmp_path, first=0.0, later=120.0)  # waits 2 minutes for batch 2
    _wait_for_first_step(proc, wd)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    seen = ""
    for line in proc.stdout:  # the first Ctrl-C is acknowledged, the run goes on ...
        seen += line
        assert time.time() < deadline, "no answer to the first Ctrl-C"
        if "Ctrl-C again aborts" in line:
            break
    assert "Ctrl-C again aborts" in seen and proc.poll() is None, seen
    t = time.time()
    proc.send_signal(signal.SIGINT)  # ... and the second ends the process without waiting
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and time.time() - t < 30
    ck = Checkpointer(wd / "checkpoints")
    assert ck.all_steps() == []  # it never got to save
    ck.close()


def test_resume_cuts_metrics_back_to_the_checkpoint(straight, tmp_path):
    """A run that logged step 3 but died before saving it resumes from step 2: metrics.jsonl
    then holds each step once, step 3 as the resumed run computed it."""
    cfg = _config()
    cfg.checkpoint.save_every = 2
    apply_fn, init = make_toy(dropout=0.1)
    kw = dict(model_apply=apply_fn, init_params=init, log=lambda s: None)
    train(cfg, str(tmp_path), data_iterator=CountingIterator(), stop_at_step=3, **kw)
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # killed before the save of step 3 landed
    train(cfg, str(tmp_path), data_iterator=CountingIterator(), **kw)
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    assert [r["step"] for r in lines] == list(range(1, TOTAL + 1))
    assert [r["loss"] for r in lines] == _losses(straight[0])  # bitwise: the resume is exact


def test_restore_onto_another_mesh(tmp_path):
    _, init = make_toy()
    params = init()
    cfg = _config()
    tx, _ = make_optimizer(cfg.optimizer, TOTAL)
    pred = trainable_predicate(cfg.optimizer)

    def shardings(mesh, axis, dim):
        def one(x):
            spec = [None] * x.ndim
            if x.ndim and x.shape[dim] % mesh.shape[axis] == 0:
                spec[dim] = axis
            return NamedSharding(mesh, P(*spec))

        return jax.tree.map(one, params)

    mesh_a = make_mesh({"fsdp": 8})
    sh_a = state_shardings(shardings(mesh_a, "fsdp", 0), tx, pred, params_abstract=params)
    state = jax.jit(lambda p: create_train_state(p, tx, pred), out_shardings=sh_a)(params)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    assert state.params["language_model"]["lm_head"]["kernel"].sharding.spec == P("fsdp", None)
    ck = Checkpointer(tmp_path / "ck", save_every=1)
    ck.save(1, state, force=True)
    ck.wait()

    mesh_b = make_mesh({"data": 2, "fsdp": 4})
    sh_b = state_shardings(shardings(mesh_b, "fsdp", -1), tx, pred, params_abstract=params)
    target = with_shardings(jax.eval_shape(lambda p: create_train_state(p, tx, pred), params), sh_b)
    restored = ck.restore(target)
    ck.close()
    k = restored.params["language_model"]["lm_head"]["kernel"]
    assert k.sharding.mesh.shape == mesh_b.shape and k.sharding.spec == P(None, "fsdp")
    mu = restored.opt_state[1][0].mu["language_model"]["lm_head"]["kernel"]
    assert mu.sharding.spec == P(None, "fsdp")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for s, r in zip(jax.tree.leaves(sh_b), jax.tree.leaves(restored), strict=True):
        assert r.sharding == s


def test_checkpoint_iterator_state_and_dpo_reference(tmp_path):
    from ppllava_jax.train.checkpoint import decode_iterator_state, encode_iterator_state

    for s in (b'{"pos": 3}', b"\xff\x00raw", {"pos": 3, "nested": [1, 2]}):
        assert decode_iterator_state(encode_iterator_state(s)) == s

    class BytesIterator:  # like grain's DataLoaderIterator: get_state() -> bytes
        state = b'{"last_seen_indices": {"0": 41}}'

        def get_state(self):
            return self.state

        def set_state(self, s):
            self.state = s

    _, init = make_toy()
    params = init()
    cfg = _config()
    cfg.optimizer.trainable = "llm_only"
    tx, _ = make_optimizer(cfg.optimizer, TOTAL)
    pred = trainable_predicate(cfg.optimizer)
    create = lambda p: create_train_state(p, tx, pred, with_reference=True)
    state = create(params)
    ck = Checkpointer(tmp_path / "ck", save_frozen=False, save_reference=False)
    ck.save(2, state, data_iterator=BytesIterator(), config=cfg, force=True)
    ck.close()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.restore_config()["optimizer"]["trainable"] == "llm_only"
    it = BytesIterator()
    it.state = b"{}"
    with pytest.raises(ValueError, match="no frozen"):
        ck.restore(jax.eval_shape(create, params))
    restored = ck.restore(jax.eval_shape(create, params), data_iterator=it, initial=state)
    ck.close()
    assert it.state == BytesIterator.state
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_run_matches_single_device(straight, tmp_path):
    from ppllava_jax.sharding import shard_batch

    mesh = make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    apply_fn, init = make_toy(dropout=0.1)

    def one(x):  # shard the first axis that divides
        spec = [None] * x.ndim
        for d in range(x.ndim):
            if x.shape[d] % 2 == 0:
                spec[d] = "fsdp"
                break
        return NamedSharding(mesh, P(*spec))

    params = init()
    shardings = jax.tree.map(one, params)
    params = jax.device_put(params, shardings)
    res = train(
        _config(),
        str(tmp_path),
        model_apply=apply_fn,
        init_params=params,
        data_iterator=CountingIterator(),
        param_shardings=shardings,
        place_batch=lambda b: shard_batch(b, mesh),
        log=lambda s: None,
    )
    k = res.state.params["language_model"]["lm_head"]["kernel"]
    assert k.sharding.spec == P("fsdp", None) and len(k.sharding.device_set) == 2
    mu = res.state.opt_state[1][0].mu["language_model"]["lm_head"]["kernel"]
    assert mu.sharding == k.sharding
    np.testing.assert_allclose(_losses(tmp_path), _losses(straight[0]), rtol=1e-5)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x)["loss"] for x in f]


def test_grain_iterators_resume_through_checkpoint(tmp_path):
    import grain

    src = np.arange(40)
    loaders = {
        "dataset": lambda: iter(grain.MapDataset.source(src).shuffle(seed=1).batch(4)),
        "dataloader": lambda: iter(
            grain.DataLoader(
                data_source=src,
                sampler=grain.samplers.IndexSampler(
                    40,
                    shuffle=True,
                    seed=0,
                    num_epochs=1,
                    shard_options=grain.sharding.NoSharding(),
                ),
                operations=[grain.transforms.Batch(4)],
                worker_count=0,
            )
        ),
    }
    _, init = make_toy()
    cfg = _config()
    tx, _ = make_optimizer(cfg.optimizer, TOTAL)
    pred = trainable_predicate(cfg.optimizer)
    create = lambda p: create_train_state(p, tx, pred)
    params = init()
    state = create(params)
    for name, make in loaders.items():
        straight = make()
        expected = [next(straight).tolist() for _ in range(5)]
        it = make()
        for _ in range(2):
            next(it)
        ck = Checkpointer(tmp_path / name)
        ck.save(2, state, data_iterator=it, force=True)
        ck.close()
        it2 = make()
        ck = Checkpointer(tmp_path / name)
        ck.restore(jax.eval_shape(create, params), data_iterator=it2)
        ck.close()
        assert [next(it2).tolist() for _ in range(3)] == expected[2:], name
