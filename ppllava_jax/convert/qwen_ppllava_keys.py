"""Key tables of the Qwen2 + SigLIP PPLLaVA family, the ``llava_onevision`` family, and the
Qwen variant's training start point (LLaVA-OneVision + SigLIP).

- A released PPLLaVA-Qwen directory is the ``ppllava`` family (``config.json`` with
  ``model_type: llava_onevision``, ``qwen: true`` and the PPLLaVA fields; ``clip/config.json`` a
  ``SiglipModel`` config); ``ppllava_family.ppllava_rules`` hands a ``qwen`` config to
  ``qwen_ppllava_rules``. Keys: ``vision_tower.vision_model.*`` (SigLIP, ``post_layernorm``
  stored but not on the LLM path), ``multi_modal_projector.{clip_text_model, clip_visual_head,
  clip_visual_ln, logit_scale, logit_bias, linear_1, linear_2}``, ``language_model.*`` (Qwen2),
  ``image_newline``.
- ``llava_onevision``: a LLaVA-OneVision checkpoint (``LlavaOnevisionForConditionalGeneration``)
  as this model without prompt-guided pooling (``pooling='none'``). PPLLaVA's merge is used:
  LLaVA-OneVision's own ``anyres_max_9`` downscaling and 2x2 video pooling are not.
- ``build_qwen_start_point``: the original's ``config/qwen/ppllava_qwen7b_videoonly.yaml`` start
  point: the towers, MLP, Qwen2 and ``image_newline`` from LLaVA-OneVision-Qwen2-7B-SI; from
  SigLIP-so400m the text tower (64 positions extended to 196, both tables), the vision tower's
  ``head`` (-> ``clip_visual_head``) and ``post_layernorm`` (-> ``clip_visual_ln``),
  ``logit_scale`` and ``logit_bias``. SigLIP's own vision trunk is not used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ppllava_jax.convert.llama_keys import IGNORE as LLAMA_IGNORE
from ppllava_jax.convert.llama_keys import llama_rules
from ppllava_jax.convert.mapping import KeyMap, Rule
from ppllava_jax.convert.registry import Family, read_json_config
from ppllava_jax.convert.siglip_keys import IGNORE as SIGLIP_IGNORE
from ppllava_jax.convert.siglip_keys import head_rules, siglip_text_rules, siglip_vision_rules
from ppllava_jax.models.config import PPLLaVAConfig, SiglipVisionConfig

IGNORE = (*SIGLIP_IGNORE, *LLAMA_IGNORE)
QWEN_PAD_ID = 151643  # <|endoftext|>: the original's LlavaOnevisionVidConfig hard-codes it

_V4 = dict(
    vision="vision_tower.vision_model.",
    projector="multi_modal_projector.",
    llm="language_model.model.",
    head="language_model.lm_head.",
    newline="image_newline",
)


def _ln(torch: str, jax_: str) -> list[Rule]:
    return [Rule(f"{torch}.weight", f"{jax_}/scale"), Rule(f"{torch}.bias", f"{jax_}/bias")]


def qwen_projector_rules(
    torch_prefix: str = "multi_modal_projector.",
    jax_prefix: str = "multi_modal_projector/",
    pooling: str = "ppllava",
    extended: bool = True,
) -> list[Rule]:
    """``linear_1``/``linear_2`` and, for ``pooling='ppllava'``, the SigLIP prompt encoder."""
    t, j = torch_prefix, jax_prefix
    rules = [
        Rule(f"{t}{n}.{p}", f"{j}{n}/{q}", tr)
        for n in ("linear_1", "linear_2")
        for p, q, tr in (("weight", "kernel", "linear"), ("bias", "bias", "none"))
    ]
    if pooling == "ppllava":
        rules += [
            *siglip_text_rules(f"{t}clip_text_model.", f"{j}clip_text_model/", extended),
            *head_rules(f"{t}clip_visual_head.", f"{j}clip_visual_head/"),
            *_ln(f"{t}clip_visual_ln", f"{j}clip_visual_ln"),
            Rule(f"{t}logit_scale", f"{j}logit_scale"),
            Rule(f"{t}logit_bias", f"{j}logit_bias"),
        ]
    return rules


def qwen_ppllava_rules(cfg: PPLLaVAConfig, layout: dict[str, str] | None = None) -> list[Rule]:
    """Every parameter of ``PPLLaVA(cfg)`` (``cfg.qwen``) under the torch prefixes of
    ``layout`` (``ppllava_family.detect_layout``; default the original's)."""
    lay = layout or _V4
    vcfg = cfg.vision
    use_head = isinstance(vcfg, SiglipVisionConfig) and vcfg.vision_use_head
    rules = siglip_vision_rules(lay["vision"], "vision_tower/vision_model/", use_head)
    rules += qwen_projector_rules(
        lay["projector"], "multi_modal_projector/", cfg.pooling, cfg.clip_text.extended
    )
    rules += llama_rules(
        torch_model=lay["llm"], torch_head=lay["head"], jax_prefix="language_model/"
    )
    rules.append(Rule(lay["newline"], "image_newline"))
    return rules


# -- llava_onevision -----------------------------------------------------------------------


def _with_onevision_defaults(d: dict) -> dict:
    """What a LLaVA-OneVision config.json leaves to transformers' defaults: the image token id,
    ``frame_shape`` (the SigLIP tower's patch grid), the pad id (top level, else the Qwen2
    config's, else Qwen2's ``<|endoftext|>``)."""
    d = dict(d)
    vision = SiglipVisionConfig.from_hf(d.get("vision_config") or {})
    d["vision_config"] = vision.to_hf()
    d.setdefault("image_token_index", d.get("image_token_id", 151646))
    d.setdefault("vision_feature_layer", -1)
    d.setdefault("vision_feature_select_strategy", "full")
    d.setdefault("frame_shape", [vision.grid, vision.grid])
    if d.get("pad_token_id") is None:
        pad = (d.get("text_config") or {}).get("pad_token_id")
        d["pad_token_id"] = QWEN_PAD_ID if pad is None else pad
    return d


def _check_pad(cfg: PPLLaVAConfig, source: str) -> PPLLaVAConfig:
    if not 0 <= cfg.pad_token_id < cfg.llm.vocab_size:
        raise ValueError(
            f"{source}: pad_token_id={cfg.pad_token_id} is outside the Qwen2 vocabulary "
            f"({cfg.llm.vocab_size}); set pad_token_id in config.json (Qwen2: <|endoftext|>)"
        )
    return cfg


def llava_onevision_config_from_hf(d: dict) -> PPLLaVAConfig:
    """LLaVA-OneVision as PPLLaVA-Qwen without pooling and without the SigLIP prompt encoder."""
    d = _with_onevision_defaults({k: v for k, v in d.items() if k != "clip_config"})
    d.update(qwen=True, pooling="none", btadapter=False, extend_clip=False)
    return _check_pad(PPLLaVAConfig.from_hf(d, None), "llava_onevision config.json")


def llava_onevision_config_to_hf(cfg: PPLLaVAConfig) -> dict:
    return {
        "model_type": "llava_onevision",
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "vision_config": cfg.vision.to_hf(),
        "text_config": cfg.llm.to_hf(),
        "image_token_index": cfg.image_token_index,
        "video_token_index": cfg.image_token_index + 1,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vision_aspect_ratio": "anyres_max_9",
        "projector_hidden_act": cfg.projector_hidden_act,
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
    }


def _is_llava_onevision(d: dict) -> bool:
    archs = d.get("architectures") or []
    is_ppllava = "pooling" in d or "btadapter" in d or "qwen" in d
    return not is_ppllava and (
        d.get("model_type") == "llava_onevision"
        or "LlavaOnevisionForConditionalGeneration" in archs
    )


def _keymap(cfg: PPLLaVAConfig, keys: Iterable[str] = ()) -> KeyMap:
    from ppllava_jax.convert.ppllava_family import detect_layout

    return KeyMap(qwen_ppllava_rules(cfg, detect_layout(keys)))


def _abstract(cfg: PPLLaVAConfig) -> Any:
    from ppllava_jax.models.ppllava import abstract_params

    return abstract_params(cfg)


FAMILIES = [
    Family(
        name="llava_onevision",
        detect=_is_llava_onevision,
        config_from_hf=llava_onevision_config_from_hf,
        config_to_hf=llava_onevision_config_to_hf,
        abstract_params=_abstract,
        keymap=_keymap,
        export_keymap=lambda cfg: KeyMap(qwen_ppllava_rules(cfg)),
        ignore=IGNORE,
    )
]


# -- the training start point --------------------------------------------------------------

# the original recipe's PPLLaVA fields (config/qwen/ppllava_qwen7b_videoonly.yaml)
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


def qwen_start_point_config(ov_hf: dict, siglip_hf: dict, **overrides: Any) -> PPLLaVAConfig:
    """PPLLaVA-Qwen config of the start point: LLaVA-OneVision's towers and Qwen2, SigLIP's text
    tower (196 positions), the recipe's pooling. ``overrides``: PPLLaVA fields to change."""
    d = _with_onevision_defaults(
        {k: v for k, v in ov_hf.items() if k not in ("pooling", "btadapter", "qwen")}
    )
    d.update(QWEN_RECIPE)
    names = {f.name for f in dataclasses.fields(PPLLaVAConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown PPLLaVA config fields {sorted(unknown)}")
    d.update(overrides)
    base = PPLLaVAConfig.from_hf(d, siglip_hf)
    rest = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    cfg = dataclasses.replace(base, **rest) if rest else base
    return _check_pad(cfg, "LLaVA-OneVision config.json")


def build_qwen_start_point(
    ov_dir: str | Path,
    siglip_dir: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    scan_layers: bool = True,
    **overrides: Any,
) -> Path:
    """Assemble the PPLLaVA-Qwen start point (module docstring) and write it as a ``ppllava``
    directory. Strict: every parameter filled, every tensor of both checkpoints used except
    SigLIP's vision trunk (``vision_model.embeddings/encoder``) and its 64-row position table
    (replaced by the 196-row extension)."""
    import jax
    from flax import traverse_util

    from ppllava_jax.convert import params_io
    from ppllava_jax.convert.api import with_runtime
    from ppllava_jax.convert.mapping import ConversionError, convert_state_dict
    from ppllava_jax.convert.ppllava_family import _flatten, detect_layout, ppllava_config_to_hf
    from ppllava_jax.convert.torch_io import TorchCheckpoint
    from ppllava_jax.models.longclip import extend_positions

    ov_dir, siglip_dir = Path(ov_dir), Path(siglip_dir)
    siglip_hf = read_json_config(siglip_dir)
    if siglip_hf.get("model_type") != "siglip":
        raise ValueError(
            f"--clip {siglip_dir} is a {siglip_hf.get('model_type')!r} model; the Qwen start point "
            "needs a SiglipModel (google/siglip-so400m-patch14-384)"
        )
    btd = overrides.pop("btadapter_depth", None)  # the command line's default; no adapter here
    del btd
    cfg = qwen_start_point_config(read_json_config(ov_dir), siglip_hf, **overrides)
    cfg = with_runtime(cfg, scan_layers=scan_layers)
    abstract = _abstract(cfg)
    flat_exp = _flatten(abstract)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    out: dict[str, np.ndarray] = {}

    def take(ckpt, rules: list[Rule], source: Path, known_unused: tuple[str, ...]) -> None:
        keymap = KeyMap(rules)
        part = convert_state_dict(
            ckpt, keymap, abstract, dtype=np_dtype, ignore=IGNORE, strict=False, source=str(source)
        )
        out.update(_flatten(part))
        skip = (*IGNORE, *known_unused)
        extra = [k for k in ckpt if not keymap.to_jax(k) and not any(re.search(p, k) for p in skip)]
        if extra:
            raise ConversionError(f"{source}: tensors not used: {extra[:20]}")

    # 1. LLaVA-OneVision: SigLIP tower, MLP, Qwen2, image_newline.
    ov = TorchCheckpoint(ov_dir)
    plain = dataclasses.replace(cfg, pooling="none")
    take(ov, qwen_ppllava_rules(plain, detect_layout(ov)), ov_dir, ())

    # 2. SigLIP: text tower (positions extended), vision head, post-LN, logit scale and bias.
    sig = TorchCheckpoint(siglip_dir)
    j = "multi_modal_projector/"
    rules = [
        r
        for r in siglip_text_rules("text_model.", f"{j}clip_text_model/")
        if "position_embedding" not in r.torch
    ]
    rules += head_rules("vision_model.head.", f"{j}clip_visual_head/")
    rules += _ln("vision_model.post_layernorm", f"{j}clip_visual_ln")
    rules += [Rule("logit_scale", f"{j}logit_scale"), Rule("logit_bias", f"{j}logit_bias")]
    pos_key = "text_model.embeddings.position_embedding.weight"
    unused = (r"^vision_model\.(embeddings|encoder)\.", re.escape(pos_key) + "$")
    take(sig, rules, siglip_dir, unused)
    table = extend_positions(np.asarray(sig[pos_key], np.float32), keep=cfg.clip_text.position_keep)
    for name in ("position_embedding", "position_embedding_res"):
        out[f"{j}clip_text_model/embeddings/{name}"] = table.astype(np_dtype)

    missing = [k for k in flat_exp if k not in out]
    if missing:
        raise ConversionError(f"start point leaves parameters unfilled: {missing[:30]}")
    bad = [
        f"{k}: built {v.shape}, model wants {flat_exp[k].shape}"
        for k, v in out.items()
        if tuple(v.shape) != tuple(flat_exp[k].shape)
    ]
    if bad:
        raise ConversionError("start point shape mismatches:\n  " + "\n  ".join(bad[:30]))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
    return params_io.save_params(output, params, "ppllava", ppllava_config_to_hf(cfg))
