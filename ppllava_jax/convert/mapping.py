"""Key tables between PyTorch state dicts and Flax parameter trees, and the strict converter.

A table is a list of ``Rule``s, one per parameter kind, with ``{i}`` standing for a layer index::

    Rule("encoder.layers.{i}.self_attn.q_proj.weight", "encoder/layers_{i}/self_attn/q_proj/kernel",
         "linear")

Rules name the *unscanned* layout (``layers_3``). When the target tree is scanned, a path segment
``<name>layers_<i>`` becomes row ``i`` of the stacked leaf under ``<name>layers`` (see
``layers.stack_layers``); both directions handle that, so tables are written once.

Conversion is strict: unused checkpoint keys, unfilled parameters and shape mismatches are
collected and reported together in one ``ConversionError``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

_SCAN_SEG = re.compile(r"^(\w*layers)_(\d+)$")
_STACKED_SEG = re.compile(r"^\w*layers$")


class ConversionError(ValueError):
    """The checkpoint does not fit the model: lists every problem at once."""


# name -> (torch -> jax, jax -> torch)
TRANSFORMS: dict[
    str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
] = {
    "none": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),  # (out, in) <-> (in, out)
    "conv2d": (  # OIHW <-> HWIO
        lambda a: a.transpose(2, 3, 1, 0),
        lambda a: a.transpose(3, 2, 0, 1),
    ),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    jax: str
    transform: str = "none"


def ln_rules(torch: str, jax_: str) -> list[Rule]:
    """A LayerNorm: ``{torch}.weight`` / ``.bias`` <-> ``{jax_}/scale`` / ``/bias``."""
    return [Rule(f"{torch}.weight", f"{jax_}/scale"), Rule(f"{torch}.bias", f"{jax_}/bias")]


def linear_rules(torch: str, jax_: str, bias: bool = True) -> list[Rule]:
    """A Linear: ``{torch}.weight`` (out, in) <-> ``{jax_}/kernel`` (in, out), and the bias."""
    rules = [Rule(f"{torch}.weight", f"{jax_}/kernel", "linear")]
    return rules + [Rule(f"{torch}.bias", f"{jax_}/bias")] if bias else rules


def layout_prefix(keys: Iterable[str], prefix: str) -> str:
    """``prefix`` when a checkpoint's keys lie under it (e.g. the transformers 4 layout's
    ``vision_model.``), else ''."""
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def _compile(pattern: str, sep: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", pattern)
    rx = "".join(
        f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") and p.endswith("}") else re.escape(p)
        for p in parts
    )
    return re.compile(f"^{rx}$")


class KeyMap:
    """Bidirectional key table built from ``Rule``s (optionally under a common prefix)."""

    def __init__(self, rules: Iterable[Rule], torch_prefix: str = "", jax_prefix: str = ""):
        self.rules = [Rule(torch_prefix + r.torch, jax_prefix + r.jax, r.transform) for r in rules]
        for r in self.rules:
            if r.transform not in TRANSFORMS:
                raise ValueError(f"rule {r}: unknown transform {r.transform!r}")
        self._fwd = [(_compile(r.torch, "."), r) for r in self.rules]
        self._bwd = [(_compile(r.jax, "/"), r) for r in self.rules]

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules)

    def to_jax(self, torch_key: str) -> tuple[str, str] | None:
        """``(jax path, transform)`` of a checkpoint key, or None when no rule matches."""
        return _lookup(self._fwd, torch_key, "jax")

    def to_torch(self, jax_path: str) -> tuple[str, str] | None:
        """``(torch key, transform)`` of a parameter path, or None when no rule matches."""
        return _lookup(self._bwd, jax_path, "torch")


def _lookup(table: list[tuple[re.Pattern, Rule]], key: str, side: str) -> tuple[str, str] | None:
    for rx, r in table:
        m = rx.match(key)
        if m:
            return getattr(r, side).format(**m.groupdict()), r.transform
    return None


def flat_params(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` of a (possibly boxed) nested parameter dict."""
    from flax.core import meta

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


