"""Fine-tune PPLLaVA-Vicuna-7B on your own videos (README, "Fine-tune on your own videos").

    python train.py --config configs/finetune_own.py --workdir runs/my_videos \\
        --config.init_from=ckpt/ppllava \\
        --config.data.sources='[{"path": "my_videos/train.json", "data_root": "my_videos"}]' \\
        --config.data.tokenizer=ckpt/ppllava/tokenizer \\
        --config.data.clip_tokenizer=ckpt/ppllava/clip_tokenizer \\
        --config.train.num_samples=4

Starts from the released PPLLaVA-Vicuna-7B converted to ``ckpt/ppllava`` (``init_from``; the
model's sizes come from its ``config.json``) and trains on annotation files of your own
(``data.sources``: the format of ``examples/my_videos/train.json``). Three settings are yours:

- ``data.sources``: your annotation files and the folders their media paths are relative to;
- ``data.tokenizer`` / ``data.clip_tokenizer``: the released model's tokenizers (the files of
  ``llava-hf/llava-v1.6-vicuna-7b-hf`` and ``openai/clip-vit-large-patch14-336``, put in
  ``ckpt/ppllava/tokenizer`` and ``ckpt/ppllava/clip_tokenizer`` as README "Using released
  weights" says; a ``train.py`` export such as ``runs/sft/final`` carries its own);
- ``train.num_samples``: how many samples your files hold (the schedule runs ``train.epochs``
  over them).

Nothing synthetic is generated or scored (this recipe has no ``synthetic`` section); score a
held-out file with ``eval.py --benchmark openqa`` (README). The 7B settings are the video-only
recipe's (``configs/ppllava_vicuna7b_videoonly.py``: 32 frames, 248-token CLIP prompts, the
original's text encoding with the legacy Vicuna tokenizer, bf16, remat, fsdp), for one machine
of 8 GPUs (32 samples per update, 4 per GPU).
"""

from __future__ import annotations

import ml_collections

from configs import common
from ppllava_jax.train.trainer import default_config

BATCH = 32  # samples per update on one host (8 GPUs x 4)


def get_config() -> ml_collections.ConfigDict:
    c = default_config()  # train / optimizer / checkpoint / dpo sections
    c.model = common.vicuna7b_model()  # runtime fields (bf16, remat, scan); sizes: init_from
    common.mesh_and_batch(c)  # fsdp mesh; plan.py's batch section
    c.batch.global_batch = BATCH

    # ---------------------------------------------------------------- yours to set
    c.init_from = "ckpt/ppllava"  # the released PPLLaVA-Vicuna-7B, converted
    d = c.data = common.data_config(())  # 32 frames, 248-token CLIP prompts, Vicuna text
    d.sources = []  # your annotation files: [{"path": ..., "data_root": ...}, ...]
    d.tokenizer = ""  # the released LLM tokenizer's directory (ckpt/ppllava/tokenizer)
    d.clip_tokenizer = ""  # the released CLIP tokenizer's directory (ckpt/ppllava/clip_tokenizer)
    d.batch_size = BATCH  # per host
    d.fixed_groups = ()  # several hosts: the media groups of your data, e.g. ("video", "image")

    # ---------------------------------------------------------------- training
    t = c.train
    t.num_samples = 1000  # placeholder: the samples of your annotation files
    t.epochs = 3
    t.global_batch = c.batch.get_ref("global_batch")
    t.total_steps = -(
        (-t.get_ref("num_samples") * t.get_ref("epochs")) // t.get_ref("global_batch")
    )
    t.log_every = 10
    t.loss_chunk_size = 512  # LM head + cross entropy over chunks: no [B, L, vocab] logits
    c.optimizer.lr = 2e-5  # the SFT recipe's: AdamW, cosine, 3% warmup, no weight decay
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.optimizer.trainable = "ppllava_sft"  # LLM, BT-Adapter, projector MLP + CLIP projections
    c.checkpoint.save_every = 100
    return c
