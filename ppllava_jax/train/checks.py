"""Checks of a training config made before anything is compiled, each failing with a message
that says what to change: the mode against the data, the hosts against the visual groups, the
batch rows against the mesh, the tokenizers (given, and fitting the model's tables); and whether
the run ends by scoring the synthetic task (:func:`scores_synthetic`)."""

from __future__ import annotations

import os
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
    if eval_mesh is not None and scores_synthetic(cfg):
        n = int(cfg.eval.get("batch_size", 0))
        if n:  # 0: eval.py's default, a multiple of the devices
            sharding.check_batch_rows(
                n,
                eval_mesh,
                what=f"eval.batch_size={n} (scoring at the end of training)",
                setting="eval.batch_size",
            )


def check_tokenizers(cfg: ml_collections.ConfigDict, mcfg: PPLLaVAConfig) -> None:
    """The tokenizers must be given (:func:`check_tokenizer_dirs`) and fit the model's embedding
    tables and image token."""
    from transformers import AutoTokenizer

    check_tokenizer_dirs(cfg)
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
    if mcfg.pooling == "ppllava":
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


def scores_synthetic(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run scores the synthetic task's held-out split at the end: ``eval.split`` is
    set, the config has a ``synthetic`` section, and the run trains on that set. A demo config
    given annotation files of one's own (``data.sources`` set while ``synthetic.dir`` is empty:
    no synthetic set was made, ``run.prepare_data`` points both at it when it makes one) scores
    nothing; its held-out data is scored by ``eval.py`` (README, "Fine-tune on your own
    videos")."""
    syn = cfg.get("synthetic")
    if not cfg.get("eval", {}).get("split", "") or syn is None:
        return False
    own_data = bool(cfg.get("data", {}).get("sources")) and not syn.get("dir", "")
    return not own_data


# data.<field>: (what the directory holds, the released files, their folder in a checkpoint)
TOKENIZER_SETTINGS = {
    "tokenizer": (
        "the LLM tokenizer",
        "hf/llava-v1.6-vicuna-7b-hf, Qwen family hf/llava-onevision-qwen2-7b-si-hf",
    ),
    "clip_tokenizer": (
        "the CLIP tokenizer of the prompt encoder",
        "hf/clip-vit-large-patch14-336, Qwen family hf/siglip-so400m-patch14-384",
    ),
}


def tokenizer_hint(field: str) -> str:
    """Where the tokenizer directory of ``data.<field>`` (``tokenizer`` / ``clip_tokenizer``)
    comes from, as one sentence of an error message."""
    what, released = TOKENIZER_SETTINGS[field]
    return (
        f"set --config.data.{field}=DIR, the directory of {what}'s files: the released model's "
        f"download ({released}), the {field}/ folder a checkpoint directory carries "
        f"(ckpt/ppllava/{field} as README 'Using released weights' fills it, or a train.py "
        f"export's final/{field}), or the demo's trained one, runs/demo/data/{field}"
    )


def check_tokenizer_dirs(cfg: ml_collections.ConfigDict) -> None:
    """``data.tokenizer`` and ``data.clip_tokenizer`` name existing directories (every sample is
    tokenized by both); a ValueError names the setting and where its files come from."""
    for field in TOKENIZER_SETTINGS:
        path = str(cfg.data.get(field, "") or "")
        if not path:
            raise ValueError(f"data.{field} is not set: {tokenizer_hint(field)}")
        if not os.path.isdir(path):
            raise ValueError(f"data.{field}={path}: no such directory; {tokenizer_hint(field)}")
