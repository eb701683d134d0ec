"""Answers files: where eval.py's answers go, how a rerun resumes them, and what they belong to.

Every answered question is appended (one JSON line, flushed and fsynced per batch) to
``<out stem>.answers.jsonl`` (``.answers.host<k>.jsonl`` for host k > 0 of a multi-host run).
On restart, every ``<out stem>.answers*.jsonl`` is read and the questions already there are not
asked again (a truncated last line, from a kill mid-write, is ignored).

Answers are only reusable under the settings that produced them, so
``<out stem>.answers.protocol.json`` (written by process 0 before any answer) records them::

    {"protocol": {"checkpoint_id": "3f2a...", "benchmark": "synthetic", "num_frames": 8,
                  "template": "plain_v1", "tokenizer_legacy": true, "max_new_tokens": 4, ...},
     "checkpoint": "/abs/path/of/the/checkpoint"}

``protocol`` holds what changes a question's prompt, frames, tokens or answer:

- ``checkpoint_id``: a hash of the checkpoint's ``config.json`` and of the small files orbax
  writes once per save (``params/_CHECKPOINT_METADATA`` with its commit time stamp,
  ``params/manifest.ocdbt``): the same saved parameters give the same id wherever they are
  copied, a re-export (another training run into the same directory) gives another;
- the benchmark's name and settings (its public attributes: data paths, frames, subtitles,
  system-prompt switches, split, ...);
- the conversation template, the tokenizers (a hash of each directory's files) and the
  pre-tokenization mode, the compute dtype and ``max_new_tokens`` (decoding is greedy).

Batch size, workers, mesh and the number of hosts do not change an answer and are not part of
it. On a rerun that finds answers whose recorded protocol differs (or answers without a protocol
file: written by an earlier version) ``check_answers`` refuses, naming each setting and both
values, unless ``fresh`` is set, in which case every answers file of ``out`` is deleted and the
evaluation starts afresh (``eval.py --fresh``). :func:`resume` does all of it for a run, on
every host.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import IO, Any

import jax

from ppllava_jax import sharding

HEADER_KEY = "protocol"
# files hashed into the checkpoint id (those present)
_ID_FILES = ("config.json", "params/_CHECKPOINT_METADATA", "params/manifest.ocdbt")


class AnswersMismatchError(ValueError):
    """An answers file written for another checkpoint or other protocol settings."""


def checkpoint_id(ckpt_dir: str | os.PathLike) -> str:
    """A short content hash identifying one saved checkpoint (see the module docstring); the
    resolved path when none of the hashed files exists."""
    h = hashlib.sha256()
    found = False
    for name in _ID_FILES:
        path = os.path.join(os.fspath(ckpt_dir), name)
        if os.path.isfile(path):
            found = True
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    if not found:
        return "path:" + os.path.realpath(os.fspath(ckpt_dir))
    return h.hexdigest()[:16]


def directory_id(path: str | os.PathLike) -> str:
    """A short content hash of the files directly in ``path`` (a tokenizer directory), so the
    same tokenizer compares equal wherever it lies; "" for no directory."""
    path = os.fspath(path or "")
    if not path or not os.path.isdir(path):
        return ""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            h.update(name.encode() + b"\0")
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def _plain(v: Any) -> Any:
    """A JSON value for a setting; existing paths made absolute (so spellings compare equal);
    None for what is not a plain value."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        return os.path.abspath(v) if v and os.path.exists(v) else v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return None


def benchmark_settings(bench: Any) -> dict[str, Any]:
    """The benchmark's name and its public plain-valued attributes."""
    out: dict[str, Any] = {"benchmark": getattr(bench, "name", type(bench).__name__)}
    for k, v in sorted(vars(bench).items()):
        if k.startswith("_"):
            continue
        p = _plain(v)
        if p is not None or v is None:
            out[k] = p
    return out


def protocol(bench: Any, setup: Any, max_new_tokens: int) -> dict[str, Any]:
    """The settings an answer (greedy decoding) depends on (module docstring) as a JSON-able
    dict. setup: a ``model_setup.Setup``."""
    p = {"checkpoint_id": checkpoint_id(setup.checkpoint)} if setup.checkpoint else {}
    p.update(benchmark_settings(bench))
    p.update(
        template=setup.template,
        tokenizer_id=directory_id(setup.tokenizer_dir),
        clip_tokenizer_id=directory_id(setup.clip_tokenizer_dir),
        tokenizer_legacy=setup.tokenizer_legacy,
        dtype=str(getattr(setup.cfg, "dtype", "")),
        max_new_tokens=int(max_new_tokens),
    )
    return p


def protocol_path(out: str) -> str:
    """``<out stem>.answers.protocol.json``: what the answers of ``out`` were given under."""
    return os.path.splitext(os.fspath(out))[0] + ".answers.protocol.json"


