"""What ``train.py`` runs: config -> data, model, mesh, parameters -> ``trainer.train`` -> export.

Steps, each failing early with a message that says what to change:

1. ``resolve``: the demo dataset is generated under ``<workdir>/data`` when the config asks for
   it (``synthetic`` section) and ``data.sources`` is empty; the model config is built from the
   ``model`` section (``train.model_config``) and checked with the data, tokenizers and mesh
   (``train.checks``); it is written to ``<workdir>/config.json`` once ``fit``'s trainer has
   started or accepted the resume (a refused resume changes nothing). The whole run holds
   the work directory's lock (``train/workdir_lock.py``: one run per work directory);
2. ``fit``: parameters initialised in their shards (``sharding.sharded_init``) or restored from
   ``init_from`` (a directory written by ``convert_torch_weights.py``); the grain pipeline
   (``data`` section, ``train.batches``) feeds ``trainer.train`` (resume, checkpoints; SIGTERM
   and Ctrl-C save and stop, and ``train.py`` exits with ``preemption.REQUEUE_EXIT_CODE``);
   ``init_from`` may also be an export or a training checkpoint step (``train/init_from.py``);
3. ``export_final``: the trained parameters go to ``<workdir>/final`` in the converted layout
   (``config.json`` + ``params/``) with the tokenizers and ``inference.json`` beside them, so
   ``eval.py``, ``ppllava_jax.chat`` and ``convert_torch_weights.py --to_torch`` read it directly;
4. ``score_synthetic``: the held-out split of the synthetic task is scored (``eval.split``), and
   its held-out conversations (``eval.multiturn_split``: each later turn asked with the earlier
   ones in the prompt, as the chat asks it), each into ``<workdir>/results_<split>.json`` and
   ``metrics.jsonl`` / TensorBoard (``eval/...``, ``eval_multiturn/...``); the last lines
   printed name every output and both accuracies (``outputs_message``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from ppllava_jax import sharding
from ppllava_jax.convert import params_io
from ppllava_jax.convert.ppllava_config import ppllava_config_to_hf
from ppllava_jax.data import pipeline as pl
from ppllava_jax.evaluate.common import results_path, scalar_metrics
from ppllava_jax.models.config import PPLLaVAConfig
from ppllava_jax.models.ppllava import PPLLaVA, init_params
from ppllava_jax.train import init_from, resume_check, trainer, workdir_lock
from ppllava_jax.train.batches import TrainBatches
from ppllava_jax.train.checkpoint import config_to_dict
from ppllava_jax.train.checks import (
    check_batch,
    check_mode,
    check_multihost,
    check_tokenizers,
    scores_synthetic,
)
from ppllava_jax.train.metrics import MetricsWriter
from ppllava_jax.train.model_config import model_config
from ppllava_jax.train.preemption import requeue_message
from ppllava_jax.train.program import make_apply, place_batch

# the synthetic task's answers are a colour word or an option letter (a few tokens): chat and the
# web demo stop a confused model after this many tokens instead of 200
SYNTHETIC_MAX_NEW_TOKENS = 16


def prepare_data(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Create the synthetic dataset if the config uses it, and point ``data`` at it."""
    syn = cfg.get("synthetic")
    if syn is None or cfg.data.sources:
        return
    from ppllava_jax.data import synthetic

    out = syn.dir or os.path.join(workdir, "data")
    names = ("num_train", "num_eval", "frames", "size", "seed", "qtypes", "multiturn_fraction")
    kw = {k: syn[k] for k in names if k in syn}
    # several processes: process 0 writes the set, the others wait and then only check it
    if jax.process_index() == 0:
        if not os.path.exists(os.path.join(out, synthetic.MARKER)):
            print(
                f"[train] generating the demo dataset in {out}: {kw.get('num_train')} training "
                f"and {kw.get('num_eval')} held-out clips ...",
                flush=True,
            )
        synthetic.ensure_dataset(out, **kw)
    sharding.process_barrier("synthetic_dataset")
    if jax.process_index() != 0:
        synthetic.ensure_dataset(out, **kw)
    with cfg.unlocked():
        cfg.synthetic.dir = out
        cfg.data.sources = [dict(path=os.path.join(out, "train.json"), data_root=out)]
        cfg.data.tokenizer = cfg.data.tokenizer or os.path.join(out, "tokenizer")
        if syn.get("llm_tokenizer", "llama") == "qwen":  # the Qwen-family demo (plain_qwen)
            from ppllava_jax.data.qwen_tokenizer import ensure_qwen_tokenizer

            cfg.data.tokenizer = ensure_qwen_tokenizer(out, int(syn.qwen_vocab_size))
        cfg.data.clip_tokenizer = cfg.data.clip_tokenizer or os.path.join(out, "clip_tokenizer")


