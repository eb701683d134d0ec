"""Shared by the data tests: a tiny PPLLaVA config for the synthetic set and a data config."""

import os

from ppllava_jax.models.config import CLIPVisionConfig, PPLLaVAConfig

BUCKETS = [48, 64, 96]


PINPOINTS = ((32, 64), (64, 32), (64, 64))


def tiny_model(image_token_index: int, pinpoints=PINPOINTS, pad_token_id: int = 3) -> PPLLaVAConfig:
    """32 x 32 tower, 4 x 4 patches; a video of T frames pools to (T/2) x 2 x 2 tokens."""
    return PPLLaVAConfig(
        vision=CLIPVisionConfig(image_size=32, patch_size=8, num_hidden_layers=2),
        frame_shape=(4, 4),
        btadapter_depth=1,
        pooling="ppllava",
        pooling_kernel=(2, 2, 2),
        pooling_stride=(2, 2, 2),
        image_pooling_kernel=(1, 2, 2),
        image_pooling_stride=(1, 2, 2),
        image_grid_pinpoints=tuple(pinpoints),
        image_token_index=image_token_index,
        pad_token_id=pad_token_id,
    )


def data_cfg(out: str, split: str = "train", **kw) -> dict:
    """A data config over ``out/<split>.json`` of the synthetic set (4 frames, small buckets)."""
    c = dict(
        sources=[dict(path=os.path.join(out, f"{split}.json"), data_root=out)],
        tokenizer=os.path.join(out, "tokenizer"),
        clip_tokenizer=os.path.join(out, "clip_tokenizer"),
        num_frames=4,
        clip_max_length=32,
        max_length=96,
        buckets=BUCKETS,
        batch_size=4,
        prefetch_batches=0,
        seed=1,
    )
    c.update(kw)
    return c


def tiny_qwen_model(image_token_index: int, pad_token_id: int = 0) -> PPLLaVAConfig:
    """The Qwen2 + SigLIP family (``qwen=True``: SigLIP towers, no BT-Adapter) at the size of
    :func:`tiny_model` (32 x 32 tower, 4 x 4 patches, the same pooling); its SigLIP text tower
    has the 7B recipe's 196 positions."""
    from ppllava_jax.models.config import SiglipTextConfig, SiglipVisionConfig

    return PPLLaVAConfig(
        qwen=True,
        vision=SiglipVisionConfig(image_size=32, patch_size=8, num_hidden_layers=2),
        clip_text=SiglipTextConfig(max_position_embeddings=196, extended=True),
        btadapter=False,
        frame_shape=(4, 4),
        pooling="ppllava",
        pooling_kernel=(2, 2, 2),
        pooling_stride=(2, 2, 2),
        image_pooling_kernel=(1, 2, 2),
        image_pooling_stride=(1, 2, 2),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=image_token_index,
        pad_token_id=pad_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
