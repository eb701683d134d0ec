"""The CLIP prompts' padding: prompts are right-padded to a fixed length (248 positions in the
original); training cuts each batch's to its longest real prompt (``train.batches``).

    <group>_clip_ids / <group>_clip_mask  int32[N_g, Lc]  (``data.collate``)
"""

from __future__ import annotations

import numpy as np

from ppllava_jax.layout import GROUPS


def clip_prompt_length(batch: dict[str, np.ndarray]) -> int:
    """The longest CLIP prompt of ``batch``: 1 + the last attended position of every group's
    ``<group>_clip_mask`` (0 when no group has a prompt)."""
    n = 0
    for g in GROUPS:
        mask = batch.get(f"{g}_clip_mask")
        if mask is not None and mask.size:
            real = np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0)
            n = max(n, int(np.flatnonzero(real)[-1]) + 1 if real.any() else 0)
    return n


def trim_clip_prompts(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """``batch`` with every ``<group>_clip_ids`` / ``<group>_clip_mask`` cut to ``length``
    positions (prompts are right-padded: positions past ``clip_prompt_length`` are padding).

    Exact for the prompt encoders of both families: the CLIP text tower is causal and pools at a
    real token, SigLIP's attention masks the padding, so no real token sees a cut position."""
    need = clip_prompt_length(batch)
    if length < need:
        raise ValueError(f"a CLIP prompt has {need} tokens, more than length={length}")
    out = dict(batch)
    for g in GROUPS:
        for key in (f"{g}_clip_ids", f"{g}_clip_mask"):
            if key in out:
                out[key] = out[key][..., :length]
    return out
