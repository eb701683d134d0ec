"""The data iterator as the trainer sees it: ``TrainBatches`` wraps the grain pipeline's
iterator (host-only fields dropped, skipped samples counted, its position checkpointed), and
``common_length`` pads every host's batch to one length, ``with_target_positions`` lists the
positions the loss reads (so the LM head runs only there), ``with_trimmed_clip_prompts`` cuts the
CLIP prompts' padding."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from ppllava_jax import sharding
from ppllava_jax.data import clip_prompts, collate
from ppllava_jax.data import pipeline as pl
from ppllava_jax.models.config import PPLLaVAConfig

MIN_CLIP_LENGTH = 64  # shortest trimmed CLIP prompt: lengths 64, 128, ... (few programs)


def common_length(batch: dict[str, np.ndarray], mcfg: PPLLaVAConfig) -> dict[str, np.ndarray]:
    """Pad this host's batch to the longest length of all hosts (each host picks its own bucket;
    the global array needs one). A no-op on one host."""
    if jax.process_count() == 1:
        return batch
    length = sharding.max_over_processes(batch["input_ids"].shape[-1])
    pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else 0
    return collate.pad_length(batch, length, pad)


def _agreed_size(n: int, smallest: int, largest: int, name: str) -> int:
    """``n`` rounded up to a power of two, at least ``smallest``, at most ``largest``: the
    largest of all hosts (few compiled programs, one global shape)."""
    k = min(max(smallest, 1 << max(n - 1, 0).bit_length()), largest)
    return sharding.max_over_processes(k, name=name)


def with_target_positions(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` + ``int32[B, K]`` ``target_positions`` (``collate.target_positions``): the
    train step then applies the LM head and the cross entropy at those K positions only, not at
    all ``L`` (same loss and gradients; ``train.losses.gathered_token_logps``).

    ``K`` is the most supervised targets of a row, rounded up to a power of two (at least 16,
    at most ``L - 1``: few compiled programs), the largest of all hosts (one global shape)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    n = collate.count_targets(labels, mask)
    k = _agreed_size(n, 16, labels.shape[-1] - 1, "target_positions")
    return {**batch, collate.TARGET_POSITIONS: collate.target_positions(labels, mask, count=k)}


def with_trimmed_clip_prompts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with the CLIP prompts cut to the longest real one rounded up to a power of two
    (at least ``MIN_CLIP_LENGTH``, at most their padded length; the largest of all hosts: few
    compiled programs, one global shape): the frozen text tower then runs over 64 positions for
    a question of 40 tokens, not the 248 the prompts are padded to. Same outputs
    (``clip_prompts.trim_clip_prompts``)."""
    full = max((v.shape[-1] for k, v in batch.items() if k.endswith("_clip_ids")), default=0)
    if not full:
        return batch
    n = clip_prompts.clip_prompt_length(batch)
    k = _agreed_size(n, MIN_CLIP_LENGTH, full, "clip_prompt_length")
    return clip_prompts.trim_clip_prompts(batch, k)


class TrainBatches:
    """The pipeline's iterator for the trainer: drops host-only fields, counts skipped samples,
    and passes ``get_state``/``set_state`` through (so checkpoints hold the data position).

    pipeline: the ``Pipeline`` of ``it``; with it, a checkpoint of another process count
      resumes (``reshard_state``).
    trace: a file to which each batch's sample ids and array shapes are appended as one JSON
      line (``train.data_trace``: what the multi-process tests check).
    """

    def __init__(self, it: Any, pipeline: pl.Pipeline | None = None, trace: str = ""):
        self.it = it
        self.pipeline = pipeline
        self.trace = trace
        self.batches = 0  # batches consumed (restored with the state): the step they feed
        self.skipped: dict[str, int] = {}

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch, meta = pl.split_meta(next(self.it))
        batch.pop("valid", None)
        self.skipped = dict(meta.get("skipped", self.skipped))
        self.batches += 1
        if self.trace:
            rec = {
                "step": self.batches,
                "process": jax.process_index(),
                "ids": list(meta.get("ids", [])),
                "epoch": [int(e) for e in meta.get("epoch", [])],
                "shapes": {k: list(np.shape(v)) for k, v in sorted(batch.items())},
            }
            with open(self.trace, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return batch

    def metrics(self) -> dict[str, int]:
        out = {f"data/skipped_{k}": int(v) for k, v in self.skipped.items()}
        out["data/skipped"] = int(sum(self.skipped.values()))
        return out

    def get_state(self) -> Any:
        return self.it.get_state()

    def set_state(self, state: Any) -> None:
        self.it.set_state(state)
        if isinstance(state, dict):
            self.batches = int(state.get("batches", 0))

    def reshard_state(self, states: list[Any], process_index: int, process_count: int) -> Any:
        """The state to resume from after a change of the process count (``Pipeline
        .reshard_state``; called by ``Checkpointer.restore``)."""
        if self.pipeline is None:
            raise ValueError("TrainBatches without its pipeline cannot resume on a new host count")
        return self.pipeline.reshard_state(states, process_index, process_count)
