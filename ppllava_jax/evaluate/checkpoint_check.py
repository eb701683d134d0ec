"""Is a directory a PPLLaVA checkpoint that ``eval.py`` / the chat can load? Checked before any
array is restored, with a message naming the directory, and the parameter and both shapes
where the saved tree and the model of its ``config.json`` disagree (orbax's own error names no
parameter; a non-PPLLaVA family would fail with an ``AttributeError`` in the model)."""

from __future__ import annotations

import json
import os
from typing import Any

from ppllava_jax.convert.saved_tree import (
    TreeMismatchError,
    mismatch_report,
    saved_metadata,
    shapes_of,
)

USAGE = (
    "pass a directory written by train.py (<workdir>/final) or by convert_torch_weights.py "
    "(config.json, params/, tokenizer/, clip_tokenizer/)"
)


class CheckpointMismatchError(ValueError):
    """A checkpoint directory that eval.py / the chat cannot use as it is."""


def _not_converted(path: str) -> str | None:
    """What the directory is when it is not a converted one (a hint), else None."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return (
            f"{path} is a training workdir: evaluate its export {os.path.join(path, 'final')} "
            "(written at the end of training)"
        )
    if os.path.isdir(os.path.join(path, "state")):
        return (
            f"{path} is a training checkpoint step (state/, data/): evaluate the workdir's "
            "export <workdir>/final"
        )
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return None
        if isinstance(d, dict) and "model_type" in d and "family" not in d:
            return (
                f"{path} is a transformers checkpoint (model_type {d['model_type']!r}): convert "
                f"it first: python convert_torch_weights.py --source {path} --output ckpt/NAME"
            )
    return None


def check_checkpoint(checkpoint: str | os.PathLike, runtime: dict[str, Any] | None = None) -> None:
    """Raise ``FileNotFoundError`` / ``CheckpointMismatchError`` unless ``checkpoint`` is a
    converted PPLLaVA directory whose saved parameters (``params/``) have the tree and shapes
    of the model its ``config.json`` describes. Reads ``config.json`` and the orbax metadata
    only. runtime: runtime config fields as ``load_setup`` passes them (``dtype``)."""
    import flax.linen as nn

    from ppllava_jax.convert import params_io
    from ppllava_jax.convert.api import converted_config

    path = os.fspath(checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} not found: {USAGE}")
    hint = _not_converted(path)
    if hint:
        raise CheckpointMismatchError(hint)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint directory; {USAGE}")
    family, _ = params_io.read_config(path)
    if family != "ppllava":
        raise CheckpointMismatchError(
            f"{path} holds a {family!r} checkpoint (config.json: family {family!r}); eval.py and "
            "the chat need a 'ppllava' one: convert a released PPLLaVA, or build the training "
            "start point with convert_torch_weights.py --source LLAVA_NEXT --clip CLIP and train "
            "it"
        )
    params_dir = os.path.join(path, "params")
    try:
        saved = shapes_of(dict(saved_metadata(params_dir)))
        fam, cfg = converted_config(path, **(runtime or {}))  # scan_layers as stored
    except TreeMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}; convert the checkpoint again") from None
    expected = shapes_of(nn.unbox(fam.abstract_params(cfg)))
    versus = "saved shapes vs the shapes config.json gives"
    report = mismatch_report(
        saved, expected, saved_name="saved", expected_name="config.json", versus=versus
    )
    if report:
        raise CheckpointMismatchError(
            f"{params_dir} does not hold the parameters of the model its config.json describes "
            + report
            + "\nThe config.json and params/ come from different models: convert the checkpoint "
            "again, or put back the config.json written with these parameters."
        )
