"""PPLLaVA-7B (Vicuna-7B, CLIP ViT-L/14-336 + BT-Adapter), video-only SFT (SPEC section 7).

Plan the memory of a slice before renting it (ahead-of-time compile on simulated devices)::

    python -m ppllava_jax.plan --config configs/ppllava_vicuna7b_videoonly.py \
        --devices 64 --mesh fsdp=64 --batch-per-device 1 --hbm-gib 16

Train from the converted start point (``convert_torch_weights.py --source
llava-v1.6-vicuna-7b-hf --clip clip-vit-large-patch14-336 --output ckpt/ppllava_start``) as the
original's ``config/vicuna/ppllava_vicuna7b_videoonly.yaml`` does: LLaVA-Hound's video
instructions alone (its ``llava_hound_300k``: ``llavahound_all_vid.json``, frame folders read as
``video_reader_type: 'rawframe'``, 32 frames), **2 epochs**, 8 per GPU x 2 accumulation x 8 GPUs
= 128 per update, lr 2e-5 cosine, 3% warmup, no weight decay, the loss a token mean per device
micro-batch of 8 (``train.loss_normalization``). Launch commands for TPU pods and multi-GPU:
``configs/ppllava_vicuna7b_image_video.py``::

    python train.py --config configs/ppllava_vicuna7b_videoonly.py --workdir runs/sft_video \
        --config.data.batch_size=128 --config.train.grad_accum_steps=1

The model, mesh, batch and data sections are shared with the other 7B recipes
(``configs/common.py``).
"""

from __future__ import annotations

import ml_collections

from configs import common
from ppllava_jax.train.trainer import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()  # train / optimizer / checkpoint / dpo sections
    c.model = common.vicuna7b_model()  # 7B, bf16 compute, remat, scanned layers, 32 frames
    common.mesh_and_batch(c)  # fsdp mesh; plan.py's batch section (global batch 128)

    # ---------------------------------------------------------------- start point and data
    c.init_from = "ckpt/ppllava_start"  # convert_torch_weights.py output; "" = random init
    c.data = common.data_config(common.HOUND)  # the original's only source
    c.data.buckets = [1152, 1536, 2048]  # every sample carries 1024 visual tokens

    # ---------------------------------------------------------------- training (SPEC §7)
    t = c.train
    t.num_samples = 300_000  # placeholder: samples of llava_hound_300k (set it to your count)
    t.epochs = 2  # the original's num_train_epochs for this recipe
    t.global_batch = c.batch.get_ref("global_batch")
    t.total_steps = -(
        (-t.get_ref("num_samples") * t.get_ref("epochs")) // t.get_ref("global_batch")
    )
    # the original's loss: a token mean per device micro-batch (per_device_train_batch_size 8),
    # averaged over devices and accumulation steps; groups of 8 rows whatever this mesh is
    t.loss_normalization = "per_device_mean"
    t.loss_group_size = 8
    # the LM head and cross entropy over 512-position chunks: no float32 [B, L, vocab] logits
    # (same values and gradients; docs/plan_figures.md)
    c.train.loss_chunk_size = 512
    c.optimizer.lr = 2e-5  # AdamW, cosine, 3% warmup, no weight decay
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.optimizer.trainable = "ppllava_sft"  # LLM, BT-Adapter, projector MLP + CLIP projections
    return c
