"""Skipping and collation in the main process: records -> static-shape batches.

Skipping happens after ``mp_prefetch``: a bad sample is a small "skip" record from the
worker; :class:`BatchIterator` counts it per reason, logs a warning naming the file, and keeps
filling the batch from the next samples (training) or keeps it as an invalid row (evaluation).
Because the workers emit exactly one record per index and grain interleaves them round-robin,
the batches are identical for any ``num_workers``, and the counts are part of the iterator
state (``get_state()``: grain's positions, the skip counts, the batch count).
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from ppllava_jax.data.collate import Sample, collate
from ppllava_jax.data.config import tower_size
from ppllava_jax.data.errors import DataError
from ppllava_jax.data.preprocess import media_of
from ppllava_jax.layout import GROUPS, IGNORE_INDEX

log = logging.getLogger(__name__)


class BatchSpec:
    """Everything the batching iterator needs (picklable, small): the resolved data config's
    batching fields, the model config, the frames per media group, the source names (for
    ``meta['ids']`` and warnings) and the skip counts from loading."""

    def __init__(self, cfg, model_cfg, frames, source_names, initial_skips):
        self.model_cfg = model_cfg
        self.batch_size = int(cfg.batch_size)
        self.buckets = sorted(int(b) for b in cfg.buckets)
        self.padding_side = cfg.padding_side
        self.clip_length = int(cfg.clip_max_length)
        self.frames = dict(frames)
        self.group_capacity = cfg.group_capacity
        self.fixed_groups = tuple(cfg.fixed_groups)
        if cfg.fixed_length:
            self.buckets = self.buckets[-1:]
        self.micro_batches = int(cfg.micro_batches)
        self.training = bool(cfg.training)
        self.drop_remainder = bool(cfg.drop_remainder) if cfg.training else False
        self.raise_errors = cfg.on_error == "raise"
        self.max_consecutive_skips = int(cfg.max_consecutive_skips)
        self.source_names = list(source_names)
        self.initial_skips = dict(initial_skips)
        self.image_size = tower_size(model_cfg)
        self.dpo = bool(cfg.get("dpo", False))


class BatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: BatchSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self):
        return BatchIterator(self._parent.__iter__(), self._spec)

    def __str__(self) -> str:
        return f"BatchIterDataset(batch_size={self._spec.batch_size})"


class BatchIterator(grain.DatasetIterator):
    """Consumes records, counts and drops (train) or masks (eval) bad ones, collates.

    A batch is :func:`collate.collate`'s dict plus ``valid: bool[B]`` and ``meta``
    (``ppllava_jax.data.pipeline``'s docstring); DPO batches have ``2 * batch_size`` rows."""

    def __init__(self, parent: grain.DatasetIterator, spec: BatchSpec):
        super().__init__(parent)
        self._spec = spec
        self._skipped = dict(spec.initial_skips)
        self._batches = 0
        # training: the epoch being read, whether it was read from its start, its ok samples,
        # its skipped ones by reason and the last (an epoch without any usable sample: error)
        self._ep: int | None = None
        self._ep_full = True
        self._ep_ok = 0
        self._ep_bad: dict[str, int] = {}
        self._ep_last: dict | None = None

    def _track(self, rec: dict) -> None:
        e = int(rec.get("epoch", -1))
        if e < 0:
            return
        if self._ep is None:
            self._ep = e
        elif e != self._ep:
            self._check_epoch()
            self._ep, self._ep_full, self._ep_ok, self._ep_bad = e, True, 0, {}
        if rec["status"] == "ok":
            self._ep_ok += 1
        elif rec["status"] == "skip":
            self._ep_bad[rec["reason"]] = self._ep_bad.get(rec["reason"], 0) + 1
            self._ep_last = rec

    def _check_epoch(self) -> None:
        """A whole epoch (read from its start) of skipped samples: nothing can be trained on."""
        if not (self._ep_full and self._ep_ok == 0 and self._ep_bad and self._ep_last):
            return
        last = self._ep_last
        name = self._spec.source_names[last["source"]] if last["source"] >= 0 else "?"
        raise DataError(
            f"epoch {self._ep} has no valid sample: all {sum(self._ep_bad.values())} samples read "
            f"by this host were skipped ({', '.join(f'{k} {v}' for k, v in self._ep_bad.items())}"
            f"); the last, {name}:{last.get('sample_index', last['index'])}, file {last['path']}: "
            f"{last['message']}. Check the media paths (data_root of data.sources) and files",
            path=last["path"],
        )

    def _count(self, rec: dict) -> None:
        s = self._spec
        if s.raise_errors:
            raise DataError(f"bad sample ({rec['reason']}): {rec['message']}", path=rec["path"])
        self._skipped[rec["reason"]] = self._skipped.get(rec["reason"], 0) + 1
        name = s.source_names[rec["source"]] if rec["source"] >= 0 else "?"
        log.warning(
            "skipping sample %s:%d (%s), file %s: %s",
            name,
            rec.get("sample_index", rec["index"]),
            rec["reason"],
            rec["path"],
            rec["message"],
        )

    def __next__(self) -> dict:
        s = self._spec
        rows: list[dict] = []
        consecutive = 0
        while len(rows) < s.batch_size:
            try:
                rec = next(self._parent)
            except StopIteration:
                if s.training:
                    self._check_epoch()
                break
            if s.training:
                self._track(rec)
            if rec["status"] == "skip":
                self._count(rec)
                consecutive += 1
                if consecutive >= s.max_consecutive_skips:
                    raise DataError(
                        f"{consecutive} bad samples in a row (last: {rec['path']}: "
                        f"{rec['message']}); check the data or data.max_consecutive_skips"
                    )
                if not s.training:
                    rows.append(rec)
                continue
            consecutive = 0
            if rec["status"] == "pad" and s.training:
                continue
            rows.append(rec)
        if not rows or (len(rows) < s.batch_size and s.drop_remainder):
            raise StopIteration
        while len(rows) < s.batch_size:
            rows.append({"status": "pad", "epoch": -1, "position": -1, "source": -1, "index": -1})
        batch = self._collate(rows)
        self._batches += 1
        return batch

    def _dummy(self, rows: list[dict]) -> dict:
        for r in rows:
            if r["status"] == "ok":
                return r
        s = self._spec
        size, t = s.image_size, s.frames["video"]
        ids = np.array([s.model_cfg.image_token_index], np.int32)
        clip = np.zeros(s.clip_length, np.int32)
        return {
            "input_ids": ids,
            "labels": np.full(1, IGNORE_INDEX, np.int32),
            "rejected_input_ids": ids,
            "rejected_labels": np.full(1, IGNORE_INDEX, np.int32),
            "clip_ids": clip,
            "clip_mask": np.eye(1, s.clip_length, dtype=np.int32)[0],
            "kind": "video",
            "pixels": np.zeros((t, size, size, 3), np.float32),
        }

    def _collate(self, rows: list[dict]) -> dict:
        s = self._spec
        dummy = self._dummy(rows)
        samples = []
        for r in rows:
            src = r if r["status"] == "ok" else dummy
            samples.append(
                Sample(
                    input_ids=src["input_ids"],
                    labels=src["labels"],
                    media=media_of(src),
                    clip_ids=src["clip_ids"],
                    clip_mask=src["clip_mask"],
                )
            )
        if s.dpo:  # rejected twins after the chosen rows, reusing their visual input
            for i, r in enumerate(rows):
                src = r if r["status"] == "ok" else dummy
                samples.append(
                    Sample(
                        input_ids=src["rejected_input_ids"],
                        labels=src["rejected_labels"],
                        media_from=None if samples[i].media is None else i,
                    )
                )
            rows = rows + rows
        caps = None
        if s.group_capacity == "batch":
            caps = {g: s.batch_size for g in GROUPS}
        batch = collate(
            samples,
            s.model_cfg,
            buckets=s.buckets,
            padding_side=s.padding_side,
            capacity=caps,
            num_frames=s.frames,
            clip_length=s.clip_length,
            micro_batches=s.micro_batches,
            groups=s.fixed_groups,
        )
        batch["valid"] = np.array([r["status"] == "ok" for r in rows])

        def ids(r):
            if r["source"] < 0 or r["status"] == "pad":
                return ""
            return f"{s.source_names[r['source']]}:{r['index']}"

        batch["meta"] = {
            "ids": [ids(r) for r in rows],
            "source": np.array([r["source"] for r in rows], np.int32),
            "index": np.array([r["index"] for r in rows], np.int32),
            "epoch": np.array([r["epoch"] for r in rows], np.int32),
            "position": np.array([r["position"] for r in rows], np.int32),
            "status": [r["status"] for r in rows],
            "skipped": dict(self._skipped),
        }
        if s.dpo:
            n = len(rows) // 2
            batch["meta"]["dpo_role"] = ["chosen"] * n + ["rejected"] * n
        return batch

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            "skipped": dict(self._skipped),
            "batches": self._batches,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = dict(state["skipped"])
        self._batches = int(state["batches"])
        self._ep, self._ep_full = None, False  # resumed inside an epoch: not checked whole

    def __str__(self) -> str:
        return "BatchIterator"
