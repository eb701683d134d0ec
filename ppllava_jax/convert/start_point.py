"""The training start points, assembled from released checkpoints and written as a ``ppllava``
directory (SPEC §9).

``build_start_point(llava_dir, clip_dir, output)``:

- LLaVA-NeXT (``llava-v1.6-vicuna-7b-hf``) + OpenAI CLIP (``clip-vit-large-patch14-336``), the
  paper's: vision trunk, ``linear_1``/``linear_2``, the LLM and ``image_newline`` from
  LLaVA-NeXT; the projector's CLIP text tower, ``clip_text_projection``,
  ``clip_visual_projection``, ``clip_visual_ln`` (= CLIP's vision ``post_layernorm``) and
  ``logit_scale`` from CLIP, the 77-row text positions extended to 248 rows (both
  ``position_embedding`` and ``position_embedding_res``); the BT-Adapter as the original builds
  it (``init_btadapter``).
- LLaVA-OneVision-Qwen2-7B-SI + SigLIP-so400m (the original's
  ``config/qwen/ppllava_qwen7b_videoonly.yaml``), when ``llava_dir`` is a LLaVA-OneVision: the
  towers, MLP, Qwen2 and ``image_newline`` from LLaVA-OneVision; from SigLIP the text tower (64
  positions extended to 196, both tables), the vision tower's ``head`` (-> ``clip_visual_head``)
  and ``post_layernorm`` (-> ``clip_visual_ln``), ``logit_scale`` and ``logit_bias``. SigLIP's
  own vision trunk is not used; no BT-Adapter.

Strict: every parameter must be filled, and every tensor of the LLaVA checkpoint (and of SigLIP,
but its vision trunk and 64-row position table) used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ppllava_jax.convert import params_io
from ppllava_jax.convert.api import with_runtime
from ppllava_jax.convert.clip_keys import text_rules
from ppllava_jax.convert.mapping import (
    ConversionError,
    KeyMap,
    Rule,
    convert_state_dict,
    flat_params,
    layout_prefix,
    linear_rules,
    ln_rules,
)
from ppllava_jax.convert.ppllava_config import ppllava_config_to_hf, start_point_config
from ppllava_jax.convert.ppllava_family import IGNORE, ppllava_abstract_params
from ppllava_jax.convert.ppllava_keys import detect_layout, ppllava_rules
from ppllava_jax.convert.registry import read_json_config
from ppllava_jax.convert.siglip_keys import head_rules, siglip_text_rules
from ppllava_jax.models.config import PPLLaVAConfig

PROJ = "multi_modal_projector/"


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
    """Assemble a training start point (module docstring) and write it to ``output`` as a
    ``ppllava`` directory (replaced once complete, never a source). dtype: storage dtype;
    seed: of ``numpy.random.default_rng`` drawing the BT-Adapter's fresh tensors; overrides:
    PPLLaVA fields (``btadapter_depth``, ``max_T``, ...; the Qwen variant has no BT-Adapter and
    ignores ``btadapter_depth``). Returns the absolute output path."""
    from ppllava_jax.convert.torch_io import TorchCheckpoint
    from ppllava_jax.models.longclip import extend_positions

    llava_dir, clip_dir = Path(llava_dir), Path(clip_dir)
    llava_hf, clip_hf = read_json_config(llava_dir), read_json_config(clip_dir)
    qwen = llava_hf.get("model_type") == "llava_onevision"
    if qwen:
        if clip_hf.get("model_type") != "siglip":
            raise ValueError(
                f"--clip {clip_dir} is a {clip_hf.get('model_type')!r} model; the Qwen start "
                "point needs a SiglipModel (google/siglip-so400m-patch14-384)"
            )
        overrides.pop("btadapter_depth", None)  # the command line's default; no adapter here
    cfg = start_point_config(llava_hf, clip_hf, qwen=qwen, **overrides)
    cfg = with_runtime(cfg, scan_layers=scan_layers)
    parts = _Parts(cfg, np.dtype(jnp.dtype(dtype)))

    # 1. LLaVA-NeXT / LLaVA-OneVision: vision trunk, MLP, LLM, newline.
    llava = TorchCheckpoint(llava_dir)
    plain = dataclasses.replace(cfg, btadapter=False, pooling="none")
    parts.take(llava, ppllava_rules(plain, detect_layout(llava)), llava_dir, known_unused=())

    # 2. The prompt encoder: CLIP's or SigLIP's text tower (positions extended), and the rest.
    encoder = TorchCheckpoint(clip_dir)
    rules, known_unused, t_prefix = (_siglip_rules if qwen else _clip_rules)(encoder)
    pos_key = f"{t_prefix}embeddings.position_embedding.weight"
    parts.take(encoder, rules, clip_dir, known_unused)
    table = extend_positions(
        np.asarray(encoder[pos_key], np.float32), keep=cfg.clip_text.position_keep
    )
    for name in ("position_embedding", "position_embedding_res"):
        parts.out[f"{PROJ}clip_text_model/embeddings/{name}"] = table.astype(parts.dtype)

    # 3. BT-Adapter from the trunk's last D layers.
    if cfg.btadapter:
        factor = float(llava_hf.get("vision_config", {}).get("initializer_factor", 1.0))
        rng = np.random.default_rng(seed)
        init_btadapter(cfg, parts.out, parts.expected, parts.dtype, rng, factor)
    return parts.save(output, [llava_dir, clip_dir])


def _text_rules_without_positions(rules: list[Rule]) -> list[Rule]:
    """The start point extends the position table itself."""
    return [r for r in rules if "position_embedding" not in r.torch]


def _clip_rules(clip: Mapping[str, Any]) -> tuple[list[Rule], tuple[str, ...] | None, str]:
    """(rules, known-unused patterns (None: unused tensors are not checked), text prefix) of
    OpenAI CLIP in the transformers 4 or 5 layout."""
    t, v = layout_prefix(clip, "text_model."), layout_prefix(clip, "vision_model.")
    rules = _text_rules_without_positions(text_rules(t, f"{PROJ}clip_text_model/"))
    rules += linear_rules("text_projection", f"{PROJ}clip_text_projection", bias=False)
    rules += linear_rules("visual_projection", f"{PROJ}clip_visual_projection", bias=False)
    rules += ln_rules(f"{v}post_layernorm", f"{PROJ}clip_visual_ln")
    rules.append(Rule("logit_scale", f"{PROJ}logit_scale"))
    return rules, None, t


def _siglip_rules(sig: Mapping[str, Any]) -> tuple[list[Rule], tuple[str, ...] | None, str]:
    """As ``_clip_rules`` for a ``SiglipModel`` (its vision trunk and the 64-row position table
    are known to be unused)."""
    t = "text_model."
    rules = _text_rules_without_positions(siglip_text_rules(t, f"{PROJ}clip_text_model/"))
    rules += head_rules("vision_model.head.", f"{PROJ}clip_visual_head/")
    rules += ln_rules("vision_model.post_layernorm", f"{PROJ}clip_visual_ln")
    rules += [Rule("logit_scale", f"{PROJ}logit_scale"), Rule("logit_bias", f"{PROJ}logit_bias")]
    pos_key = re.escape(f"{t}embeddings.position_embedding.weight") + "$"
    return rules, (r"^vision_model\.(embeddings|encoder)\.", pos_key), t


class _Parts:
    """The start point's flat parameters (``out``: ``{"a/b/c": numpy array}``) as they are
    gathered from several checkpoints, checked against the model's (``expected``)."""

    def __init__(self, cfg: PPLLaVAConfig, dtype: np.dtype):
        self.cfg, self.dtype = cfg, dtype
        self.abstract = ppllava_abstract_params(cfg)
        self.expected = flat_params(self.abstract)
        self.out: dict[str, np.ndarray] = {}

    def take(
        self,
        ckpt: Mapping[str, Any],
        rules: list[Rule],
        source: Path,
        known_unused: tuple[str, ...] | None,
    ) -> None:
        """Convert what ``rules`` name; unless ``known_unused`` is None, every other tensor of
        ``ckpt`` must be a buffer (``IGNORE``) or match ``known_unused``."""
        keymap = KeyMap(rules)
        part = convert_state_dict(
            ckpt,
            keymap,
            self.abstract,
            dtype=self.dtype,
            ignore=IGNORE,
            strict=False,
            source=str(source),
        )
        self.out.update(flat_params(part))
        if known_unused is None:
            return
        skip = (*IGNORE, *known_unused)
        extra = [k for k in ckpt if not keymap.to_jax(k) and not any(re.search(p, k) for p in skip)]
        if extra:
            raise ConversionError(f"{source}: tensors not used: {extra[:20]}")

    def save(self, output: str | Path, sources: list[Path]) -> Path:
        """Check every parameter is filled with its shape, then write the directory."""
        from flax import traverse_util

        missing = [k for k in self.expected if k not in self.out]
        if missing:
            raise ConversionError(f"start point leaves parameters unfilled: {missing[:30]}")
        bad = [
            f"{k}: built {v.shape}, model wants {self.expected[k].shape}"
            for k, v in self.out.items()
            if tuple(v.shape) != tuple(self.expected[k].shape)
        ]
        if bad:
            raise ConversionError("start point shape mismatches:\n  " + "\n  ".join(bad[:30]))
        params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in self.out.items()})
        hf = ppllava_config_to_hf(self.cfg)
        return params_io.save_converted(output, params, "ppllava", hf, sources)


def init_btadapter(
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
