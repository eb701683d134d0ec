"""PPLLaVA-7B image + video SFT: the paper's main recipe (SPEC section 7).

Start point: LLaVA-NeXT-Vicuna-7B with the CLIP ViT-L/14-336 text tower (prompt-guided pooling)
and a fresh BT-Adapter, converted once::

    python convert_torch_weights.py --source hf/llava-v1.6-vicuna-7b-hf \\
        --clip hf/clip-vit-large-patch14-336 --output ckpt/ppllava_start

(``--source``/``--clip``: local copies of ``llava-hf/llava-v1.6-vicuna-7b-hf`` and
``openai/clip-vit-large-patch14-336``; their tokenizers are ``data.tokenizer`` and
``data.clip_tokenizer``.)

Data layout (the original's mixture, each file in the annotation format of
``ppllava_jax/data/annotations.py``; the VideoChat2-IT files are used as released, the others
converted to it): ``data/annotations/<name>.json`` with media under ``data/media/<name>/``::

    llava_v1p5_300k        image        LLaVA-1.5 665k subset (COCO, VG, GQA, OCR-VQA images)
    llava_hound_300k       video        LLaVA-Hound video instructions (frame folders)
    classification_k400    video        VideoChat2-IT video/classification/k710 (Kinetics)
    classification_ssv2    video        VideoChat2-IT video/classification/ssv2
    reasoning_next_qa      video        VideoChat2-IT video/reasoning/next_qa
    reasoning_clevrer_qa   video        VideoChat2-IT video/reasoning/clevrer_qa
    reasoning_clevrer_mc   video        VideoChat2-IT video/reasoning/clevrer_mc

Every source has weight 1.0 (the original concatenates them: one epoch reads each sample once).

Steps: one epoch = ``train.num_samples`` samples (all sources x weights; set it to your count,
e.g. ``Pipeline(cfg.data, model_cfg).order.global_length(0)``) / 128 per update, rounded up.
``train.total_steps`` follows ``--config.train.num_samples=N`` automatically (a config
reference); ``--config.train.total_steps=S`` overrides it outright.

Global batch 128 (SPEC section 7) = ``data.batch_size`` (per host) x hosts; the trainer splits
each update into ``train.grad_accum_steps`` micro-batches, so a device holds
``data.batch_size x hosts / (devices x grad_accum_steps)`` samples at once. The defaults are
for a TPU v5p-32 slice (16 chips, 4 hosts): 32 per host x 4 hosts = 128, 2 micro-batches of 64
= 4 per chip (``docs/plan_figures.md``: 4 x 32-frame videos per v5p chip fit).

Single host (one 8xH100 machine: 128 per host, 8 micro-batches of 16 = 2 per GPU)::

    python train.py --config configs/ppllava_vicuna7b_image_video.py --workdir runs/sft \\
        --config.data.batch_size=128 --config.train.grad_accum_steps=8

TPU pod (v5p-32, 4 hosts; every host runs the same command, JAX finds its peers)::

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \\
        "cd ppllava-jax && python train.py --config configs/ppllava_vicuna7b_image_video.py \\
         --workdir gs://$BUCKET/runs/sft --config.data.batch_size=32 \\
         --config.train.grad_accum_steps=2"

Multi-GPU (SLURM, N nodes of 8 GPUs, one process per node, 128 / N per host, 2 per GPU;
``jax.distributed`` reads the SLURM environment)::

    srun --nodes=$N --ntasks-per-node=1 --gpus-per-node=8 \\
        python train.py --config configs/ppllava_vicuna7b_image_video.py \\
        --workdir /shared/runs/sft --config.data.batch_size=$((128 / N)) \\
        --config.train.grad_accum_steps=$((8 / N))

The DPO stage (``configs/ppllava_vicuna7b_dpo.py``) starts from ``<workdir>/final``.
"""

from __future__ import annotations

import ml_collections

from configs import common

NUM_SAMPLES = 800_000  # placeholder: ~300k images + ~300k LLaVA-Hound + ~200k VideoChat2-IT


def get_config() -> ml_collections.ConfigDict:
    return common.image_video_sft(common.MIXTURE, NUM_SAMPLES)
