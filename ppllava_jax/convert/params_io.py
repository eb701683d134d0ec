"""Converted parameters on disk: an orbax checkpoint of the parameter tree plus ``config.json``.

Layout of a converted directory::

    DIR/config.json      {"family": "llama" | "clip" | "clip_vision" | "clip_text" | "ppllava",
                          "config": <the model config, transformers field names>}
    DIR/params/          orbax (OCDBT) checkpoint of the nested parameter dict

The converter writes every output directory through ``staged_output``: into a temporary sibling
``OUT.tmp-XXXX`` that replaces ``OUT`` only once complete, so an interrupted or failed run leaves
the previous ``OUT`` whole, and old and new files never mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class OutputError(ValueError):
    """An output directory that must not be written (the source, or a directory of other files)."""


def _inside(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or lies inside it (paths resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _is_replaceable(out: Path) -> bool:
    """An empty directory, or one this converter (or transformers) wrote: a ``config.json``
    beside ``params/`` or weight files."""
    names = {p.name for p in out.iterdir()}
    if not names:
        return True
    weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    return "config.json" in names and ("params" in names or weights)


def check_output(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse an output that would destroy a source or files that are not a checkpoint.

    Raises ``OutputError`` when ``out_dir`` is a source, holds a source, is a file, or is an
    existing directory that is neither empty nor a checkpoint directory (``config.json`` beside
    ``params/`` or weight files). Returns the absolute output path.
    """
    out = Path(out_dir).absolute()
    for src in sources:
        if _inside(Path(src), out):
            raise OutputError(
                f"--output {out} would overwrite the source {src}: write to another directory"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file: name a directory")
    if out.is_dir() and not _is_replaceable(out):
        raise OutputError(
            f"--output {out} exists and is not a checkpoint directory (no config.json beside "
            "params/ or weight files); it would be replaced as a whole: name a new or empty "
            "directory"
        )
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Move the complete directory ``new`` to ``out``, replacing ``out`` as a whole (renames in
    one filesystem; the old directory is deleted only after the new one is in place)."""
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output(
    out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Write a directory all at once: yields a new empty sibling ``OUT.tmp-XXXX``; when the
    block ends without an error it replaces ``OUT`` (old files do not survive beside new ones),
    otherwise it is deleted and ``OUT`` is left as it was. ``check_output`` runs first."""
    out = check_output(out_dir, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_output(out, sources)  # nothing appeared there meanwhile that we would destroy
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(out_dir: str | os.PathLike, params: Any, family: str, config: dict) -> Path:
    """Write ``params`` (numpy or jax arrays, nested dict) and the config into ``out_dir``,
    overwriting those two entries in place (every process of a multi-host run calls it; use
    ``save_converted`` for a single-process write that replaces the directory at once)."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params, force=True)
    # config.json last: a directory whose parameters are incomplete has no new config
    (out / "config.json").write_text(json.dumps({"family": family, "config": config}, indent=1))
    return out


def save_converted(
    out_dir: str | os.PathLike,
    params: Any,
    family: str,
    config: dict,
    sources: Sequence[str | os.PathLike] = (),
) -> Path:
    """``save_params`` through ``staged_output``: ``out_dir`` is replaced only once complete,
    never a source (``OutputError``). Returns the absolute output path."""
    out = Path(out_dir).absolute()
    with staged_output(out, sources) as tmp:
        save_params(tmp, params, family, config)
    return out


def read_config(ckpt_dir: str | os.PathLike) -> tuple[str, dict]:
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a directory written by convert_torch_weights.py"
        )
    try:
        d = json.loads(path.read_text())
        return d["family"], d["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not the config.json of a converted directory ({e!r}): convert it again"
        ) from None


def load_params(ckpt_dir: str | os.PathLike, abstract: Any = None) -> Any:
    """Restore the parameter tree. ``abstract`` (a pytree of ``jax.ShapeDtypeStruct`` with
    shardings) places each array on a mesh as it is read; without it arrays land on one device."""
    path = Path(ckpt_dir).absolute() / "params"
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            return ckptr.restore(path)
        return ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract))
