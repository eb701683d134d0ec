"""The train step as ``train.py`` compiles it, and its inputs, from a config alone (no data, no
weights): what ``python -m ppllava_jax.plan`` lowers and the benchmarks run.

What the trainer and the planner share, one function each:

- ``make_apply``: the model call inside the step (``trainer.train``'s ``model_apply``);
- ``prepare_batch`` / ``place_batch``: a host batch as the step receives it: padded to the hosts'
  common length, ``target_positions`` added (``train.logits_at_targets_only``), the CLIP
  prompts trimmed (``train.trim_clip_prompts``), ``visual_index`` shifted into the global pool,
  then sharded over the mesh (``train/run.fit`` feeds the trainer through ``place_batch``);
- ``planned_host_batch``: the host batch the data pipeline collates for rows of one video each,
  built from shapes (its pixel arrays are zero-strided views: nothing of their size is
  allocated);
- ``train_program``: the trainer's own ``CompiledStep`` (``start.make_setup``'s optimizer,
  trainable split and state shardings) with its arguments as abstract arrays carrying the
  shardings the trainer's state, batch and step key have; ``Program.lower()`` lowers it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ppllava_jax import sharding
from ppllava_jax.data import collate
from ppllava_jax.data.config import frames_per_group, tower_size
from ppllava_jax.models.config import PPLLaVAConfig
from ppllava_jax.models.ppllava import PPLLaVA, abstract_params
from ppllava_jax.train.batches import (
    common_length,
    with_target_positions,
    with_trimmed_clip_prompts,
)
from ppllava_jax.train.compiled_step import CompiledStep
from ppllava_jax.train.start import Setup, make_setup
from ppllava_jax.train.state import TrainState, with_shardings

HostBatch = dict[str, np.ndarray]


def make_apply(model: PPLLaVA, deterministic: bool = False) -> Callable[..., dict]:
    """The step's ``apply_fn(params, batch, *, train, rng, **kw)``: ``model`` on the batch
    without ``labels`` (the step computes the loss), dropout / drop-path keyed by ``rng`` when
    training unless ``deterministic`` (training then runs the inference forward); ``kw``
    (``return_logits``) passed on."""

    def apply(params, batch, *, train, rng, **kw):
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return model.apply(
            {"params": params},
            batch,
            deterministic=deterministic or not train,
            rngs={"dropout": rng},
            **kw,
        )

    return apply


def micro_batches(cfg: ml_collections.ConfigDict) -> int:
    """Micro-batches per update (``train.grad_accum_steps``; ``data.micro_batches`` of a run)."""
    return int(cfg.train.get("grad_accum_steps", 1))


def prepare_batch(batch: Mapping[str, Any], cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig):
    """This host's batch (``data.collate`` layout, numpy) as the train step receives it:
    ``common_length``, ``with_target_positions`` when ``train.logits_at_targets_only``,
    ``with_trimmed_clip_prompts`` when ``train.trim_clip_prompts``, then
    ``collate.globalize_visual_index`` (several processes)."""
    b = common_length(dict(batch), mcfg)
    if cfg.train.get("logits_at_targets_only", True):
        b = with_target_positions(b)
    if cfg.train.get("trim_clip_prompts", True):
        b = with_trimmed_clip_prompts(b)
    return collate.globalize_visual_index(
        b, mcfg, jax.process_index(), jax.process_count(), micro_batches(cfg)
    )


def place_batch(
    cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig, mesh: Any
) -> Callable[[Mapping[str, Any]], dict[str, jax.Array]]:
    """``trainer.train``'s ``place_batch``: ``prepare_batch``, then ``sharding.shard_batch``
    onto ``mesh`` (the global batch from every host's rows)."""
    return lambda b: sharding.shard_batch(prepare_batch(b, cfg, mcfg), mesh)


def planned_host_batch(
    cfg: ml_collections.ConfigDict,
    mcfg: PPLLaVAConfig,
    *,
    rows: int,
    length: int,
    frames: int,
    clip_length: int,
    targets: int = 0,
    clip_tokens: int = 0,
) -> HostBatch:
    """The host batch the data pipeline collates (``data.batching``) for ``rows`` samples of one
    ``frames``-frame video each, every row ``length`` merged tokens: ``[bos, <video>, text]``,
    the last ``targets`` text tokens supervised (0: all text after the video, the most a row
    holds), CLIP prompts of ``clip_tokens`` real tokens (0: all) padded to ``clip_length``.

    As ``train.py``'s pipeline: ``train.grad_accum_steps`` micro-batches, each present group
    padded to the batch (``data.group_capacity='batch'``) and ``data.fixed_groups`` present
    (empty), DPO (``train.mode='dpo'``) as ``rows / 2`` pairs sharing their video. The pixel
    arrays ``float32[N, T, S, S, 3]`` are zero-strided views of one zero."""
    data = cfg.get("data") or ml_collections.ConfigDict()
    dpo = cfg.train.get("mode", "sft") == "dpo"
    items = rows // 2 if dpo else rows
    if dpo and rows % 2:
        raise ValueError(f"a DPO batch of {rows} rows is not whole pairs: plan an even batch")
    vis = int(np.prod(collate.Planner(mcfg).item_grid("video", frames)))
    text = length - 1 - vis
    if text < 1:
        raise ValueError(
            f"a merged length of {length} tokens leaves no text after a {frames}-frame video's "
            f"{vis} visual tokens: raise the length (batch.max_length, --max-length)"
        )
    targets = targets or text
    if targets > text:
        raise ValueError(f"{targets} targets per row do not fit the {text} text tokens of a row")
    clip_tokens = min(clip_tokens or clip_length, clip_length)
    word = 5 if mcfg.image_token_index != 5 else 6  # any text id
    ids = np.full(2 + text, word, np.int32)
    ids[1] = mcfg.image_token_index
    labels = np.where(np.arange(len(ids)) >= len(ids) - targets, ids, -100)
    # 1-pixel frames (the layout does not depend on their size), widened after collation; the
    # empty groups' zeros are not touched, so not allocated
    media = collate.Media("video", np.zeros((frames, 1, 1, 3), np.float32))
    clip = (np.full(clip_tokens, 5, np.int32), np.ones(clip_tokens, np.int32))
    samples = [collate.Sample(ids, labels, media, *clip) for _ in range(items)]
    if dpo:  # the rejected twins after the chosen rows, reusing their video
        samples += [collate.Sample(ids, labels, media_from=i) for i in range(items)]
    groups = tuple(data.get("fixed_groups", ()))
    num_frames = {"video": frames}
    if set(groups) - {"video"}:
        num_frames = {**frames_per_group(data, mcfg), **num_frames}
    by_batch = data.get("group_capacity", "batch") == "batch"
    batch = collate.collate(
        samples,
        mcfg,
        buckets=[length],
        padding_side=data.get("padding_side", "right"),
        capacity={g: items for g in {"video", *groups}} if by_batch else None,
        num_frames=num_frames,
        clip_length=clip_length,
        micro_batches=micro_batches(cfg),
        groups=groups,
    )
    size = tower_size(mcfg)
    for k, v in batch.items():
        if k.endswith("_pixels"):
            batch[k] = np.broadcast_to(np.zeros((), v.dtype), (*v.shape[:2], size, size, 3))
    return batch


@dataclasses.dataclass(frozen=True)
class Program:
    """The trainer's step and its arguments, abstract.

    Attributes:
      step: the trainer's ``CompiledStep`` (``step.jitted`` is what it compiles).
      setup: the optimizer, trainable split and state shardings (``start.make_setup``).
      state: the ``TrainState`` as ``ShapeDtypeStruct``s with the state's shardings.
      batch: the placed batch as ``ShapeDtypeStruct``s with ``sharding.shard_batch``'s shardings.
      rng: the step's key (``jax.random.fold_in(jax.random.key(seed), step)``, as the loop).
      host_batch: the prepared host batch (``prepare_batch``) the batch is placed from.
    """

    step: CompiledStep
    setup: Setup
    state: TrainState
    batch: dict[str, jax.ShapeDtypeStruct]
    rng: jax.ShapeDtypeStruct
    host_batch: HostBatch

    def lower(self) -> Any:
        """``step.jitted.lower(state, batch, rng)`` (call inside ``sharding.mesh_context``)."""
        return self.step.jitted.lower(self.state, self.batch, self.rng)


def step_rng(seed: int, step: int) -> jax.Array:
    """The key of step ``step`` (``trainer.train``'s loop: ``fold_in(key(seed), step)``)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def train_program(
    cfg: ml_collections.ConfigDict,
    mcfg: PPLLaVAConfig,
    mesh: Any,
    host_batch: Mapping[str, Any],
    log: Callable[[str], None] = lambda _: None,
) -> Program:
    """The step ``trainer.train`` compiles for ``host_batch`` (one host's batch in the
    ``data.collate`` layout, e.g. ``planned_host_batch``) on ``mesh``, with abstract
    parameters laid out by the logical rules (``sharding.param_shardings``, as
    ``sharding.sharded_init`` and the restore do) and ``make_apply(PPLLaVA(mcfg))``."""
    boxed = abstract_params(mcfg)
    params = nn.unbox(boxed)
    setup = make_setup(cfg, params, sharding.param_shardings(boxed, mesh), log)
    state = with_shardings(jax.eval_shape(setup.create, params), setup.shardings)
    prepared = prepare_batch(host_batch, cfg, mcfg)
    step = CompiledStep(make_apply(PPLLaVA(mcfg)), cfg, setup, None, log)
    key = jax.eval_shape(lambda: step_rng(int(cfg.train.get("seed", 0)), 0))
    # the loop's key is a concrete single-device array: the step takes it replicated
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    return Program(step, setup, state, sharding.abstract_batch(prepared, mesh), rng, prepared)
