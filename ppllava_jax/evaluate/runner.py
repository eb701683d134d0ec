"""The evaluation loop: checkpoint -> questions -> batched greedy answers -> records -> scores.

- **Data parallel over devices and hosts.** Each host reads its own shard of the questions
  (the grain pipeline's per-host sharding) and decodes it on a mesh of its local devices
  (batch over ``data`` x ``fsdp``, parameters and KV cache by their logical names, as in
  training). Hosts never exchange activations, so each host's batch keeps its own visual
  pool (see ``sharding.shard_batch``'s multi-host caveat). Multi-host runs need ``--out`` on
  a filesystem every host sees.
- **Resumable.** Every answered question is appended (one JSON line, flushed and fsynced per
  batch) to ``<out stem>.answers.jsonl`` (``.answers.host<k>.jsonl`` for host k > 0 of a
  multi-host run). On restart, every ``<out stem>.answers*.jsonl`` is read and the questions
  already there are not asked again (a truncated last line, from a kill mid-write, is
  ignored); the scores are computed from the records, so they do not depend on how often the
  run was interrupted. ``<out stem>.answers.protocol.json`` holds the checkpoint id and the
  protocol settings the answers were given under (``answer_key``): a rerun under another
  checkpoint or other settings is refused, saying what differs, unless ``fresh`` deletes the
  old answers.
- **In memory, exact.** Questions go to the data pipeline as ``annotations.Sample`` lists
  (no temporary files). An exact question (``Question.prompt_text``) is encoded as the
  original encodes it: ``tok(prompt_text)`` with the tokenizer of
  ``load_llm_tokenizer(dir, legacy=...)`` (``--tokenizer_legacy``, default legacy), the
  given CLIP text, exactly the frames of its ``FrameRule``; its record gets the generated
  text and the prompt + generated ids decoded together (``Benchmark.record(..., decoded=)``).
  A template question (``prompt``) is rendered with the checkpoint's conversation template
  as in training.
- **Static shapes.** Questions are grouped by frame count and answer prefix (one pipeline per
  group); prompts are left-padded to a few merged-length buckets (the video's visual tokens
  plus ``generate.PROMPT_BUCKETS``), so a new prompt length reuses a compiled program.
- Videos that cannot be read are skipped by the pipeline (counted, logged) and reported as
  ``num_missing``; they are asked again on the next run.

Checkpoint directory (written by ``train.py``'s final export, or ``convert_torch_weights.py``
plus the tokenizers copied in)::

    DIR/config.json          model config (``params_io.save_params``)
    DIR/params/              orbax parameters
    DIR/tokenizer/           the LLM tokenizer (AutoTokenizer.from_pretrained); required
                             unless --tokenizer is given
    DIR/clip_tokenizer/      the CLIP tokenizer of the prompt encoder (pooling 'ppllava');
                             required unless --clip_tokenizer is given
    DIR/inference.json       optional: {"template": "plain_v1", "num_frames": 8, ...}
                             defaults for the evaluation / chat flags
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ppllava_jax import sharding
from ppllava_jax.data import collate as col
from ppllava_jax.data import pipeline as pl
from ppllava_jax.evaluate import answer_key, checkpoint_check
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import Question, format_table
from ppllava_jax.generate import PROMPT_BUCKETS, SamplingConfig, make_generate, prompt_buckets

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Checkpoint + mesh


FROM_CHECKPOINT = "checkpoint"  # load_setup: the tokenizer setting the checkpoint was trained with


@dataclasses.dataclass
class Setup:
    """A loaded checkpoint ready to answer: model, config, params on ``mesh``, tokenizers."""

    model: Any
    cfg: Any
    params: Any
    mesh: Any
    tokenizer_dir: str
    clip_tokenizer_dir: str
    template: str = "plain_v1"
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str = ""
    # Llama pre-tokenization of exact prompts (load_llm_tokenizer): True legacy (the released
    # Vicuna / LLaVA-NeXT tokenizers), False non-legacy, None as the tokenizer file says
    tokenizer_legacy: bool | None = True

    _tok: Any = None
    _eval_tok: Any = None

    @property
    def tokenizer(self):
        """The LLM tokenizer as saved (template prompts, as in training; decoding)."""
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tok

    @property
    def eval_tokenizer(self):
        """The tokenizer of exact prompts: ``load_llm_tokenizer(dir, tokenizer_legacy)``."""
        if self._eval_tok is None:
            from ppllava_jax.data.tokenizers import load_llm_tokenizer

            self._eval_tok = load_llm_tokenizer(self.tokenizer_dir, legacy=self.tokenizer_legacy)
        return self._eval_tok


def parse_mesh(spec: str | dict | None) -> dict[str, int]:
    """ "data=1,fsdp=-1,tensor=1" -> dict (default: every local device on fsdp)."""
    if isinstance(spec, dict):
        return {k: int(v) for k, v in spec.items()}
    out = {}
    for part in (spec or "fsdp=-1").split(","):
        if part.strip():
            k, v = part.split("=")
            out[k.strip()] = int(v)
    return out


def local_mesh(spec: str | dict | None = None):
    """A mesh over this host's devices; with all sizes given and fewer than the devices, the
    first ``prod(sizes)`` devices (a smaller mesh, e.g. for tests)."""
    shape = parse_mesh(spec)
    devices = jax.local_devices()
    if all(v > 0 for v in shape.values()):
        n = int(np.prod(list(shape.values())))
        if n < len(devices):
            devices = devices[:n]
        shape = {**{"data": 1, "fsdp": 1, "tensor": 1}, **shape}
    return sharding.make_mesh(shape, devices)


def _need_dir(path: str, what: str, flag: str) -> str:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} directory {path!r} not found: put it in the checkpoint directory or pass "
            f"{flag}"
        )
    return path


def load_setup(
    checkpoint: str,
    *,
    tokenizer: str = "",
    clip_tokenizer: str = "",
    template: str = "",
    mesh: str | dict | None = None,
    dtype: str | None = None,
    tokenizer_legacy: bool | None | str = FROM_CHECKPOINT,
) -> Setup:
    """Read a checkpoint directory (module docstring) onto a local mesh.

    tokenizer_legacy: see :attr:`Setup.tokenizer_legacy`; ``FROM_CHECKPOINT``: what
    ``inference.json`` records (the setting training used), else True (legacy)."""
    from ppllava_jax.models.ppllava import PPLLaVA

    checkpoint = os.fspath(checkpoint)
    defaults: dict[str, Any] = {}
    inf = os.path.join(checkpoint, "inference.json")
    if os.path.exists(inf):
        with open(inf) as f:
            defaults = json.load(f)
    if tokenizer_legacy == FROM_CHECKPOINT:
        tokenizer_legacy = defaults.get("tokenizer_legacy", True)
    runtime = {"dtype": dtype} if dtype else {}
    # a missing directory, another family, a params/ tree unlike config.json's model: said
    # before anything is restored (checkpoint_check)
    checkpoint_check.check_checkpoint(checkpoint, runtime)
    m = local_mesh(mesh)
    cfg, params, _ = sharding.restore_params_onto_mesh(checkpoint, m, **runtime)
    tok = _need_dir(tokenizer or os.path.join(checkpoint, "tokenizer"), "tokenizer", "--tokenizer")
    ctok = clip_tokenizer or os.path.join(checkpoint, "clip_tokenizer")
    if cfg.pooling == "ppllava":
        _need_dir(ctok, "CLIP tokenizer", "--clip_tokenizer")
    return Setup(
        model=PPLLaVA(cfg),
        cfg=cfg,
        params=params,
        mesh=m,
        tokenizer_dir=tok,
        clip_tokenizer_dir=ctok if os.path.isdir(ctok) else "",
        template=template or defaults.get("template", "plain_v1"),
        defaults=defaults,
        checkpoint=checkpoint,
        tokenizer_legacy=tokenizer_legacy,
    )


def place_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host arrays onto the mesh, batch axis over ``data`` x ``fsdp`` (local meshes: a sharded
    ``device_put``; a global mesh: ``sharding.shard_batch``)."""
    if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        sh = sharding.batch_shardings(batch, mesh)
        return {k: jax.device_put(np.asarray(v), sh[k]) for k, v in batch.items()}
    return sharding.shard_batch(batch, mesh)


