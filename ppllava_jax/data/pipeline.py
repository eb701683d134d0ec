"""The grain input pipeline: annotations -> decoded, tokenized samples -> static-shape batches.

Stages (``Pipeline.dataset()``)::

    MapDataset.source(EpochOrder)       k -> (epoch, position, source, index) of this host's shard
      .map(Preprocess)                  decode media, template + labels, CLIP prompt, length check
      .to_iter_dataset(ReadOptions)     a few threads per process
      .mp_prefetch(num_workers)         worker processes (spawn), each a strided slice
      BatchIterDataset                  skip bad samples, count them, collate.collate -> batch
      ThreadPrefetchIterDataset         overlap collation with the training step

The parts, one module each: ``config`` (the ``data`` fields, what the model fixes, checks),
``order`` (:class:`~ppllava_jax.data.order.EpochOrder`, resharding), ``preprocess`` (one
sample -> record, shared with the ArrayRecord builder), ``skips`` (skip reasons), ``dpo``
(preference annotations), ``batching`` (skipping + collation), ``records`` (a preprocessed
split read back); this module wires them into one grain graph.

Design choices:

- **Order.** Each epoch is a deterministic function of (seed, epoch): every source contributes
  ``floor(weight * size)`` samples plus one more with probability ``frac(weight * size)``, then
  the epoch is shuffled. Host ``p`` of ``P`` takes positions ``p, p + P, ...`` of each epoch
  (training: each epoch cut to a multiple of P so all hosts stay in step; evaluation: padded
  with invalid rows up to a multiple of P). The per-sample frame-sampling seed is
  ``[seed, epoch, position]``, so a sample is decoded identically whatever the worker count
  and after a resume.
- **Skipping happens after** ``mp_prefetch``. A bad sample becomes a small "skip" record in the
  worker; the main process counts it per reason, logs a warning naming the file, and keeps
  filling the batch from the next samples (training) or keeps it as an invalid row
  (evaluation). Because the workers emit exactly one record per index and grain interleaves
  them round-robin, the batches are identical for any ``num_workers`` (grain warns that
  filtering *before* ``mp_prefetch`` breaks this), and the counts are part of the iterator
  state.
- **Static shapes: each batch is padded to the smallest bucket that fits its longest sample**
  (no grouping by length). Grouping would need a buffer of decoded samples per bucket, whose
  pixels cannot go into a checkpoint, so exact resume would have to replay them; padding keeps
  batches as consecutive runs of the shuffled order, makes the state a few integers, and costs
  little here because a video's merged length is dominated by its fixed number of visual tokens
  (1,024 of ~1,100 for the 7B recipe). Distinct shapes: at most ``len(buckets)`` per set of
  media groups present (``group_capacity='batch'`` pads every present group to the batch size).
- **State.** ``get_state()`` of the returned iterator is a small JSON-able dict (grain's
  per-worker positions, the skip counts, the batch count); ``set_state`` resumes with exactly the
  batches the uninterrupted iterator would have produced.

A batch is the dict of :func:`ppllava_jax.data.collate.collate` (numpy), plus
``valid: bool[B]`` and ``meta``, a Python dict kept out of the jitted step (pop it first)::

    meta = {"ids": ["train.json:17", ...],  # "<source name>:<index>", "" for padding rows
            "source": int32[B], "index": int32[B],  (-1 for padding rows)
            "epoch": int32[B], "position": int32[B],
            "status": ["ok" | "skip" | "pad", ...],
            "skipped": {"missing_media": 1, "bad_media": 2, ...}}  # cumulative, incl. loading

DPO (``data.dpo = True``, annotations: :mod:`ppllava_jax.data.dpo`). Each sample is
decoded once and gives two encodings with the same prompt and media: labels on the chosen
answer and on the rejected one (with ``vicuna_v1`` and ``text_encoding='original'``, the DPO
recipe, as the original's ``train_dpo.py`` encodes them: :mod:`ppllava_jax.data.dpo`). The CLIP
prompt is the conversation *without* the preferred answer (earlier turns and the last question;
the original's: the stripped question), so the visual tokens, shared by both, do not see
either answer. ``data.batch_size`` counts pairs: a batch has ``2 * batch_size`` rows, chosen rows
``0..B-1`` then rejected rows ``B..2B-1``, row ``i + B`` the rejected twin of row ``i``
(``meta['dpo_role']`` says which). The twins share the visual input: row ``i + B`` is collated
with ``collate.Sample.media_from = i``, so its ``visual_index`` rows equal row ``i``'s and each
pair is one item of its media group (the vision tower and the projector run once per pair).
Skipping works on whole pairs (one record per pair), so pairs stay together; ``valid`` and
every ``meta`` list have ``2 * batch_size`` entries. Not available with ``array_record``.

Skip reasons: :mod:`ppllava_jax.data.skips`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import dpo, records
from ppllava_jax.data.annotations import eval_sample
from ppllava_jax.data.batching import BatchIterDataset, BatchSpec
from ppllava_jax.data.config import default_config, resolve_config, validate_config
from ppllava_jax.data.errors import DataError
from ppllava_jax.data.order import EpochOrder, reshard_state
from ppllava_jax.data.preprocess import Preprocess
from ppllava_jax.data.skips import SKIP_REASONS, LoadCounter, no_samples_message


def ensure_flags_parsed() -> None:
    """grain's worker start reads absl flags; outside an absl app (tests, notebooks) they are
    unparsed, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def source_name(src: ann.AnnotationSource) -> str:
    """How batches (``meta['ids']``) and warnings name a source: its name, else its file's."""
    return src.name or os.path.basename(src.path)


