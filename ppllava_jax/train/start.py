"""Before the first step of ``trainer.train``: the optimizer and the trainable split, the
checkpointer, and the train state, created from the initial parameters or restored from the
newest intact checkpoint (its config compared with this run's, its data with this run's: a
damaged step is set aside, said in one line, and the one before it tried)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from ppllava_jax.train.checkpoint import Checkpointer, config_to_dict
from ppllava_jax.train.checkpoint_failures import one_line, quiet_late_read_callbacks
from ppllava_jax.train.optimizer import (
    Predicate,
    check_selection,
    make_optimizer,
    param_count_table,
    split_params,
    trainable_predicate,
)
from ppllava_jax.train.resume_check import DataChangedError, check_data
from ppllava_jax.train.state import TrainState, create_train_state, state_shardings, with_shardings

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the run's state is made of.

    Attributes:
      mode: ``sft`` | ``dpo`` (``train.mode``).
      tx, schedule: the optimizer (``optimizer`` section) and its learning-rate schedule.
      predicate: selects the trainable parameters by path (``optimizer.trainable``).
      shardings: the ``TrainState``'s shardings (from the parameters'), None: one device.
    """

    mode: str
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    predicate: Predicate
    shardings: TrainState | None

    @property
    def with_reference(self) -> bool:
        """DPO keeps a copy of the initial trainable parameters as its reference."""
        return self.mode == "dpo"

    def create(self, params: PyTree) -> TrainState:
        """The step-0 state of ``params`` (traceable)."""
        return create_train_state(
            params, self.tx, self.predicate, with_reference=self.with_reference
        )


def abstract(tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves of ``tree``'s arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def make_setup(
    config: ml_collections.ConfigDict,
    params: PyTree,
    param_shardings: PyTree | None,
    log: Callable[[str], None],
) -> Setup:
    """The optimizer for ``train.total_steps``, the trainable selection (checked against
    ``params``, its table logged) and the state's shardings."""
    tx, schedule = make_optimizer(config.optimizer, int(config.train.total_steps))
    predicate = trainable_predicate(config.optimizer)
    check_selection(params, config.optimizer)
    log(
        "[train] parameters (optimizer.trainable="
        f"{config.optimizer.get('trainable')!r}):\n"
        + param_count_table(params, predicate, int(config.train.get("param_table_depth", 1)))
    )
    mode = config.train.get("mode", "sft")
    shardings = None
    if param_shardings is not None:
        shardings = state_shardings(
            param_shardings,
            tx,
            predicate,
            with_reference=mode == "dpo",
            params_abstract=abstract(params),
        )
    return Setup(mode, tx, schedule, predicate, shardings)


def make_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> Checkpointer:
    """``workdir/checkpoints`` with the ``checkpoint`` section's settings."""
    ck = config.get("checkpoint", ml_collections.ConfigDict())
    return Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        save_every=int(ck.get("save_every", 500)),
        keep=ck.get("keep", 3),
        async_save=bool(ck.get("async_save", True)),
        save_frozen=bool(ck.get("save_frozen", True)),
        save_reference=bool(ck.get("save_reference", False)),
    )


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each field that differs between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def create_state(setup: Setup, params: PyTree) -> TrainState:
    """The step-0 state, its trainable / frozen leaves aliasing ``params``' buffers (donated).
    Without shardings it is committed to one device, as a restored state is, so both compile
    alike."""
    out = setup.shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.jit(setup.create, out_shardings=out, donate_argnums=0)(params)


def restore_state(
    setup: Setup,
    ckpt: Checkpointer,
    step: int,
    params: PyTree,
    data_iterator: Any,
    config: ml_collections.ConfigDict,
    log: Callable[[str], None],
) -> TrainState:
    """The state saved at ``step`` laid out on this run's shardings, the data iterator (if
    given) set to its saved position; ``params`` supplies what the checkpoint lacks (frozen
    parameters, the DPO reference). A config that differs from the saved one is logged; data
    other than the saved position refers to (``ckpt.data_identity``, this run's) raises
    ``DataChangedError``, or with ``train.allow_data_change`` restarts the data order."""
    step_dir = str(ckpt.directory / str(step))
    allow = bool(config.get("train", {}).get("allow_data_change", False))
    if check_data(ckpt.meta(step).get("data"), ckpt.data_identity, step_dir, allow):
        log(
            f"[train] the data changed since step {step} was saved; train.allow_data_change="
            "True: its weights and optimizer state go on, the data order starts from the beginning"
        )
        data_iterator = None
    target = with_shardings(jax.eval_shape(setup.create, params), setup.shardings)
    trainable0, frozen0 = split_params(params, setup.predicate)
    initial = TrainState(
        step=None,
        params=None,
        frozen=frozen0,
        opt_state=None,
        ref_params=trainable0 if setup.with_reference else None,
    )
    state = ckpt.restore(target, step=step, data_iterator=data_iterator, initial=initial)
    saved_cfg = ckpt.restore_config(step)
    if saved_cfg:
        diff = config_diff(saved_cfg, config_to_dict(config))
        if diff:
            log("[train] config differs from the checkpoint's:\n  " + "\n  ".join(diff))
    return state


class NoIntactCheckpointError(OSError):
    """No checkpoint of the work directory restores (said in one line)."""


def restore_intact(
    setup: Setup,
    ckpt: Checkpointer,
    params: PyTree,
    data_iterator: Any,
    config: ml_collections.ConfigDict,
    log: Callable[[str], None],
) -> tuple[TrainState, int]:
    """``restore_state`` of the newest step that restores, and that step. A step that fails
    (a truncated or missing file) is said in one line and set aside (``<step>.damaged``) once
    an earlier one restored; when none does, ``NoIntactCheckpointError``. A refusal
    (``DataChangedError``) is raised as it is. Several processes agree on each step."""
    quiet_late_read_callbacks()
    damaged: list[tuple[int, str]] = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        reason = ""
        try:
            state = restore_state(setup, ckpt, step, params, data_iterator, config, log)
        except DataChangedError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many kinds
            reason = one_line(e)
        if jax.process_count() > 1:
            from ppllava_jax.sharding import max_over_processes

            if max_over_processes(int(bool(reason)), "restore_intact") and not reason:
                reason = "another process could not restore it"
        if not reason:
            for bad, why in damaged:
                kept = ckpt.set_aside(bad)
                log(
                    f"[train] checkpoint step {bad} is damaged ({why}): resuming from step "
                    f"{step} instead (the damaged one is kept as {kept})"
                )
            return state, step
        damaged.append((step, reason))
    said = "; ".join(f"step {s}: {r}" for s, r in damaged)
    raise NoIntactCheckpointError(
        f"no checkpoint in {ckpt.directory} restores ({said}); move that directory away to "
        "start over, or start a new run in another --workdir"
    )
