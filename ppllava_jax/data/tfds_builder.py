"""Preprocess a split once into a TFDS dataset of ArrayRecord files (read back by ``records``).

Decoding and resampling videos dominates the pipeline's cost; for a split that is read many
times (evaluation sets, or a fixed-frame training set) :func:`write_split` runs the pipeline's
stage A once over every sample of a data config's sources, through a TFDS builder
(:class:`PpllavaPreprocessed`, ``file_format='array_record'``; TFDS writes and reads it
without TensorFlow)::

    info = write_split(data_config, model_config, DIR)

then ``data.array_record = DIR`` in the pipeline config (:mod:`ppllava_jax.data.records`
opens it with ``tfds.data_source``). The records keep the file order (no shuffling at write
time); a sample's frames are sampled once (``middle`` by default) and so are the same in every
epoch. Bad samples are skipped and counted as in the pipeline (``info["skipped"]``), or raise
with ``on_error="raise"``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ppllava_jax.data import records
from ppllava_jax.data.config import resolve_config, tower_size
from ppllava_jax.data.pipeline import Pipeline, source_name
from ppllava_jax.data.skips import skip_record

log = logging.getLogger(__name__)


def features() -> tfds.features.FeaturesDict:
    """One stage-A record: int32 token ids and labels [S], CLIP ids and mask [Lc], the media
    kind ('' text, video, image, multi), uint8 pixels [V, S, S, 3] (V = 0 for text), the
    original image (height, width) (zeros but for images), the merged length, and the
    sample's source and index among its source's valid samples."""
    ids = dict(shape=(None,), dtype=np.int32)
    return tfds.features.FeaturesDict(
        {
            "input_ids": tfds.features.Tensor(**ids),
            "labels": tfds.features.Tensor(**ids),
            "clip_ids": tfds.features.Tensor(**ids),
            "clip_mask": tfds.features.Tensor(**ids),
            "kind": tfds.features.Text(),
            "pixels": tfds.features.Tensor(
                shape=(None, None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "length": tfds.features.Scalar(dtype=np.int32),
            "source": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }
    )


class PpllavaPreprocessed(tfds.core.GeneratorBasedBuilder):
    """The pipeline's stage-A records of a data config's sources (module docstring).

    ``data_config`` / ``model_config`` are needed to write; TFDS builds the class without them
    (by name) to read a written dataset.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stage-A records of ppllava_jax.data.preprocess."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code directory (checksums, README) beside the builder: it downloads nothing, and
        TFDS' lookup of one needs ``importlib_resources`` for a class inside a package."""
        return None

    def __init__(self, *, data_config: Any = None, model_config: Any = None, **kwargs):
        self.pipeline = None
        if data_config is not None:
            cfg = resolve_config(data_config)
            if not cfg.frame_sampling:
                cfg.frame_sampling = "middle"
            cfg.update(dict(array_record="", shard_index=0, shard_count=1, num_workers=0))
            self.pipeline = Pipeline(cfg, model_config)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=features(),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # the file order: an evaluation split is read in order
        )

    def _split_generators(self, dl_manager):
        if self.pipeline is None:
            raise ValueError("write a preprocessed split with tfds_builder.write_split")
        return {records.SPLIT: self._generate_examples()}

    def _generate_examples(self):
        pipe = self.pipeline
        cfg, size = pipe.config, tower_size(pipe.model_config)
        skipped = dict(pipe.load_skipped)
        ids, pos = [], 0
        for k, samples in enumerate(pipe.samples):
            name = source_name(pipe.sources[k])
            for i, s in enumerate(samples):
                try:
                    rec = pipe.preprocess.decode(s, 0, pos)
                except Exception as e:  # noqa: BLE001 - counted, like the pipeline
                    r = skip_record(e, s.media[0] if s.media else s.source)
                    if cfg.on_error == "raise":
                        raise
                    skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
                    log.warning("skipping %s:%d (%s): %s", name, i, r["reason"], r["message"])
                    continue
                finally:
                    pos += 1
                yield len(ids), example(rec, k, i, size)
                ids.append(f"{name}:{i}")
        self.info.metadata.update(
            sources=[source_name(s) for s in pipe.sources],
            ids=ids,
            skipped=skipped,
            settings=records.settings(cfg, pipe.model_config),
        )


def example(rec: dict, source: int, index: int, size: int) -> dict:
    """A stage-A record as a :func:`features` example (absent media fields filled: no pixels
    ``uint8[0, size, size, 3]``, image size zeros)."""
    return {
        "input_ids": rec["input_ids"],
        "labels": rec["labels"],
        "clip_ids": np.asarray(rec["clip_ids"], np.int32),
        "clip_mask": np.asarray(rec["clip_mask"], np.int32),
        "kind": rec["kind"],
        "pixels": rec.get("pixels", np.zeros((0, size, size, 3), np.uint8)),
        "image_size": np.asarray(rec.get("image_size", (0, 0)), np.int32),
        "length": np.int32(rec["length"]),
        "source": np.int32(source),
        "index": np.int32(index),
    }


def write_split(
    config: Any, model_config: Any, out_dir: str | os.PathLike, num_shards: int = 1
) -> dict:
    """Preprocess every sample of ``config.sources`` (file order, weights ignored) into the TFDS
    dataset ``records.NAME`` under ``out_dir`` (replacing one written before).

    ``config`` is a pipeline data config; ``training`` selects the CLIP prompt text and
    ``frame_sampling`` ('' -> middle here) the frames. Returns the split's info
    (``records.RecordSource.info`` plus ``shard_sizes``).
    """
    builder = PpllavaPreprocessed(
        data_config=config,
        model_config=model_config,
        data_dir=os.fspath(out_dir),
        file_format="array_record",
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            num_shards=num_shards, download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
        )
    )
    info = records.RecordSource(out_dir).info
    info["shard_sizes"] = list(builder.info.splits[records.SPLIT].shard_lengths)
    return info