class Pipeline:
    """The data pipeline of one host.

    Args:
      config: the ``data`` ConfigDict (see :func:`default_config`; missing fields take the
        defaults, unknown fields are an error).
      model_config: the PPLLaVA config (any object with ``vision.image_size``,
        ``vision.patch_size``, ``pooling``, ``pooling_kernel``, ``pooling_stride``,
        ``image_pooling_kernel``, ``image_pooling_stride``, ``pllava_pooling_shape``,
        ``image_grid_pinpoints``, ``image_token_index``, ``pad_token_id``).

    samples: optional, one list of ``annotations.Sample`` per ``data.sources`` entry, used
      instead of reading the sources' files (evaluation feeds its questions in memory, e.g.
      :func:`annotations.eval_sample`; the sources then only name them).

    Use ``it = pipeline.iterator()``; ``next(it)`` gives a batch (module docstring);
    ``it.get_state()`` / ``it.set_state(state)`` checkpoint and resume it; close it with
    ``it.close()`` when workers are used (``pipeline.close()`` closes all).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict | Mapping,
        model_config: Any,
        samples: Sequence[Sequence[ann.Sample]] | None = None,
    ):
        cfg = resolve_config(config)
        validate_config(cfg, model_config)
        if cfg.shard_count < 0:
            import jax

            cfg.shard_index, cfg.shard_count = jax.process_index(), jax.process_count()
        self.config = cfg
        self.model_config = model_config
        self._iterators: list = []
        self.preprocess = Preprocess(cfg, model_config)
        if cfg.array_record:
            self.record_source = records.RecordSource(cfg.array_record)
            self.record_source.check(cfg, model_config)
            self.sources = [ann.AnnotationSource(path=cfg.array_record, name="array_record")]
            self.samples = None
            sizes, weights = [len(self.record_source)], [1.0]
            self.load_skipped: dict[str, int] = dict(self.record_source.info.get("skipped", {}))
        else:
            self.record_source = None
            self.sources = [
                s if isinstance(s, ann.AnnotationSource) else ann.AnnotationSource.from_config(s)
                for s in cfg.sources
            ]
            counter = LoadCounter()
            load = dpo.load_dpo_annotation_file if cfg.dpo else ann.load_annotation_file
            if samples is not None:  # given in memory (evaluation), one list per source
                if len(samples) != len(self.sources):
                    raise ValueError(
                        f"{len(samples)} sample lists for {len(self.sources)} data.sources"
                    )
                self.samples = [list(x) for x in samples]
            else:
                self.samples = [
                    load(s.path, s.data_root, s.media_type, cfg.on_error, counter)
                    for s in self.sources
                ]
            self.load_skipped = dict(counter.by_reason)
            sizes, weights = [len(x) for x in self.samples], [s.weight for s in self.sources]
            self.preprocess.samples = self.samples
            if samples is None and not any(n for n in sizes):
                raise DataError(no_samples_message(self.sources, counter))
        self.order = EpochOrder(
            sizes,
            weights,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            training=cfg.training,
            num_epochs=cfg.num_epochs,
            shard_index=cfg.shard_index,
            shard_count=cfg.shard_count,
        )

    def sample(self, source: int, index: int) -> ann.Sample:
        """The annotation behind ``meta['source'][i], meta['index'][i]`` (e.g. eval answers)."""
        if self.samples is None:
            raise ValueError("samples of an array_record split are not kept; read its info")
        return self.samples[source][index]

    # -- grain graph
    def dataset(self) -> grain.IterDataset:
        cfg = self.config
        ds = grain.MapDataset.source(self.order)
        if self.record_source is not None:
            ds = ds.map(records.RecordMap(self.record_source, self.preprocess))
        else:
            ds = ds.map(self.preprocess)
        threads = max(1, int(cfg.read_threads))
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        )
        if cfg.num_workers > 0:
            ensure_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=int(cfg.num_workers), per_worker_buffer_size=int(cfg.worker_buffer)
                )
            )
        names = [source_name(s) for s in self.sources]
        spec = BatchSpec(cfg, self.model_config, self.preprocess.frames, names, self.load_skipped)
        ds = BatchIterDataset(ds, spec)
        if cfg.prefetch_batches > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=int(cfg.prefetch_batches)
            )
        return ds

    def iterator(self, state: dict | None = None) -> grain.DatasetIterator:
        """A fresh iterator (optionally restored from ``state``)."""
        it = self.dataset().__iter__()
        if state is not None:
            it.set_state(copy.deepcopy(state))
        self._iterators.append(it)
        return it

    def reshard_state(self, states: Sequence[dict], shard_index: int, shard_count: int) -> dict:
        """Training on another number of hosts: the iterator state for shard ``shard_index``
        of ``shard_count`` that resumes where the ``len(states)`` old hosts' iterators stopped
        (``states``: their ``get_state()``, in host order); :func:`order.reshard_state`."""
        return reshard_state(self.order, states, shard_index, shard_count)

    def close(self) -> None:
        for it in self._iterators:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._iterators.clear()


def split_meta(batch: dict) -> tuple[dict, dict]:
    """(arrays for the jitted step, meta) — ``meta`` removed from a shallow copy."""
    batch = dict(batch)
    return batch, batch.pop("meta", {})


# the data package's front: the pipeline and the config / sample helpers its callers use
__all__ = [
    "SKIP_REASONS",
    "Pipeline",
    "default_config",
    "eval_sample",
    "source_name",
    "split_meta",
    "validate_config",
]
