"""``PPLLaVAConfig`` <-> the config.json files of the whole models: a released PPLLaVA
(LLaVA-NeXT layout plus the PPLLaVA fields; LLaVA-OneVision layout with ``qwen: true``), its
``clip/config.json``, LLaVA-NeXT and LLaVA-OneVision read as PPLLaVA without pooling, the
training start points' configs, and a run config's ``model`` section (``ppllava_config_from_dict``).

    cfg = ppllava_config_from_hf(json.load(open("ppllava/config.json")), clip_hf)
    d = ppllava_config_to_hf(cfg)   # config.json, with the CLIP config under "clip_config"
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ppllava_jax.convert.hf_config import (
    decoder_from_hf,
    listify,
    llama_to_hf,
    tower_from_hf,
    tower_to_hf,
    tuplify,
)
from ppllava_jax.models.config import (
    OPENAI_CLIP_L336_TEXT,
    SIGLIP_SO400M_TEXT,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    PPLLaVAConfig,
    Qwen2Config,
    SiglipTextConfig,
    SiglipVisionConfig,
)

# PPLLaVA fields of the original's config.json, with the original's class defaults where the
# 7B model does not differ (pooling/btadapter/extend_clip are the 7B model's values).
PPLLAVA_FIELDS = (
    "image_token_index",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_grid_pinpoints",
    "projector_hidden_act",
    "pooling",
    "pooling_kernel",
    "pooling_stride",
    "image_pooling_kernel",
    "image_pooling_stride",
    "pllava_pooling_shape",
    "frame_shape",
    "pooling_temp",
    "btadapter",
    "btadapter_depth",
    "max_T",
    "extend_clip",
    "clip_weight",
    "clip_post_pretrain",
    "ignore_index",
    "pad_token_id",
    "qwen",
)

# an explicit null in config.json means "not set" for these (the image kernel then falls back to
# the video one, as in the original)
NULLABLE_FIELDS = (
    "pooling_kernel",
    "pooling_stride",
    "image_pooling_kernel",
    "image_pooling_stride",
    "pllava_pooling_shape",
    "clip_weight",
    "clip_post_pretrain",
)

QWEN_PAD_ID = 151643  # <|endoftext|>: the original's LlavaOnevisionVidConfig hard-codes it
# The original's ``LlavaInterleaveForConditionalGeneration.from_config`` sets
# ``max_T = cfg.get("max_T", 64)`` and no shipped yaml names ``max_T``: 64 time-embedding rows.
START_MAX_T = 64
# the PPLLaVA fields of the start points: the paper's (LLaVA-NeXT + CLIP) and the Qwen recipe's
# (config/qwen/ppllava_qwen7b_videoonly.yaml; LLaVA-OneVision + SigLIP)
START_RECIPE = dict(
    pooling="ppllava", btadapter=True, btadapter_depth=4, extend_clip=True, max_T=START_MAX_T
)
QWEN_RECIPE = dict(
    qwen=True,
    pooling="ppllava",
    pooling_kernel=[2, 3, 3],
    pooling_stride=[2, 3, 3],
    image_pooling_kernel=[1, 3, 3],
    image_pooling_stride=[1, 3, 3],
    btadapter=False,
    extend_clip=True,
    pooling_temp=0.01,
)


def ppllava_config_from_hf(
    d: dict[str, Any], clip_config: dict[str, Any] | None = None, **runtime: Any
) -> PPLLaVAConfig:
    """From the original's config.json ``d`` and the ``clip/config.json`` its ``clip_weight``
    points to (default: ``d["clip_config"]``; None: OpenAI clip-vit-large-patch14-336's text
    tower, or SigLIP-so400m's for ``qwen``). runtime: runtime fields of every tower."""
    rt = {k: v for k, v in runtime.items() if v is not None}
    clip_config = d.get("clip_config") if clip_config is None else clip_config
    qwen = bool(d.get("qwen"))
    vision_cls, text_cls = (
        (SiglipVisionConfig, SiglipTextConfig) if qwen else (CLIPVisionConfig, CLIPTextConfig)
    )
    vision = tower_from_hf(vision_cls, d.get("vision_config", {}), **rt)
    llm = decoder_from_hf(d.get("text_config", {}), qwen, **rt)
    if clip_config is not None:
        text = tower_from_hf(text_cls, clip_config, **rt)
    else:
        text = text_cls(**(SIGLIP_SO400M_TEXT if qwen else OPENAI_CLIP_L336_TEXT), **rt)
    if qwen:
        d = {"btadapter": False, **d}
    if bool(d.get("extend_clip", PPLLaVAConfig.extend_clip)):
        base = text.max_position_embeddings if not text.extended else (64 if qwen else 77)
        text = text.replace(
            extended=True, max_position_embeddings=4 * base - 3 * text.position_keep
        )
    kw = {
        k: tuplify(d[k])
        for k in PPLLAVA_FIELDS
        if k in d and (d[k] is not None or k in NULLABLE_FIELDS)
    }
    return PPLLaVAConfig(vision=vision, clip_text=text, llm=llm, **kw, **rt)


def ppllava_clip_config_to_hf(cfg: PPLLaVAConfig) -> dict[str, Any]:
    """``clip/config.json`` for the projector's CLIP (text tower as in the checkpoint, 77
    positions before the extension; vision tower = the LLaVA vision config). The Qwen
    variant writes a ``SiglipModel`` config (64 positions, the vision tower with its head)."""
    text = tower_to_hf(cfg.clip_text)
    if cfg.clip_text.extended:
        k = cfg.clip_text.position_keep
        text["max_position_embeddings"] = (cfg.clip_text.max_position_embeddings + 3 * k) // 4
    if cfg.qwen:
        return {
            "model_type": "siglip",
            "architectures": ["SiglipModel"],
            "text_config": text,
            "vision_config": {**tower_to_hf(cfg.vision), "vision_use_head": True},
        }
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": cfg.clip_text.projection_dim,
        "text_config": text,
        "vision_config": tower_to_hf(cfg.vision),
    }


