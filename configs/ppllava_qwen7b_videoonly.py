"""PPLLaVA-Qwen2-7B (SigLIP-so400m, no BT-Adapter), video-only SFT: the original's
``config/qwen/ppllava_qwen7b_videoonly.yaml``.

The original recipe: start from LLaVA-OneVision-Qwen2-7B-SI, prompt-guided pooling read by
SigLIP-so400m-patch14-384 (text tower extended 64 -> 196 positions), pooling (2,3,3) for videos
and (1,3,3) for images, 27x27-patch frames, template ``plain_qwen``; data ``llava_hound_300k``
(32 frames, raw frames); 1 epoch, AdamW lr 1e-5, no weight decay, cosine, 3% warmup, bf16,
gradient checkpointing, 8 per device x 2 accumulation (x 8 GPUs = 128), the loss a token mean
per device micro-batch of 8 (``train.loss_normalization``); trainable: the LLM
(``freeze_LLM: False``), the whole projector (MLP, SigLIP text tower, SigLIP head, post-LN)
except ``logit_scale``/``logit_bias`` and the text tower's kept position table
(``position_embedding``, ``requires_grad=False`` in the original's context extension; its
``position_embedding_res`` trains), ``image_newline``; the SigLIP vision tower frozen. Training
samples as the original's ``Interleave_sft_dataset`` builds them with its Qwen switch
(``data.text_encoding='original'``: the ``plain_qwen`` text verbatim, split at
``<|im_start|>assistant\n``, the SigLIP prompt the whole conversation, unpadded).

Build the start point, plan the memory, train::

    python convert_torch_weights.py --source hf/llava-onevision-qwen2-7b-si-hf \
        --clip hf/siglip-so400m-patch14-384 --output ckpt/ppllava_qwen_start
    python -m ppllava_jax.plan --config configs/ppllava_qwen7b_videoonly.py \
        --devices 8 --mesh fsdp=8 --batch-per-device 1,2 --hbm-gib 80
    python train.py --config configs/ppllava_qwen7b_videoonly.py --workdir runs/sft_qwen

(TPU pod and SLURM launches as in ``configs/ppllava_vicuna7b_image_video.py``.)
"""

from __future__ import annotations

import ml_collections

from configs import common
from ppllava_jax.train.trainer import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.preset = "ppllava_qwen7b"  # train.model_config.preset_model_config -> ppllava_qwen7b_config()
    m.dtype = "bfloat16"  # compute dtype (softmax/norms/loss stay f32)
    m.param_dtype = "float32"
    m.scan_layers = True
    m.remat_policy = "full"  # gradient checkpointing, as the original
    m.attention_impl = "auto"  # blockwise / cudnn / splash per backend (configs/common.py)
    m.llm_layers = 28  # Qwen2-7B decoder layers
    m.vocab_size = 152128  # llava-onevision-qwen2-7b-si-hf (read from init_from when set)
    m.num_frames = common.FRAMES  # frames per video, 384x384, 27x27 patches each
    m.clip_length = 196  # SigLIP prompt tokens (64 extended to 196)

    # ---------------------------------------------------------------- mesh and batch
    # fsdp = ZeRO-3 as the original's deepspeed zero3.json; global batch 128 = 8 per device x 2
    # accumulation x 8 GPUs in the original; 2048 tokens = 1296 visual (16 x 9 x 9) + text
    common.mesh_and_batch(c)
    b = c.batch

    # ---------------------------------------------------------------- start point and data
    c.init_from = "ckpt/ppllava_qwen_start"  # the converted start point; "" = random init
    d = c.data = common.data_config(common.HOUND)
    d.tokenizer = "hf/llava-onevision-qwen2-7b-si-hf"  # Qwen2 tokenizer, <image> = 151646
    d.clip_tokenizer = "hf/siglip-so400m-patch14-384"  # SigLIP's SentencePiece, </s> = 1
    d.template = "plain_qwen"  # <|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n
    d.tokenizer_legacy = None  # byte-level BPE: no Llama pre-tokenization switch
    # the original's training samples (Interleave_sft_dataset, qwen): plain_qwen text verbatim,
    # each '<|im_start|>assistant\n' piece tokenized alone, answers + <|im_end|> + "\n"
    # supervised, the SigLIP prompt the whole rendered conversation
    d.text_encoding = "original"
    d.clip_max_length = 196  # training: the conversation unpadded, truncated; eval: padded
    d.buckets = [1536, 2048]  # every sample carries 1296 visual tokens

    # ---------------------------------------------------------------- training (the yaml)
    c.train.num_samples = 300_000  # placeholder: samples in one epoch of llava_hound_300k
    c.train.global_batch = b.get_ref("global_batch")
    # the original's loss: a token mean per device micro-batch (per_device_train_batch_size 8),
    # averaged over devices and accumulation steps; groups of 8 rows whatever this mesh is
    c.train.loss_normalization = "per_device_mean"
    c.train.loss_group_size = 8
    c.train.total_steps = -((-c.train.get_ref("num_samples")) // c.train.get_ref("global_batch"))
    # the LM head and cross entropy over 512-position chunks: no float32 [B, L, vocab] logits
    # (same values and gradients; docs/plan_figures.md)
    c.train.loss_chunk_size = 512
    c.optimizer.lr = 1e-5  # learning_rate: 1e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    # LLM + projector (MLP, SigLIP text tower and head, post-LN) + image_newline; frozen: the
    # SigLIP vision tower, logit_scale, logit_bias and the text tower's kept position table
    # (requires_grad False in the original; position_embedding_res trains)
    c.optimizer.trainable = (r"^language_model/", r"^multi_modal_projector/", r"^image_newline$")
    c.optimizer.frozen = (
        r"(^|/)logit_(scale|bias)$",
        r"^multi_modal_projector/clip_text_model/embeddings/position_embedding$",
    )
    return c
