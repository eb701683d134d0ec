"""Before a training run resumes: does the latest checkpoint in ``workdir/checkpoints`` fit the
model and trainable selection of this run? Checked from the orbax metadata (no array is read),
so a changed model (another size, layer count, pooling...) or ``optimizer.trainable`` is
reported by parameter name with both shapes before any restore is attempted (orbax's own error
names no parameter). ``run.main`` calls ``check_resume`` right before ``trainer.train``.

What a checkpoint's data position refers to is recorded with it (``data_identity``: each
``data.sources`` file's path, weight, size and content hash, or the ``data.array_record`` files);
the trainer refuses to resume over other data (``check_data``) unless
``train.allow_data_change`` is set, which keeps the weights and optimizer state and restarts the
data order."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from etils import epath

from ppllava_jax.convert.saved_tree import (
    TreeMismatchError,
    mismatch_report,
    saved_metadata,
    shapes_of,
)


class ResumeMismatchError(ValueError):
    """The checkpoint to resume from was written for another model or trainable selection."""


class DataChangedError(ResumeMismatchError):
    """The data a checkpoint's position refers to is not this run's data any more."""


def _file_identity(path: str) -> dict[str, Any]:
    p = epath.Path(path)
    try:
        digest = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return {"size": p.stat().length, "sha256": digest.hexdigest()}
    except OSError:  # unreadable now: the data pipeline says so
        return {"size": None, "sha256": None}


def data_identity(config: Any) -> dict | None:
    """What the data position of a run of ``config`` refers to: for each ``data.sources`` file
    its path, weight, size and sha256 (media are not read), or for ``data.array_record`` its
    files and sizes; None when the config has no data section."""
    from ppllava_jax.data.annotations import AnnotationSource

    data = config.get("data") if hasattr(config, "get") else None
    if data is None:
        return None
    if data.get("array_record"):
        root = epath.Path(data.array_record)
        files = sorted(p for p in root.glob("*") if p.is_file()) if root.exists() else []
        return {"array_record": {p.name: p.stat().length for p in files}, "path": str(root)}
    out = []
    for c in data.get("sources", []) or []:
        src = AnnotationSource.from_config(c)
        path = src.path if "://" in src.path else os.path.abspath(src.path)
        out.append({"path": path, "weight": float(src.weight), **_file_identity(path)})
    return {"sources": out}


def _content(identity: dict) -> Any:
    """What decides the sample order: each source file's weight, size and content (the same
    files moved elsewhere are the same data), or the ArrayRecord files."""
    sources = identity.get("sources")
    if sources is None or any(s.get("sha256") is None for s in sources):
        return identity
    return [(s["weight"], s["size"], s["sha256"]) for s in sources]


def check_data(saved: dict | None, now: dict | None, step_dir: str, allow_change: bool) -> bool:
    """Whether the data changed since the checkpoint in ``step_dir`` recorded ``saved``
    (``data_identity`` then and ``now``; nothing recorded: unchanged; the same files at other
    paths: unchanged). A change raises ``DataChangedError`` naming the setting, unless
    ``allow_change`` (``train.allow_data_change``)."""
    if not saved or not now or _content(saved) == _content(now):
        return False
    if allow_change:
        return True
    old, new = saved.get("sources"), now.get("sources")
    if old is None or new is None:
        what = "data.sources / data.array_record name other data than the checkpoint's run read"
    elif len(old) != len(new):
        paths = [s["path"] for s in new]
        what = f"data.sources lists {paths}, the checkpoint's run read {[s['path'] for s in old]}"
    else:
        keys = ("weight", "size", "sha256")
        pairs = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
        changed = [(a, b) for a, b in pairs if [a[k] for k in keys] != [b[k] for k in keys]]
        a, b = (changed or pairs or [(old[0], new[0])])[0]
        diff = [f"weight {a['weight']} -> {b['weight']}"] if a["weight"] != b["weight"] else []
        diff += [f"size {a['size']} -> {b['size']} bytes"] if a["size"] != b["size"] else []
        diff += ["its content differs"] if a["sha256"] != b["sha256"] else []
        diff = diff or ["another file"]
        moved = "" if a["path"] == b["path"] else f" (the checkpoint's run read {a['path']})"
        what = f"data.sources file {b['path']}{moved} changed ({', '.join(diff)})"
    raise DataChangedError(
        f"cannot resume from {step_dir}: {what}, so its saved data position no longer refers "
        "to the same samples. Resume with the data it was saved with, start a new run in "
        "another --workdir, or pass --config.train.allow_data_change=True to keep its weights "
        "and optimizer state and restart the data order from the beginning"
    )


def latest_checkpoint(directory: str | os.PathLike) -> int | None:
    """The latest complete (committed) step in ``directory`` (``workdir/checkpoints``), or None."""
    steps = checkpoint_steps(directory)
    return steps[0] if steps else None


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The complete (committed) steps in ``directory`` (``workdir/checkpoints``), newest first."""
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
        return []
    ckpt = Checkpointer(path, async_save=False)  # the steps the trainer will try
    try:
        return sorted(ckpt.all_steps(), reverse=True)
    finally:
        ckpt.close()


def check_resume(directory: str | os.PathLike, params: Any, config: Any) -> None:
    """Raise ``ResumeMismatchError`` if the latest checkpoint in ``directory`` cannot be restored
    into a run of ``params`` (the model's whole parameter tree: arrays or abstract leaves) with
    ``config.optimizer.trainable``; nothing to check without a checkpoint.

    The newest step whose metadata reads is compared (an unreadable one is damaged: the
    trainer falls back from it). Compared: the saved trainable + frozen parameters with the
    model's (names and shapes), and which of them are trainable (the optimizer state covers the
    trainable ones only). The message names the checkpoint, each parameter and what differs,
    and the ways on."""
    from ppllava_jax.train.optimizer import split_params, trainable_predicate

    tree = None
    for step in checkpoint_steps(directory):  # the newest whose metadata reads
        step_dir = os.path.join(os.path.abspath(os.fspath(directory)), str(step))
        try:
            tree = dict(saved_metadata(os.path.join(step_dir, "state")))
            break
        except TreeMismatchError:
            continue  # damaged: the trainer sets it aside and resumes from an earlier step
    if tree is None:
        return  # none readable (or none): the trainer says so
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
