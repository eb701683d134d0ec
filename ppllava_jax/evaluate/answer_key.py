"""What an answers file belongs to: the checkpoint and the protocol settings of the evaluation.

``runner.run`` resumes from ``<out stem>.answers*.jsonl``. Answers are only reusable under the
settings that produced them, so each answers file starts with a header line::

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
  pre-tokenization mode, the compute dtype, ``max_new_tokens`` and the sampling settings.

Batch size, workers, mesh and the number of hosts do not change an answer and are not part of
it. On a rerun whose protocol differs from a file's header (or whose file has answers but no
header: written before headers existed) ``check_answers`` refuses, naming each setting and both
values, unless ``fresh`` is set, in which case every answers file of ``out`` is deleted and the
evaluation starts afresh (``eval.py --fresh``).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any

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


def protocol(
    bench: Any,
    setup: Any,
    max_new_tokens: int,
    sampling: Any = None,
) -> dict[str, Any]:
    """The settings an answer depends on (module docstring) as a JSON-able dict.

    setup: a ``runner.Setup``; sampling: a ``generate.SamplingConfig`` or None (greedy)."""
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
    if sampling is not None:
        keep = ("temperature", "top_k", "top_p", "num_beams", "length_penalty")
        s = dataclasses.asdict(sampling)
        p["sampling"] = {k: s[k] for k in keep if k in s}
    return p


def header_line(proto: dict[str, Any], checkpoint: str = "") -> str:
    """The first line of a new answers file (newline included)."""
    info = {"checkpoint": os.path.realpath(checkpoint)} if checkpoint else {}
    return json.dumps({HEADER_KEY: proto, **info}) + "\n"


def answer_files(out: str) -> list[str]:
    """Every host's answers file of ``out`` (``<out stem>.answers*.jsonl``)."""
    stem = os.path.splitext(os.fspath(out))[0]
    return sorted(glob.glob(glob.escape(stem) + ".answers*.jsonl"))


def read_header(path: str) -> tuple[dict | None, str, int]:
    """(protocol of the header or None, the header's checkpoint path, answer records) of an
    answers file; a line cut by a kill is ignored."""
    proto, ckpt, n = None, "", 0
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict):
                continue
            if HEADER_KEY in r and proto is None and n == 0:
                proto, ckpt = r[HEADER_KEY], str(r.get("checkpoint", ""))
            elif "id" in r:
                n += 1
    return proto, ckpt, n


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
    """Make ``out``'s answers files safe to resume from under ``proto``.

    fresh: delete every answers file of ``out`` (whatever it holds) and start afresh.
    Otherwise a file whose header differs from ``proto`` (or that has answers and no header)
    raises ``AnswersMismatchError`` naming the file, each differing setting with both values,
    and the two ways on (``--fresh``, another ``--out``). Files with neither header nor answers
    (empty, or a header cut by a kill) are fine (rewritten on opening).
    Returns the files deleted (``fresh``)."""
    files = answer_files(out)
    if fresh:
        for path in files:
            try:
                os.remove(path)
            except FileNotFoundError:  # another host removed it
                pass
        return files
    now = os.path.realpath(checkpoint) if checkpoint else "?"
    for path in files:
        old, old_ckpt, n = read_header(path)
        if old is None and n == 0:
            continue
        if old is None:
            why = [
                f"its {n} answers have no header saying which checkpoint and settings gave them "
                "(written by an earlier version)"
            ]
        elif old != proto:
            why = differences(old, proto)
            if "checkpoint_id" in old and old.get("checkpoint_id") != proto.get("checkpoint_id"):
                why.append(f"checkpoint: {old_ckpt or '?'} in the file, {now} now")
        else:
            continue
        raise AnswersMismatchError(
            f"{path} holds {n} answers of another evaluation; resuming would report them as "
            "answers of this one:\n  "
            + "\n  ".join(why)
            + "\nRefusing to resume. Pass --fresh to delete the answers files of this --out and "
            "start afresh, or choose another --out."
        )
    return []


def open_answers(path: str, proto: dict[str, Any] | None, checkpoint: str = ""):
    """Open ``path`` for appending answers (call ``check_answers`` first). A file without a
    header and without answers (new, empty, or a header cut by a kill) is (re)started with
    the header; a last line cut by a kill is closed with a newline first, so the next record
    starts on its own line (``runner.read_answers`` ignores the cut one)."""
    if proto is not None:
        old, _, n = read_header(path) if os.path.exists(path) else (None, "", 0)
        if old is None and n == 0:
            f = open(path, "w")
            f.write(header_line(proto, checkpoint))
            f.flush()
            os.fsync(f.fileno())
            return f
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")
