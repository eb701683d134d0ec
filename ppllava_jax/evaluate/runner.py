"""The evaluation loop: questions -> batched greedy answers -> answer records -> scores.

- **Data parallel over devices and hosts.** Each host reads its own shard of the questions
  (the grain pipeline's per-host sharding) and decodes it on a mesh of its local devices
  (batch over ``data`` x ``fsdp``, parameters and KV cache by their logical names, as in
  training). Hosts never exchange activations, so each host's batch keeps its own visual
  pool (see ``sharding.shard_batch``'s multi-host caveat). Multi-host runs need ``--out`` on
  a filesystem every host sees.
- **Resumable** (``answers``): every answer is appended to this host's answers file as its
  batch is done; a rerun asks only the questions not answered yet, under the same checkpoint
  and protocol settings (else it refuses, unless ``fresh``). The scores are computed from the
  records, so they do not depend on how often the run was interrupted.
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
  ``num_missing``; they are asked again on the next run. Annotation items that give no
  question (a missing field, a wrong type: ``Benchmark.bad_items``) are skipped too, logged,
  counted in ``num_missing`` and ``bad_annotations`` and listed in the results file
  (``bad_annotations``: file, item, reason). The results file lists every question without an
  answer under ``missing_ids``; :func:`check_missing` fails a run missing more than a share.
- A rerun says how many answers it found (``resuming ...: N of M questions answered before``).

The checkpoint is loaded by ``model_setup.load_setup``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ppllava_jax import sharding
from ppllava_jax.data import pipeline as pl
from ppllava_jax.evaluate import answers, heatmap
from ppllava_jax.evaluate.base import Benchmark
from ppllava_jax.evaluate.common import BadItem, Question, format_table
from ppllava_jax.evaluate.model_setup import Setup, eval_batch_size, place_batch, video_buckets
from ppllava_jax.generate import SamplingConfig, make_generate
from ppllava_jax.layout import FRAME_MASK

log = logging.getLogger(__name__)


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
    turns: list[dict[str, Any]] = [{"q": hq, "a": ha} for hq, ha in q.history]
    turns.append({"q": q.prompt, "a": q.answer or "-"})  # the open turn (generation prompt)
    if q.system:
        turns[0]["i"] = q.system
    a: dict[str, Any] = {"video": q.video, "media_type": "video", "QA": turns, "qid": q.qid}
    if q.bound is not None:
        a["start"], a["end"] = float(q.bound[0]), float(q.bound[1])
    return a


def pipeline_config(
    setup: Setup,
    source: str,
    name: str,
    *,
    num_frames: int,
    answer_prefix: str,
    batch_size: int,
    max_new_tokens: int,
    num_workers: int = 0,
) -> dict[str, Any]:
    """The ``data`` settings of the evaluation pipeline of one question group: the
    checkpoint's tokenizers and template, segment-middle frames, left padding to
    :func:`~ppllava_jax.evaluate.model_setup.video_buckets`, one pass in order."""
    cfg = setup.cfg
    buckets = video_buckets(cfg, num_frames, max_new_tokens)
    return dict(
        sources=[dict(path=source, media_type="video", name=name)],
        template=setup.template,
        tokenizer_legacy=setup.tokenizer_legacy,
        tokenizer=setup.tokenizer_dir,
        clip_tokenizer=setup.clip_tokenizer_dir,
        num_frames=num_frames,
        frame_sampling="middle",
        clip_max_length=int(cfg.clip_text.max_position_embeddings),
        max_length=max(buckets),
        buckets=buckets,
        padding_side="left",
        group_capacity="batch",
        batch_size=batch_size,
        training=False,
        generation_prompt=True,
        answer_prefix=answer_prefix,
        num_workers=num_workers,
        shuffle=False,
        num_epochs=1,
        max_images=1,
    )


def check_questions(name: str, questions: Sequence[Question], max_T: int) -> None:
    """Refuse a benchmark whose question ids repeat (they key the answers) or that reads more
    frames than the model's time embeddings hold."""
    seen: set[str] = set()
    for q in questions:
        if q.qid in seen:
            raise ValueError(f"{name}: question id {q.qid!r} appears twice")
        seen.add(q.qid)
        if q.frame_count > max_T:
            raise ValueError(
                f"{q.frame_count} frames > the model's max_T={max_T} (BT-Adapter time "
                "embeddings); lower --num_frames"
            )


