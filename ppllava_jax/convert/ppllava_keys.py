"""Key tables of the whole PPLLaVA model, both variants (CLIP + Vicuna, SigLIP + Qwen2).

``ppllava_vision_rules`` covers ``vision_tower.vision_model.*`` (CLIP trunk + BT-Adapter),
``projector_rules`` ``multi_modal_projector.*`` (the CLIP or SigLIP prompt encoder, the LLaVA
MLP, ``logit_scale``), each under movable prefixes; ``ppllava_rules`` the whole model under the
prefixes ``detect_layout`` finds in a checkpoint (transformers 4 or 5 layouts). The towers'
parts reuse ``clip_keys`` / ``siglip_keys``, the LLM ``llama_keys``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ppllava_jax.convert.clip_keys import encoder_rules, text_rules, vision_rules
from ppllava_jax.convert.llama_keys import llama_rules
from ppllava_jax.convert.mapping import Rule, linear_rules, ln_rules
from ppllava_jax.convert.siglip_keys import head_rules, siglip_text_rules, siglip_vision_rules
from ppllava_jax.models.config import PPLLaVAConfig, SiglipVisionConfig

# torch prefixes of the parts in the original (transformers 4.45) layout, which export writes
V4_LAYOUT = dict(
    vision="vision_tower.vision_model.",
    projector="multi_modal_projector.",
    llm="language_model.model.",
    head="language_model.lm_head.",
    newline="image_newline",
)


def btadapter_rules(torch_prefix: str = "", jax_prefix: str = "") -> list[Rule]:
    """``btadapter_S_layers.{i}`` (a CLIP encoder layer), ``btadapter_T_layers.{i}``
    (``layer_norm1``, ``self_attn``, ``temporal_fc``), ``btadapter_cls_token``,
    ``btadapter_time_embed``."""
    t, j = torch_prefix, jax_prefix
    spatial = [
        Rule(
            r.torch.replace(f"{t}encoder.layers.", f"{t}btadapter_S_layers."),
            r.jax.replace(f"{j}encoder/layers_", f"{j}btadapter_S_layers_"),
            r.transform,
        )
        for r in encoder_rules(t, j)
    ]
    tt, tj = f"{t}btadapter_T_layers.{{i}}", f"{j}btadapter_T_layers_{{i}}"
    temporal = ln_rules(f"{tt}.layer_norm1", f"{tj}/layer_norm1")
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        temporal += linear_rules(f"{tt}.self_attn.{p}", f"{tj}/self_attn/{p}")
    temporal += linear_rules(f"{tt}.temporal_fc", f"{tj}/temporal_fc")
    return [
        *spatial,
        *temporal,
        Rule(f"{t}btadapter_cls_token", f"{j}btadapter_cls_token"),
        Rule(f"{t}btadapter_time_embed.weight", f"{j}btadapter_time_embed/embedding"),
    ]


def ppllava_vision_rules(
    torch_prefix: str = "vision_tower.vision_model.",
    jax_prefix: str = "vision_tower/vision_model/",
    btadapter: bool = True,
) -> list[Rule]:
    """``PPLLaVAVisionModel``: the CLIP vision transformer plus (``btadapter``) the adapter."""
    rules = vision_rules(torch_prefix, jax_prefix)
    if btadapter:
        rules += btadapter_rules(torch_prefix, jax_prefix)
    return rules


def projector_rules(
    torch_prefix: str = "multi_modal_projector.",
    jax_prefix: str = "multi_modal_projector/",
    pooling: str = "ppllava",
    extended: bool = True,
    qwen: bool = False,
) -> list[Rule]:
    """``PPLLaVAProjector``: ``linear_1``/``linear_2`` and, for ``pooling='ppllava'``, the prompt
    encoder: the CLIP text tower (``extended``: Long-CLIP position tables), projections,
    ``clip_visual_ln`` and ``logit_scale``; for ``qwen`` the SigLIP text tower, the vision head
    (``clip_visual_head``), ``clip_visual_ln``, ``logit_scale`` and ``logit_bias``."""
    t, j = torch_prefix, jax_prefix
    rules = linear_rules(f"{t}linear_1", f"{j}linear_1") + linear_rules(
        f"{t}linear_2", f"{j}linear_2"
    )
    if pooling != "ppllava":
        return rules
    text = siglip_text_rules if qwen else text_rules
    rules += text(f"{t}clip_text_model.", f"{j}clip_text_model/", extended)
    if qwen:
        rules += head_rules(f"{t}clip_visual_head.", f"{j}clip_visual_head/")
    else:
        for p in ("clip_text_projection", "clip_visual_projection"):
            rules += linear_rules(f"{t}{p}", f"{j}{p}", bias=False)
    rules += [
        *ln_rules(f"{t}clip_visual_ln", f"{j}clip_visual_ln"),
        Rule(f"{t}logit_scale", f"{j}logit_scale"),
    ]
    if qwen:
        rules.append(Rule(f"{t}logit_bias", f"{j}logit_bias"))
    return rules


def detect_layout(keys: Iterable[str]) -> dict[str, str]:
    """Torch prefixes of the model's parts in a checkpoint, from its keys: transformers 4
    (``V4_LAYOUT``) or 5 (``model.vision_tower.``, ``model.language_model.`` + ``lm_head.``)."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    out = dict(V4_LAYOUT)
    for cand in (
        "vision_tower.vision_model.",
        "model.vision_tower.vision_model.",
        "model.vision_tower.",
        "vision_tower.",
    ):
        if has(cand):
            out["vision"] = cand
            break
    if has("model.multi_modal_projector."):
        out["projector"] = "model.multi_modal_projector."
    if has("model.language_model."):
        out["llm"], out["head"] = "model.language_model.", "lm_head."
    if "model.image_newline" in keys:
        out["newline"] = "model.image_newline"
    return out


def ppllava_rules(cfg: PPLLaVAConfig, layout: dict[str, str] | None = None) -> list[Rule]:
    """Every parameter of ``PPLLaVA(cfg)`` under the torch prefixes of ``layout`` (default
    ``V4_LAYOUT``): CLIP + BT-Adapter or (``cfg.qwen``) SigLIP vision, the projector, the LLM
    (LLaMA / Qwen2 names) and ``image_newline``."""
    lay = layout or V4_LAYOUT
    vm = "vision_tower/vision_model/"
    if cfg.qwen:
        use_head = isinstance(cfg.vision, SiglipVisionConfig) and cfg.vision.vision_use_head
        rules = siglip_vision_rules(lay["vision"], vm, use_head)
    else:
        rules = ppllava_vision_rules(lay["vision"], vm, cfg.btadapter)
    rules += projector_rules(
        lay["projector"], "multi_modal_projector/", cfg.pooling, cfg.clip_text.extended, cfg.qwen
    )
    rules += llama_rules(
        torch_model=lay["llm"], torch_head=lay["head"], jax_prefix="language_model/"
    )
    rules.append(Rule(lay["newline"], "image_newline"))
    return rules
