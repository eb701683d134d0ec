"""Sections shared by the recipes in ``configs/``: each recipe file builds on these and states
only what is its own. (Configs import only ``ppllava_jax``, ``ml_collections`` and this module,
never each other; ``tests/test_layers.py`` checks it. ``train.py``/``eval.py`` load a config by
its path, and ``from configs import common`` resolves through the repository root, which is on
``sys.path`` when they run.)

- The 7B recipes (``ppllava_vicuna7b_*.py``, ``ppllava_qwen7b_videoonly.py``): the frame count,
  the global batch, the annotation mixture and data section, the Vicuna-7B model section, the
  mesh and planning-batch sections.
- The demos (``demo.py``, ``demo_qwen.py``): the synthetic task, data, evaluation, mesh and
  schedule; each demo adds its model.
"""

from __future__ import annotations

import ml_collections

from ppllava_jax.data import pipeline, synthetic
from ppllava_jax.layout import GROUPS
from ppllava_jax.train import trainer

# ==================================================================== the 7B recipes

FRAMES = 32  # frames per video in every 7B recipe (the original's; 1024 Vicuna visual tokens)
GLOBAL_BATCH = 128  # SPEC section 7
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
HOUND = (("llava_hound_300k", "video"),)  # the video-only recipes' one source
# the multi-image recipe's extra source (M4-Instruct, first in the original's mixture)
MULTI_IMAGE = (("m4_multi_image", "multi-image"),)


def sources(mixture=MIXTURE) -> list[dict]:
    """``data.sources`` entries of a mixture (placeholder paths under ``ANNOTATIONS`` and
    ``MEDIA``, see ``configs/ppllava_vicuna7b_image_video.py``)."""
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
    """The data section of the 7B recipes: 32 frames, 248-token CLIP prompts, the Vicuna
    tokenizer and template (the Qwen recipe replaces the text settings)."""
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
    d.num_frames = FRAMES  # (32/2) x (24/3) x (24/3) = 1024 visual tokens per video
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


def vicuna7b_model() -> ml_collections.ConfigDict:
    """The model section of the Vicuna-7B recipes (read by ``train/model_config`` and
    ``plan.py``; a converted ``init_from`` directory's config.json takes precedence)."""
    m = ml_collections.ConfigDict()
    m.preset = "ppllava_vicuna7b"  # PPLLaVAConfig() (7B defaults)
    m.dtype = "bfloat16"  # compute dtype of activations/matmuls (softmax/norms/loss stay f32)
    m.param_dtype = "float32"  # parameter storage (and so optimizer moments) dtype
    m.scan_layers = True  # nn.scan over repeated layers: compile time flat in depth
    m.remat_policy = "full"  # none | full | dots | dots_no_batch (gradient checkpointing)
    # auto: cuDNN flash attention on NVIDIA, splash on TPU where it applies, else the
    # reference XLA path for small score tensors and blockwise (O(S) memory) for large ones:
    # the 32-frame CLIP / BT-Adapter layers and the 2048-token LLM (docs/plan_figures.md)
    m.attention_impl = "auto"
    m.llm_layers = 32  # Vicuna-7B decoder layers (lower it only for experiments)
    m.vocab_size = 32064  # llava-v1.6-vicuna-7b vocabulary (32000 + added tokens, padded)
    m.num_frames = FRAMES  # frames per video, each 336x336 (the start point's max_T = 64)
    m.clip_length = 248  # CLIP prompt tokens (Long-CLIP positions; the conversation, truncated)
    return m


def mesh_and_batch(c: ml_collections.ConfigDict) -> None:
    """The mesh section and ``plan.py``'s batch section of the 7B recipes, set on ``c``."""
    mesh = c.mesh = ml_collections.ConfigDict()
    mesh.data = 1  # pure data parallel (replicated parameters); within a slice
    mesh.fsdp = -1  # data parallel + parameter/optimizer sharding (ZeRO-3); -1 = the rest
    mesh.tensor = 1  # Megatron tensor parallel over heads / MLP / vocabulary
    mesh.dcn_data = 1  # slices (multi-slice TPU) or nodes stacked on `data` over the slow network

    b = c.batch = ml_collections.ConfigDict()
    b.per_device = 1  # samples per device per micro-batch (global = per_device * devices)
    b.global_batch = GLOBAL_BATCH  # grad_accum_steps = global / (per_device * devices)
    b.max_length = 2048  # merged sequence: a 32-frame video's visual tokens + text, padded