def _locate(path: str, expected: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """Find ``path`` in ``expected``, directly or as row ``i`` of a scanned stack."""
    if path in expected:
        return path, None
    segs = path.split("/")
    for n, s in enumerate(segs):
        m = _SCAN_SEG.match(s)
        if m:
            cand = "/".join([*segs[:n], m.group(1), *segs[n + 1 :]])
            if cand in expected:
                return cand, int(m.group(2))
    return None


def _with_torch_name(path: str, row: int | None, keymap: KeyMap) -> str:
    """``jax/path (torch: key)`` for error messages; for a scanned stack, names layer ``row``."""
    probe = path
    if row is not None or keymap.to_torch(path) is None:
        segs = path.split("/")
        for n, s in enumerate(segs):
            if _STACKED_SEG.match(s):
                probe = "/".join([*segs[:n], f"{s}_{row or 0}", *segs[n + 1 :]])
                break
    hit = keymap.to_torch(probe)
    return f"{path} (torch: {hit[0]})" if hit else path


def _fmt(items: list[str], limit: int = 25) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def convert_state_dict(
    checkpoint: Mapping[str, np.ndarray],
    keymap: KeyMap,
    expected: Any,
    *,
    dtype: Any = None,
    ignore: Iterable[str] = (),
    strict: bool = True,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Convert a PyTorch state dict into the nested Flax parameter dict ``expected`` describes.

    Args:
      checkpoint: ``torch key -> array``, read lazily (``TorchCheckpoint``).
      keymap: the family's key table.
      expected: pytree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the model's init),
        boxed or not. Its paths and shapes are the contract; a scanned tree gets stacked leaves.
      dtype: storage dtype of the result (default: each expected leaf's dtype).
      ignore: regexes of checkpoint keys that are known not to be parameters (buffers such as
        ``position_ids``); they are skipped, everything else must be used.
      strict: raise on any problem (default). False returns what could be converted.
    Returns:
      nested dict of numpy arrays in the layout of ``expected``.
    """
    exp = flat_params(expected)
    ignore_rx = [re.compile(p) for p in ignore]
    out: dict[str, np.ndarray] = {}
    rows: dict[str, set[int]] = {}
    unused, mismatched = [], []
    for key in checkpoint:
        if any(rx.search(key) for rx in ignore_rx):
            continue
        hit = keymap.to_jax(key)
        loc = _locate(hit[0], exp) if hit else None
        if loc is None:
            where = f" (-> {hit[0]}, not a parameter of this model)" if hit else ""
            unused.append(key + where)
            continue
        path, row = loc
        tgt = exp[path]
        want_shape = tuple(tgt.shape[1:] if row is not None else tgt.shape)
        arr = TRANSFORMS[hit[1]][0](checkpoint[key])
        if tuple(arr.shape) != want_shape:
            mismatched.append(f"{key} -> {path}: checkpoint {tuple(arr.shape)}, model {want_shape}")
            continue
        out_dtype = np.dtype(dtype if dtype is not None else tgt.dtype)
        if row is None:
            out[path] = np.asarray(arr, dtype=out_dtype)
        else:
            if path not in out:
                if row >= tgt.shape[0]:
                    unused.append(f"{key} (layer {row} >= {tgt.shape[0]} layers of {path})")
                    continue
                out[path] = np.zeros(tgt.shape, dtype=out_dtype)
                rows[path] = set()
            if row >= tgt.shape[0]:
                unused.append(f"{key} (layer {row} >= {tgt.shape[0]} layers of {path})")
                continue
            out[path][row] = arr
            rows[path].add(row)
    missing = [_with_torch_name(p, None, keymap) for p in exp if p not in out]
    for p, r in rows.items():
        gaps = sorted(set(range(exp[p].shape[0])) - r)
        if gaps:
            missing.append(f"{_with_torch_name(p, gaps[0], keymap)} (layers {gaps})")
    if strict and (unused or missing or mismatched):
        msg = [f"{source} does not fit the model:"]
        if missing:
            msg.append(
                f"  {len(missing)} model parameters not found in the checkpoint:{_fmt(missing)}"
            )
        if unused:
            msg.append(f"  {len(unused)} checkpoint tensors not used:{_fmt(unused)}")
        if mismatched:
            msg.append(f"  {len(mismatched)} shape mismatches:{_fmt(mismatched)}")
        msg.append(
            "  Check that config.json matches the weights and that --source is the right model "
            "family."
        )
        raise ConversionError("\n".join(msg))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def export_state_dict(
    params: Any, keymap: KeyMap, *, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(torch key, array)`` for every leaf of ``params`` (scanned stacks are split back
    into per-layer tensors). Raises ``ConversionError`` naming leaves the table does not cover."""
    from flax.core import meta

    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(meta.unbox(params)).items()}
    uncovered = []
    plan: list[tuple[str, str, str, int | None]] = []
    for path, leaf in flat.items():
        hit = keymap.to_torch(path)
        if hit:
            plan.append((path, *hit, None))
            continue
        segs = path.split("/")
        stacked = [n for n, s in enumerate(segs) if _STACKED_SEG.match(s)]
        done = False
        for n in stacked:
            for i in range(np.shape(leaf)[0]):
                p = "/".join([*segs[:n], f"{segs[n]}_{i}", *segs[n + 1 :]])
                h = keymap.to_torch(p)
                if h is None:
                    break
                plan.append((path, *h, i))
            else:
                done = True
                break
        if not done:
            uncovered.append(path)
    if uncovered:
        raise ConversionError(f"no PyTorch name for these parameters:{_fmt(uncovered)}")
    for path, key, transform, row in plan:
        arr = np.asarray(flat[path] if row is None else flat[path][row])
        if dtype is not None:
            arr = arr.astype(dtype)
        arr = TRANSFORMS[transform][1](arr)
        yield key, np.ascontiguousarray(arr).reshape(np.shape(arr))  # keeps 0-d scalars 0-d
