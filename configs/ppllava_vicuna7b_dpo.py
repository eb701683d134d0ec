"""PPLLaVA-7B DPO on top of the image + video SFT model (SPEC section 7).

Start point: the SFT run's export, ``<sft workdir>/final`` (``configs/
ppllava_vicuna7b_image_video.py``; converted layout with ``config.json``). Only the LLM trains
(``llm_only``); the reference is a frozen copy of the starting LLM, evaluated in the same jitted
step (no second optimizer state). Sigmoid DPO, beta 0.1, AdamW lr 5e-6, linear schedule with 10%
warmup, no weight decay.

Data: the original's LLaVA-Hound video preference set (``sft_dpo_17k.jsonl``, 17k pairs over the
LLaVA-Hound frame folders), converted to the annotation format with the preference on the last
turn (``ppllava_jax/data/pipeline.py``, "DPO")::

    [{"video": "<video id>", "QA": [{"q": prompt, "chosen": chosen, "rejected": rejected}]}, ...]

written to ``data/annotations/llava_hound_dpo_17k.json`` with the frame folders under
``data/media/llava_hound/``. ``data.dpo=True`` makes each pair two rows (chosen rows first,
then their rejected twins) that share one decoded video: the vision tower and the projector run
once per pair. Each twin is encoded as the original's ``train_dpo.py`` encodes it (LLaVA's
``preprocess_v1``: the Vicuna system prompt, ``USER: <image>\n{prompt} ASSISTANT: {answer}</s>``,
the answer and ``</s>`` supervised; ``ppllava_jax/data/dpo.py``); the CLIP prompt is the
question (the preferred answer is not shown to pooling).

Batch: ``data.batch_size`` counts pairs. The original used 64 pairs per update (2 per GPU x 4
accumulation x 8 GPUs) = 128 sequences, for 2 epochs; here 64 pairs = ``data.batch_size``
(per host) x hosts, i.e. 16 x 4 on a v5p-32 slice (16 chips), 2 micro-batches of 32 pairs =
2 pairs (4 sequences) per chip. Steps: ``ceil(train.num_samples x epochs / 64)`` =
``ceil(17000 x 2 / 64) = 532``; ``--config.train.num_samples=N`` recomputes it,
``--config.train.total_steps=S`` overrides it.

Single host (8 GPUs: 64 pairs per host, 8 micro-batches = 1 pair per GPU)::

    python train.py --config configs/ppllava_vicuna7b_dpo.py --workdir runs/dpo \\
        --config.init_from=runs/sft/final --config.data.batch_size=64 \\
        --config.train.grad_accum_steps=8

TPU pod (v5p-32, 4 hosts)::

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \\
        "cd ppllava-jax && python train.py --config configs/ppllava_vicuna7b_dpo.py \\
         --workdir gs://$BUCKET/runs/dpo --config.init_from=gs://$BUCKET/runs/sft/final"

Multi-GPU (SLURM, N nodes of 8 GPUs, 64 / N pairs per host)::

    srun --nodes=$N --ntasks-per-node=1 --gpus-per-node=8 \\
        python train.py --config configs/ppllava_vicuna7b_dpo.py --workdir /shared/runs/dpo \\
        --config.init_from=/shared/runs/sft/final --config.data.batch_size=$((64 / N)) \\
        --config.train.grad_accum_steps=$((8 / N))
"""

from __future__ import annotations

import ml_collections

from configs import common
from ppllava_jax.train.trainer import default_config

PAIRS_PER_UPDATE = 64  # the original: 2 per GPU x 4 accumulation x 8 GPUs
NUM_PAIRS = 17_000  # LLaVA-Hound sft_dpo_17k
EPOCHS = 2  # the original's num_train_epochs


def get_config() -> ml_collections.ConfigDict:
    c = default_config()  # train / optimizer / checkpoint / dpo sections
    c.model = common.vicuna7b_model()  # 7B, bf16 compute, remat, scanned layers, 32 frames
    common.mesh_and_batch(c)  # fsdp mesh; plan.py's batch section
    c.batch.global_batch = PAIRS_PER_UPDATE

    c.init_from = "runs/sft/final"  # the SFT export (placeholder path)

    d = c.data = common.data_config()  # 32 frames, 248-token CLIP prompts, as the SFT recipe
    d.sources = [
        dict(
            path=f"{common.ANNOTATIONS}/llava_hound_dpo_17k.json",
            data_root=f"{common.MEDIA}/llava_hound",
            media_type="video",
            weight=1.0,
            name="llava_hound_dpo_17k",
        )
    ]
    d.dpo = True  # 2 x batch_size rows: chosen rows, then their rejected twins
    # the original's train_dpo.py samples: LLaVA's preprocess_v1 with the Vicuna conversation
    # (its system prompt, "USER: <image>\n{prompt} ASSISTANT: {answer}</s>", ppllava_jax/data/
    # dpo.py), the CLIP prompt the question alone (text_encoding 'original', as common sets)
    d.template = "vicuna_v1"
    d.batch_size = PAIRS_PER_UPDATE // 4  # pairs per host: 4 hosts (v5p-32) x 16 = 64
    d.max_length = 2048  # the original's model_max_length; 1024 visual tokens + text
    d.buckets = [1152, 1536, 2048]  # video only
    d.fixed_groups = ("video",)

    t = c.train
    t.mode = "dpo"
    t.num_samples = NUM_PAIRS  # pairs in the preference set
    t.epochs = EPOCHS
    t.global_batch = c.batch.get_ref("global_batch")  # pairs per update = batch_size x hosts
    t.total_steps = -(
        (-t.get_ref("num_samples") * t.get_ref("epochs")) // t.get_ref("global_batch")
    )
    t.grad_accum_steps = 2  # 32-pair micro-batches: 2 pairs (4 sequences) per v5p chip
    t.log_every = 1
    t.loss_normalization = "per_device_mean"  # as the SFT recipe
    t.loss_group_size = 8
    t.loss_chunk_size = 512  # LM head + log-softmax over chunks: no [B, L, vocab] logits

    c.dpo.beta = 0.1

    o = c.optimizer
    o.lr = 5e-6
    o.schedule = "linear"
    o.warmup_ratio = 0.1
    o.warmup_steps = -1
    o.weight_decay = 0.0
    o.trainable = "llm_only"

    c.checkpoint.save_every = 40  # the original's save_steps
    c.checkpoint.keep = 5
    return c