def build_params(cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig, mesh) -> tuple[Any, Any]:
    """Parameters on the mesh, sharded by the logical rules: restored from ``init_from`` or
    initialised in place (no host holds the whole model)."""
    abstract = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0)))
    if cfg.get("init_from"):
        return init_from.restore_params(init_from.locate(cfg.init_from), abstract, mesh)
    seed = int(cfg.train.get("seed", 0))
    params, shardings = sharding.sharded_init(
        lambda rng: init_params(mcfg, rng), mesh, jax.random.PRNGKey(seed)
    )
    return params, shardings


def step_flops(mcfg: PPLLaVAConfig, params: Any, opt_cfg) -> Any:
    """Per-device model FLOPs of a step as a function of the host batch (for MFU): the analytic
    count of ``ppllava_jax.flops`` (XLA's count misses all but one pass of a scanned layer)."""
    from ppllava_jax import flops
    from ppllava_jax.train.optimizer import param_paths, trainable_predicate

    pred = trainable_predicate(opt_cfg)
    trained = [p for p in param_paths(params) if pred(p)]
    per_host = jax.local_device_count()
    return lambda batch: flops.batch_train_flops(mcfg, batch, trained) / per_host


def export_final(workdir: str, params: Any, mcfg: PPLLaVAConfig, cfg) -> str:
    """``<workdir>/final``: converted layout + tokenizers (what eval.py and chat read)."""
    out = os.path.join(workdir, "final")
    # several processes write the (sharded, not fully addressable) arrays together
    host = jax.device_get(params) if jax.process_count() == 1 else params
    params_io.save_params(out, host, "ppllava", ppllava_config_to_hf(mcfg))
    if jax.process_index() != 0:
        sharding.process_barrier("export_final")
        return out
    for name in ("tokenizer", "clip_tokenizer"):
        src = cfg.data.get(name)
        if src and os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name), dirs_exist_ok=True)
    inference = {
        "template": cfg.data.template,
        "num_frames": int(cfg.data.num_frames),
        # the pre-tokenization training used, so evaluation tokenizes prompts the same way
        "tokenizer_legacy": cfg.data.get("tokenizer_legacy"),
    }
    cap = answer_cap(cfg)
    if cap:
        inference["max_new_tokens"] = cap
    write_json(os.path.join(out, "inference.json"), inference)
    sharding.process_barrier("export_final")
    return out


