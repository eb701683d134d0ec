"""Demo: a tiny PPLLaVA trained from scratch on the embedded synthetic video-QA task (CPU).

    python train.py --config configs/demo.py --workdir runs/demo

creates the dataset in ``runs/demo/data`` when missing (coloured shapes moving in short mp4
clips; multiple-choice questions, two of three types need the temporal order), trains every part
of a small PPLLaVA (vision tower with BT-Adapter, prompt-guided pooling, LLaMA decoder) and
reports the held-out multiple-choice accuracy at the end (chance: 25%).
Any field can be overridden: ``--config.train.total_steps=200``.
"""

import ml_collections

from ppllava_jax.data import pipeline, synthetic
from ppllava_jax.train import trainer

FRAMES = 8  # frames sampled per clip
SIZE = 48  # clip and tower resolution


def get_config() -> ml_collections.ConfigDict:
    c = trainer.default_config()

    # -- the synthetic dataset, created under <workdir>/data when `synthetic.dir` is empty
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.dir = ""  # "" = <workdir>/data
    c.synthetic.num_train = 3000  # training clips
    c.synthetic.num_eval = 300  # held-out clips
    c.synthetic.qtypes = synthetic.DEFAULT_QTYPES  # colour, first_colour, last_colour
    c.synthetic.frames = 16  # frames per clip
    c.synthetic.size = SIZE  # clip width = height
    c.synthetic.seed = 0

    # -- model: every size small enough for a 2-core CPU
    c.model = ml_collections.ConfigDict()
    c.model.vision = dict(
        image_size=SIZE,  # tower input = clip size
        patch_size=8,  # 6x6 patch grid
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    )
    c.model.clip_text = dict(
        vocab_size=1024,  # >= the synthetic CLIP tokenizer's ~700 (end-of-text = its largest id)
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,  # the questions are short
        projection_dim=64,
        eos_token_id=2,  # legacy rule: pool at the largest id (= end-of-text)
    )
    c.model.llm = dict(
        vocab_size=513,  # the synthetic LLaMA tokenizer: 512 pieces + <image>
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    c.model.image_token_index = 512  # <image> in the synthetic tokenizer
    c.model.pad_token_id = 3
    c.model.frame_shape = (6, 6)  # patch grid of one frame
    c.model.pooling = "ppllava"  # prompt-guided pooling
    # video: 8 frames x 6x6 patches -> one token per frame, the prompt-weighted mean of its
    # patches (few visual tokens: a from-scratch LLM finds them far sooner than 36)
    c.model.pooling_kernel = (1, 6, 6)
    c.model.pooling_stride = (1, 6, 6)
    c.model.image_pooling_kernel = (1, 2, 2)
    c.model.image_pooling_stride = (1, 2, 2)
    c.model.image_grid_pinpoints = ((SIZE, 2 * SIZE), (2 * SIZE, SIZE), (2 * SIZE, 2 * SIZE))
    c.model.btadapter = True
    c.model.btadapter_depth = 1
    c.model.vision_feature_layer = -1  # the last layer, so the one adapter layer is used
    c.model.max_T = 16
    c.model.extend_clip = False  # no Long-CLIP extension: 32 positions are plenty here
    c.model.scan_layers = True
    c.model.dtype = "float32"
    c.model.remat_policy = "none"

    c.init_from = ""  # a converted / start-point directory; "" = random initialisation

    # -- data (filled in from the synthetic dataset by train.py when sources is empty)
    c.data = pipeline.default_config()
    c.data.num_frames = FRAMES
    c.data.image_size = SIZE
    c.data.image_grid_pinpoints = [list(p) for p in c.model.image_grid_pinpoints]
    c.data.clip_max_length = 32
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

    # -- evaluation at the end of training: held-out multiple choice accuracy
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "eval"  # synthetic split scored at the end ("" = none)
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
