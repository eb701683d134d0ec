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

The image+video and DPO recipes start from this file's model, mesh and batch sections.
"""

from __future__ import annotations

import ml_collections

from ppllava_jax.train.trainer import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()  # train / optimizer / checkpoint / dpo sections

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.preset = "ppllava_vicuna7b"  # plan.model_config builds PPLLaVAConfig() (7B defaults)
    m.dtype = "bfloat16"  # compute dtype of activations/matmuls (softmax/norms/loss stay f32)
    m.param_dtype = "float32"  # parameter storage (and so optimizer moments) dtype
    m.scan_layers = True  # nn.scan over repeated layers: compile time flat in depth
    m.remat_policy = "full"  # none | full | dots | dots_no_batch (gradient checkpointing)
    m.attention_impl = "xla"  # xla | cudnn (NVIDIA flash attention, bf16) | auto
    m.llm_layers = 32  # Vicuna-7B decoder layers (lower it only for experiments)
    m.vocab_size = 32064  # llava-v1.6-vicuna-7b vocabulary (32000 + added tokens, padded)
    m.num_frames = 32  # frames per video, each 336x336 (the start point's max_T = 64)
    m.clip_length = 248  # CLIP prompt tokens (Long-CLIP positions; the conversation, truncated)

    # ---------------------------------------------------------------- mesh
    mesh = c.mesh = ml_collections.ConfigDict()
    mesh.data = 1  # pure data parallel (replicated parameters); within a slice
    mesh.fsdp = -1  # data parallel + parameter/optimizer sharding (ZeRO-3); -1 = the rest
    mesh.tensor = 1  # Megatron tensor parallel over heads / MLP / vocabulary
    mesh.dcn_data = 1  # slices (multi-slice TPU) or nodes stacked on `data` over the slow network

    # ---------------------------------------------------------------- batch
    b = c.batch = ml_collections.ConfigDict()
    b.per_device = 1  # samples per device per micro-batch (global = per_device * devices)
    b.global_batch = 128  # SPEC section 7; grad_accum_steps = global / (per_device * devices)
    b.max_length = 2048  # merged sequence: 1024 visual tokens (16 x 8 x 8) + text, padded
    b.visual_tokens = 1024  # pooled tokens per 32-frame video: (32/2) x (24/3) x (24/3)

    # ---------------------------------------------------------------- start point and data
    c.init_from = "ckpt/ppllava_start"  # convert_torch_weights.py output; "" = random init
    from configs import ppllava_vicuna7b_image_video as iv  # (imports this file: lazily here)

    c.data = iv.data_config([("llava_hound_300k", "video")])  # the original's only source
    c.data.buckets = [1152, 1536, 2048]  # every sample carries 1024 visual tokens

    # ---------------------------------------------------------------- training (SPEC §7)
    t = c.train
    t.num_samples = 300_000  # placeholder: samples of llava_hound_300k (set it to your count)
    t.epochs = 2  # the original's num_train_epochs for this recipe
    t.global_batch = b.get_ref("global_batch")
    t.total_steps = -(
        (-t.get_ref("num_samples") * t.get_ref("epochs")) // t.get_ref("global_batch")
    )
    # the original's loss: a token mean per device micro-batch (per_device_train_batch_size 8),
    # averaged over devices and accumulation steps; groups of 8 rows whatever this mesh is
    t.loss_normalization = "per_device_mean"
    t.loss_group_size = 8
    c.optimizer.lr = 2e-5  # AdamW, cosine, 3% warmup, no weight decay
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.optimizer.trainable = "ppllava_sft"  # LLM, BT-Adapter, projector MLP + CLIP projections
    return c