def eval_batch_size(batch_size: int, mesh) -> int:
    """The per-host batch for ``mesh``: ``batch_size``, or (0) the smallest multiple of the
    data-parallel devices that is >= 8. A batch whose rows (``batch_size`` x hosts on a global
    mesh) ``data`` x ``fsdp`` does not divide would be replicated: ``sharding.ShardingError``
    before anything compiles, saying what divides."""
    local = all(d.process_index == jax.process_index() for d in mesh.devices.flat)
    hosts = 1 if local else jax.process_count()
    n = sharding.batch_devices(mesh)
    step = n // int(np.gcd(n, hosts))
    batch_size = int(batch_size or step * -(-8 // step))
    what = f"--batch_size {batch_size}" + (f" x {hosts} hosts" if hosts > 1 else "")
    sharding.check_batch_rows(batch_size * hosts, mesh, what=what, setting="--batch_size")
    return batch_size


def video_buckets(cfg: Any, num_frames: int, max_new_tokens: int) -> list[int]:
    """Merged-length buckets for videos of ``num_frames`` frames that leave room for the answer
    within the decoder's positions."""
    t, h, w = col.Planner(cfg).item_grid("video", num_frames)
    buckets = prompt_buckets(t * h * w, PROMPT_BUCKETS)
    limit = int(cfg.llm.max_position_embeddings) - int(max_new_tokens)
    fit = [b for b in buckets if b <= limit]
    return fit or [max(limit, t * h * w + 16)]


# --------------------------------------------------------------------------------------
# Answer files


def answers_path(out: str, process_index: int | None = None) -> str:
    p = jax.process_index() if process_index is None else process_index
    stem = os.path.splitext(os.fspath(out))[0]
    return f"{stem}.answers.jsonl" if p == 0 else f"{stem}.answers.host{p}.jsonl"


def read_answers(out: str) -> dict[str, dict]:
    """Every record of every host's answer file, by question id (the last one wins)."""
    stem = os.path.splitext(os.fspath(out))[0]
    recs: dict[str, dict] = {}
    for path in sorted(glob.glob(glob.escape(stem) + ".answers*.jsonl")):
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
                    recs[str(r["id"])] = r
    return recs


def _open_answers(path: str):
    """Append mode; a last line cut by a kill is closed with a newline first, so the next
    record starts on its own line (the cut one is ignored by ``read_answers``)."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
    except ImportError:  # tqdm missing: a silent stand-in

        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()


# --------------------------------------------------------------------------------------
# The loop


class _Stop(Exception):
    """``max_new_answers`` reached (a test stand-in for a killed run)."""


def pipeline_sample(q: Question, source: str = "eval", index: int = 0):
    """The pipeline sample of a question: exact (``pipeline.eval_sample``) or a template
    annotation (validated as the annotation files are)."""
    from ppllava_jax.data import annotations as ann

    if q.exact:
        return pl.eval_sample(
            q.video,
            q.prompt_text,
            q.clip_text or "",
            q.frames,
            source=source,
            index=index,
            extra={"qid": q.qid},
        )
    return ann.parse_sample(_annotation(q), source, index)


def _annotation(q: Question) -> dict[str, Any]:
    turn: dict[str, Any] = {"q": q.prompt, "a": q.answer or "-"}
    if q.system:
        turn["i"] = q.system
    a: dict[str, Any] = {"video": q.video, "media_type": "video", "QA": [turn], "qid": q.qid}
    if q.bound is not None:
        a["start"], a["end"] = float(q.bound[0]), float(q.bound[1])
    return a


def run(
    bench: Benchmark,
    setup: Setup,
    out: str,
    *,
    batch_size: int = 0,
    max_new_tokens: int | None = None,
    num_workers: int = 0,
    save_attention: str = "",
    max_attention: int = 16,
    progress: bool = True,
    max_new_answers: int | None = None,
    sampling: SamplingConfig | None = None,
    fresh: bool = False,
) -> dict[str, Any] | None:
    """Answer every unanswered question of ``bench`` and write ``out`` (results JSON).

    batch_size: per host (0: the smallest multiple of the data-parallel devices that is >= 8);
      one that the mesh's ``data`` x ``fsdp`` does not divide is refused (``eval_batch_size``).
    max_new_tokens: default the benchmark's, else 200 (SPEC §8).
    save_attention: a directory for per-frame relevance heatmaps of the first
      ``max_attention`` questions answered by this host.
    max_new_answers: stop (as if killed) after that many new answers (tests); returns None.
    fresh: delete the answers files of ``out`` first. Without it, answers files written for
      another checkpoint or other protocol settings (``answer_key``) are refused
      (``answer_key.AnswersMismatchError``, before anything is compiled).
    Returns the results dict (on host 0; None on other hosts).
    """
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cfg, model = setup.cfg, setup.model
    n_new = int(max_new_tokens or bench.max_new_tokens or 200)
    tok = setup.tokenizer
    eos = cfg.llm.eos_token_id if cfg.llm.eos_token_id is not None else tok.eos_token_id
    pad = cfg.llm.pad_token_id if cfg.llm.pad_token_id is not None else 0
    sc = sampling or SamplingConfig(max_new_tokens=n_new, eos_token_id=int(eos), pad_token_id=pad)
    batch_size = eval_batch_size(batch_size, setup.mesh)

    questions = bench.questions()
    by_id: dict[str, Question] = {}
    for q in questions:
        if q.qid in by_id:
            raise ValueError(f"{bench.name}: question id {q.qid!r} appears twice")
        if q.frame_count > cfg.max_T:
            raise ValueError(
                f"{q.frame_count} frames > the model's max_T={cfg.max_T} (BT-Adapter time "
                "embeddings); lower --num_frames"
            )
        by_id[q.qid] = q
    proto = answer_key.protocol(bench, setup, n_new, sampling)
    if not fresh or jax.process_index() == 0:  # one host deletes (fresh), every host checks
        answer_key.check_answers(out, proto, fresh=fresh, checkpoint=setup.checkpoint)
    if fresh and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"eval_{bench.name}_fresh")
    if jax.process_index() == 0:  # before any host writes an answer (the sync below)
        answer_key.write_protocol(out, proto, setup.checkpoint)
    done = read_answers(out)
    todo = [q for q in questions if q.qid not in done]
    # every host shards the same to-do list: none writes before all have read the answer files
    sharding.process_barrier(f"eval_{bench.name}_read")
    log.info(
        "%s: %d questions, %d answered before, %d to go",
        bench.name,
        len(questions),
        len(questions) - len(todo),
        len(todo),
    )

    gen = make_generate(model, sc, setup.mesh)
    maps_fn = None
    if save_attention:
        maps_fn = jax.jit(
            lambda p, b: model.apply({"params": p}, b, method="embed_inputs")[1].get("video")
        )
    groups: dict[tuple, list[Question]] = {}
    for q in todo:
        groups.setdefault((q.frame_count, q.answer_prefix, q.group, q.exact), []).append(q)
    pid, nproc = jax.process_index(), jax.process_count()
    bar = _progress(-(-len(todo) // nproc), bench.name, progress and pid == 0)
    written = 0
    attention_saved = 0
    skipped = 0
    t0 = time.time()
    try:
        with _open_answers(answers_path(out)) as sink:
            for (frames, prefix, group, _), qs in sorted(groups.items(), key=lambda kv: kv[0]):
                src = f"{bench.name}:{group}:{frames}"
                buckets = video_buckets(cfg, frames, n_new)
                data = dict(
                    sources=[dict(path=src, media_type="video", name=bench.name)],
                    template=setup.template,
                    tokenizer_legacy=setup.tokenizer_legacy,
                    tokenizer=setup.tokenizer_dir,
                    clip_tokenizer=setup.clip_tokenizer_dir,
                    num_frames=frames,
                    frame_sampling="middle",
                    image_size=cfg.vision.image_size,
                    image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
                    clip_max_length=int(cfg.clip_text.max_position_embeddings),
                    max_length=max(buckets),
                    buckets=buckets,
                    padding_side="left",
                    group_capacity="batch",
                    batch_size=batch_size,
                    training=False,
                    generation_prompt=True,
                    answer_prefix=prefix,
                    num_workers=num_workers,
                    shuffle=False,
                    num_epochs=1,
                    max_images=1,
                )
                samples = [[pipeline_sample(q, src, i) for i, q in enumerate(qs)]]
                pipe = pl.Pipeline(data, cfg, samples=samples)
                try:
                    for host in pipe.iterator():
                        batch, meta = pl.split_meta(host)
                        valid = np.asarray(batch.pop("valid"))
                        batch.pop("labels", None)
                        skipped += sum(s == "skip" for s in meta["status"])
                        if not valid.any():
                            continue
                        placed = place_batch(batch, setup.mesh)
                        res = jax.device_get(gen(setup.params, placed))
                        maps = None
                        if maps_fn is not None and attention_saved < max_attention:
                            from ppllava_jax import sharding as shd

                            with shd.mesh_context(setup.mesh):
                                maps = np.asarray(jax.device_get(maps_fn(setup.params, placed)))
                        lines = []
                        for i in np.flatnonzero(valid):
                            sample = pipe.sample(int(meta["source"][i]), int(meta["index"][i]))
                            q = by_id[sample.extra["qid"]]
                            n = int(res["lengths"][i])
                            ids = [
                                int(t) for t in res["tokens"][i][:n] if int(t) != sc.eos_token_id
                            ]
                            text = tok.decode(ids, skip_special_tokens=True)
                            if q.exact:
                                etok = setup.eval_tokenizer
                                prompt_ids = list(etok(q.prompt_text).input_ids)
                                full = etok.decode(prompt_ids + ids, skip_special_tokens=True)
                                rec = bench.record(q, text, decoded=full)
                            else:
                                rec = bench.record(q, text)
                            lines.append(json.dumps(rec))
                            if maps is not None and attention_saved < max_attention:
                                _save_maps(save_attention, q, batch, maps, i)
                                attention_saved += 1
                        sink.write("".join(x + "\n" for x in lines))
                        sink.flush()
                        os.fsync(sink.fileno())
                        written += len(lines)
                        bar.update(len(lines))
                        if max_new_answers is not None and written >= max_new_answers:
                            raise _Stop
                finally:
                    pipe.close()
    except _Stop:
        bar.close()
        return None
    bar.close()
    log.info(
        "%s: %d answers in %.1fs (%d unreadable)", bench.name, written, time.time() - t0, skipped
    )
    if nproc > 1:  # hosts finish far apart: a coordination-service barrier, not a collective
        sharding.process_barrier(f"eval_{bench.name}_done")
        if pid != 0:
            return None
    return finalize(bench, questions, out, setup.checkpoint, proto)


def _save_maps(root: str, q: Question, batch: dict, maps: np.ndarray, row: int) -> None:
    from ppllava_jax.evaluate import heatmap

    frames = heatmap.denormalize(batch["video_pixels"][row])
    valid = batch.get("video_frames")
    heatmap.save_heatmaps(
        os.path.join(root, _safe(q.qid)),
        frames,
        maps[row],
        valid=None if valid is None else valid[row],
        caption=q.clip_text or q.prompt,
        size=max(224, int(frames.shape[1])),
    )


def finalize(
    bench: Benchmark,
    questions: Sequence[Question],
    out: str,
    checkpoint: str = "",
    protocol: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scores from the answer files -> ``out`` (JSON) + the benchmark's extra files; prints the
    summary table."""
    recs = read_answers(out)
    order = [q.qid for q in questions if q.qid in recs]
    records = [recs[i] for i in order]
    summary = bench.summarize(records, questions)
    summary.update(bench.write_outputs(records, out))
    result = {
        "benchmark": bench.name,
        "checkpoint": checkpoint,
        "summary": summary,
        "records": records,
    }
    if protocol is not None:  # the settings the answers were given under (answer_key)
        result["protocol"] = protocol
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print(format_table(summary, f"== {bench.name} =="), flush=True)
    return result
