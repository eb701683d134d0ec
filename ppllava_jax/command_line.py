"""One command-line style for every command (``train.py``, ``eval.py``,
``convert_torch_weights.py``, ``python -m ppllava_jax.chat``, ``.demo``, ``.launch``, ``.plan``):

- Flags are ``--lower_case_with_underscores``; the same name with dashes is accepted
  (``--save-attention`` = ``--save_attention``, ``--to-torch`` = ``--to_torch``).
- ``--help`` prints the module docstring (a one-line summary, the example commands, the
  details), then the flags with their defaults; exit status 0.
- A mistake on the command line (an unknown or missing flag, a bad value, an unknown config
  field) prints ``error: <what> (see <command> --help)`` on stderr, exit status 2, no traceback.
- A mistake found while running (a missing or wrong file, a bad setting, unusable data) prints
  one ``error: <message>`` line, exit status 1; ``PPLLAVA_TRACEBACK=1`` raises it instead.

The pieces: ``argument_parser(doc, prog)`` for the argparse commands (chat, demo, converter,
launcher, planner) and ``parse_flags`` as the absl ``flags_parser`` of ``train.py`` / ``eval.py``
(``app.run(main, flags_parser=parse_flags)``); ``report_user_errors(fn, ...)`` runs a command's
work and turns the errors a user causes (``USER_ERRORS``: ``OSError``, ``ValueError`` and the
data layer's ``DataError``) into that line; ``print_error`` / ``show_traceback`` for a command
that catches its own. For the ``--config.a.b=...`` overrides of ``train.py`` / ``eval.py``: an
unknown field is reported with the config's close matches and the known fields of that
section, and ``allow_list_overrides()`` lets list-valued fields (``data.sources``,
``data.buckets``) be overridden (``ml_collections``' ``config_flags`` has parsers for scalars,
tuples and dicts only), as a JSON or Python list, a tuple, comma-separated values, or one bare
value::

    --config.data.buckets='[256, 512]'       --config.data.buckets=256,512
    --config.data.sources='[{"path": "a.json", "data_root": "media/"}, {"path": "b.json"}]'
    --config.data.sources=train.json          # one file
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from absl import flags

from ppllava_jax.data.errors import DataError

USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, DataError)
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
T = TypeVar("T")


# ----------------------------------------------------------------------------- errors


def show_traceback() -> bool:
    """True when ``PPLLAVA_TRACEBACK`` asks for tracebacks instead of ``error:`` lines."""
    return os.environ.get("PPLLAVA_TRACEBACK", "") not in ("", "0")


def print_error(message: object) -> None:
    """``error: <message>`` on stderr, after whatever stdout holds."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def report_user_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a ``USER_ERRORS`` exception is printed as ``error: <message>``
    on stderr and the process exits with status 1 (``PPLLAVA_TRACEBACK=1``: raised)."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if show_traceback():
            raise
        print_error(e)
        sys.exit(1)


def usage_error(message: str, prog: str) -> NoReturn:
    """A command-line mistake: ``error: <message> (see <prog> --help)``, exit status 2."""
    print_error(f"{message} (see {prog} --help)")
    sys.exit(2)


# ----------------------------------------------------------------------------- spellings


def flag_spellings(argv: Sequence[str], known: Iterable[str]) -> list[str]:
    """``argv`` with each ``--flag`` (or ``--flag=value``) that is not a ``known`` flag but is
    one with dashes and underscores swapped renamed to that flag; nothing after ``--``."""
    known = set(known)
    canonical = {k.replace("-", "_"): k for k in known}
    out, rest = [], False
    for a in argv:
        if rest or not a.startswith("--") or a == "--":
            rest = rest or a == "--"
            out.append(a)
            continue
        name, eq, value = a[2:].partition("=")
        if name not in known and name.replace("-", "_") in canonical:
            a = f"--{canonical[name.replace('-', '_')]}{eq}{value}"
        out.append(a)
    return out