def ppllava_config_to_hf(cfg: PPLLaVAConfig) -> dict[str, Any]:
    """The original's config.json (LLaVA-NeXT layout plus the PPLLaVA fields; LLaVA-OneVision
    for the Qwen variant), ``clip_weight`` (default ``clip``) and, under ``clip_config``, the
    ``clip/config.json`` (``ppllava_clip_config_to_hf``)."""
    d: dict[str, Any] = {k: listify(getattr(cfg, k)) for k in PPLLAVA_FIELDS}
    common = dict(text_config=llama_to_hf(cfg.llm), hidden_size=cfg.llm.hidden_size)
    if cfg.qwen:
        d.update(
            model_type="llava_onevision",
            vision_config=tower_to_hf(cfg.vision),
            **common,
            video_token_index=cfg.image_token_index + 1,  # unused: videos use <image>
            vision_aspect_ratio="anyres_max_9",  # unused by PPLLaVA
            tie_word_embeddings=cfg.llm.tie_word_embeddings,
        )
    else:
        vision = {**tower_to_hf(cfg.vision), "depth": cfg.btadapter_depth, "max_T": cfg.max_T}
        d.update(model_type="llava_next", vision_config=vision, **common, qwen=False)
    d["clip_weight"] = d.get("clip_weight") or "clip"
    d["clip_config"] = ppllava_clip_config_to_hf(cfg)
    return d


