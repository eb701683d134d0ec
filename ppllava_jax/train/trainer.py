"""The training loop as a library function: ``train(config, workdir, ...)``.

``train.py`` (the command line) builds the model, the initial parameters and the data
iterator, then calls, e.g. with the project's sharding helpers::

    mesh = sharding.make_mesh(config.mesh)
    params, shardings = sharding.sharded_init(init_fn, mesh, ...)   # or converted weights
    with sharding.mesh_context(mesh):          # activations' logical constraints resolve
        result = trainer.train(
            config, workdir,
            model_apply=lambda params, batch, *, train, rng: {"logits": model.apply(
                {"params": params}, **batch, train=train, rngs={"dropout": rng})},
            init_params=params,                # a pytree, or a callable returning it
            data_iterator=grain_iterator,      # dict batches; get_state()/set_state()
            param_shardings=shardings,         # tree of Shardings like the params (optional)
            place_batch=lambda b: sharding.shard_batch(b, mesh),
        )

What the loop does: split parameters into trainable/frozen (``config.optimizer.trainable``),
print the parameter table, resume from the latest checkpoint in ``workdir/checkpoints`` (state,
data iterator, checked against the saved config) or create the state, compile the step once
per batch shape (AOT, for the FLOP count), then per step: fetch a batch, run the jitted and
donated step with ``rng = fold_in(key(seed), step)`` (so a resumed run sees the randomness a
straight run would), log every ``log_every`` steps, evaluate every ``eval_every`` steps, save
every ``checkpoint.save_every`` steps and at the end, and on SIGTERM save and return.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from ppllava_jax.sharding import process_barrier
from ppllava_jax.train.checkpoint import Checkpointer, PreemptionWatcher, config_to_dict
from ppllava_jax.train.metrics import (
    MetricsWriter,
    compiled_flops,
    peak_flops_per_device,
    throughput,
)
from ppllava_jax.train.optimizer import (
    check_selection,
    default_optimizer_config,
    make_optimizer,
    param_count_table,
    split_params,
    trainable_predicate,
)
from ppllava_jax.train.state import TrainState, create_train_state, state_shardings, with_shardings
from ppllava_jax.train.step import make_train_step

PyTree = Any


def default_config() -> ml_collections.ConfigDict:
    """The config sections the trainer reads (``train``, ``optimizer``, ``checkpoint``, ``dpo``).

    Project configs start from this and add ``model`` / ``data`` sections.
    """
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict()
    c.train.mode = "sft"  # sft | dpo
    c.train.total_steps = 1000  # optimizer updates in the whole run
    c.train.grad_accum_steps = 1  # micro-batches per update (the global batch is fixed)
    # SFT loss: global_token_mean (sum of token losses / supervised tokens of the global batch)
    # | per_device_mean (the original's: the token mean of each group of loss_group_size rows
    # of a micro-batch, averaged over groups; 0 = the rows one device holds). train/step.py
    c.train.loss_normalization = "global_token_mean"
    c.train.loss_group_size = 0
    # > 0: LM head + cross entropy over chunks of this many positions, supervised ones only,
    # never materialising [B, L, V] logits (same values; train/losses.chunked_token_logps)
    c.train.loss_chunk_size = 0
    c.train.seed = 0  # step rng = fold_in(key(seed), step)
    c.train.log_every = 10  # steps between metrics lines
    c.train.eval_every = 0  # steps between eval_fn calls (0: only at the end, if given)
    c.train.param_table_depth = 1  # path components per row of the parameter table
    # append each batch's sample ids and shapes to workdir/data_trace/process_<i>.jsonl
    c.train.data_trace = False
    c.optimizer = default_optimizer_config()
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500  # steps between checkpoints (and one at the end)
    c.checkpoint.keep = 3  # how many recent checkpoints to keep
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.checkpoint.save_frozen = True  # include frozen parameters (self-contained checkpoints)
    c.checkpoint.save_reference = False  # include the DPO reference (else rebuilt from init)
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # sigmoid DPO temperature
    return c


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int  # last completed step
    preempted: bool  # stopped by SIGTERM (a checkpoint was written)
    last_metrics: dict  # the last logged record


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _signature(batch: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v)), str(v.dtype)) for k, v in batch.items()))


def _place_batch(batch: Mapping[str, Any], sharding: Sharding | PyTree | None) -> dict:
    if sharding is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    if isinstance(sharding, Sharding):
        sharding = {k: sharding for k in batch}
    return {
        k: jax.make_array_from_process_local_data(sharding[k], np.asarray(v))
        for k, v in batch.items()
    }


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model_apply: Callable[..., dict],
    init_params: PyTree | Callable[[], PyTree],
    data_iterator: Iterator[Mapping[str, Any]],
    mode: str | None = None,
    eval_fn: Callable[[TrainState, int], Mapping[str, Any]] | None = None,
    param_shardings: PyTree | None = None,
    batch_sharding: Sharding | PyTree | None = None,
    place_batch: Callable[[Mapping[str, Any]], dict] | None = None,
    flops_per_step: float | Callable[[Mapping[str, Any]], float] | None = None,
    stop_at_step: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume training) to ``config.train.total_steps``.

    Args:
      config: see ``default_config()``.
      workdir: checkpoints go to ``workdir/checkpoints``, metrics to ``workdir/metrics.jsonl``
        and ``workdir/tensorboard``.
      model_apply: ``(params, batch, *, train, rng) -> {"logits": float[B, L, V], ...}``.
      init_params: the whole initial parameter tree (plain arrays, placed as
        ``param_shardings`` says), or a callable returning it. On a fresh start its buffers
        are donated to the train state (do not use them afterwards). On resume it provides
        what the checkpoint lacks (frozen parameters / DPO reference, if not saved).
      data_iterator: yields dicts of host (numpy) arrays, the process-local part of the
        global batch ``[B, ...]`` or ``[k, B/k, ...]``; if it has ``get_state``/``set_state``
        its position is checkpointed and restored.
      mode: ``sft`` | ``dpo`` (default ``config.train.mode``).
      eval_fn: ``(state, step) -> {name: scalar}``, called every ``train.eval_every`` steps and
        at the end; written with an ``eval/`` prefix.
      param_shardings: tree of ``Sharding`` shaped like the parameters; the state (optimizer
        moments included) is laid out from it and restores onto it. None: one device.
      batch_sharding: the global batch's ``Sharding`` (or a dict of them per key), used to
        assemble global arrays with ``jax.make_array_from_process_local_data``.
      place_batch: overrides the batch placement altogether (host dict -> device dict).
      flops_per_step: per-device FLOPs of one step for MFU, or a function of the host batch
        giving them (e.g. ``ppllava_jax.flops.batch_train_flops``), called once per compiled
        shape. None: XLA's ``cost_analysis()``, which counts a scanned layer body only once.
      stop_at_step: stop (and save) after this step although the schedule runs to
        ``total_steps`` (time-sliced jobs, tests); a later call resumes.
      log: where progress text goes.
    """
    mode = mode or config.train.get("mode", "sft")
    total = int(config.train.total_steps)
    ck_cfg = config.get("checkpoint", default_config().checkpoint)
    log_every = max(int(config.train.get("log_every", 10)), 1)
    eval_every = int(config.train.get("eval_every", 0) or 0)
    accum = int(config.train.get("grad_accum_steps", 1))

    tx, schedule = make_optimizer(config.optimizer, total)
    predicate = trainable_predicate(config.optimizer)
    params = init_params() if callable(init_params) else init_params
    check_selection(params, config.optimizer)
    log(
        "[train] parameters (optimizer.trainable="
        f"{config.optimizer.get('trainable')!r}):\n"
        + param_count_table(params, predicate, int(config.train.get("param_table_depth", 1)))
    )

    with_ref = mode == "dpo"
    create = lambda p: create_train_state(p, tx, predicate, with_reference=with_ref)
    shardings = None
    if param_shardings is not None:
        shardings = state_shardings(
            param_shardings,
            tx,
            predicate,
            with_reference=with_ref,
            params_abstract=_abstract(params),
        )

    ckpt = Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        save_every=int(ck_cfg.get("save_every", 500)),
        keep=ck_cfg.get("keep", 3),
        async_save=bool(ck_cfg.get("async_save", True)),
        save_frozen=bool(ck_cfg.get("save_frozen", True)),
        save_reference=bool(ck_cfg.get("save_reference", False)),
    )
    latest = ckpt.latest_step()
    has_state = hasattr(data_iterator, "get_state") and hasattr(data_iterator, "set_state")
    if latest is None:
        # donated: the trainable/frozen leaves alias the initial buffers instead of copying
        # (no shardings: commit to one device, as a restored state is, so both compile alike)
        out_sh = shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        state = jax.jit(create, out_shardings=out_sh, donate_argnums=0)(params)
        log(f"[train] starting from scratch ({mode}), {total} steps")
    else:
        abstract = with_shardings(jax.eval_shape(create, params), shardings)
        trainable0, frozen0 = split_params(params, predicate)
        initial = TrainState(
            step=None,
            params=None,
            frozen=frozen0,
            opt_state=None,
            ref_params=trainable0 if with_ref else None,
        )
        state = ckpt.restore(
            abstract,
            step=latest,
            data_iterator=data_iterator if has_state else None,
            initial=initial,
        )
        saved_cfg = ckpt.restore_config(latest)
        if saved_cfg:
            diff = _config_diff(saved_cfg, config_to_dict(config))
            if diff:
                log("[train] config differs from the checkpoint's:\n  " + "\n  ".join(diff))
        log(f"[train] resumed from step {latest} in {ckpt.directory}")
    del params

    step_fn = make_train_step(
        model_apply,
        config,
        mode,
        tx=tx,
        schedule=schedule,
        param_shardings=None if shardings is None else shardings.params,
    )
    if shardings is not None:
        rep = (
            NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())
            if isinstance(jax.tree.leaves(shardings)[0], NamedSharding)
            else None
        )
        jitted = jax.jit(step_fn, out_shardings=(shardings, rep), donate_argnums=(0,))
    else:
        jitted = jax.jit(step_fn, donate_argnums=(0,))
    compiled: dict[tuple, tuple[Any, float | None]] = {}
    peak = peak_flops_per_device()
    place = place_batch or (lambda b: _place_batch(b, batch_sharding))
    base_rng = jax.random.key(int(config.train.get("seed", 0)))

    writer = MetricsWriter(workdir)
    step = int(jax.device_get(state.step))
    window: list[dict] = []
    t_window = time.perf_counter()
    last: dict = {}
    preempted = False
    try:
        with PreemptionWatcher() as watcher:
            end = total if stop_at_step is None else min(total, int(stop_at_step))
            while step < end:
                if watcher.should_stop(step):
                    preempted = True
                    break
                try:
                    host_batch = next(data_iterator)
                except StopIteration:
                    log(f"[train] the data iterator ended at step {step} (< {total})")
                    break
                except Exception:
                    if watcher.requested:  # e.g. data workers killed by the same SIGTERM
                        preempted = True
                        break
                    raise
                batch = place(host_batch)
                rng = jax.random.fold_in(base_rng, step)
                sig = _signature(batch)
                if sig not in compiled:
                    t = time.perf_counter()
                    exe = jitted.lower(state, batch, rng).compile()
                    # several processes: start the new program together (gloo's first
                    # collective on a set of devices fails when they arrive >30 s apart)
                    process_barrier(f"train_compiled_{step}_{len(compiled)}")
                    n_micro = batch["labels"].shape[0] if batch["labels"].ndim == 3 else accum
                    if callable(flops_per_step):
                        fl = flops_per_step(host_batch)
                    else:
                        fl = flops_per_step or ((compiled_flops(exe) or 0.0) * n_micro or None)
                    compiled[sig] = (exe, fl)
                    log(
                        f"[train] compiled the step for {dict((k, s) for k, s, _ in sig)} "
                        f"in {time.perf_counter() - t:.1f}s"
                    )
                    t_window += time.perf_counter() - t  # compile time is not step time
                exe, fl = compiled[sig]
                state, metrics = exe(state, batch, rng)
                step += 1
                window.append(metrics)

                if step % log_every == 0 or step == end:
                    got = jax.device_get(window)
                    now = time.perf_counter()
                    rec = {
                        k: float(np.mean([m[k] for m in got]))
                        for k in got[-1]
                        if not k.startswith("num_")
                    }
                    rec["lr"] = float(got[-1].get("lr", np.nan))
                    for k in ("num_tokens", "num_samples", "num_input_tokens"):
                        rec[k] = int(sum(int(m[k]) for m in got))
                    rec.update(
                        throughput(
                            steps=len(got),
                            seconds=now - t_window,
                            tokens=rec["num_input_tokens"],
                            samples=rec["num_samples"],
                            flops_per_step=fl,
                            peak=peak,
                        )
                    )
                    if hasattr(data_iterator, "metrics"):  # e.g. skipped-sample counts
                        rec.update(data_iterator.metrics())
                    last = writer.write(step, rec)
                    window, t_window = [], time.perf_counter()

                if eval_fn is not None and eval_every > 0 and step % eval_every == 0:
                    t = time.perf_counter()
                    writer.write(step, dict(eval_fn(state, step)), prefix="eval/")
                    t_window += time.perf_counter() - t

                ckpt.save(
                    step, state, data_iterator=data_iterator if has_state else None, config=config
                )
            if preempted:
                log(f"[train] preempted: saving step {step} and stopping")
            if eval_fn is not None and not preempted and (eval_every <= 0 or step % eval_every):
                writer.write(step, dict(eval_fn(state, step)), prefix="eval/")
            ckpt.save(
                step,
                state,
                data_iterator=data_iterator if has_state else None,
                config=config,
                force=True,
            )
    finally:
        ckpt.close()
        writer.close()
    return TrainResult(state=state, step=step, preempted=preempted, last_metrics=last)
