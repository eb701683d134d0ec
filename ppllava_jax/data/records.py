"""A preprocessed split read back: the TFDS dataset that :mod:`ppllava_jax.data.tfds_builder`
writes, opened with ``tfds.data_source`` (no TensorFlow needed) and mapped into the pipeline.

``data.array_record = DIR`` reads, instead of decoding again, the pipeline's stage-A record of
every usable sample (frames sampled and resized to the tower size as uint8, token ids, labels,
CLIP prompt ids and mask, the merged length)::

    DIR/ppllava_preprocessed/1.0.0/
        ppllava_preprocessed-train.array_record-0000K-of-0000N   the records (random access)
        dataset_info.json, features.json                         TFDS' description of them
        metadata.json     preprocessing settings, source names, skip counts, the sample ids
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np

from ppllava_jax.data.config import grid_pinpoints, tower_size
from ppllava_jax.data.errors import SampleTooLongError
from ppllava_jax.data.skips import skip_record

NAME = "ppllava_preprocessed"  # the TFDS dataset (tfds_builder.PpllavaPreprocessed)
SPLIT = "train"  # the one split a written dataset holds

# data settings a reader must agree with (they fix the stored arrays)
FIXED = (
    "num_frames",
    "max_images",
    "clip_max_length",
    "template",
    "training",
    "frame_sampling",
    "training_bounds",
    "seed",
    "generation_prompt",
    "answer_prefix",
    "text_encoding",
    "tokenizer_legacy",
    "frame_folder_order",
)


def settings(cfg: Any, model_cfg: Any) -> dict:
    """The settings a split is written with: :data:`FIXED` of the resolved data config ``cfg``,
    and the model's tower size and any-resolution grids."""
    return {
        **{k: cfg[k] for k in FIXED},
        "image_size": tower_size(model_cfg),
        "image_grid_pinpoints": [list(p) for p in grid_pinpoints(model_cfg)],
    }


class RecordSource:
    """Random access to a written split: ``source[i] -> stage-A record`` (a dict of numpy
    arrays as :class:`~ppllava_jax.data.preprocess.Preprocess` decodes it, plus ``source`` and
    ``index``); ``info``: the split's metadata (``settings``, ``sources``, ``skipped``, ``ids``)
    and ``num_records``. Picklable (each worker process opens the files itself)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not glob.glob(os.path.join(self.path, NAME, "*", "dataset_info.json")):
            raise ValueError(
                f"{self.path} is not a preprocessed split (no TFDS dataset {NAME!r} in it); "
                "write one with ppllava_jax.data.tfds_builder.write_split"
            )
        self._source = None
        source = self.source
        self.info = dict(source.dataset_info.metadata or {}, num_records=len(source))

    @property
    def source(self):
        """The ``tfds.data_source`` of the split (opened on first use in each process)."""
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(NAME, data_dir=self.path, split=SPLIT)
        return self._source

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def __len__(self) -> int:
        return int(self.info["num_records"])

    def __getitem__(self, i: int) -> dict:
        rec = dict(self.source[int(i)])
        rec["kind"] = rec["kind"].decode() if isinstance(rec["kind"], bytes) else str(rec["kind"])
        for k in ("source", "index", "length"):
            rec[k] = int(rec[k])
        if rec["kind"] != "image":
            rec.pop("image_size")
        if not rec["kind"]:
            rec.pop("pixels")
        return rec

    def check(self, cfg: Any, model_cfg: Any) -> None:
        """Raise ValueError if ``cfg`` (a resolved data config) and ``model_cfg`` disagree with
        the settings the split was written with (those that fix the stored arrays' shapes)."""
        have, want = self.info.get("settings", {}), settings(cfg, model_cfg)
        diff = {
            k: (have.get(k), want[k])
            for k in ("num_frames", "image_size", "max_images", "clip_max_length")
            if have.get(k) != want[k]
        }
        if diff:
            raise ValueError(
                f"{self.path} was written with other settings (written, config): {diff}; "
                "rewrite it or change the config"
            )


class RecordMap:
    """Pipeline map for an ArrayRecord split: ``{position, index, ...} -> record``."""

    def __init__(self, source: RecordSource, preprocess: Any):
        self.source = source
        self.preprocess = preprocess

    def __call__(self, item: dict) -> dict:
        out = {k: item[k] for k in ("epoch", "position", "source", "index")}
        if item["pad"]:
            return dict(out, status="pad")
        rec = self.source[item["index"]]
        rec.pop("source", None), rec.pop("index", None)
        if rec["length"] > self.preprocess.max_length:
            e = SampleTooLongError(rec["length"], self.preprocess.max_length, self.source.path)
            return dict(out, **skip_record(e, self.source.path))
        rec["length"] = np.int32(rec["length"])
        return dict(out, status="ok", **self.preprocess.finalize(rec))