def answer_cap(cfg: ml_collections.ConfigDict) -> int:
    """``max_new_tokens`` for ``inference.json`` (the default answer length of chat and the web
    demo): ``inference.max_new_tokens`` of the config, else ``SYNTHETIC_MAX_NEW_TOKENS`` for a
    model trained on the synthetic task, else 0 (not recorded)."""
    cap = int(cfg.get("inference", {}).get("max_new_tokens", 0) or 0)
    if not cap and cfg.get("synthetic") is not None:
        cap = SYNTHETIC_MAX_NEW_TOKENS
    return cap


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written to a sibling and renamed into place (a
    reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def score_synthetic(final: str, cfg, split: str, workdir: str) -> dict[str, Any]:
    """Score the exported model on a split of the synthetic set with eval.py's own runner
    (same prompts, extraction and records as ``eval.py --benchmark synthetic``) into
    ``<workdir>/results_<split>.json``; the runner's answers files (its resume state) are removed
    before (a new model) and after (scratch once the results are written)."""
    from ppllava_jax.evaluate import answers, model_setup, runner
    from ppllava_jax.evaluate.synthetic import Synthetic

    def remove_answers() -> None:
        if jax.process_index() == 0:
            for path in [*answers.answer_files(out), answers.protocol_path(out)]:
                if os.path.exists(path):
                    os.remove(path)

    bench = Synthetic(cfg.synthetic.dir, num_frames=int(cfg.data.num_frames), split=split)
    out = results_path(workdir, split)
    remove_answers()
    sharding.process_barrier("score_synthetic")  # every process answers its share (runner.run)
    res = runner.run(
        bench,
        model_setup.load_setup(final),
        out,
        batch_size=int(cfg.eval.batch_size),
        max_new_tokens=int(cfg.eval.max_new_tokens),
        progress=False,
    )
    sharding.process_barrier("score_synthetic_done")
    remove_answers()
    return res["summary"] if res else {}


def log_scores(workdir: str, step: int, scores: dict[str, Any], prefix: str = "eval/") -> None:
    """The numeric scores (and each question type's accuracy) as ``<prefix>...`` at ``step`` in
    ``metrics.jsonl`` and TensorBoard, beside the training curves."""
    writer = MetricsWriter(workdir, console=False)
    writer.write(step, scalar_metrics(scores), prefix=prefix)
    writer.close()


def scored_splits(cfg: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(split, key) of each synthetic split scored at the end: ``eval.split`` as ``eval`` and
    ``eval.multiturn_split`` as ``eval_multiturn`` (none when ``eval.split`` is empty or the run
    is not on the synthetic task); ``key`` names its ``summary`` entries and metrics."""
    ev = cfg.get("eval", {})
    if not scores_synthetic(cfg):  # e.g. data.sources of one's own: no synthetic set
        return []
    both = ((ev.split, "eval"), (ev.get("multiturn_split", ""), "eval_multiturn"))
    return [(split, key) for split, key in both if split]


def resolve(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[Any, PPLLaVAConfig, Any]:
    """The run's config filled in (the demo dataset made and pointed at) and checked, its model
    config and mesh (``fit`` writes it to ``<workdir>/config.json`` once the run starts)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy we may fill in
    if cfg.get("init_from"):
        init_from.locate(cfg.init_from)  # a wrong path is said before any data is made
    prepare_data(cfg, workdir)
    cfg.data.micro_batches = int(cfg.train.get("grad_accum_steps", 1))
    check_mode(cfg)
    check_multihost(cfg, jax.process_count())
    mcfg = model_config(cfg)
    check_tokenizers(cfg, mcfg)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    from ppllava_jax.evaluate import model_setup

    check_batch(cfg, mesh, jax.process_count(), model_setup.local_mesh())
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(
            f"[train] {jax.process_count()} processes, mesh "
            f"{dict(mesh.shape)}:\n"
            + sharding.format_host_layout(sharding.host_layout(mesh, int(cfg.data.batch_size))),
            flush=True,
        )
    return cfg, mcfg, mesh


def fit(cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig, mesh: Any, workdir: str):
    """``trainer.train`` on the grain pipeline with parameters built on ``mesh`` (call inside
    ``sharding.mesh_context(mesh)``); returns its ``TrainResult``."""
    pipe = pl.Pipeline(cfg.data, mcfg)
    trace = ""
    if cfg.train.get("data_trace", False):
        os.makedirs(os.path.join(workdir, "data_trace"), exist_ok=True)
        trace = os.path.join(workdir, "data_trace", f"process_{jax.process_index()}.jsonl")
    params, shardings = build_params(cfg, mcfg, mesh)
    # a checkpoint of another model / trainable selection: said by name, before restoring
    resume_check.check_resume(os.path.join(workdir, "checkpoints"), params, cfg)
    result = trainer.train(
        cfg,
        workdir,
        model_apply=make_apply(PPLLaVA(mcfg)),
        init_params=params,
        data_iterator=TrainBatches(pipe.iterator(), pipe, trace),
        param_shardings=shardings,
        flops_per_step=step_flops(mcfg, params, cfg.optimizer),
        # the batch as the step receives it: the planner's too (train/program.py)
        place_batch=place_batch(cfg, mcfg, mesh),
        # config.json only once a resume was accepted: a refused one changes nothing
        on_start=lambda step: write_config(cfg, workdir),
    )
    pipe.close()
    return result


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """The resolved config as ``<workdir>/config.json`` (process 0)."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "config.json"), config_to_dict(cfg))


def outputs_message(
    workdir: str, summary: dict[str, Any], split: str, multiturn_split: str = ""
) -> str:
    """What a finished run printed last: where its parameters, scores and logs are."""
    lines = [
        f"[train] finished at step {summary['step']}. Outputs in {workdir}:",
        f"  parameters (eval.py / chat / --to_torch read them): {summary['final']}",
        f"  resolved config: {os.path.join(workdir, 'config.json')}",
    ]
    if "eval_accuracy" in summary:
        lines.append(
            f"  evaluation ({split} split): {results_path(workdir, split)}, accuracy "
            f"{100 * summary['eval_accuracy']:.1f}% of {summary.get('eval_num_questions')} "
            "questions"
        )
    if "eval_multiturn_accuracy" in summary:
        lines.append(
            f"  evaluation ({multiturn_split} split: later turns of conversations): "
            f"{results_path(workdir, multiturn_split)}, accuracy "
            f"{100 * summary['eval_multiturn_accuracy']:.1f}% of "
            f"{summary.get('eval_multiturn_num_questions')} questions"
        )
    lines += [
        f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}",
        f"  TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
    ]
    return "\n".join(lines)


def main(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train the config in ``workdir`` (resuming what is there), export ``final/`` and score
    the synthetic task's held-out splits. Returns a summary: ``step``, ``preempted`` (a signal
    stopped the run after saving: ``train.py`` exits with ``REQUEUE_EXIT_CODE``), ``final``
    and the ``eval_*`` and ``eval_multiturn_*`` scores. One run per work directory: its lock
    (``train/workdir_lock.py``) is held throughout."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    sharding.maybe_initialize_distributed()
    with workdir_lock.hold(workdir):
        return run_in(cfg, workdir)


def run_in(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``main`` in a work directory whose lock this run holds."""
    cfg, mcfg, mesh = resolve(cfg, workdir)
    with sharding.mesh_context(mesh):
        result = fit(cfg, mcfg, mesh, workdir)
        summary: dict[str, Any] = {"step": result.step, "preempted": result.preempted}
        if result.preempted:
            if jax.process_index() == 0:
                print(requeue_message(result.step, result.signal_name, result.checkpoints))
            return summary
        params = result.state.full_params()
        final = export_final(workdir, params, mcfg, cfg)
        summary["final"] = final
        del params, result
    # scored like eval.py does it: the export is read back onto eval's own mesh
    splits = dict((key, split) for split, key in scored_splits(cfg))
    for key, split in splits.items():
        scores = score_synthetic(final, cfg, split, workdir)
        summary.update({f"{key}_{k}": v for k, v in scores.items()})
        log_scores(workdir, summary["step"], scores, prefix=f"{key}/")
    if jax.process_index() == 0:
        msg = outputs_message(
            workdir, summary, splits.get("eval", ""), splits.get("eval_multiturn", "")
        )
        print(msg, flush=True)
    return summary
