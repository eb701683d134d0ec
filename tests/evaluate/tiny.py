"""A tiny random PPLLaVA checkpoint with real tokenizers, for the tests.

    make_tiny_checkpoint(ckpt_dir, data_dir)

writes the synthetic demo dataset to ``data_dir`` (8 train / 8 eval clips, 8 frames, 32 px)
when it is not there, and a randomly initialised PPLLaVA whose vocabularies match its
tokenizers to ``ckpt_dir`` in the layout ``eval.py`` and ``ppllava_jax.chat`` read
(``config.json``, ``params/``, ``tokenizer/``, ``clip_tokenizer/``). The answers are random;
only the plumbing is exercised.
"""

from __future__ import annotations

import os
import shutil

import jax

SIZE = 32
FRAMES = 8


def tiny_config(vocab: int, image_token: int, clip_vocab: int):
    from ppllava_jax.models.config import (
        CLIPTextConfig,
        CLIPVisionConfig,
        LlamaConfig,
        PPLLaVAConfig,
    )

    return PPLLaVAConfig(
        vision=CLIPVisionConfig(
            image_size=SIZE,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=16,
        ),
        clip_text=CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=clip_vocab - 2,
            eos_token_id=2,
            pad_token_id=clip_vocab - 1,
        ),
        llm=LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_index=image_token,
        pad_token_id=3,
        frame_shape=(SIZE // 8, SIZE // 8),
        pooling="ppllava",
        pooling_kernel=(2, 2, 2),
        pooling_stride=(2, 2, 2),
        image_pooling_kernel=(1, 2, 2),
        image_pooling_stride=(1, 2, 2),
        image_grid_pinpoints=((SIZE, 2 * SIZE), (2 * SIZE, SIZE)),
        btadapter=True,
        btadapter_depth=1,
        max_T=16,
        extend_clip=False,
    )


def make_tiny_checkpoint(ckpt_dir: str, data_dir: str, seed: int = 0, **dataset) -> str:
    """``dataset``: further ``synthetic.ensure_dataset`` arguments (e.g. multiturn_fraction)."""
    from transformers import AutoTokenizer

    from ppllava_jax.convert import params_io
    from ppllava_jax.convert.ppllava_config import ppllava_config_to_hf
    from ppllava_jax.data import synthetic
    from ppllava_jax.models.ppllava import init_params

    sizes = {"num_train": 8, "num_eval": 8, "frames": FRAMES, "size": SIZE}
    synthetic.ensure_dataset(data_dir, **{**sizes, **dataset})
    tok = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    ctok = AutoTokenizer.from_pretrained(os.path.join(data_dir, "clip_tokenizer"))
    cfg = tiny_config(len(tok), tok.convert_tokens_to_ids("<image>"), len(ctok))
    import flax.linen as nn

    params = jax.jit(lambda r: nn.unbox(init_params(cfg, r)))(jax.random.PRNGKey(seed))
    params_io.save_params(ckpt_dir, jax.device_get(params), "ppllava", ppllava_config_to_hf(cfg))
    for name in ("tokenizer", "clip_tokenizer"):
        shutil.copytree(
            os.path.join(data_dir, name), os.path.join(ckpt_dir, name), dirs_exist_ok=True
        )
    return os.fspath(ckpt_dir)
