"""Compare the parameter tree saved in an orbax checkpoint with the tree a model expects, from
the checkpoint's metadata alone (no array is read), so that a mismatch is reported by
parameter name before any restore is attempted (orbax's own error names no parameter).

    saved = saved_shapes("ckpt/ppllava/params")   # {"language_model/lm_head/kernel": (4096, 32064)}
    diffs = tree_differences(saved, shapes_of(abstract))  # ["...: checkpoint (1, 2), model (1, 3)"]

``mismatch_report`` words the differences for an error message (``eval.py``'s checkpoint check,
training's resume check).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax


class TreeMismatchError(ValueError):
    """A saved parameter tree that does not fit the model it is restored into."""


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: tuple) -> str:
    """A pytree key path as ``a/b/c``."""
    return "/".join(_key_name(k) for k in path)


def shapes_of(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` of every array leaf of ``tree`` (arrays, ``jax.ShapeDtypeStruct``
    or orbax ``ArrayMetadata``: anything with a ``shape``). Boxed (logically partitioned)
    leaves count as their value."""
    import flax.linen as nn

    tree = nn.unbox(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(p): tuple(int(d) for d in x.shape) for p, x in leaves if hasattr(x, "shape")}


def saved_metadata(directory: str | os.PathLike) -> Any:
    """The orbax metadata tree of a ``StandardCheckpointer`` directory (e.g. ``DIR/params`` of
    a converted checkpoint, ``checkpoints/<step>/state`` of a training run). Raises
    ``TreeMismatchError`` naming the directory when it holds no readable checkpoint."""
    import orbax.checkpoint as ocp
    from etils import epath

    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise TreeMismatchError(f"{path} not found: the checkpoint has no saved parameters")
    try:  # the handler reads the item's own metadata (a Checkpointer also wants a step's)
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; one message for people
        raise TreeMismatchError(
            f"{path} is not a readable orbax checkpoint ({type(e).__name__}: {e})"
        ) from None
    tree = getattr(meta, "item_metadata", None)
    if tree is None:
        tree = getattr(meta, "tree", None)
    return meta if tree is None else tree


def saved_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` of every array saved in an orbax checkpoint directory."""
    tree = saved_metadata(directory)
    return shapes_of(dict(tree) if isinstance(tree, Mapping) else tree)


def tree_differences(
    saved: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    saved_name: str = "checkpoint",
    expected_name: str = "model",
    limit: int = 12,
) -> list[str]:
    """One line per difference between two ``shapes_of`` maps: parameters whose shapes differ
    (both shapes), parameters only in ``expected`` (missing from the checkpoint), parameters only
    in ``saved``; at most ``limit`` of each kind, then a count. Empty when they agree."""
    out: list[str] = []

    def some(kind: str, items: list[str]) -> None:
        out.extend(items[:limit])
        if len(items) > limit:
            out.append(f"... and {len(items) - limit} more {kind}")

    common = sorted(set(saved) & set(expected))
    some(
        "shape differences",
        [
            f"{k}: {saved_name} {tuple(saved[k])}, {expected_name} {tuple(expected[k])}"
            for k in common
            if tuple(saved[k]) != tuple(expected[k])
        ],
    )
    some(
        f"parameters missing from the {saved_name}",
        [
            f"{k}: in the {expected_name} {tuple(expected[k])}, not in the {saved_name}"
            for k in sorted(set(expected) - set(saved))
        ],
    )
    some(
        f"parameters the {expected_name} lacks",
        [
            f"{k}: in the {saved_name} {tuple(saved[k])}, not in the {expected_name}"
            for k in sorted(set(saved) - set(expected))
        ],
    )
    return out


def mismatch_report(
    saved: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    saved_name: str,
    expected_name: str,
    versus: str,
) -> str:
    """'' when two ``shapes_of`` maps agree, else ``(N differences; VERSUS):`` and one indented
    line per ``tree_differences`` entry, to follow a sentence saying which checkpoint and model
    (``versus`` names the two sides, e.g. "checkpoint shapes vs this config's model")."""
    diffs = tree_differences(saved, expected, saved_name=saved_name, expected_name=expected_name)
    if not diffs:
        return ""
    return f"({len(diffs)} differences; {versus}):\n  " + "\n  ".join(diffs)
