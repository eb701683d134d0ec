"""Reading and writing PyTorch/Hugging Face checkpoint directories, one tensor at a time.

Reads ``model.safetensors``, sharded ``model-0000k-of-0000n.safetensors`` (with or without
``model.safetensors.index.json``) and ``pytorch_model*.bin`` (needs torch). Safetensors files are
opened with the ``safetensors`` library (``safe_open``: the header is checked against the file
when it is opened; tensors are memory-mapped and copied out one at a time, bfloat16 via
ml_dtypes), so reading never holds more than the tensor asked for.

A damaged file (zero bytes, text, truncated, a bad header) raises ``CheckpointError`` naming the
file and, where known, the tensor. A ``.bin`` is loaded with ``weights_only=True``: one that holds
other Python objects is refused (unpickling them runs code from the file), with what to do
instead (:func:`refused_pickle_message`), never with a hint to unpickle it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

# dtypes written to safetensors (what transformers reads back)
_WRITABLE = frozenset(
    np.dtype(t)
    for t in (
        np.float64,
        np.float32,
        np.float16,
        ml_dtypes.bfloat16,
        np.int64,
        np.int32,
        np.int16,
        np.int8,
        np.uint8,
        np.bool_,
    )
)
_DAMAGED = "the file is damaged or incomplete: download or export it again"


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be read as asked."""


def refused_pickle_message(path: str | os.PathLike, torch_message: str) -> str:
    """One line for a ``.bin`` that ``torch.load(weights_only=True)`` refuses: it holds Python
    objects besides tensors, which are not unpickled here (that would run code from the file).
    Says what to do instead of torch's own hint (``weights_only=False``, unsafe)."""
    found = re.search(r"GLOBAL (\S+)", torch_message)
    what = f" (e.g. {found.group(1)})" if found else ""
    return (
        f"{path} holds Python objects besides tensors{what}; they are not unpickled, since "
        "unpickling runs code from the file. If you trust its source, re-save its tensors as "
        "safetensors in a separate environment (transformers: "
        "model.save_pretrained(DIR, safe_serialization=True); or safetensors.torch.save_file "
        "of the state dict as DIR/model.safetensors) and pass that DIR as --source"
    )


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _SafetensorsFile:
    """One ``.safetensors`` file opened with ``safetensors.safe_open`` (numpy arrays)."""

    def __init__(self, path: Path):
        self.path = path
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes); {_DAMAGED}")
        try:
            self._f = safe_open(str(path), framework="numpy")
            self._keys = list(self._f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({_reason(e)}); {_DAMAGED}"
            ) from None

    def keys(self) -> list[str]:
        return self._keys

    def get(self, key: str) -> np.ndarray:
        try:
            return np.array(self._f.get_tensor(key))
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key} ({_reason(e)})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())


class TorchCheckpoint(Mapping):
    """Read-only mapping ``torch key -> np.ndarray`` over a checkpoint directory or file.

    Tensors are read lazily on ``__getitem__``. bfloat16 stays bfloat16 (ml_dtypes). A file
    that cannot be read raises ``CheckpointError`` naming it (and the tensor, when reading one).
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
        if f.stat().st_size == 0:
            raise CheckpointError(f"{f} is empty (0 bytes); {_DAMAGED}")
        try:
            # zip checkpoints (torch >= 1.6) are memory-mapped; the legacy format is read whole
            mmap = zipfile.is_zipfile(f)
            sd = torch.load(f, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as e:  # RuntimeError, OSError, EOFError, UnpicklingError, ...
            refused = isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()
            if refused and re.search(r"GLOBAL \S+", str(e)):
                raise CheckpointError(refused_pickle_message(f, str(e))) from None
            # torch's first line of a refusal advises weights_only=False: its detail instead
            found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e)) if refused else None
            reason = found.group(1).strip() if found else _reason(e)
            raise CheckpointError(
                f"{f} is not a readable PyTorch checkpoint ({reason}); {_DAMAGED}"
            ) from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f} holds a {type(sd).__name__}, not a state dict of tensors")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{f}: entry {k} is a {type(v).__name__}, not a tensor")
            self._where[k] = (f, v)

    def __getitem__(self, key: str) -> np.ndarray:
        src = self._where[key]
        if isinstance(src, _SafetensorsFile):
            return src.get(key)
        import torch

        f, t = src
        try:
            t = t.detach()
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
            return t.numpy().copy()
        except Exception as e:  # a damaged mmap'ed storage, a dtype numpy lacks
            raise CheckpointError(f"{f}: cannot read tensor {key} ({_reason(e)})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._where[key]
        if isinstance(src, _SafetensorsFile):
            return src.shape(key)
        return tuple(src[1].shape)

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
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index} is not a readable shard index ({_reason(e)}); {_DAMAGED}"
            ) from None
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
    for name, arr in items:
        if np.dtype(arr.dtype) not in _WRITABLE:
            raise CheckpointError(f"cannot write tensor {name} of dtype {arr.dtype} to safetensors")
    save_file(dict(items), str(path), metadata={"format": "pt", **(metadata or {})})