class Answerer:
    """Questions -> answer records, one batch at a time (one pipeline per question group).

    save_attention: a directory for the prompt-to-patch relevance pictures of the first
    ``max_attention`` questions answered here (``heatmap``)."""

    def __init__(
        self,
        bench: Benchmark,
        setup: Setup,
        sampling: SamplingConfig,
        *,
        save_attention: str = "",
        max_attention: int = 0,
    ):
        self.bench, self.setup, self.sampling = bench, setup, sampling
        self.generate = make_generate(setup.model, sampling, setup.mesh)
        self.save_attention = save_attention
        self.attention_left = int(max_attention) if save_attention else 0
        self.skipped = 0  # unreadable videos (the pipeline's skips)

    def answer(
        self, questions: Sequence[Question], batch_size: int, num_workers: int = 0
    ) -> Iterator[list[dict[str, Any]]]:
        """The records of each batch, in group order (frames, answer prefix, group)."""
        by_id = {q.qid: q for q in questions}
        groups: dict[tuple, list[Question]] = {}
        for q in questions:
            groups.setdefault((q.frame_count, q.answer_prefix, q.group, q.exact), []).append(q)
        for (frames, prefix, group, _), qs in sorted(groups.items(), key=lambda kv: kv[0]):
            src = f"{self.bench.name}:{group}:{frames}"
            data = pipeline_config(
                self.setup,
                src,
                self.bench.name,
                num_frames=frames,
                answer_prefix=prefix,
                batch_size=batch_size,
                max_new_tokens=self.sampling.max_new_tokens,
                num_workers=num_workers,
            )
            samples = [[pipeline_sample(q, src, i) for i, q in enumerate(qs)]]
            pipe = pl.Pipeline(data, self.setup.cfg, samples=samples)
            try:
                for host in pipe.iterator():
                    records = self._answer_batch(pipe, host, by_id)
                    if records:
                        yield records
            finally:
                pipe.close()

    def _answer_batch(self, pipe: pl.Pipeline, host: dict, by_id: dict[str, Question]) -> list:
        batch, meta = pl.split_meta(host)
        valid = np.asarray(batch.pop("valid"))
        batch.pop("labels", None)
        self.skipped += sum(s == "skip" for s in meta["status"])
        if not valid.any():
            return []
        placed = place_batch(batch, self.setup.mesh)
        res = jax.device_get(self.generate(self.setup.params, placed))
        maps = self.setup.relevance(placed) if self.attention_left > 0 else None
        records = []
        for i in np.flatnonzero(valid):
            sample = pipe.sample(int(meta["source"][i]), int(meta["index"][i]))
            q = by_id[sample.extra["qid"]]
            ids = [int(t) for t in res["tokens"][i][: int(res["lengths"][i])]]
            ids = [t for t in ids if t != self.sampling.eos_token_id]
            text = self.setup.tokenizer.decode(ids, skip_special_tokens=True)
            records.append(self.record(q, text, ids))
            if maps is not None and self.attention_left > 0:
                self.save_heatmap(q, text, batch, maps, i)
                self.attention_left -= 1
        return records

    def record(self, q: Question, text: str, ids: Sequence[int]) -> dict[str, Any]:
        """The benchmark's record of ``q`` answered with ``text``, the decoded generated ``ids``
        (EOS dropped); exact questions also get the prompt + answer decoded together."""
        if not q.exact:
            return self.bench.record(q, text)
        etok = self.setup.eval_tokenizer
        prompt_ids = list(etok(q.prompt_text).input_ids)
        full = etok.decode(prompt_ids + list(ids), skip_special_tokens=True)
        return self.bench.record(q, text, decoded=full)

    def save_heatmap(
        self, q: Question, answer: str, batch: dict, maps: np.ndarray, row: int
    ) -> None:
        """``<save_attention>/<question id>.png``: the question's frames, their relevance,
        the question and the answer (``heatmap.save_question_heatmap``)."""
        from ppllava_jax.data.image import pixel_stats

        stats = pixel_stats(bool(getattr(self.setup.cfg, "qwen", False)))
        valid = batch.get(FRAME_MASK["video"])
        heatmap.save_question_heatmap(
            os.path.join(self.save_attention, heatmap.safe_name(q.qid) + ".png"),
            heatmap.denormalize(batch["video_pixels"][row], *stats),
            maps[row],
            question=q.clip_text or q.prompt,
            answer=answer,
            qid=q.qid,
            valid=None if valid is None else valid[row],
        )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


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
    fresh: bool = False,
) -> dict[str, Any] | None:
    """Answer every unanswered question of ``bench`` and write ``out`` (results JSON).

    batch_size: per host (0: the smallest multiple of the data-parallel devices that is >= 8);
      one that the mesh's ``data`` x ``fsdp`` does not divide is refused (``eval_batch_size``).
    max_new_tokens: default the benchmark's, else 200 (SPEC §8).
    save_attention: a directory for the relevance pictures (``<question id>.png``: frames,
      relevance, colour bar, question and answer) of the first ``max_attention`` questions
      answered by this host.
    max_new_answers: stop (as if killed) after that many new answers (tests); returns None.
    fresh: delete the answers files of ``out`` first. Without it, answers files written for
      another checkpoint or other protocol settings (``answers.protocol``) are refused
      (``answers.AnswersMismatchError``, before anything is compiled).
    Returns the results dict (on host 0; None on other hosts).
    """
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    n_new = int(max_new_tokens or bench.max_new_tokens or 200)
    sc = setup.sampling(n_new)  # greedy
    batch_size = eval_batch_size(batch_size, setup.mesh)
    questions = bench.questions()
    check_questions(bench.name, questions, setup.cfg.max_T)
    proto = answers.protocol(bench, setup, n_new)
    done = answers.resume(out, proto, bench.name, checkpoint=setup.checkpoint, fresh=fresh)
    todo = [q for q in questions if q.qid not in done]
    pid, nproc = jax.process_index(), jax.process_count()
    if len(todo) < len(questions) and pid == 0:
        print(
            f"{bench.name}: resuming {', '.join(answers.answer_files(out))}: "
            f"{len(questions) - len(todo)} of {len(questions)} questions answered before, "
            f"{len(todo)} to go",
            flush=True,
        )
    answerer = Answerer(
        bench, setup, sc, save_attention=save_attention, max_attention=max_attention
    )
    written, t0 = 0, time.time()
    bar = _progress(-(-len(todo) // nproc), bench.name, progress and pid == 0)
    with bar, answers.open_answers(answers.answers_path(out)) as sink:
        with contextlib.closing(answerer.answer(todo, batch_size, num_workers)) as batches:
            for records in batches:
                answers.append_records(sink, records)
                written += len(records)
                bar.update(len(records))
                if max_new_answers is not None and written >= max_new_answers:
                    return None  # as if killed here
    log.info(
        "%s: %d answers in %.1fs (%d unreadable)",
        bench.name,
        written,
        time.time() - t0,
        answerer.skipped,
    )
    if nproc > 1:  # hosts finish far apart: a coordination-service barrier, not a collective
        sharding.process_barrier(f"eval_{bench.name}_done")
        if pid != 0:
            return None
    return finalize(bench, questions, out, setup.checkpoint, proto, bench.bad_items())


def finalize(
    bench: Benchmark,
    questions: Sequence[Question],
    out: str,
    checkpoint: str = "",
    protocol: dict[str, Any] | None = None,
    bad_items: Sequence[BadItem] = (),
) -> dict[str, Any]:
    """Scores from the answer files -> ``out`` (JSON) + the benchmark's extra files; prints the
    summary table. ``bad_items`` (annotation items that gave no question) count as questions
    without an answer: in ``num_questions``, ``num_missing`` and ``bad_annotations`` of the
    summary; the results list them (``bad_annotations``) and every question without an
    answer (``missing_ids``)."""
    recs = answers.read_answers(out)
    records = [recs[q.qid] for q in questions if q.qid in recs]
    summary = bench.summarize(records, questions)
    summary.update(bench.write_outputs(records, out))
    if bad_items:
        summary["num_questions"] = summary.get("num_questions", len(questions)) + len(bad_items)
        summary["num_missing"] = summary.get("num_missing", 0) + len(bad_items)
        summary["bad_annotations"] = len(bad_items)
    result = {
        "benchmark": bench.name,
        "checkpoint": checkpoint,
        "summary": summary,
        "missing_ids": [q.qid for q in questions if q.qid not in recs] + [b.qid for b in bad_items],
        "bad_annotations": [dataclasses.asdict(b) for b in bad_items],
        "records": records,
    }
    if protocol is not None:  # the settings the answers were given under (answers.protocol)
        result["protocol"] = protocol
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    setting = bench.setting()
    title = f"== {bench.name} ({setting}) ==" if setting else f"== {bench.name} =="
    print(format_table(summary, title), flush=True)
    return result


class MissingAnswersError(ValueError):
    """More questions of a benchmark went unanswered than the run allows."""


def check_missing(result: dict[str, Any], out: str, max_missing: float) -> None:
    """MissingAnswersError (one line) when more than ``max_missing`` (a share, 0..1) of the
    questions of ``result`` (:func:`finalize`'s, written to ``out``) have no answer
    (unreadable videos, malformed annotation items)."""
    s = result["summary"]
    total, missing = int(s.get("num_questions", 0)), int(s.get("num_missing", 0))
    if not total or missing / total <= max_missing:
        return
    bad = int(s.get("bad_annotations", 0))
    ids = result.get("missing_ids", [])
    raise MissingAnswersError(
        f"{result['benchmark']}: {missing} of {total} questions ({100 * missing / total:.1f}%) "
        f"have no answer, more than --max_missing={max_missing:g}: {bad} malformed annotation "
        f"items, {missing - bad} unreadable videos (the log names each); their ids are under "
        f"missing_ids in {out} (the first: {', '.join(map(str, ids[:3]))}). Fix the data, or "
        "raise --max_missing to accept the scores"
    )
