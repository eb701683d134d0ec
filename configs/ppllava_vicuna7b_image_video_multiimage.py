"""PPLLaVA-7B image + video + multi-image SFT: the original's
``config/vicuna/ppllava_vicuna7b_image_video_multiimage.yaml``, the checkpoint its Video-MME
script evaluates.

It is the image + video recipe (``configs/ppllava_vicuna7b_image_video.py``: start point, global
batch 128, one epoch, lr 2e-5 cosine with 3% warmup, the SFT trainable set, launches) with one
more source, first in the mixture as in the yaml::

    m4_multi_image         multi-image  M4-Instruct multi-image samples (LLaVA-NeXT-Interleave)

``data/annotations/m4_multi_image.json`` with the images under ``data/media/m4_multi_image/``
(placeholder paths: point them at your copies). A sample names its images as the original
reads them, ``"multi-image": [paths]`` (or ``"image": [paths]``); they are read as a frame
folder (paths sorted), up to 32 of them, each pooled to 8 x 8 = 64 tokens (the image pooling
kernel (1, 3, 3)), so a sample of 32 images holds 2,048 visual tokens: the longest bucket is
3,072 tokens. Every batch holds a multi-image group (``data.fixed_groups``; the same shapes on
every host).

Steps: ``--config.train.num_samples=N`` (samples in one epoch of the mixture) sets
``train.total_steps`` = ceil(N / 128), as in the image + video recipe::

    python train.py --config configs/ppllava_vicuna7b_image_video_multiimage.py \\
        --workdir runs/sft_multi --config.train.num_samples=N

Memory before renting a slice::

    python -m ppllava_jax.plan --config configs/ppllava_vicuna7b_image_video_multiimage.py \\
        --devices 16 --mesh fsdp=16 --batch-per-device 2,4 --hbm-gib 95
"""

from __future__ import annotations

import ml_collections

from configs import common

# placeholder: the image + video mixture's ~800k samples + the M4-Instruct multi-image ones
NUM_SAMPLES = 1_400_000
MAX_IMAGES = 32  # the original's raw-frame reader keeps at most 32 images of a sample


def get_config() -> ml_collections.ConfigDict:
    c = common.image_video_sft(common.MULTI_IMAGE + common.MIXTURE, NUM_SAMPLES)
    d = c.data
    d.max_images = MAX_IMAGES
    # 32 images x 64 visual tokens + the text (the other groups' lengths as in image + video)
    d.max_length = 3072
    d.buckets = [640, 1152, 1536, 2048, 3072]
    return c
