"""What the command lines (``train.py``, ``eval.py``, ``python -m ppllava_jax.chat``) print when
the person at the keyboard got something wrong: one ``error: ...`` message saying what and how
to fix it, exit status 1 (2 for a bad flag), no traceback.

- ``report_user_errors(fn, ...)`` runs ``fn`` and turns the errors a user causes (a missing or
  wrong file, a bad setting, unusable data: ``OSError``, ``ValueError`` and the data layer's
  ``DataError``) into that message. ``PPLLAVA_TRACEBACK=1`` re-raises them instead, for a
  traceback.
- ``parse_flags`` is an absl ``flags_parser`` (``app.run(main, flags_parser=parse_flags)``): a
  ``--config.a.b=...`` override naming a field the config does not have is reported with the
  config's close matches and the known fields of that section.
- ``allow_list_overrides()`` lets list-valued config fields (``data.sources``, ``data.buckets``,
  ``data.image_grid_pinpoints``) be overridden on the command line (``ml_collections``'
  ``config_flags`` has parsers for scalars, tuples and dicts only), as a JSON or Python list, a
  tuple, comma-separated values, or one bare value::

      --config.data.buckets='[256, 512]'       --config.data.buckets=256,512
      --config.data.sources='[{"path": "a.json", "data_root": "media/"}, {"path": "b.json"}]'
      --config.data.sources=train.json          # one file
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from absl import flags

from ppllava_jax.data.errors import DataError

USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, DataError)
T = TypeVar("T")


def report_user_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a ``USER_ERRORS`` exception is printed as ``error: <message>``
    on stderr and the process exits with status 1 (``PPLLAVA_TRACEBACK=1``: raised)."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("PPLLAVA_TRACEBACK", "") not in ("", "0"):
            raise
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----------------------------------------------------------------------------- list overrides


class ListParser(flags.ArgumentParser):
    """Parses a list-valued config override: JSON, a Python literal (list or tuple), or a bare
    value (one element)."""

    def parse(self, argument: Any) -> list:
        if isinstance(argument, (list, tuple)):
            return list(argument)
        if not isinstance(argument, str):
            return [argument]
        text = argument.strip()
        for load in (json.loads, ast.literal_eval):
            try:
                value = load(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            return list(value) if isinstance(value, (list, tuple)) else [value]
        return [text]  # a bare string, e.g. one annotation file's path

    def flag_type(self) -> str:
        return "list"


def allow_list_overrides() -> None:
    """Register ``ListParser`` for list-valued fields with ``ml_collections.config_flags``
    (idempotent; call before the flags are parsed)."""
    from ml_collections import config_flags

    config_flags.register_flag_parser_for_type(list, ListParser())


# ----------------------------------------------------------------------------- config fields


def _config_file(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        m = re.fullmatch(rf"--?{name}=(.+)", a)
        if m:
            return m.group(1)
        if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config(spec: str) -> Any:
    """``get_config()`` of a config file as ``config_flags`` reads it (``path[:argument]``)."""
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_ppllava_cli_config", path)
    if mod_spec is None or mod_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _keys(node: Any) -> list[str] | None:
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        return sorted(str(k) for k in node.keys())
    return None


def unknown_field_message(config: Any, path: str, flag: str = "config") -> str | None:
    """The message for an override ``--{flag}.{path}`` if ``path`` names a field ``config``
    does not have (close matches and the known fields of that section), else None."""
    node, done = config, []
    for part in path.split("."):
        keys = _keys(node)
        if keys is None:
            where = ".".join(done)
            return (
                f"--{flag}.{path}: {where} is a {type(node).__name__}, not a section with fields; "
                f"set it as a whole (--{flag}.{where}=...)"
            )
        if part not in keys:
            where = ".".join(done) or "the config"
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
            prefix = ".".join(done) + "." if done else ""
            hint = f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""
            return (
                f"--{flag}.{path}: unknown config field {prefix}{part}{hint}; "
                f"the fields of {where}: {', '.join(keys)}"
            )
        node = node[part]
        done.append(part)
    return None


def config_override_errors(argv: Sequence[str], flag: str = "config") -> list[str]:
    """Messages for every ``--{flag}.X=...`` of ``argv`` naming an unknown field (the config file
    given by ``--{flag}`` is loaded to know them)."""
    spec = _config_file(argv, flag)
    if not spec:
        return []
    try:
        config = _load_config(spec)
    except Exception:  # noqa: BLE001 - the file itself is broken: absl reports that
        return []
    out = []
    for a in argv:
        m = re.match(rf"--?(?:no)?{flag}\.([A-Za-z0-9_.]+)(=|$)", a)
        if m:
            msg = unknown_field_message(config, m.group(1), flag)
            if msg:
                out.append(msg)
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """An absl ``flags_parser``: ``app.parse_flags_with_usage``, and a config override of an
    unknown field reported as ``error: ...`` (exit status 2) instead of a traceback."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        msgs = config_override_errors(argv) or [f"bad command line: {e}"]
        print("\n".join(f"error: {m}" for m in msgs), file=sys.stderr, flush=True)
        sys.exit(2)
