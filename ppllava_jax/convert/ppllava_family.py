"""Converter families for whole models: released PPLLaVA checkpoints and LLaVA-NeXT.

- ``ppllava``: a released PPLLaVA directory (``config.json`` with the PPLLaVA fields, weights with
  ``vision_tower.vision_model.*`` incl. ``btadapter_*``, ``multi_modal_projector.*`` incl.
  ``clip_text_model``, ``language_model.*``, ``image_newline``; the CLIP config in the directory
  its ``clip_weight`` names, e.g. ``clip/config.json``).
- ``llava_next``: a LLaVA-NeXT checkpoint (``LlavaNextForConditionalGeneration``) as the PPLLaVA
  model without BT-Adapter and without pooling (``pooling='none'``) — the special case
  transformers implements.

Both accept the key layouts transformers 4 and 5 write (``vision_tower.vision_model.`` or
``vision_tower.``, optionally under ``model.``; ``language_model.model.`` +
``language_model.lm_head.`` or ``model.language_model.`` + ``lm_head.``) and export the original
(transformers 4.45) layout. ``build_start_point`` assembles the paper's training start point from
LLaVA-NeXT plus OpenAI CLIP (SPEC §9).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ppllava_jax.convert.clip_keys import IGNORE as CLIP_IGNORE
from ppllava_jax.convert.llama_keys import IGNORE as LLAMA_IGNORE
from ppllava_jax.convert.llama_keys import llama_rules
from ppllava_jax.convert.mapping import KeyMap, Rule
from ppllava_jax.convert.ppllava_keys import ppllava_vision_rules, projector_rules
from ppllava_jax.convert.registry import Family, read_json_config
from ppllava_jax.models.config import PPLLaVAConfig

IGNORE = (*CLIP_IGNORE, *LLAMA_IGNORE)

_V4 = dict(
    vision="vision_tower.vision_model.",
    projector="multi_modal_projector.",
    llm="language_model.model.",
    head="language_model.lm_head.",
    newline="image_newline",
)


def detect_layout(keys: Iterable[str]) -> dict[str, str]:
    """Torch prefixes of the model's parts in a checkpoint, from its keys."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    out = dict(_V4)
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
    """Every parameter of ``PPLLaVA(cfg)`` under the torch prefixes of ``layout``."""
    if cfg.qwen:  # SigLIP + Qwen2 (convert/qwen_ppllava_keys.py)
        from ppllava_jax.convert.qwen_ppllava_keys import qwen_ppllava_rules

        return qwen_ppllava_rules(cfg, layout)
    lay = layout or _V4
    rules = ppllava_vision_rules(lay["vision"], "vision_tower/vision_model/", cfg.btadapter)
    rules += projector_rules(
        lay["projector"], "multi_modal_projector/", cfg.pooling, cfg.clip_text.extended
    )
    rules += llama_rules(
        torch_model=lay["llm"], torch_head=lay["head"], jax_prefix="language_model/"
    )
    rules.append(Rule(lay["newline"], "image_newline"))
    return rules


def _keymap(cfg: PPLLaVAConfig, keys: Iterable[str] = ()) -> KeyMap:
    return KeyMap(ppllava_rules(cfg, detect_layout(keys)))


def _export_keymap(cfg: PPLLaVAConfig) -> KeyMap:
    return KeyMap(ppllava_rules(cfg))


def _abstract(cfg: PPLLaVAConfig) -> Any:
    from ppllava_jax.models.ppllava import abstract_params

    return abstract_params(cfg)


# -- ppllava -------------------------------------------------------------------------------


def _read_ppllava_config(source: Path) -> dict:
    """config.json plus, under ``clip_config``, the CLIP config ``clip_weight`` points to (a
    directory relative to the checkpoint, ``clip/`` by default) when present."""
    d = read_json_config(source)
    if "clip_config" not in d:
        for name in (d.get("clip_weight"), "clip"):
            if not name:
                continue
            p = Path(source) / str(name) / "config.json"
            if p.exists():
                d["clip_config"] = json.loads(p.read_text())
                break
    return d


def ppllava_config_from_hf(d: dict) -> PPLLaVAConfig:
    return PPLLaVAConfig.from_hf(d, d.get("clip_config"))


def ppllava_config_to_hf(cfg: PPLLaVAConfig) -> dict:
    d = cfg.to_hf()
    d["clip_weight"] = d.get("clip_weight") or "clip"
    d["clip_config"] = cfg.clip_to_hf()
    return d


def _write_clip_config(cfg: PPLLaVAConfig, out: Path) -> None:
    (out / "clip").mkdir(parents=True, exist_ok=True)
    (out / "clip" / "config.json").write_text(json.dumps(cfg.clip_to_hf(), indent=2))


