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
straight run would), log every ``log_every`` steps (``metrics.jsonl`` cut back to the step the
run starts from), save every ``checkpoint.save_every`` steps and at the end, and on SIGTERM or
Ctrl-C save and return (``TrainResult.preempted``; ``preemption.py``).

Failures lose nothing: a NaN or infinite loss or gradient norm stops the run at the next
metrics line or save, naming the step it appeared at, before anything non-finite is saved
(``divergence.py``); a background save that failed stops it at the next step
(``Checkpointer.check``); a damaged checkpoint is set aside and the one before it restored
(``start.restore_intact``); a checkpoint whose data position refers to other data than this
run's is refused (``resume_check.check_data``, ``train.allow_data_change``).

Where each part lives: the optimizer, trainable split, checkpointer and the created or restored
state in ``start.py``; the per-shape compilation in ``compiled_step.py``; the logged window and
the writer in ``metrics.py``; the loop itself (``_loop``) here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ppllava_jax.train.checkpoint import Checkpointer
from ppllava_jax.train.compiled_step import CompiledStep, FlopsPerStep
from ppllava_jax.train.divergence import FiniteGuard
from ppllava_jax.train.metrics import LogWindow, MetricsWriter, peak_flops_per_device
from ppllava_jax.train.optimizer import default_optimizer_config
from ppllava_jax.train.preemption import PreemptionWatcher
from ppllava_jax.train.resume_check import data_identity
from ppllava_jax.train.start import create_state, make_checkpointer, make_setup, restore_intact
from ppllava_jax.train.state import TrainState

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
    # the LM head and cross entropy only at the supervised positions (planned on the host: the
    # batch's target_positions, train/batches.with_target_positions): same loss, less compute
    c.train.logits_at_targets_only = True
    # cut the CLIP prompts' padding to the batch's longest prompt, rounded up to a power of two
    # (train/batches.with_trimmed_clip_prompts): same outputs, a shorter frozen text tower
    c.train.trim_clip_prompts = True
    c.train.seed = 0  # step rng = fold_in(key(seed), step)
    c.train.log_every = 10  # steps between metrics lines
    c.train.param_table_depth = 1  # path components per row of the parameter table
    # append each batch's sample ids and shapes to workdir/data_trace/process_<i>.jsonl
    c.train.data_trace = False
    # resume although data.sources changed since the checkpoint (its data position then means
    # nothing): keep the weights and optimizer state, restart the data order (else refused)
    c.train.allow_data_change = False
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
    preempted: bool  # stopped by SIGTERM / SIGINT (a checkpoint was written)
    last_metrics: dict  # the last logged record
    signal_name: str = ""  # what stopped it, when preempted
    checkpoints: str = ""  # the checkpoint directory


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model_apply: Callable[..., dict],
    init_params: PyTree | Callable[[], PyTree],
    data_iterator: Iterator[Mapping[str, Any]],
    param_shardings: PyTree | None = None,
    place_batch: Callable[[Mapping[str, Any]], dict] | None = None,
    flops_per_step: FlopsPerStep = None,
    stop_at_step: int | None = None,
    log: Callable[[str], None] = print,
    on_start: Callable[[int], None] | None = None,
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
        its position is checkpointed and restored; if it has ``metrics()`` (e.g. skipped
        samples) they are logged with each record.
      param_shardings: tree of ``Sharding`` shaped like the parameters; the state (optimizer
        moments included) is laid out from it and restores onto it. None: one device.
      place_batch: host dict -> device dict (e.g. ``sharding.shard_batch`` onto the mesh);
        None: ``jnp.asarray`` of each array (one device).
      flops_per_step: per-device FLOPs of one step for MFU, or a function of the host batch
        giving them (e.g. ``ppllava_jax.flops.batch_train_flops``), called once per compiled
        shape. None: XLA's ``cost_analysis()``, which counts a scanned layer body only once.
      stop_at_step: stop (and save) after this step although the schedule runs to
        ``total_steps`` (time-sliced jobs, tests); a later call resumes.
      log: where progress text goes.
      on_start: called with the step the run starts from once the state is created or the
        resume accepted, before the first step (``run.fit`` writes ``config.json`` there).
    """
    params = init_params() if callable(init_params) else init_params
    setup = make_setup(config, params, param_shardings, log)
    ckpt = make_checkpointer(config, workdir)
    ckpt.data_identity = data_identity(config)  # what the saved data positions refer to
    saved_iterator = data_iterator if _has_state(data_iterator) else None
    total = int(config.train.total_steps)
    latest = ckpt.latest_step()
    if latest is None:
        state = create_state(setup, params)
        start = config.get("init_from") or "a random initialisation"
        log(f"[train] starting at step 0 ({setup.mode}) from {start}, {total} steps")
    else:
        try:
            state, latest = restore_intact(setup, ckpt, params, saved_iterator, config, log)
        except BaseException:
            ckpt.close()
            raise
        log(f"[train] resumed from step {latest} in {ckpt.directory}")
    del params
    step = int(jax.device_get(state.step))
    if on_start is not None:
        on_start(step)
    guard = FiniteGuard(config, lambda: _last_checkpoint(ckpt))
    writer = MetricsWriter(workdir, total_steps=total, start_step=step)
    compiled = CompiledStep(model_apply, config, setup, flops_per_step, log)
    end = total if stop_at_step is None else min(total, int(stop_at_step))
    try:
        with PreemptionWatcher() as watcher:
            state, step, last, preempted = _loop(
                config,
                state,
                step,
                end,
                compiled,
                data_iterator,
                place_batch or _on_device,
                watcher,
                writer,
                ckpt,
                guard,
                log,
            )
            if preempted:
                log(f"[train] preempted: saving step {step} and stopping ({watcher.signal_name})")
            guard.check(state)
            ckpt.save(step, state, data_iterator=saved_iterator, config=config, force=True)
    finally:
        ckpt.close()
        writer.close()
    return TrainResult(
        state=state,
        step=step,
        preempted=preempted,
        last_metrics=last,
        signal_name=watcher.signal_name,
        checkpoints=str(ckpt.directory),
    )


def _loop(
    config: ml_collections.ConfigDict,
    state: TrainState,
    step: int,
    end: int,
    compiled: CompiledStep,
    data_iterator: Iterator[Mapping[str, Any]],
    place: Callable[[Mapping[str, Any]], dict],
    watcher: PreemptionWatcher,
    writer: MetricsWriter,
    ckpt: Checkpointer,
    guard: FiniteGuard,
    log: Callable[[str], None],
) -> tuple[TrainState, int, dict, bool]:
    """Steps ``step + 1 .. end``: fetch, place, run, log every ``train.log_every`` steps (and
    at ``end``), save every ``checkpoint.save_every``; stops early when a signal arrived (the
    caller saves) or the data ends. Each metrics line and each save first checks the steps
    since the last check for a non-finite loss or gradient norm (``guard``), each step the
    previous background save (``ckpt.check``); either raises. Returns the state, the last
    completed step, the last logged record and whether a signal stopped it before ``end``."""
    log_every = max(int(config.train.get("log_every", 10)), 1)
    base_rng = jax.random.key(int(config.train.get("seed", 0)))
    saved_iterator = data_iterator if _has_state(data_iterator) else None
    peak = peak_flops_per_device()
    window = LogWindow()
    last: dict = {}
    while step < end:
        ckpt.check()
        if watcher.should_stop(step):
            return state, step, last, True
        host_batch = _next_batch(data_iterator, watcher, step, end, log)
        if host_batch is None:
            return state, step, last, watcher.requested
        batch = place(host_batch)
        rng = jax.random.fold_in(base_rng, step)
        program, flops, compile_s = compiled.get(state, batch, rng, host_batch, step)
        window.exclude(compile_s)  # compile time is not step time
        state, metrics = program(state, batch, rng)
        step += 1
        window.add(metrics)
        guard.add(step, metrics)
        if step % log_every == 0 or step == end:
            rec = window.record(flops, peak)
            if hasattr(data_iterator, "metrics"):  # e.g. skipped-sample counts
                rec.update(data_iterator.metrics())
            last = writer.write(step, rec)
            guard.check()
        if ckpt.should_save(step):
            guard.check(state)
            ckpt.save(step, state, data_iterator=saved_iterator, config=config)
    return state, step, last, False


def _next_batch(
    data_iterator: Iterator[Mapping[str, Any]],
    watcher: PreemptionWatcher,
    step: int,
    end: int,
    log: Callable[[str], None],
) -> Mapping[str, Any] | None:
    """The next host batch; None when the data ended (said) or a signal broke the iterator
    (e.g. data workers killed by the same SIGTERM: the run stops as preempted)."""
    try:
        return next(data_iterator)
    except StopIteration:
        log(f"[train] the data iterator ended at step {step} (< {end})")
        return None
    except Exception:
        if watcher.requested:
            return None
        raise


def _last_checkpoint(ckpt: Checkpointer) -> str:
    """The newest complete checkpoint, said for a message."""
    ckpt.wait()
    step = ckpt.latest_step()
    where = ckpt.directory / str(step)
    return "no checkpoint was saved" if step is None else f"the last checkpoint is {where}"


def _has_state(data_iterator: Any) -> bool:
    """Whether the iterator's position can be checkpointed (``get_state``/``set_state``)."""
    return hasattr(data_iterator, "get_state") and hasattr(data_iterator, "set_state")


def _on_device(batch: Mapping[str, Any]) -> dict:
    """The default placement: each host array onto the default device."""
    return {k: jnp.asarray(v) for k, v in batch.items()}
