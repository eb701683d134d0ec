"""Reading and writing PyTorch/Hugging Face checkpoint directories, one tensor at a time.

Reads ``model.safetensors``, sharded ``model-0000k-of-0000n.safetensors`` (with or without
``model.safetensors.index.json``) and ``pytorch_model*.bin`` (needs torch). Safetensors files are
memory-mapped and parsed here (bfloat16 included, via ml_dtypes), so reading never holds more
than the tensor asked for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be read as asked."""


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self.offset = 8 + n
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}"
            )
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._mm[self.offset + start : self.offset + end]
        return np.array(raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"]))


class TorchCheckpoint(Mapping):
    """Read-only mapping ``torch key -> np.ndarray`` over a checkpoint directory or file.

    Tensors are read lazily on ``__getitem__``. bfloat16 stays bfloat16 (ml_dtypes).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self._where: dict[str, object] = {}
        files = _checkpoint_files(path)
        for f in files:
            if f.suffix == ".safetensors":
                st = _SafetensorsFile(f)
                for k in st.keys():
                    self._where[k] = st
            else:
                self._load_bin(f)

    def _load_bin(self, f: Path) -> None:
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{f} is a PyTorch pickle; reading it needs torch: pip install 'ppllava-jax[torch]'"
            ) from e
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        if "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        for k, v in sd.items():
            self._where[k] = v

    def __getitem__(self, key: str) -> np.ndarray:
        src = self._where[key]
        if isinstance(src, _SafetensorsFile):
            return src.get(key)
        import torch

        t = src.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._where[key]
        if isinstance(src, _SafetensorsFile):
            return tuple(src.header[key]["shape"])
        return tuple(src.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return [path / n for n in names]
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("*.bin"))
    if bins:
        return bins
    raise CheckpointError(
        f"{path} holds no *.safetensors or pytorch_model*.bin files; point --source at the "
        "directory with the model weights and config.json"
    )


def write_safetensors(
    tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``name -> array`` as ``model.safetensors`` or ``model-0000k-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Accepts an iterator, so tensors can be produced one at
    a time; each shard is written when full."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    tmp_paths: list[Path] = []
    size = 0

    def flush() -> None:
        p = out_dir / f".shard-{len(tmp_paths):05d}.tmp"
        _write_one(p, shards[-1], metadata)
        tmp_paths.append(p)

    weight_map: dict[str, int] = {}
    total = 0
    for name, arr in items:
        arr = np.ascontiguousarray(arr).reshape(np.shape(arr))  # keeps 0-d scalars 0-d
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            flush()
            shards[-1] = []
            shards.append([])
            size = 0
        shards[-1].append((name, arr))
        weight_map[name] = len(tmp_paths)
        size += arr.nbytes
        total += arr.nbytes
    flush()
    shards[-1] = []
    n = len(tmp_paths)
    if n == 1:
        final = [out_dir / "model.safetensors"]
    else:
        final = [out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for t, f in zip(tmp_paths, final):
        os.replace(t, f)
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: final[i].name for k, i in weight_map.items()},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return final


def _write_one(path: Path, items: list[tuple[str, np.ndarray]], metadata) -> None:
    header: dict[str, object] = {}
    off = 0
    for name, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in _ST_NAMES:
            raise CheckpointError(f"cannot write tensor {name} of dtype {dt} to safetensors")
        header[name] = {
            "dtype": _ST_NAMES[dt],
            "shape": list(arr.shape),
            "data_offsets": [off, off + arr.nbytes],
        }
        off += arr.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, arr in items:
            f.write(arr.tobytes())