def image_video_sft(mixture=MIXTURE, num_samples: int = 800_000) -> ml_collections.ConfigDict:
    """The image + video SFT recipe on ``mixture`` (``configs/ppllava_vicuna7b_image_video.py``,
    the original's ``ppllava_vicuna7b_image_video.yaml``; the multi-image recipe adds
    ``MULTI_IMAGE`` to it): one epoch of ``num_samples`` samples, global batch 128, lr 2e-5
    cosine with 3% warmup, the SFT trainable set."""
    c = trainer.default_config()  # train / optimizer / checkpoint / dpo sections
    c.model = vicuna7b_model()  # 7B, bf16 compute, remat, scanned layers, 32 frames
    mesh_and_batch(c)  # fsdp mesh; plan.py's batch section

    c.init_from = "ckpt/ppllava_start"  # convert_torch_weights.py output (module docstring)
    c.data = data_config(mixture)

    # -------------------------------------------------------- schedule: 1 epoch (SPEC §7)
    c.train.mode = "sft"
    c.train.num_samples = num_samples  # samples in one epoch of the mixture (read by nothing
    #                                    but the step count below)
    # = data.batch_size x hosts (documentation + the count)
    c.train.global_batch = c.batch.get_ref("global_batch")
    c.train.total_steps = -((-c.train.get_ref("num_samples")) // c.train.get_ref("global_batch"))
    c.train.epochs = 1  # the original's num_train_epochs (the video-only recipe's is 2)
    c.train.grad_accum_steps = 2  # 64-sample micro-batches: 4 per v5p chip
    # the original's loss: token mean per group of 8 rows (its per-device micro-batch), averaged
    # the LM head and cross entropy over 512-position chunks: no float32 [B, L, vocab] logits
    # (same values and gradients; docs/plan_figures.md)
    c.train.loss_chunk_size = 512
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


# ==================================================================== the demos

DEMO_FRAMES = 8  # frames sampled per clip
DEMO_SIZE = 48  # clip and tower resolution
# the vision tower of both demos (CLIP + BT-Adapter, SigLIP): every size small for a 2-core CPU
DEMO_VISION = dict(
    image_size=DEMO_SIZE,  # tower input = clip size
    patch_size=8,  # 6x6 patch grid
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def demo_task() -> ml_collections.ConfigDict:
    """Everything of the demos but the model: the synthetic dataset, the data section, the
    end-of-training evaluation, the mesh and the schedule (``configs/demo.py``)."""
    c = trainer.default_config()

    # -- the synthetic dataset, created under <workdir>/data when `synthetic.dir` is empty
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.dir = ""  # "" = <workdir>/data
    c.synthetic.num_train = 3000  # training clips
    c.synthetic.num_eval = 300  # held-out clips
    c.synthetic.qtypes = synthetic.DEFAULT_QTYPES  # colour, first_colour, last_colour
    # training clips that also get a 2-3 turn conversation (train.json, beside their one-turn
    # question); every held-out clip gets one (eval_multiturn.json)
    c.synthetic.multiturn_fraction = synthetic.MULTITURN_FRACTION
    c.synthetic.frames = 16  # frames per clip
    c.synthetic.size = DEMO_SIZE  # clip width = height
    c.synthetic.seed = 0

    c.init_from = ""  # a converted / start-point directory; "" = random initialisation

    # -- data (filled in from the synthetic dataset by train.py when sources is empty)
    c.data = pipeline.default_config()
    c.data.num_frames = DEMO_FRAMES
    c.data.clip_max_length = 32  # evaluation prompts padded to it (the questions are short)
    c.data.clip_prompt = "question"  # the conversation holds the answer (see pipeline.py)
    # answers-only labels on the whole text: the demo scores a prompt ending in "ASSISTANT:",
    # while the original's encoding leaves an unsupervised "▁" token after it (pipeline.py)
    c.data.text_encoding = "offsets"
    c.data.max_length = 64  # ~48 text tokens + 8 visual tokens
    c.data.buckets = [64]
    c.data.fixed_groups = ("video",)  # every batch has its video group (multi-host shapes)
    c.data.batch_size = 32
    c.data.num_workers = 0
    c.data.prefetch_batches = 2

    # -- evaluation at the end of training: held-out multiple choice accuracy, and the later
    # turns of the held-out conversations asked as the chat asks them
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "eval"  # synthetic split scored at the end ("" = none: nothing scored)
    c.eval.multiturn_split = synthetic.MULTITURN_SPLIT  # scored with it ("" = not)
    c.eval.batch_size = 48
    c.eval.max_new_tokens = 4

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    # ~0.7 s/step on 2 CPU cores (data decoding included); the loss falls below 0.05 around step
    # 200-250, held-out accuracy 100%. Data + training + export + scoring: ~5.5 minutes.
    c.train.total_steps = 400
    c.train.log_every = 25
    c.train.seed = 0
    c.optimizer.trainable = "all"  # from scratch: train everything (the recipe freezes CLIP)
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 40
    c.optimizer.weight_decay = 0.0
    c.checkpoint.save_every = 200
    c.checkpoint.keep = 2
    return c