def _is_ppllava(d: dict) -> bool:
    # the Qwen variant is written in the LLaVA-OneVision layout (``qwen: true``)
    return d.get("model_type") in ("llava_next", "llava_onevision") and (
        "pooling" in d or "btadapter" in d
    )


# -- llava_next ----------------------------------------------------------------------------


def _with_llava_defaults(d: dict) -> dict:
    """Fill what a LLaVA-NeXT config.json leaves to transformers' defaults: the vision config's
    omitted fields, the image token id and ``frame_shape`` (the tower's patch grid)."""
    from ppllava_jax.convert.clip_keys import vision_config_from_hf

    d = dict(d)
    vision = vision_config_from_hf(d.get("vision_config", {}))
    d["vision_config"] = vision.to_hf()
    d.setdefault("image_token_index", d.get("image_token_id", 32000))
    d.setdefault("frame_shape", [vision.grid, vision.grid])
    return d


def llava_next_config_from_hf(d: dict) -> PPLLaVAConfig:
    """LLaVA-NeXT as PPLLaVA: no BT-Adapter, no pooling, no CLIP text tower."""
    d = _with_llava_defaults({k: v for k, v in d.items() if k != "clip_config"})
    d.update(pooling="none", btadapter=False, extend_clip=False)
    cfg = PPLLaVAConfig.from_hf(d, None)
    return cfg


def llava_next_config_to_hf(cfg: PPLLaVAConfig) -> dict:
    d = {
        "model_type": "llava_next",
        "architectures": ["LlavaNextForConditionalGeneration"],
        "vision_config": cfg.vision.to_hf(),
        "text_config": cfg.llm.to_hf(),
        "image_token_index": cfg.image_token_index,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
    }
    return d


def _is_llava_next(d: dict) -> bool:
    archs = d.get("architectures") or []
    return not _is_ppllava(d) and (
        d.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in archs
    )


FAMILIES = [
    Family(
        name="ppllava",
        detect=_is_ppllava,
        config_from_hf=ppllava_config_from_hf,
        config_to_hf=ppllava_config_to_hf,
        abstract_params=_abstract,
        keymap=_keymap,
        export_keymap=_export_keymap,
        ignore=IGNORE,
        read_hf_config=_read_ppllava_config,
        write_hf_extras=_write_clip_config,
    ),
    Family(
        name="llava_next",
        detect=_is_llava_next,
        config_from_hf=llava_next_config_from_hf,
        config_to_hf=llava_next_config_to_hf,
        abstract_params=_abstract,
        keymap=_keymap,
        export_keymap=_export_keymap,
        ignore=IGNORE,
    ),
]


# -- the training start point --------------------------------------------------------------


# The original's ``LlavaInterleaveForConditionalGeneration.from_config`` sets
# ``max_T = cfg.get("max_T", 64)`` and no shipped yaml names ``max_T``: 64 time-embedding rows.
START_MAX_T = 64