def ppllava_config_from_dict(d: dict[str, Any]) -> PPLLaVAConfig:
    """``PPLLaVAConfig`` from a plain dict (an ml_collections ``model`` section): ``vision``,
    ``clip_text`` and ``llm`` are dicts of their dataclass fields, the rest PPLLaVA fields.
    Unknown keys are an error naming them."""
    d = dict(d)
    subs: dict[str, type] = {
        "vision": CLIPVisionConfig,
        "clip_text": CLIPTextConfig,
        "llm": LlamaConfig,
    }
    if d.get("qwen"):
        subs = {"vision": SiglipVisionConfig, "clip_text": SiglipTextConfig, "llm": Qwen2Config}
    kw: dict[str, Any] = {}
    for name, cls in subs.items():
        sub = dict(d.pop(name, {}) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(sub) - names)
        if bad:
            raise ValueError(f"model.{name}: unknown fields {bad}; known: {sorted(names)}")
        kw[name] = cls(**{k: tuplify(v) for k, v in sub.items()})
    names = {f.name for f in dataclasses.fields(PPLLaVAConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(f"model: unknown fields {bad}; known: {sorted(names - set(subs))}")
    kw.update({k: tuplify(v) for k, v in d.items()})
    return PPLLaVAConfig(**kw)


# -- LLaVA-NeXT / LLaVA-OneVision as PPLLaVA, and the start points -------------------------


def with_llava_defaults(d: dict[str, Any], qwen: bool = False) -> dict[str, Any]:
    """Fill what a LLaVA-NeXT (or, ``qwen``, LLaVA-OneVision) config.json leaves to transformers'
    defaults: the vision config's omitted fields, the image token id, ``frame_shape`` (the
    tower's patch grid); for LLaVA-OneVision also the feature layer and strategy and the pad id
    (top level, else the Qwen2 config's, else Qwen2's ``<|endoftext|>``)."""
    d = dict(d)
    vision_cls = SiglipVisionConfig if qwen else CLIPVisionConfig
    vision = tower_from_hf(vision_cls, d.get("vision_config") or {}, hf_defaults=True)
    d["vision_config"] = tower_to_hf(vision)
    d.setdefault("image_token_index", d.get("image_token_id", 151646 if qwen else 32000))
    d.setdefault("frame_shape", [vision.grid, vision.grid])
    if qwen:
        d.setdefault("vision_feature_layer", -1)
        d.setdefault("vision_feature_select_strategy", "full")
        if d.get("pad_token_id") is None:
            pad = (d.get("text_config") or {}).get("pad_token_id")
            d["pad_token_id"] = QWEN_PAD_ID if pad is None else pad
    return d


def _check_pad(cfg: PPLLaVAConfig, source: str) -> PPLLaVAConfig:
    if cfg.qwen and not 0 <= cfg.pad_token_id < cfg.llm.vocab_size:
        raise ValueError(
            f"{source}: pad_token_id={cfg.pad_token_id} is outside the Qwen2 vocabulary "
            f"({cfg.llm.vocab_size}); set pad_token_id in config.json (Qwen2: <|endoftext|>)"
        )
    return cfg


def llava_config_from_hf(d: dict[str, Any], qwen: bool = False) -> PPLLaVAConfig:
    """LLaVA-NeXT (or, ``qwen``, LLaVA-OneVision) as PPLLaVA: no BT-Adapter, no pooling, no
    CLIP / SigLIP prompt encoder."""
    d = with_llava_defaults({k: v for k, v in d.items() if k != "clip_config"}, qwen)
    d.update(pooling="none", btadapter=False, extend_clip=False)
    if qwen:
        d["qwen"] = True
    return _check_pad(ppllava_config_from_hf(d, None), "llava_onevision config.json")


def llava_config_to_hf(cfg: PPLLaVAConfig) -> dict[str, Any]:
    """config.json of ``LlavaNextForConditionalGeneration`` (``LlavaOnevision...`` for
    ``cfg.qwen``)."""
    d = {
        "model_type": "llava_onevision" if cfg.qwen else "llava_next",
        "architectures": [
            "LlavaOnevisionForConditionalGeneration"
            if cfg.qwen
            else "LlavaNextForConditionalGeneration"
        ],
        "vision_config": tower_to_hf(cfg.vision),
        "text_config": llama_to_hf(cfg.llm),
        "image_token_index": cfg.image_token_index,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
    }
    if cfg.qwen:
        d.update(
            video_token_index=cfg.image_token_index + 1,
            vision_aspect_ratio="anyres_max_9",
            pad_token_id=cfg.pad_token_id,
        )
    return d


def start_point_config(
    llava_hf: dict[str, Any], clip_hf: dict[str, Any], *, qwen: bool = False, **overrides: Any
) -> PPLLaVAConfig:
    """PPLLaVA config of a training start point: the towers and LLM of LLaVA-NeXT (``qwen``:
    LLaVA-OneVision), the text tower of ``clip_hf`` (CLIP extended to 248 positions; SigLIP to
    196), the recipe's PPLLaVA fields (``START_RECIPE``: BT-Adapter depth 4 with ``max_T`` = 64
    time embeddings, the original's defaults; ``QWEN_RECIPE``). ``overrides``: PPLLaVA fields to
    change (e.g. ``btadapter_depth``, ``max_T``)."""
    skip = ("pooling", "btadapter", "qwen")
    d = with_llava_defaults({k: v for k, v in llava_hf.items() if k not in skip}, qwen)
    d.update(QWEN_RECIPE if qwen else START_RECIPE)
    names = {f.name for f in dataclasses.fields(PPLLaVAConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown PPLLaVA config fields {sorted(unknown)}")
    d.update(overrides)  # ppllava_config_from_hf reads the PPLLaVA fields from the dict
    base = ppllava_config_from_hf(d, clip_hf)
    rest = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    cfg = dataclasses.replace(base, **rest) if rest else base
    return _check_pad(cfg, "LLaVA-OneVision config.json")
