"""Model configurations: frozen, hashable dataclasses (usable as static jit arguments).

Each config reads and writes the transformers ``config.json`` fields of its family
(``from_hf`` / ``to_hf``) and carries the runtime fields of ``Runtime`` (dtypes, scan, remat,
attention kernel). Defaults are the 7B PPLLaVA sizes (CLIP ViT-L/14-336, Vicuna-7B).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """How a tower runs; not part of the checkpoint.

    dtype: compute dtype of activations and matmuls ('float32', 'bfloat16').
    param_dtype: dtype parameters are created and stored in.
    scan_layers: stack repeated layers and ``nn.scan`` over them (compile time independent of
      depth); False keeps one sub-module per layer (``layers_0``, ``layers_1``, ...).
    remat_policy: 'none' | 'full' | 'dots' | 'dots_no_batch' (see layers.REMAT_POLICIES).
    attention_impl: 'xla' | 'cudnn' | 'auto' for ``jax.nn.dot_product_attention``.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def runtime(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _RUNTIME_FIELDS}

    def replace(self, **kw: Any) -> Any:
        return dataclasses.replace(self, **kw)


def _pick(cls: type, d: dict[str, Any], **overrides: Any) -> Any:
    """Build ``cls`` from the keys of ``d`` it knows; unknown keys are ignored (HF configs carry
    dozens of generation fields), ``None`` values keep the default."""
    names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
    # runtime fields come only from ``overrides``: HF configs carry "dtype" (the storage dtype)
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in list(kw.items()):
        if isinstance(v, list):
            kw[k] = _tuplify(v)
    return cls(**kw)


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig(Runtime):
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> CLIPVisionConfig:
        if "vision_config" in d:  # a CLIPModel config
            d = {**d["vision_config"], "projection_dim": d.get("projection_dim")}
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in _RUNTIME_FIELDS:
            d.pop(f)
        d["model_type"] = "clip_vision_model"
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig(Runtime):
    """CLIP text tower. ``max_position_embeddings`` is the table length actually used (248 for the
    Long-CLIP extension); ``position_keep`` rows (< 20) come from the frozen original table when
    ``extended`` is set (SPEC section 4)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    extended: bool = False
    position_keep: int = 20

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> CLIPTextConfig:
        if "text_config" in d:  # a CLIPModel config
            d = {**d["text_config"], "projection_dim": d.get("projection_dim")}
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in (*_RUNTIME_FIELDS, "extended", "position_keep"):
            d.pop(f)
        d["model_type"] = "clip_text_model"
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(Runtime):
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> LlamaConfig:
        d = dict(d)
        if d.get("rope_scaling") not in (None, {}) and d["rope_scaling"].get(
            "rope_type", d["rope_scaling"].get("type")
        ) not in (None, "default"):
            raise NotImplementedError(f"rope_scaling={d['rope_scaling']} is not supported")
        rp = d.get("rope_parameters")  # transformers 5 moves rope_theta here
        if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in d:
            d["rope_theta"] = rp["rope_theta"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in _RUNTIME_FIELDS:
            d.pop(f)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"])
        return d


LN_100 = math.log(100.0)


_OPENAI_CLIP_L336_TEXT = dict(  # text tower of openai/clip-vit-large-patch14-336
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,  # the legacy ids of that config.json: pooling at argmax(ids)
    eos_token_id=2,
    pad_token_id=1,
)

# PPLLaVA fields of the original's config.json, with the original's class defaults where the
# 7B model does not differ (pooling/btadapter/extend_clip are the 7B model's values).
_PPLLAVA_FIELDS = (
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
)

# an explicit null in config.json means "not set" for these (the image kernel then falls back to
# the video one, as in the original)
_NULLABLE_FIELDS = (
    "pooling_kernel",
    "pooling_stride",
    "image_pooling_kernel",
    "image_pooling_stride",
    "pllava_pooling_shape",
    "clip_weight",
    "clip_post_pretrain",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPLLaVAConfig(Runtime):
    """The whole PPLLaVA model (a LLaVA-NeXT config.json plus the PPLLaVA fields).

    vision: the CLIP vision tower (``vision_config``); clip_text: the projector's CLIP text tower
      (from ``clip/config.json`` that ``clip_weight`` names; 248 positions when ``extend_clip``);
      llm: the decoder (``text_config``).
    pooling: 'ppllava' (prompt-guided) | 'avp' (mean over frames) | 'none' (all tokens) |
      'pllava' (adaptive average pool to ``pllava_pooling_shape``).
    pooling_kernel/stride: video windows (t, h, w); image_pooling_kernel/stride: still images,
      any-resolution views and multi-image samples (None: the video ones).
    frame_shape: patch grid (rows, cols) of one frame.
    pooling_temp: temperature of the in-window softmax.
    btadapter, btadapter_depth, max_T: the BT-Adapter (SPEC section 2); max_T rows of time
      embedding = the most frames one sample may have.
    Runtime fields (dtype, scan_layers, ...) are copied to the three sub-configs.
    """

    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    clip_text: CLIPTextConfig = dataclasses.field(
        default_factory=lambda: CLIPTextConfig(
            **{**_OPENAI_CLIP_L336_TEXT, "max_position_embeddings": 248}, extended=True
        )
    )
    llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    image_token_index: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = (
        (336, 672),
        (672, 336),
        (672, 672),
        (1008, 336),
        (336, 1008),
    )
    projector_hidden_act: str = "gelu"
    pooling: str = "ppllava"
    pooling_kernel: tuple[int, int, int] | None = (2, 3, 3)
    pooling_stride: tuple[int, int, int] | None = (2, 3, 3)
    image_pooling_kernel: tuple[int, int, int] | None = (1, 3, 3)
    image_pooling_stride: tuple[int, int, int] | None = (1, 3, 3)
    pllava_pooling_shape: tuple[int, int, int] | None = None
    frame_shape: tuple[int, int] = (24, 24)
    pooling_temp: float = 0.01
    btadapter: bool = True
    btadapter_depth: int = 4
    max_T: int = 128
    extend_clip: bool = True
    clip_weight: str | None = None
    clip_post_pretrain: str | None = None
    ignore_index: int = -100
    pad_token_id: int = 0
    # Not in config.json: reproduce the original BT-Adapter's reading of a sample with exactly 3
    # frames/images as channels-first (its ``x.shape[1] == 3`` test), which swaps the frame and
    # colour axes of those 3 frames. The released model ran (and was trained) that way, and the
    # fixtures' 3-image sample depends on it; False gives the evident intent.
    legacy_three_frame_swap: bool = True

    def __post_init__(self) -> None:
        rt = self.runtime()
        for name in ("vision", "clip_text", "llm"):
            sub = getattr(self, name)
            if sub.runtime() != rt:
                object.__setattr__(self, name, sub.replace(**rt))
        if self.pooling not in ("ppllava", "avp", "none", "pllava"):
            raise ValueError(
                f"pooling={self.pooling!r} is not supported; use 'ppllava', 'avp', 'none' or "
                "'pllava'"
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}; "
                "expected 'default' or 'full'"
            )
        if tuple(self.frame_shape) != (self.vision.grid, self.vision.grid):
            raise ValueError(
                f"frame_shape={self.frame_shape} does not match the vision tower's patch grid "
                f"{self.vision.grid}x{self.vision.grid} (image_size {self.vision.image_size} / "
                f"patch_size {self.vision.patch_size})"
            )
        if self.btadapter and not 1 <= self.btadapter_depth <= self.vision.num_hidden_layers:
            raise ValueError(
                f"btadapter_depth={self.btadapter_depth} must be in [1, "
                f"{self.vision.num_hidden_layers}] (the vision tower's layers)"
            )

    @property
    def clip_projection_dim(self) -> int:
        """Width of the projector's CLIP visual/text projections."""
        return self.clip_text.projection_dim

    def pool_kernel_stride(self, video: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(kernel, stride) of the prompt-guided pool: video ones, or the image ones (still
        images, any-resolution views, multi-image samples; falling back to the video ones)."""
        k, s = self.pooling_kernel, self.pooling_stride
        if not video:
            k = self.image_pooling_kernel if self.image_pooling_kernel is not None else k
            s = self.image_pooling_stride if self.image_pooling_stride is not None else s
        if k is None or s is None:
            raise ValueError(
                "pooling='ppllava' needs pooling_kernel and pooling_stride in config.json"
            )
        return tuple(k), tuple(s)

    @classmethod
    def from_hf(
        cls, d: dict[str, Any], clip_config: dict[str, Any] | None = None, **runtime: Any
    ) -> PPLLaVAConfig:
        """From the original's config.json ``d`` and the ``clip/config.json`` its
        ``clip_weight`` points to (None: OpenAI clip-vit-large-patch14-336's text tower)."""
        if d.get("qwen"):
            raise NotImplementedError("the Qwen/SigLIP variant of PPLLaVA is not supported")
        rt = {k: v for k, v in runtime.items() if v is not None}
        vision = CLIPVisionConfig.from_hf(d.get("vision_config", {}), **rt)
        llm = LlamaConfig.from_hf(d.get("text_config", {}), **rt)
        text = (
            CLIPTextConfig.from_hf(clip_config, **rt)
            if clip_config is not None
            else CLIPTextConfig(**_OPENAI_CLIP_L336_TEXT, **rt)
        )
        extend = bool(d.get("extend_clip", cls.extend_clip))
        if extend:
            base = text.max_position_embeddings if not text.extended else 77
            text = text.replace(
                extended=True,
                max_position_embeddings=4 * base - 3 * text.position_keep,
            )
        kw = {
            k: d[k]
            for k in _PPLLAVA_FIELDS
            if k in d and (d[k] is not None or k in _NULLABLE_FIELDS)
        }
        for k, v in list(kw.items()):
            if isinstance(v, list):
                kw[k] = _tuplify(v)
        return cls(vision=vision, clip_text=text, llm=llm, **kw, **rt)

    def to_hf(self) -> dict[str, Any]:
        """The original's config.json (LLaVA-NeXT layout plus the PPLLaVA fields)."""
        d: dict[str, Any] = {k: _listify(getattr(self, k)) for k in _PPLLAVA_FIELDS}
        vision = self.vision.to_hf()
        vision.update(depth=self.btadapter_depth, max_T=self.max_T)
        d.update(
            model_type="llava_next",
            vision_config=vision,
            text_config=self.llm.to_hf(),
            hidden_size=self.llm.hidden_size,
            qwen=False,
        )
        return d

    def clip_to_hf(self) -> dict[str, Any]:
        """``clip/config.json`` for the projector's CLIP (text tower as in the checkpoint, 77
        positions before the extension; vision tower = the LLaVA vision config)."""
        text = self.clip_text.to_hf()
        if self.clip_text.extended:
            k = self.clip_text.position_keep
            text["max_position_embeddings"] = (self.clip_text.max_position_embeddings + 3 * k) // 4
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.clip_text.projection_dim,
            "text_config": text,
            "vision_config": self.vision.to_hf(),
        }


def ppllava_config_from_dict(d: dict[str, Any]) -> PPLLaVAConfig:
    """``PPLLaVAConfig`` from a plain dict (an ml_collections ``model`` section): ``vision``,
    ``clip_text`` and ``llm`` are dicts of their dataclass fields, the rest PPLLaVA fields.
    Unknown keys are an error naming them."""
    d = dict(d)
    subs = {"vision": CLIPVisionConfig, "clip_text": CLIPTextConfig, "llm": LlamaConfig}
    kw: dict[str, Any] = {}
    for name, cls in subs.items():
        sub = dict(d.pop(name, {}) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(sub) - names)
        if bad:
            raise ValueError(f"model.{name}: unknown fields {bad}; known: {sorted(names)}")
        kw[name] = cls(**{k: _tuplify(v) for k, v in sub.items()})
    names = {f.name for f in dataclasses.fields(PPLLaVAConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(f"model: unknown fields {bad}; known: {sorted(names - set(subs))}")
    kw.update({k: _tuplify(v) for k, v in d.items()})
    return PPLLaVAConfig(**kw)
