"""Checks of a training config made before anything is compiled, each failing with a message
that says what to change: the mode against the data, the hosts against the visual groups, the
batch rows against the mesh, the tokenizers against the model's tables."""

from __future__ import annotations

from typing import Any

import ml_collections

from ppllava_jax import sharding
from ppllava_jax.models.config import PPLLaVAConfig


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