# ----------------------------------------------------------------------------- argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; a short usage line (the required flags, then ``[flags]``);
    each flag's default after its help unless the help states it."""

    def _format_usage(self, usage, actions, groups, prefix):
        if usage is None:
            need = [a for a in actions if a.required and a.option_strings]
            words = [f"{a.option_strings[0]} {a.metavar or a.dest.upper()}" for a in need]
            usage = " ".join([self._prog, *words, "[flags]"])
        return super()._format_usage(usage, actions, groups, prefix)

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, "", False, argparse.SUPPRESS)
        if shown and not action.required and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse in the shared style (module docstring): dashes or underscores in flag names,
    ``error: ... (see PROG --help)`` and exit status 2 for a mistake."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = [s[2:] for a in self._actions for s in a.option_strings if s.startswith("--")]
        return super().parse_known_args(flag_spellings(args, known), namespace)

    def error(self, message: str) -> NoReturn:
        usage_error(message, self.prog)


def argument_parser(doc: str | None, prog: str, usage: str | None = None) -> ArgumentParser:
    """The parser of a command: ``--help`` shows ``doc`` (its summary, examples and details)
    above the flags."""
    return ArgumentParser(prog=prog, description=doc, usage=usage, formatter_class=HelpFormatter)


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
    """An absl ``flags_parser`` in the shared style: dashes or underscores in flag names;
    ``--help`` exits 0; an unknown flag, a missing or bad value, or a config override of an
    unknown field (with the config's close matches) is ``error: ...`` with exit status 2."""
    fv = flags.FLAGS
    bools = {n for n in fv if isinstance(fv[n], flags.BooleanFlag)}
    known = [*fv, *(f"no{n}" for n in bools)]
    # --no-x / --no_x: absl's --nox of a boolean flag x
    argv = [
        f"--no{a[5:]}" if a[:5] in ("--no-", "--no_") and a[5:].replace("-", "_") in bools else a
        for a in argv
    ]
    argv = [argv[0], *flag_spellings(argv[1:], known)] if argv else argv
    prog = os.path.basename(argv[0]) if argv else "the command"
    try:
        rest = fv(argv)
    except SystemExit as e:  # absl's help flags exit 1 after printing the help
        if any(a in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise e
    except Exception as e:  # a config file's own error (SyntaxError, ...) is reported too
        msgs = config_file_errors(argv)
        flag_error = (flags.Error, AttributeError, KeyError, TypeError, ValueError)
        if not msgs and not isinstance(e, flag_error):
            raise
        msgs = msgs or config_override_errors(argv) or [_flag_message(str(e))]
        for m in msgs[:-1]:
            print_error(m)
        usage_error(msgs[-1], prog)
    # a config file that does not load: config_flags defers the error to the first use of the
    # config (after a command has made its directories): said here, before anything runs
    broken = [n for n in fv if type(fv[n].value).__name__ == "_ErrorConfig"]
    if broken:
        usage_error(config_file_errors(argv, broken[0])[0], prog)
    return rest


def config_file_errors(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The message for a ``--{flag}`` config file of ``argv`` that is missing or does not load
    (a one-element list), else []."""
    spec = _config_file(argv, flag)
    if not spec:
        return []
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        return [f"--{flag} {path}: no such config file (the recipes are configs/*.py)"]
    try:
        _load_config(spec)
    except Exception as e:  # noqa: BLE001 - any error of the user's file is reported
        text = str(e).strip().splitlines()
        return [f"--{flag} {spec}: cannot load it ({type(e).__name__}: {text[0] if text else ''})"]
    return []


def _flag_message(text: str) -> str:
    """absl's message of a flag error, in the shared wording."""
    m = re.search(r"Flag --(\S+) must have a value other than None", text)
    if m:
        return f"--{m.group(1)} is required"
    return text.removeprefix("flag ").strip()
