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

from configs import ppllava_vicuna7b_videoonly as videoonly
from ppllava_jax.data import pipeline
from ppllava_jax.layout import GROUPS

GLOBAL_BATCH = 128  # SPEC section 7
NUM_SAMPLES = 800_000  # placeholder: ~300k images + ~300k LLaVA-Hound + ~200k VideoChat2-IT
ANNOTATIONS = "data/annotations"  # placeholder roots: point them at your copies
MEDIA = "data/media"

# (name, media type) of the original image + video mixture, weight 1 each
MIXTURE = (
    ("llava_v1p5_300k", "image"),
    ("llava_hound_300k", "video"),
    ("classification_k400", "video"),
    ("classification_ssv2", "video"),
    ("reasoning_next_qa", "video"),
    ("reasoning_clevrer_qa", "video"),
    ("reasoning_clevrer_mc", "video"),
)


def sources(mixture=MIXTURE) -> list[dict]:
    """``data.sources`` entries of a mixture (placeholder paths, see the module docstring)."""
    return [
        dict(
            path=f"{ANNOTATIONS}/{name}.json",
            data_root=f"{MEDIA}/{name}",
            media_type=kind,
            weight=1.0,
            name=name,
        )
        for name, kind in mixture
    ]


def data_config(mixture=MIXTURE) -> ml_collections.ConfigDict:
    """The data section shared by the 7B recipes: 32 frames, 248-token CLIP prompts."""
    d = pipeline.default_config()
    d.sources = sources(mixture)
    # the same arrays on every host (multi-host): each group of the mixture in every batch
    kinds = {"video": "video", "image": "image", "multi-image": "multi"}
    d.fixed_groups = tuple(g for g in GROUPS if g in {kinds[k] for _, k in mixture})
    d.tokenizer = "hf/llava-v1.6-vicuna-7b-hf"  # LLaMA tokenizer with <image> = 32000
    d.clip_tokenizer = "hf/clip-vit-large-patch14-336"
    d.template = "plain_v1"
    # the released Vicuna tokenizer's pre-tokenization (a '▁' after each special token) and the
    # original's training samples (Interleave_sft_dataset: ids, labels, CLIP text)
    d.tokenizer_legacy = True
    d.text_encoding = "original"
    d.num_frames = 32  # (32/2) x (24/3) x (24/3) = 1024 visual tokens per video
    d.clip_max_length = 248  # Long-CLIP positions; the whole conversation, truncated
    # Merged lengths: an any-resolution image is <= 64 + 16 x 17 = 336 tokens, a video 1024,
    # plus the text (the original capped the text at 1024 tokens). A mixed batch is padded to
    # the smallest bucket that fits its longest sample: image-only ~640, most video batches
    # 1152, long conversations 1536 / 2048; longer samples are skipped (counted).
    d.max_length = 2048
    d.buckets = [640, 1152, 1536, 2048]
    d.batch_size = GLOBAL_BATCH // 4  # per host: 4 hosts (v5p-32) x 32 = 128
    d.num_epochs = 0  # repeat; the schedule (1 epoch of steps) ends the run
    d.num_workers = 8  # decoding processes per host (32-frame videos are the bottleneck)
    d.read_threads = 2
    d.worker_buffer = 4
    d.prefetch_batches = 2
    return d


def get_config() -> ml_collections.ConfigDict:
    # model (7B, bf16 compute, remat, scanned layers), mesh (fsdp) and batch sections, and the
    # trainer's train / optimizer / checkpoint / dpo sections
    c = videoonly.get_config()

    c.init_from = "ckpt/ppllava_start"  # convert_torch_weights.py output (module docstring)
    c.data = data_config()

    # -------------------------------------------------------- schedule: 1 epoch (SPEC §7)
    c.train.mode = "sft"
    c.train.num_samples = NUM_SAMPLES  # samples in one epoch of the mixture (read by nothing
    #                                    but the step count below)
    c.train.global_batch = GLOBAL_BATCH  # = data.batch_size x hosts (documentation + the count)
    c.train.total_steps = -((-c.train.get_ref("num_samples")) // c.train.get_ref("global_batch"))
    c.train.epochs = 1  # the original's num_train_epochs (the video-only recipe's is 2)
    c.train.grad_accum_steps = 2  # 64-sample micro-batches: 4 per v5p chip
    # the original's loss: token mean per group of 8 rows (its per-device micro-batch), averaged
    c.train.loss_normalization = "per_device_mean"
    c.train.loss_group_size = 8
    c.train.log_every = 10

    # -------------------------------------------------------- optimizer (SPEC §7)
    o = c.optimizer
    o.lr = 2e-5
    o.schedule = "cosine"
    o.warmup_ratio = 0.03  # 3% of total_steps
    o.warmup_steps = -1
    o.weight_decay = 0.0
    o.grad_clip_norm = 1.0  # the original's HF Trainer default max_grad_norm
    o.trainable = "ppllava_sft"  # LLM, BT-Adapter, projector MLP/LN/projections, image_newline

    c.checkpoint.save_every = 500
    c.checkpoint.keep = 2
    return c