def answers_path(out: str, process_index: int | None = None) -> str:
    """This host's answers file of ``out`` (module docstring)."""
    p = jax.process_index() if process_index is None else process_index
    stem = os.path.splitext(os.fspath(out))[0]
    return f"{stem}.answers.jsonl" if p == 0 else f"{stem}.answers.host{p}.jsonl"


def answer_files(out: str) -> list[str]:
    """Every host's answers file of ``out`` (``<out stem>.answers*.jsonl``)."""
    stem = os.path.splitext(os.fspath(out))[0]
    return sorted(glob.glob(glob.escape(stem) + ".answers*.jsonl"))


def answer_records(out: str) -> list[dict[str, Any]]:
    """Every answer record (a JSON object with an ``id``) of every host's answers file, in
    file order; a line cut by a kill is ignored."""
    recs = []
    for path in answer_files(out):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if isinstance(r, dict) and "id" in r:
                    recs.append(r)
    return recs


def read_answers(out: str) -> dict[str, dict[str, Any]]:
    """Every record of every host's answer file, by question id (the last one wins)."""
    return {str(r["id"]): r for r in answer_records(out)}


def open_answers(path: str) -> IO[str]:
    """``path`` in append mode; a last line cut by a kill is closed with a newline first, so
    the next record starts on its own line (the cut one is ignored by ``read_answers``)."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")


def append_records(sink: IO[str], records: list[dict[str, Any]]) -> None:
    """One JSON line per record, flushed and fsynced (a kill loses at most this batch)."""
    sink.write("".join(json.dumps(r) + "\n" for r in records))
    sink.flush()
    os.fsync(sink.fileno())


def read_protocol(out: str) -> tuple[dict | None, str]:
    """(recorded protocol or None, the checkpoint path recorded with it)."""
    try:
        with open(protocol_path(out)) as f:
            d = json.load(f)
        return d[HEADER_KEY], str(d.get("checkpoint", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""


def write_protocol(out: str, proto: dict[str, Any], checkpoint: str = "") -> str:
    """Record ``proto`` for ``out``'s answers (atomically: a temporary file renamed)."""
    path = protocol_path(out)
    info = {"checkpoint": os.path.realpath(checkpoint)} if checkpoint else {}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({HEADER_KEY: proto, **info}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: <old> in the file, <new> now`` for each setting that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(not set)"), new.get(k, "(not set)")
        if a != b:
            out.append(f"{k}: {json.dumps(a)} in the file, {json.dumps(b)} now")
    return out


def check_answers(
    out: str, proto: dict[str, Any], *, fresh: bool = False, checkpoint: str = ""
) -> list[str]:
    """Make ``out``'s answers safe to resume from under ``proto`` (call ``write_protocol``
    afterwards, before writing answers).

    fresh: delete every answers file of ``out`` and its protocol file, and start afresh.
    Otherwise answers recorded under another protocol (or with no protocol file) raise
    ``AnswersMismatchError`` naming the file, each differing setting with both values, and the
    two ways on (``--fresh``, another ``--out``). No answers: nothing to check.
    Returns the files deleted (``fresh``)."""
    files = answer_files(out)
    if fresh:
        gone = []
        for path in [*files, protocol_path(out)]:
            try:
                os.remove(path)
                gone.append(path)
            except FileNotFoundError:  # another host removed it, or there was none
                pass
        return gone
    n = len(answer_records(out))
    if n == 0:
        return []
    old, old_ckpt = read_protocol(out)
    if old == proto:
        return []
    if old is None:
        why = [
            f"{protocol_path(out)} is missing: nothing says which checkpoint and settings gave "
            "them (written by an earlier version, or the file was deleted)"
        ]
    else:
        why = differences(old, proto)
        if old.get("checkpoint_id") != proto.get("checkpoint_id"):
            now = os.path.realpath(checkpoint) if checkpoint else "?"
            why.append(f"checkpoint: {old_ckpt or '?'} in the file, {now} now")
    raise AnswersMismatchError(
        f"{', '.join(files)} hold {n} answers of another evaluation; resuming would report them "
        "as answers of this one:\n  "
        + "\n  ".join(why)
        + "\nRefusing to resume. Pass --fresh to delete the answers of this --out and start "
        "afresh, or choose another --out."
    )


def resume(
    out: str, proto: dict[str, Any], name: str, *, checkpoint: str = "", fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Make ``out``'s answers resumable under ``proto`` on every host and return the answers
    already given, by question id. ``check_answers`` on every host (``fresh``: host 0 deletes,
    the others wait), host 0 records ``proto``, and no host returns before all have read the
    answers files (so every host shards the same list of questions to go). ``name`` names
    the barriers (the benchmark's)."""
    if not fresh or jax.process_index() == 0:  # one host deletes (fresh), every host checks
        check_answers(out, proto, fresh=fresh, checkpoint=checkpoint)
    if fresh and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"eval_{name}_fresh")
    if jax.process_index() == 0:  # before any host writes an answer (the barrier below)
        write_protocol(out, proto, checkpoint)
    done = read_answers(out)
    sharding.process_barrier(f"eval_{name}_read")
    return done
