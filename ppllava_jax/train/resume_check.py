"""Before a training run resumes: does the latest checkpoint in ``workdir/checkpoints`` fit the
model and trainable selection of this run? Checked from the orbax metadata (no array is read),
so a changed model (another size, layer count, pooling...) or ``optimizer.trainable`` is
reported by parameter name with both shapes before any restore is attempted (orbax's own error
names no parameter). ``run.main`` calls ``check_resume`` right before ``trainer.train``."""

from __future__ import annotations

import os
from typing import Any

from ppllava_jax.convert.saved_tree import (
    TreeMismatchError,
    mismatch_report,
    saved_metadata,
    shapes_of,
)


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from was written for another model or trainable selection."""


def latest_checkpoint(directory: str | os.PathLike) -> int | None:
    """The latest complete (committed) step in ``directory`` (``workdir/checkpoints``), or None."""
    import jax

    from ppllava_jax import sharding
    from ppllava_jax.train.checkpoint import Checkpointer

    path = os.path.abspath(os.fspath(directory))
    exists = os.path.isdir(path)
    if jax.process_count() > 1:
        # every process must take the same branch (a Checkpointer waits for all processes):
        # process 0 may create the directory (in the trainer's Checkpointer) while a slower
        # process is still here, which then opened one more Checkpointer than the others
        exists = bool(sharding.max_over_processes(int(exists), "checkpoint_dir_exists"))
    if not exists:
        return None
    ckpt = Checkpointer(path, async_save=False)  # the step the trainer will restore
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def check_resume(directory: str | os.PathLike, params: Any, config: Any) -> None:
    """Raise ``ResumeMismatchError`` if the latest checkpoint in ``directory`` cannot be restored
    into a run of ``params`` (the model's whole parameter tree: arrays or abstract leaves) with
    ``config.optimizer.trainable``; nothing to check without a checkpoint.

    Compared: the saved trainable + frozen parameters with the model's (names and shapes), and
    which of them are trainable (the optimizer state covers the trainable ones only). The message
    names the checkpoint, each parameter and what differs, and the ways on."""
    from ppllava_jax.train.optimizer import split_params, trainable_predicate

    step = latest_checkpoint(directory)
    if step is None:
        return
    step_dir = os.path.join(os.path.abspath(os.fspath(directory)), str(step))
    try:
        tree = dict(saved_metadata(os.path.join(step_dir, "state")))
    except TreeMismatchError as e:
        raise ResumeMismatchError(
            f"cannot resume from {step_dir}: {e}; delete that step directory to resume from an "
            "earlier one, or start a new run in another --workdir"
        ) from None
    saved_train = shapes_of(tree.get("params", {}))
    saved_frozen = shapes_of(tree.get("frozen", {}))
    model = shapes_of(params)
    trainable, _ = split_params(params, trainable_predicate(config.optimizer))
    now_train = shapes_of(trainable)
    ways = (
        f"Resume with the config that run was started with (saved in {step_dir}/config), or "
        "start a new run in another --workdir (init_from= a converted checkpoint to begin from "
        "other weights)."
    )
    saved_all = {**saved_train, **saved_frozen}
    expected = model
    if "frozen" not in tree and set(saved_all) < set(model):
        # frozen parameters not saved (checkpoint.save_frozen=False): compare the saved ones
        expected = {k: v for k, v in model.items() if k in saved_all}
    versus = "checkpoint shapes vs this config's model"
    report = mismatch_report(
        saved_all, expected, saved_name="checkpoint", expected_name="model", versus=versus
    )
    if report:
        raise ResumeMismatchError(
            f"cannot resume from {step_dir}: its parameters are not those of this run's model "
            + report
            + "\nThe model config changed since the checkpoint was saved. "
            + ways
        )
    if set(saved_train) != set(now_train):
        was = sorted(set(saved_train) - set(now_train))
        now = sorted(set(now_train) - set(saved_train))
        lines = [f"{k}: trainable in the checkpoint, frozen now" for k in was[:12]]
        lines += [f"{k}: frozen in the checkpoint, trainable now" for k in now[:12]]
        more = len(was) + len(now) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        raise ResumeMismatchError(
            f"cannot resume from {step_dir}: optimizer.trainable="
            f"{config.optimizer.get('trainable')!r} selects other parameters than the run that "
            "saved it (its optimizer state covers the parameters trained then):\n  "
            + "\n  ".join(lines)
            + "\n"
            + ways
        )
