"""What ``train.py`` runs: config -> data, model, mesh, parameters -> ``trainer.train`` -> export.

Steps, each failing early with a message that says what to change:

1. the demo dataset is generated under ``<workdir>/data`` when the config asks for it
   (``synthetic`` section) and ``data.sources`` is empty;
2. the model config is built from the ``model`` section and checked against the tokenizers;
3. a mesh from ``mesh``; parameters initialised in their shards (``sharding.sharded_init``) or
   restored from ``init_from`` (a directory written by ``convert_torch_weights.py``);
4. the grain pipeline (``data`` section) feeds ``trainer.train`` (resume, checkpoints, SIGTERM);
5. at the end the trained parameters are written to ``<workdir>/final`` in the converted
   layout (``config.json`` + ``params/``) with the tokenizers beside them, so ``eval.py``,
   ``ppllava_jax.chat`` and ``convert_torch_weights.py --to_torch`` read it directly, and the
   held-out split of the synthetic task is scored (``eval.split``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from ppllava_jax import sharding
from ppllava_jax.convert import params_io
from ppllava_jax.convert.ppllava_family import ppllava_config_to_hf
from ppllava_jax.data import collate
from ppllava_jax.data import pipeline as pl
from ppllava_jax.models.config import PPLLaVAConfig, ppllava_config_from_dict
from ppllava_jax.models.ppllava import PPLLaVA, init_params
from ppllava_jax.train import resume_check, trainer


def prepare_data(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Create the synthetic dataset if the config uses it, and point ``data`` at it."""
    syn = cfg.get("synthetic")
    if syn is None or cfg.data.sources:
        return
    from ppllava_jax.data import synthetic

    out = syn.dir or os.path.join(workdir, "data")
    names = ("num_train", "num_eval", "frames", "size", "seed", "qtypes")
    kw = {k: syn[k] for k in names if k in syn}
    # several processes: process 0 writes the set, the others wait and then only check it
    if jax.process_index() == 0:
        synthetic.ensure_dataset(out, **kw)
    barrier("synthetic_dataset")
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


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op on one process)."""
    sharding.process_barrier(name)


def model_config(cfg: ml_collections.ConfigDict) -> PPLLaVAConfig:
    """The ``PPLLaVAConfig`` of ``init_from``'s config.json (runtime fields from ``model``), of a
    ``model.preset`` (the 7B recipes), or of the ``model`` section's fields (the demo)."""
    if cfg.get("init_from"):
        from ppllava_jax.convert.api import with_runtime
        from ppllava_jax.convert.ppllava_family import ppllava_config_from_hf

        family, hf = params_io.read_config(cfg.init_from)
        if family != "ppllava":
            raise ValueError(
                f"init_from={cfg.init_from} holds a {family!r} checkpoint; train.py needs a "
                "'ppllava' one (convert a released PPLLaVA, or build the start point with "
                "convert_torch_weights.py --source LLAVA_NEXT --clip CLIP)"
            )
        rt = {
            k: cfg.model[k]
            for k in ("dtype", "scan_layers", "remat_policy", "attention_impl")
            if k in cfg.model
        }
        return with_runtime(ppllava_config_from_hf(hf), **rt)
    if cfg.model.get("preset"):  # the 7B recipes: PPLLaVAConfig defaults + a few fields
        from ppllava_jax.plan import model_config as preset_config

        return preset_config(cfg.model)
    return ppllava_config_from_dict(cfg.model.to_dict())


def check_mode(cfg: ml_collections.ConfigDict) -> None:
    """``train.mode`` and ``data.dpo`` must agree: DPO steps read chosen/rejected row pairs."""
    mode = cfg.train.get("mode", "sft")
    if mode not in ("sft", "dpo"):
        raise ValueError(f"train.mode={mode!r}; use 'sft' or 'dpo'")
    if (mode == "dpo") != bool(cfg.data.get("dpo", False)):
        raise ValueError(
            f"train.mode={mode!r} but data.dpo={bool(cfg.data.get('dpo', False))}: a DPO run "
            "needs preference pairs (set both --config.train.mode=dpo and --config.data.dpo=True, "
            "as configs/ppllava_vicuna7b_dpo.py does), an SFT run plain samples"
        )


def common_length(batch: dict[str, np.ndarray], mcfg: PPLLaVAConfig) -> dict[str, np.ndarray]:
    """Pad this host's batch to the longest length of all hosts (each host picks its own bucket;
    the global array needs one). A no-op on one host."""
    if jax.process_count() == 1:
        return batch
    length = sharding.max_over_processes(batch["input_ids"].shape[-1])
    pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else 0
    return collate.pad_length(batch, length, pad)


def check_multihost(cfg: ml_collections.ConfigDict, process_count: int) -> None:
    """Every host must feed the same array shapes in a step. Lengths are agreed on per step
    (``common_length``); the visual groups of every batch have to be fixed by the config."""
    if process_count <= 1:
        return
    d = cfg.data
    if not list(d.get("fixed_groups", [])):
        raise ValueError(
            f"{process_count} processes need the same visual groups in every batch on every host: "
            "set data.fixed_groups to the media of the mixture, e.g. ['video'] or "
            "['video', 'image']"
        )