def start_point_config(llava_hf: dict, clip_hf: dict, **overrides: Any) -> PPLLaVAConfig:
    """PPLLaVA config of the paper's start point: LLaVA-NeXT's towers and LLM, the CLIP text
    tower of ``clip_hf`` (extended to 248 positions), BT-Adapter depth 4 with ``max_T`` = 64 time
    embeddings (the original's defaults), prompt-guided pooling.
    ``overrides``: PPLLaVA fields to change (e.g. ``btadapter_depth``, ``max_T``)."""
    d = _with_llava_defaults(
        {k: v for k, v in llava_hf.items() if k not in ("pooling", "btadapter")}
    )
    d.update(
        pooling="ppllava",
        btadapter=True,
        btadapter_depth=4,
        extend_clip=True,
        max_T=START_MAX_T,
    )
    names = {f.name for f in dataclasses.fields(PPLLaVAConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown PPLLaVA config fields {sorted(unknown)}")
    d.update(overrides)  # PPLLaVAConfig.from_hf reads the PPLLaVA fields from the dict
    base = PPLLaVAConfig.from_hf(d, clip_hf)
    rest = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    return dataclasses.replace(base, **rest) if rest else base


def build_start_point(
    llava_dir: str | Path,
    clip_dir: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    scan_layers: bool = True,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Assemble the paper's training start point (SPEC §9) and write it as a ``ppllava``
    directory.

    - vision trunk, ``linear_1``/``linear_2``, the LLM and ``image_newline``: from LLaVA-NeXT
      (``llava-v1.6-vicuna-7b-hf``);
    - the projector's CLIP text tower, ``clip_text_projection``, ``clip_visual_projection``,
      ``clip_visual_ln`` (= CLIP's vision ``post_layernorm``) and ``logit_scale``: from OpenAI
      CLIP (``clip-vit-large-patch14-336``), the 77-row text positions extended to 248 rows
      (both ``position_embedding`` and ``position_embedding_res``);
    - BT-Adapter, as the original builds it (``CLIPVisionModel_BTAdapter`` initialised by
      transformers' ``CLIPPreTrainedModel._init_weights``, LLaVA-NeXT loaded over it, then
      ``init_weights``): spatial layers ``j`` copied from the vision trunk's layers ``N - D + j``;
      temporal layers fresh (``_init_btadapter``: CLIP's attention initialisation, LayerNorm
      1 / 0, ``temporal_fc`` zero, so the temporal branch starts as the identity); time
      embedding ``nn.Embedding``'s default N(0, 1) with ``max_T`` rows; class token zero. The
      fresh tensors are drawn from ``numpy.random.default_rng(seed)``.

    Strict: every parameter must be filled and every tensor of both checkpoints used or known
    to be unused (CLIP's vision tower, the text tower's 77-row table).

    A LLaVA-OneVision ``llava_dir`` with a SigLIP ``clip_dir`` builds the Qwen variant's start
    point instead (``qwen_ppllava_keys.build_qwen_start_point``; no BT-Adapter).
    """
    if read_json_config(Path(llava_dir)).get("model_type") == "llava_onevision":
        from ppllava_jax.convert.qwen_ppllava_keys import build_qwen_start_point

        overrides.pop("btadapter_depth", None)  # no BT-Adapter in the Qwen variant
        return build_qwen_start_point(
            llava_dir, clip_dir, output, dtype=dtype, scan_layers=scan_layers, **overrides
        )
    import jax

    from ppllava_jax.convert import params_io
    from ppllava_jax.convert.api import with_runtime
    from ppllava_jax.convert.clip_keys import text_rules
    from ppllava_jax.convert.mapping import ConversionError, convert_state_dict
    from ppllava_jax.convert.torch_io import TorchCheckpoint
    from ppllava_jax.models.longclip import extend_positions

    llava_dir, clip_dir = Path(llava_dir), Path(clip_dir)
    llava_hf = read_json_config(llava_dir)
    clip_hf = read_json_config(clip_dir)
    cfg = with_runtime(start_point_config(llava_hf, clip_hf, **overrides), scan_layers=scan_layers)
    abstract = _abstract(cfg)
    flat_exp = _flatten(jax.tree.map(lambda x: x, abstract))
    out: dict[str, np.ndarray] = {}
    np_dtype = np.dtype(jax.numpy.dtype(dtype))

    # 1. LLaVA-NeXT: trunk, MLP, LLM, newline.
    llava = TorchCheckpoint(llava_dir)
    lay = detect_layout(llava)
    plain = dataclasses.replace(cfg, btadapter=False, pooling="none")
    part = convert_state_dict(
        llava,
        KeyMap(ppllava_rules(plain, lay)),
        abstract,
        dtype=np_dtype,
        ignore=IGNORE,
        strict=False,
        source=str(llava_dir),
    )
    out.update(_flatten(part))
    llava_used = {k for k in llava if KeyMap(ppllava_rules(plain, lay)).to_jax(k)}
    extra = [k for k in llava if k not in llava_used and not any(re.search(p, k) for p in IGNORE)]
    if extra:
        raise ConversionError(f"{llava_dir}: tensors not used: {extra[:20]}")

    # 2. OpenAI CLIP: text tower (positions extended), projections, post-LN, logit scale.
    clip = TorchCheckpoint(clip_dir)
    t_prefix = "text_model." if any(k.startswith("text_model.") for k in clip) else ""
    j = "multi_modal_projector/"
    rules = [
        r
        for r in text_rules(t_prefix, f"{j}clip_text_model/", extended=False)
        if "position_embedding" not in r.torch
    ]
    v_prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""
    rules += [
        Rule("text_projection.weight", f"{j}clip_text_projection/kernel", "linear"),
        Rule("visual_projection.weight", f"{j}clip_visual_projection/kernel", "linear"),
        Rule(f"{v_prefix}post_layernorm.weight", f"{j}clip_visual_ln/scale"),
        Rule(f"{v_prefix}post_layernorm.bias", f"{j}clip_visual_ln/bias"),
        Rule("logit_scale", f"{j}logit_scale"),
    ]
    part = convert_state_dict(
        clip,
        KeyMap(rules),
        abstract,
        dtype=np_dtype,
        ignore=IGNORE,
        strict=False,
        source=str(clip_dir),
    )
    out.update(_flatten(part))
    pos_key = f"{t_prefix}embeddings.position_embedding.weight"
    table = extend_positions(
        np.asarray(clip[pos_key], np.float32), keep=cfg.clip_text.position_keep
    )
    for name in ("position_embedding", "position_embedding_res"):
        out[f"{j}clip_text_model/embeddings/{name}"] = table.astype(np_dtype)

    # 3. BT-Adapter from the trunk's last D layers.
    if cfg.btadapter:
        factor = float(llava_hf.get("vision_config", {}).get("initializer_factor", 1.0))
        _init_btadapter(cfg, out, flat_exp, np_dtype, np.random.default_rng(seed), factor)

    missing = [k for k in flat_exp if k not in out]
    if missing:
        raise ConversionError(f"start point leaves parameters unfilled: {missing[:30]}")
    for k, v in out.items():
        if tuple(v.shape) != tuple(flat_exp[k].shape):
            raise ConversionError(f"{k}: built {v.shape}, model wants {flat_exp[k].shape}")
    from flax import traverse_util

    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
    return params_io.save_converted(
        output, params, "ppllava", ppllava_config_to_hf(cfg), [llava_dir, clip_dir]
    )


def _flatten(tree: Any) -> dict[str, Any]:
    from flax import traverse_util
    from flax.core import meta

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


def _init_btadapter(
    cfg: PPLLaVAConfig,
    out: dict,
    exp: dict,
    dtype: np.dtype,
    rng: np.random.Generator,
    factor: float = 1.0,
) -> None:
    """Fill the BT-Adapter's parameters of ``out`` (flat JAX paths) as the original's start point.

    ``btadapter_S_layers_j``: every tensor of trunk layer ``N - D + j`` (``init_weights``).
    ``btadapter_T_layers_j`` (fresh, transformers ``CLIPPreTrainedModel._init_weights`` with the
    vision config's ``initializer_factor`` = ``factor``): ``q/k/v_proj`` weights
    N(0, ``C**-0.5 * (2 * N)**-0.5 * factor``), ``out_proj`` weight N(0, ``C**-0.5 * factor``),
    every bias 0, ``layer_norm1`` 1 / 0, ``temporal_fc`` 0 / 0 (mmengine ``constant_init``).
    ``btadapter_time_embed``: N(0, 1) (``nn.Embedding``'s default; CLIP's initialisation leaves a
    bare embedding alone), ``[max_T, C]``. ``btadapter_cls_token``: zeros.
    """
    n, d, c = cfg.vision.num_hidden_layers, cfg.btadapter_depth, cfg.vision.hidden_size
    vm = "vision_tower/vision_model/"
    scanned = f"{vm}encoder/layers/layer_norm1/scale" in exp

    def trunk(i: int, sub: str) -> np.ndarray:
        if scanned:
            return out[f"{vm}encoder/layers/{sub}"][i]
        return out[f"{vm}encoder/layers_{i}/{sub}"]

    subs = sorted(
        k.split("/", 4)[-1] if not scanned else k[len(f"{vm}encoder/layers/") :]
        for k in exp
        if k.startswith(f"{vm}encoder/layers" + ("/" if scanned else "_0/"))
    )
    in_std = c**-0.5 * (2 * n) ** -0.5 * factor
    out_std = c**-0.5 * factor

    def fresh(sub: str, shape: tuple[int, ...]) -> np.ndarray:
        if sub.endswith("/bias") or sub.startswith("temporal_fc/"):
            return np.zeros(shape, dtype)
        if sub == "layer_norm1/scale":
            return np.ones(shape, dtype)
        if sub in ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel"):
            return rng.normal(0.0, in_std, shape).astype(dtype)
        if sub == "self_attn/out_proj/kernel":
            return rng.normal(0.0, out_std, shape).astype(dtype)
        raise ValueError(f"btadapter_T_layers/{sub}: no initialisation known for this parameter")

    for jj in range(d):
        src = n - d + jj
        for sub in subs:
            out[f"{vm}btadapter_S_layers_{jj}/{sub}"] = np.array(trunk(src, sub), dtype)
        prefix = f"{vm}btadapter_T_layers_{jj}/"
        for key in sorted(k for k in exp if k.startswith(prefix)):
            out[key] = fresh(key[len(prefix) :], tuple(exp[key].shape))
    out[f"{vm}btadapter_cls_token"] = np.zeros(exp[f"{vm}btadapter_cls_token"].shape, dtype)
    key = f"{vm}btadapter_time_embed/embedding"
    out[key] = rng.standard_normal(exp[key].shape).astype(dtype)
