"""Demo of the Qwen2 + SigLIP family: a tiny PPLLaVA-Qwen trained from scratch on the embedded
synthetic video-QA task (CPU), the same task and accuracy bar as ``configs/demo.py``.

    python train.py --config configs/demo_qwen.py --workdir runs/demo_qwen

creates the dataset in ``runs/demo_qwen/data`` when missing, plus a tiny Qwen2-style tokenizer
trained on its text (``data/qwen_tokenizer.py``: ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ``<image>`` after the ordinary ids), and trains every part of a small
PPLLaVA-Qwen: a SigLIP vision tower (no class token, no BT-Adapter, every patch of the last
layer), prompt-guided pooling read by a SigLIP text tower (bidirectional, last position through
its head, no mask; the prompt unpadded in training, padded in evaluation) and SigLIP's attention
head's value path, a Qwen2 decoder (grouped-query attention, q/k/v bias, rope_theta 1e6, untied
head), the ``plain_qwen`` template. Reports the held-out multiple-choice accuracy (chance 25%)
and that of the held-out conversations' later turns.
"""

import ml_collections

from configs import common

SIZE = common.DEMO_SIZE
QWEN_VOCAB = 400  # ordinary ids of the trained Qwen-style tokenizer; 5 special ids follow


def get_config() -> ml_collections.ConfigDict:
    c = common.demo_task()  # dataset, data, evaluation, mesh and schedule as the Vicuna demo
    c.synthetic.llm_tokenizer = "qwen"  # train DATA/qwen_tokenizer and use it as data.tokenizer
    c.synthetic.qwen_vocab_size = QWEN_VOCAB

    m = c.model = ml_collections.ConfigDict()
    m.qwen = True  # SigLIP towers + Qwen2 (PPLLaVAConfig.qwen)
    # SigLIP vision tower of the Vicuna demo's size; no head, as LLaVA-OneVision's tower (the
    # projector has its own)
    m.vision = dict(common.DEMO_VISION, vision_use_head=False)
    m.clip_text = dict(  # SigLIP text tower of the prompt-guided pooling
        vocab_size=1024,  # >= the synthetic CLIP-style prompt tokenizer's ~700 ids
        hidden_size=64,  # = the vision width: cosine of text and patch embeddings
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,  # the questions are short
    )
    m.llm = dict(  # Qwen2
        vocab_size=QWEN_VOCAB + 5,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=512,
        bos_token_id=QWEN_VOCAB,  # <|endoftext|> (Qwen2 has no BOS; unused)
        eos_token_id=QWEN_VOCAB + 2,  # <|im_end|>: generation stops there
        pad_token_id=QWEN_VOCAB,  # <|endoftext|>
    )
    m.image_token_index = QWEN_VOCAB + 3  # <image>
    m.pad_token_id = QWEN_VOCAB
    m.frame_shape = (6, 6)
    m.vision_feature_layer = -1  # LLaVA-OneVision: the last layer, before post_layernorm
    m.vision_feature_select_strategy = "full"  # every patch (SigLIP has no class token)
    m.pooling = "ppllava"
    m.pooling_kernel = (1, 6, 6)  # as the Vicuna demo: one prompt-pooled token per frame
    m.pooling_stride = (1, 6, 6)
    m.image_pooling_kernel = (1, 2, 2)
    m.image_pooling_stride = (1, 2, 2)
    m.image_grid_pinpoints = ((SIZE, 2 * SIZE), (2 * SIZE, SIZE), (2 * SIZE, 2 * SIZE))
    m.btadapter = False  # the Qwen variant has none
    m.max_T = 16
    m.extend_clip = False  # 32 positions are plenty here (the 7B recipe extends 64 -> 196)
    m.scan_layers = True
    m.dtype = "float32"
    m.remat_policy = "none"

    c.data.template = "plain_qwen"  # training CLIP prompts unpadded, evaluation ones padded
    # the 400-id tokenizer splits words finely: a 3-turn conversation is ~100 tokens (+ 8 visual),
    # so batches holding one are padded to 112 (single turns: 64)
    c.data.max_length = 112
    c.data.buckets = [64, 112]
    return c
