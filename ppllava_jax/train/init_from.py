"""Where a run's weights come from: ``init_from`` names one of three kinds of directory.

- an export, ``<workdir>/final`` of an earlier run (``config.json`` + ``params/`` + tokenizers);
- a converted directory, ``convert_torch_weights.py --output`` (the same layout: a released
  PPLLaVA or the paper's start point);
- a training checkpoint step, ``<workdir>/checkpoints/<step>``: its trainable and frozen
  parameters (not its optimizer state or data position: a new run starts at step 0), its model
  from the run config saved beside them.

Anything else is refused in one line that says what to give instead. ``locate`` decides the kind
from the files alone; ``model_config`` (``train/model_config.py``) and ``restore_params`` read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh

from ppllava_jax import sharding
from ppllava_jax.convert.saved_tree import mismatch_report, saved_metadata, shapes_of
from ppllava_jax.sharding.restore import placed_abstract
from ppllava_jax.train.optimizer import merge_params

WHAT_TO_GIVE = (
    "give an export (<workdir>/final), a directory written by convert_torch_weights.py, or a "
    "training checkpoint step (<workdir>/checkpoints/<step>)"
)


class InitFromError(ValueError):
    """``init_from`` names nothing a run can start from (said in one line)."""


@dataclasses.dataclass(frozen=True)
class StartPoint:
    """A located ``init_from``.

    Attributes:
      kind: ``converted`` (an export or a converted directory) | ``checkpoint`` (a step).
      path: the absolute directory (for a checkpoint: ``.../checkpoints/<step>``).
      step: the checkpoint's step (None for a converted directory).
    """

    kind: str
    path: str
    step: int | None = None

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return f"the parameters of training checkpoint step {self.step} ({self.path})"
        return f"the converted parameters in {self.path}"


def _steps_in(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def locate(path: str) -> StartPoint:
    """The kind of directory ``path`` is; ``InitFromError`` (one line) for anything else."""
    p = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(p):
        raise InitFromError(f"init_from={path}: not found; {WHAT_TO_GIVE}")
    if os.path.isfile(os.path.join(p, "config.json")) and os.path.isdir(os.path.join(p, "params")):
        return StartPoint("converted", p)
    if os.path.isdir(os.path.join(p, "state")) and os.path.basename(p).isdigit():
        if not os.path.isfile(os.path.join(p, "config", "metadata")):
            raise InitFromError(
                f"init_from={path}: this checkpoint step has no saved run config "
                f"({p}/config), so its model is unknown; {WHAT_TO_GIVE}"
            )
        return StartPoint("checkpoint", p, int(os.path.basename(p)))
    for sub in ("checkpoints", ""):
        steps = _steps_in(os.path.join(p, sub))
        if steps and (sub or os.path.isdir(os.path.join(p, str(steps[-1]), "state"))):
            where = os.path.join(p, sub) if sub else p
            final = os.path.join(p, "final")
            export = f"its export {final} or " if sub and os.path.isdir(final) else ""
            raise InitFromError(
                f"init_from={path} is a training run's directory: give {export}one step, "
                f"e.g. {os.path.join(where, str(steps[-1]))} (steps: "
                f"{', '.join(map(str, steps))})"
            )
    raise InitFromError(
        f"init_from={path}: neither config.json + params/ nor a checkpoint step; {WHAT_TO_GIVE}"
    )


def saved_run_config(start: StartPoint) -> ml_collections.ConfigDict:
    """The run config saved with a checkpoint step (``checkpoints/<step>/config``)."""
    with open(os.path.join(start.path, "config", "metadata")) as f:
        return ml_collections.ConfigDict(json.load(f))


def _checkpoint_params_target(start: StartPoint, abstract: Any) -> dict[str, Any]:
    """``{"params": ..., "frozen": ...}`` of the step's saved subtrees, each leaf the model's
    abstract leaf (shape, dtype, sharding); a tree that does not fit the model is refused."""
    saved = saved_metadata(os.path.join(start.path, "state"))
    saved = dict(saved) if not isinstance(saved, dict) else saved
    parts = {k: saved[k] for k in ("params", "frozen") if k in saved and saved[k]}
    flat_model = traverse_util.flatten_dict(abstract, sep="/")
    saved_shapes: dict[str, tuple[int, ...]] = {}
    for part in parts.values():
        saved_shapes.update(shapes_of(part))
    report = mismatch_report(
        saved_shapes,
        shapes_of(abstract),
        saved_name="checkpoint",
        expected_name="model",
        versus=f"checkpoint step {start.step} vs the model of its own run config",
    )
    if report:
        missing = "frozen" not in parts
        hint = (
            " (it was saved without its frozen parameters, checkpoint.save_frozen=False: start "
            "from that run's export instead)"
            if missing
            else ""
        )
        raise InitFromError(f"init_from={start.path} does not fit the model{hint} {report}")
    return {
        name: traverse_util.unflatten_dict(
            {k: flat_model[k] for k in traverse_util.flatten_dict(part, sep="/")}, sep="/"
        )
        for name, part in parts.items()
    }


def restore_params(start: StartPoint, abstract_boxed: Any, mesh: Mesh) -> tuple[Any, Any]:
    """The start point's parameters placed on ``mesh`` as ``param_shardings`` places the model's
    boxed abstract tree. Returns ``(params, shardings)``, arrays in the abstract tree's dtypes."""
    if start.kind == "converted":
        return sharding.restore_onto_mesh(start.path, abstract_boxed, mesh)
    abstract, shardings = placed_abstract(abstract_boxed, mesh)
    target = _checkpoint_params_target(start, abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            os.path.join(start.path, "state"),
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    return merge_params(*(out[k] for k in target)), shardings
