"""Preprocess a split once into ArrayRecord files, and read it back as a grain source.

Decoding and resampling videos dominates the pipeline's cost; for a split that is read many
times (evaluation sets, or a fixed-frame training set) this writes, once, the pipeline's
stage-A record of every sample (frames sampled and resized to the tower size as uint8, token
ids, labels, CLIP prompt ids and mask, the merged length) and reads them back with
``grain.sources.ArrayRecordDataSource``::

    info = write_split(data_config, model_config, DIR)

    DIR/data.array_record-00000-of-0000N   one record per usable sample (npz bytes)
    DIR/info.json                           preprocessing settings, sizes, skip counts, ids

then ``data.array_record = DIR`` in the pipeline config. Records are serialized with
``numpy.savez`` (no pickle). The format follows TFDS' ArrayRecord layout (``name.array_record-
SSSSS-of-NNNNN`` shards, random access), but is written without TensorFlow, which is not a
dependency here (``tfds.core`` builders need it to serialize features); a samples' frames are
sampled once (``middle`` by default) and so are the same in every epoch.

Bad samples are skipped and counted as in the pipeline (``info.json["skipped"]``), or raise
with ``on_error="raise"``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any

import numpy as np

from ppllava_jax.data import pipeline as pl

log = logging.getLogger(__name__)

INFO = "info.json"
PREFIX = "data.array_record"
FORMAT_VERSION = 1
# settings a reader must agree with (they fix the stored arrays)
_FIXED = (
    "num_frames",
    "image_size",
    "image_grid_pinpoints",
    "max_images",
    "clip_max_length",
    "template",
    "training",
    "frame_sampling",
    "seed",
    "generation_prompt",
    "answer_prefix",
    "text_encoding",
    "tokenizer_legacy",
    "frame_folder_order",
)


def serialize(rec: dict) -> bytes:
    """Stage-A record -> npz bytes (arrays only; ``kind`` stored as a 0-d string)."""
    buf = io.BytesIO()
    arrays = {k: np.asarray(v) for k, v in rec.items() if k != "kind"}
    arrays["kind"] = np.asarray(rec.get("kind", ""))
    np.savez(buf, **arrays)
    return buf.getvalue()


def deserialize(data: bytes) -> dict:
    """Inverse of :func:`serialize`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        rec = {k: z[k] for k in z.files}
    rec["kind"] = str(rec["kind"])
    for k in ("source", "index", "length"):
        if k in rec:
            rec[k] = int(rec[k])
    return rec


def _shard_paths(out_dir: str, num_shards: int) -> list[str]:
    return [
        os.path.join(out_dir, f"{PREFIX}-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)
    ]


def write_split(
    config: Any, model_config: Any, out_dir: str | os.PathLike, num_shards: int = 1
) -> dict:
    """Preprocess every sample of ``config.sources`` (file order, weights ignored) into ArrayRecord.

    ``config`` is a pipeline data config; ``training`` selects the CLIP prompt text and
    ``frame_sampling`` ('' -> middle here) the frames. Returns the info dict (also written).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    cfg = pl.default_config()
    cfg.update(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    if not cfg.frame_sampling:
        cfg.frame_sampling = "middle"
    cfg.update(dict(array_record="", shard_index=0, shard_count=1, num_workers=0))
    pipe = pl.Pipeline(cfg, model_config)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = _shard_paths(out_dir, num_shards)
    total = sum(len(s) for s in pipe.samples)
    per = -(-total // num_shards) if total else 1
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    skipped = dict(pipe.load_skipped)
    ids, n, pos = [], 0, 0
    try:
        for k, samples in enumerate(pipe.samples):
            name = pl._source_name(pipe.sources[k])
            for i, s in enumerate(samples):
                try:
                    rec = pipe.preprocess.decode(s, 0, pos)
                except Exception as e:  # noqa: BLE001 - counted, like the pipeline
                    r = pl._skip_record(e, s.media[0] if s.media else s.source)
                    if cfg.on_error == "raise":
                        raise
                    skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
                    log.warning("skipping %s:%d (%s): %s", name, i, r["reason"], r["message"])
                    continue
                finally:
                    pos += 1
                rec.update(source=np.int32(k), index=np.int32(i))
                writers[min(n // per, num_shards - 1)].write(serialize(rec))
                ids.append(f"{name}:{i}")
                n += 1
    finally:
        for w in writers:
            w.close()
    info = {
        "format_version": FORMAT_VERSION,
        "num_records": n,
        "files": [os.path.basename(p) for p in paths],
        "shard_sizes": [min(per, max(0, n - j * per)) for j in range(num_shards)],
        "sources": [pl._source_name(s) for s in pipe.sources],
        "ids": ids,
        "skipped": skipped,
        "settings": {k: cfg[k] for k in _FIXED},
    }
    with open(os.path.join(out_dir, INFO), "w") as f:
        json.dump(info, f, indent=1)
    return info


class RecordSource:
    """Random access to a written split: ``source[i] -> stage-A record`` (dict)."""

    def __init__(self, path: str | os.PathLike):
        import grain

        self.path = os.fspath(path)
        info_path = os.path.join(self.path, INFO)
        if not os.path.exists(info_path):
            raise ValueError(f"{self.path} is not a preprocessed split (no {INFO}); write_split")
        with open(info_path) as f:
            self.info = json.load(f)
        files = [os.path.join(self.path, p) for p in self.info["files"]]
        self._source = grain.sources.ArrayRecordDataSource(files)
        if len(self._source) != self.info["num_records"]:
            raise ValueError(
                f"{self.path}: {len(self._source)} records, info.json says "
                f"{self.info['num_records']} (incomplete write?)"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        return deserialize(self._source[int(i)])

    def check(self, cfg: Any) -> None:
        """Raise ValueError if ``cfg`` disagrees with the settings the split was written with."""
        have = self.info["settings"]
        diff = {
            k: (have[k], cfg[k])
            for k in ("num_frames", "image_size", "max_images", "clip_max_length")
            if have.get(k) != cfg[k]
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
            e = pl.SampleTooLongError(rec["length"], self.preprocess.max_length, self.source.path)
            return dict(out, **pl._skip_record(e, self.source.path))
        rec["length"] = np.int32(rec["length"])
        if not rec["kind"]:
            rec.pop("pixels", None)
        return dict(out, status="ok", **self.preprocess.finalize(rec))
