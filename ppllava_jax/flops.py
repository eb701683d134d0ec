"""Analytic model FLOPs of PPLLaVA: the count behind MFU (train.py's metrics, plan.py, benchmarks).

XLA's ``cost_analysis()`` counts the body of a ``lax.scan`` once, so with ``scan_layers`` it
under-reports a step by about the layer count; these counts do not depend on how the model is
compiled. Matmuls and attention only, 2 FLOPs per multiply-add (softmax, norms and element-wise
work are not counted); attention over full ``S x S`` score matrices (what
``jax.nn.dot_product_attention`` computes, causal or not).

A training step costs 3 x the forward of a part whose parameters train (forward, input
gradients, weight gradients), 2 x for a frozen part that gradients pass through on their way to a
trained one upstream (the LLM when only the projector trains), 1 x for a frozen part nothing
upstream of it trains (the CLIP trunk of the recipe). Rematerialisation's recompute is not
counted: these are model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ppllava_jax.layout import GROUPS
from ppllava_jax.models.encoder import normalize_taps

# parts in data-flow order, with the parameter-path prefixes they own
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision_patch_embed", ("vision_tower/vision_model/embeddings",)),
    ("vision_trunk", ("vision_tower/vision_model/encoder", "vision_tower/vision_model/pre_")),
    ("btadapter", ("vision_tower/vision_model/btadapter",)),
    ("clip_text", ("multi_modal_projector/clip_text",)),
    ("clip_visual_projection", ("multi_modal_projector/clip_visual",)),
    ("projector_mlp", ("multi_modal_projector/linear_",)),
    ("pooling", ()),
    ("llm", ("language_model/model",)),
    ("lm_head", ("language_model/lm_head",)),
)


def forward_flops(
    cfg: Any,
    rows: int,
    length: int,
    visual: Sequence[tuple[int, int, bool]],
    clip_len: int,
) -> dict[str, float]:
    """FLOPs of one forward pass, by part (``PARTS``) and ``total``.

    Args:
      cfg: a ``PPLLaVAConfig``.
      rows, length: the LLM batch ``[rows, length]`` (merged sequence, padding included).
      visual: ``(items, frames, separate)`` per visual group: ``items`` samples of ``frames``
        frames (views / images) each; ``separate`` when each frame runs alone through the
        BT-Adapter (the views of an any-resolution image), else one temporal sequence per item.
      clip_len: CLIP prompt length (one prompt per item).

    Counts what the loss depends on (and what runs): the CLIP trunk up to hidden state
    ``vision_feature_layer`` (the layers above it are not run, ``CLIPEncoder(upto_taps=True)``),
    the BT-Adapter layers that feed that state, the CLIP text tower and projections ('ppllava'
    pooling), the projector MLP, the decoder over ``rows x length`` tokens and the LM head.
    """
    v, tx, llm = cfg.vision, cfg.clip_text, cfg.llm
    c, inter = v.hidden_size, v.intermediate_size
    p = v.num_patches
    n_tok = p + 1

    def enc_layer(width: int, mlp: int, seq: int) -> float:  # per token
        return 2 * (4 * width * width + 2 * width * mlp) + 4 * seq * width

    k = normalize_taps((cfg.vision_feature_layer,), v.num_hidden_layers)[0]
    parts = {name: 0.0 for name, _ in PARTS}
    d = llm.hidden_size
    for items, frames, separate in visual:
        nf = items * frames
        t_seq = 1 if separate else frames
        parts["vision_patch_embed"] += nf * p * 2 * (3 * v.patch_size**2) * c
        parts["vision_trunk"] += nf * n_tok * k * enc_layer(c, inter, n_tok)
        if cfg.btadapter:
            n_adapt = max(0, k - (v.num_hidden_layers - cfg.btadapter_depth))
            # temporal layer: qkv + out + temporal_fc (5 C^2) and attention over the frames, per
            # patch; spatial layer: attention per frame over [cls; patches], then the MLP on
            # the patches and on one class token per item (class outputs are frame-averaged)
            temporal = nf * p * (2 * 5 * c * c + 4 * t_seq * c)
            spatial = nf * n_tok * (2 * 4 * c * c + 4 * n_tok * c)
            spatial += (nf * p + nf // t_seq) * 2 * 2 * c * inter
            parts["btadapter"] += n_adapt * (temporal + spatial)
        parts["projector_mlp"] += nf * p * 2 * (c * d + d * d)
        if cfg.pooling == "ppllava":
            pd = cfg.clip_projection_dim
            parts["clip_text"] += items * (
                clip_len
                * tx.num_hidden_layers
                * enc_layer(tx.hidden_size, tx.intermediate_size, clip_len)
                + 2 * tx.hidden_size * pd
            )
            parts["clip_visual_projection"] += nf * p * (2 * c * pd + 2 * pd)
            parts["pooling"] += nf * p * 2 * d
    hd, nh, nkv = llm.head_dim, llm.num_attention_heads, llm.num_key_value_heads
    per_tok = 2 * (2 * d * nh * hd + 2 * d * nkv * hd + 3 * d * llm.intermediate_size)
    per_tok += 4 * length * nh * hd
    parts["llm"] = float(rows * length * llm.num_hidden_layers * per_tok)
    parts["lm_head"] = float(rows * length * 2 * d * llm.vocab_size)
    parts = {kk: float(vv) for kk, vv in parts.items()}
    parts["total"] = float(sum(parts.values()))
    return parts


def part_multipliers(trained: Iterable[str] | None = None) -> dict[str, float]:
    """3 / 2 / 1 per part (module docstring). ``trained``: the paths ('/'-joined, as
    ``train.optimizer.param_paths`` writes them) of the parameters that train; None: all."""
    trained = None if trained is None else tuple(trained)
    out: dict[str, float] = {}
    upstream_trains = False
    for name, prefixes in PARTS:
        if trained is None:
            trains = True
        else:  # pooling has no parameters: it only passes gradients through
            trains = any(t.startswith(pre) for t in trained for pre in prefixes)
        out[name] = 3.0 if trains else 2.0 if upstream_trains else 1.0
        upstream_trains = upstream_trains or trains
    return out


def train_flops(
    cfg: Any,
    rows: int,
    length: int,
    visual: Sequence[tuple[int, int, bool]],
    clip_len: int,
    trained: Iterable[str] | None = None,
) -> float:
    """Model FLOPs of one SFT step (``forward_flops`` weighted by ``part_multipliers``)."""
    fwd = forward_flops(cfg, rows, length, visual, clip_len)
    mult = part_multipliers(trained)
    return float(sum(fwd[name] * mult[name] for name, _ in PARTS))


def batch_train_flops(
    cfg: Any, batch: Mapping[str, Any], trained: Iterable[str] | None = None
) -> float:
    """``train_flops`` of a collated batch (``data.collate`` layout; only shapes are read).
    DPO batches count their chosen and rejected rows (the reference's forward is not counted)."""
    rows, length = batch["input_ids"].shape[-2:]
    rows *= batch["input_ids"].shape[0] if batch["input_ids"].ndim == 3 else 1
    visual, clip_len = [], 0
    for group in GROUPS:
        key = f"{group}_pixels"
        if key in batch:
            shape = batch[key].shape  # [N, T, S, S, 3] or [k, N/k, T, S, S, 3]
            lead = shape[:-4]
            items = int(lead[0]) * (int(lead[1]) if len(lead) > 1 else 1)
            visual.append((items, int(shape[-4]), group == "image"))
            ids = batch.get(f"{group}_clip_ids")
            clip_len = int(ids.shape[-1]) if ids is not None else clip_len
    return train_flops(cfg, int(rows), int(length), visual, clip_len, trained)
