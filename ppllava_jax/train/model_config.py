"""The ``PPLLaVAConfig`` a run trains, from its config file's ``model`` section.

Three ways, tried in order by ``model_config``:

- ``init_from``: the ``config.json`` of an export or a directory written by
  ``convert_torch_weights.py``, or the model of a training checkpoint step's saved run config
  (``train/init_from.py``; runtime fields ``dtype``, ``scan_layers``, ``remat_policy``,
  ``attention_impl`` from ``model``);
- ``model.preset``: the 7B recipes (``preset_model_config``), also what ``python -m
  ppllava_jax.plan`` compiles;
- otherwise the ``model`` section's own fields (the demo), ``vision`` / ``clip_text`` / ``llm``
  as dicts of their dataclass fields.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ppllava_jax.convert import params_io
from ppllava_jax.convert.api import with_runtime
from ppllava_jax.convert.ppllava_config import ppllava_config_from_dict, ppllava_config_from_hf
from ppllava_jax.models.config import LlamaConfig, PPLLaVAConfig, ppllava_qwen7b_config
from ppllava_jax.train import init_from

RUNTIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl")


def preset_model_config(m: Any) -> PPLLaVAConfig:
    """``PPLLaVAConfig`` of a 7B recipe's ``model`` section: ``preset`` ``ppllava_vicuna7b``
    (``PPLLaVAConfig`` defaults with ``llm_layers`` / ``vocab_size``) or ``ppllava_qwen7b`` (the
    Qwen2 + SigLIP 7B), with the section's ``dtype`` / ``param_dtype`` / ``scan_layers`` /
    ``remat_policy`` / ``attention_impl``."""
    runtime = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scan_layers=bool(m.scan_layers),
        remat_policy=m.remat_policy,
        attention_impl=m.attention_impl,
    )
    if m.get("preset") == "ppllava_qwen7b":
        return ppllava_qwen7b_config(llm_layers=int(m.llm_layers), **runtime)
    llm = LlamaConfig(num_hidden_layers=int(m.llm_layers), vocab_size=int(m.vocab_size))
    return PPLLaVAConfig(llm=llm, **runtime)


def init_from_config(path: str, model: Any) -> PPLLaVAConfig:
    """``PPLLaVAConfig`` of the converted checkpoint at ``path``, with ``model``'s runtime fields;
    a checkpoint of another family is refused, saying how to build a PPLLaVA start point."""
    family, hf = params_io.read_config(path)
    if family != "ppllava":
        raise ValueError(
            f"init_from={path} holds a {family!r} checkpoint; train.py needs a "
            "'ppllava' one (convert a released PPLLaVA, or build the start point with "
            "convert_torch_weights.py --source LLAVA_NEXT --clip CLIP)"
        )
    rt = {k: model[k] for k in RUNTIME_FIELDS if k in model}
    return with_runtime(ppllava_config_from_hf(hf), **rt)


def model_config(cfg: ml_collections.ConfigDict) -> PPLLaVAConfig:
    """The ``PPLLaVAConfig`` of ``init_from`` (runtime fields from ``model``), of a
    ``model.preset`` (the 7B recipes), or of the ``model`` section's fields (the demo)."""
    if cfg.get("init_from"):
        start = init_from.locate(cfg.init_from)
        if start.kind == "converted":
            return init_from_config(start.path, cfg.model)
        saved = init_from.saved_run_config(start)
        rt = {k: cfg.model[k] for k in RUNTIME_FIELDS if k in cfg.model}
        return with_runtime(model_config(saved), **rt)
    if cfg.model.get("preset"):
        return preset_model_config(cfg.model)
    return ppllava_config_from_dict(cfg.model.to_dict())