def check_batch(
    cfg: ml_collections.ConfigDict, mesh: Any, process_count: int = 1, eval_mesh: Any = None
) -> None:
    """Before compiling: each micro-batch's rows (``data.batch_size`` x 2 for DPO pairs x
    hosts / ``train.grad_accum_steps``) must split over ``mesh``'s ``data`` x ``fsdp``, and,
    when ``eval_mesh`` is given (eval.py's mesh for the scoring at the end of training),
    ``eval.batch_size`` over that one; a ``sharding.ShardingError`` says what divides."""
    d = cfg.data
    k = int(d.get("micro_batches", cfg.train.get("grad_accum_steps", 1)))
    dpo = bool(d.get("dpo", False))
    rows = int(d.batch_size) * (2 if dpo else 1) * int(process_count)
    what = f"data.batch_size={int(d.batch_size)}" + (" pairs (2 rows each)" if dpo else "")
    what += f" x {process_count} hosts" if process_count > 1 else ""
    what += f" / train.grad_accum_steps={k} micro-batches" if k > 1 else ""
    sharding.check_batch_rows(rows // k, mesh, what=what, setting="data.batch_size")
    split = cfg.get("eval", {}).get("split", "")
    if eval_mesh is not None and split and cfg.get("synthetic") is not None:
        n = int(cfg.eval.get("batch_size", 0))
        if n:  # 0: eval.py's default, a multiple of the devices
            sharding.check_batch_rows(
                n,
                eval_mesh,
                what=f"eval.batch_size={n} (scoring at the end of training)",
                setting="eval.batch_size",
            )


def check_tokenizers(cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig) -> None:
    """The tokenizers must fit the model's embedding tables and image token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    if len(tok) > mcfg.llm.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.data.tokenizer} has {len(tok)} tokens > model.llm.vocab_size="
            f"{mcfg.llm.vocab_size}; raise the vocabulary or use the matching tokenizer"
        )
    img = tok.convert_tokens_to_ids("<image>")
    if img != mcfg.image_token_index:
        raise ValueError(
            f"<image> is id {img} in {cfg.data.tokenizer} but model.image_token_index="
            f"{mcfg.image_token_index}; set --config.model.image_token_index={img}"
        )
    if mcfg.pooling == "ppllava" and cfg.data.clip_tokenizer:
        ctok = AutoTokenizer.from_pretrained(cfg.data.clip_tokenizer)
        if len(ctok) > mcfg.clip_text.vocab_size:
            raise ValueError(
                f"CLIP tokenizer {cfg.data.clip_tokenizer} has {len(ctok)} tokens > "
                f"model.clip_text.vocab_size={mcfg.clip_text.vocab_size}"
            )
        if cfg.data.clip_max_length > mcfg.clip_text.max_position_embeddings:
            raise ValueError(
                f"data.clip_max_length={cfg.data.clip_max_length} > the CLIP text tower's "
                f"{mcfg.clip_text.max_position_embeddings} positions"
            )


class TrainBatches:
    """The pipeline's iterator for the trainer: drops host-only fields, counts skipped samples,
    and passes ``get_state``/``set_state`` through (so checkpoints hold the data position).

    pipeline: the ``Pipeline`` of ``it``; with it, a checkpoint of another process count
      resumes (``reshard_state``).
    trace: a file to which each batch's sample ids and array shapes are appended as one JSON
      line (``train.data_trace``: what the multi-process tests check).
    """

    def __init__(self, it: Any, pipeline: pl.Pipeline | None = None, trace: str = ""):
        self.it = it
        self.pipeline = pipeline
        self.trace = trace
        self.batches = 0  # batches consumed (restored with the state): the step they feed
        self.skipped: dict[str, int] = {}

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch, meta = pl.split_meta(next(self.it))
        batch.pop("valid", None)
        self.skipped = dict(meta.get("skipped", self.skipped))
        self.batches += 1
        if self.trace:
            rec = {
                "step": self.batches,
                "process": jax.process_index(),
                "ids": list(meta.get("ids", [])),
                "epoch": [int(e) for e in meta.get("epoch", [])],
                "shapes": {k: list(np.shape(v)) for k, v in sorted(batch.items())},
            }
            with open(self.trace, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return batch

    def metrics(self) -> dict[str, int]:
        out = {f"data/skipped_{k}": int(v) for k, v in self.skipped.items()}
        out["data/skipped"] = int(sum(self.skipped.values()))
        return out

    def get_state(self) -> Any:
        return self.it.get_state()

    def set_state(self, state: Any) -> None:
        self.it.set_state(state)
        if isinstance(state, dict):
            self.batches = int(state.get("batches", 0))

    def reshard_state(self, states: list[Any], process_index: int, process_count: int) -> Any:
        """The state to resume from after a change of the process count (``Pipeline
        .reshard_state``; called by ``Checkpointer.restore``)."""
        if self.pipeline is None:
            raise ValueError("TrainBatches without its pipeline cannot resume on a new host count")
        return self.pipeline.reshard_state(states, process_index, process_count)


def make_apply(model: PPLLaVA):
    def apply(params, batch, *, train, rng, **kw):  # kw: return_logits (train.loss_chunk_size)
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return model.apply(
            {"params": params}, batch, deterministic=not train, rngs={"dropout": rng}, **kw
        )

    return apply


def build_params(cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig, mesh) -> tuple[Any, Any]:
    """Parameters on the mesh, sharded by the logical rules: restored from ``init_from`` or
    initialised in place (no host holds the whole model)."""
    abstract = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0)))
    shardings = sharding.param_shardings(abstract, mesh)
    if cfg.get("init_from"):
        target = sharding.abstract_with_shardings(abstract, mesh)
        params = params_io.load_params(cfg.init_from, target)
        return params, shardings
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
        barrier("export_final")
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
    with open(os.path.join(out, "inference.json"), "w") as f:
        json.dump(inference, f, indent=1)
    barrier("export_final")
    return out


def score_synthetic(final: str, cfg, split: str, workdir: str) -> dict[str, Any]:
    """Score the exported model on a split of the synthetic set with eval.py's own runner
    (same prompts, extraction and records as ``eval.py --benchmark synthetic``)."""
    from ppllava_jax.evaluate import runner
    from ppllava_jax.evaluate.synthetic import Synthetic

    bench = Synthetic(cfg.synthetic.dir, num_frames=int(cfg.data.num_frames), split=split)
    out = os.path.join(workdir, f"eval_{split}.json")
    if jax.process_index() == 0:
        for old in glob.glob(os.path.splitext(out)[0] + ".answers*.jsonl"):
            os.remove(old)  # a new model: answers of an earlier run do not count
    barrier("score_synthetic")  # every process answers its share (runner.run)
    res = runner.run(
        bench,
        runner.load_setup(final),
        out,
        batch_size=int(cfg.eval.batch_size),
        max_new_tokens=int(cfg.eval.max_new_tokens),
        progress=False,
    )
    return res["summary"] if res else {}


def main(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    sharding.maybe_initialize_distributed()
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy we may fill in
    prepare_data(cfg, workdir)
    cfg.data.micro_batches = int(cfg.train.get("grad_accum_steps", 1))
    check_mode(cfg)
    check_multihost(cfg, jax.process_count())
    mcfg = model_config(cfg)
    check_tokenizers(cfg, mcfg)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    from ppllava_jax.evaluate import runner

    check_batch(cfg, mesh, jax.process_count(), runner.local_mesh())
    pipe = pl.Pipeline(cfg.data, mcfg)
    model = PPLLaVA(mcfg)
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(
            f"[train] {jax.process_count()} processes, mesh "
            f"{dict(mesh.shape)}:\n"
            + sharding.format_host_layout(sharding.host_layout(mesh, int(cfg.data.batch_size))),
            flush=True,
        )
    trace = ""
    if cfg.train.get("data_trace", False):
        os.makedirs(os.path.join(workdir, "data_trace"), exist_ok=True)
        trace = os.path.join(workdir, "data_trace", f"process_{jax.process_index()}.jsonl")
    with sharding.mesh_context(mesh):
        params, shardings = build_params(cfg, mcfg, mesh)
        # a checkpoint of another model / trainable selection: said by name, before restoring
        resume_check.check_resume(os.path.join(workdir, "checkpoints"), params, cfg)
        result = trainer.train(
            cfg,
            workdir,
            model_apply=make_apply(model),
            init_params=params,
            data_iterator=TrainBatches(pipe.iterator(), pipe, trace),
            param_shardings=shardings,
            flops_per_step=step_flops(mcfg, params, cfg.optimizer),
            place_batch=lambda b: sharding.shard_batch(
                collate.globalize_visual_index(
                    common_length(b, mcfg),
                    mcfg,
                    jax.process_index(),
                    jax.process_count(),
                    cfg.data.micro_batches,
                ),
                mesh,
            ),
        )
        pipe.close()
        params = result.state.full_params()
        summary: dict[str, Any] = {"step": result.step, "preempted": result.preempted}
        if result.preempted:
            return summary
        final = export_final(workdir, params, mcfg, cfg)
        summary["final"] = final
        del params, result
    # scored like eval.py does it: the export is read back onto eval's own mesh
    split = cfg.get("eval", {}).get("split", "")
    if split and cfg.get("synthetic") is not None:
        scores = score_synthetic(final, cfg, split, workdir)
        summary.update({f"eval_{k}": v for k, v in scores.items()})
    return summary


__all__ = [
    "TrainBatches",
    "barrier",
    "build_params",
    "check_mode",
    "check_multihost",
    "common_length",
    "check_tokenizers",
    "export_final",
    "main",
    "make_apply",
    "model_config",
    "prepare_data",
    "score_synthetic",
    "step_flops",
]
