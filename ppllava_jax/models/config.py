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
    attention_impl: 'xla' (reference) | 'blockwise' (memory-efficient, any backend) | 'cudnn'
      (NVIDIA) | 'splash' (Pallas TPU) | 'auto' (per backend and shape); models/attention.py.
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
class SiglipVisionConfig(Runtime):
    """SigLIP vision tower (``SiglipVisionModel``). Defaults are transformers' class defaults,
    which its config.json files omit. No class token; the patch conv has a bias and "valid"
    padding (pixels past ``grid * patch_size`` are ignored); ``vision_use_head``: the
    attention-pooling head (``head``) after ``post_layernorm``."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> SiglipVisionConfig:
        if "vision_config" in d:  # a SiglipModel config
            d = d["vision_config"]
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in _RUNTIME_FIELDS:
            d.pop(f)
        d["model_type"] = "siglip_vision_model"
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipTextConfig(Runtime):
    """SigLIP text tower (``SiglipTextModel``): bidirectional, final LayerNorm, the last position
    through ``head`` (``hidden_size -> projection_size``; 0 = ``hidden_size``). Defaults are
    transformers' class defaults. ``extended``/``position_keep`` as ``CLIPTextConfig`` (64 rows
    become 196 with PPLLaVA's context extension)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    projection_size: int = 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    extended: bool = False
    position_keep: int = 20

    def __post_init__(self) -> None:
        if not self.projection_size:
            object.__setattr__(self, "projection_size", self.hidden_size)

    @property
    def projection_dim(self) -> int:
        """Width of the pooled output (the ``head``), as CLIP's ``projection_dim``."""
        return self.projection_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> SiglipTextConfig:
        if "text_config" in d:  # a SiglipModel config
            d = d["text_config"]
        d = dict(d)
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        return _pick(cls, d, **runtime)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in (*_RUNTIME_FIELDS, "extended", "position_keep"):
            d.pop(f)
        d["model_type"] = "siglip_text_model"
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
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2); attention_bias puts one on o too
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
        for f in (*_RUNTIME_FIELDS, "qkv_bias"):
            d.pop(f)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"])
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(LlamaConfig):
    """Qwen2 (transformers' ``Qwen2ForCausalLM``): the LLaMA decoder with grouped-query attention,
    bias on q/k/v (not on o), ``rope_theta`` 1e6 and an untied head. Defaults: Qwen2-7B as in
    LLaVA-OneVision-Qwen2-7B. Sliding-window attention is not supported (none of these models
    uses it)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    qkv_bias: bool = True
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643

    @classmethod
    def from_hf(cls, d: dict[str, Any], **runtime: Any) -> Qwen2Config:
        if d.get("use_sliding_window"):
            raise NotImplementedError(
                "use_sliding_window=true in the Qwen2 config.json: sliding-window attention is "
                "not supported (set it false if the model never attends past sliding_window)"
            )
        return super().from_hf(d, **runtime)  # type: ignore[return-value]

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        for f in ("attention_bias", "mlp_bias"):
            d.pop(f)
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            d.pop("head_dim")
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
        return d


LN_100 = math.log(100.0)

_SIGLIP_SO400M_TEXT = dict(  # text tower of google/siglip-so400m-patch14-384
    vocab_size=32000,
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    max_position_embeddings=64,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    projection_size=1152,
    eos_token_id=1,
    pad_token_id=1,
)


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
    "qwen",
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

    vision: CLIPVisionConfig | SiglipVisionConfig = dataclasses.field(
        default_factory=CLIPVisionConfig
    )
    clip_text: CLIPTextConfig | SiglipTextConfig = dataclasses.field(
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
    # The Qwen2 + SigLIP family (the original's ``qwen: true``, LLaVA-OneVision layout): vision is
    # a SiglipVisionConfig (hidden state ``vision_feature_layer`` of a SigLIP tower, every patch),
    # clip_text a SiglipTextConfig (196 positions extended), llm a Qwen2Config; no BT-Adapter.
    qwen: bool = False
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
        siglip = isinstance(self.vision, SiglipVisionConfig)
        if self.qwen != siglip or self.qwen != isinstance(self.clip_text, SiglipTextConfig):
            raise ValueError(
                f"qwen={self.qwen} needs SigLIP vision and text configs (and qwen=False CLIP "
                f"ones); got {type(self.vision).__name__} and {type(self.clip_text).__name__}"
            )
        if self.qwen and self.btadapter:
            raise ValueError("the Qwen/SigLIP variant has no BT-Adapter: set btadapter=false")
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
        rt = {k: v for k, v in runtime.items() if v is not None}
        if d.get("qwen"):
            vision = SiglipVisionConfig.from_hf(d.get("vision_config", {}), **rt)
            llm = Qwen2Config.from_hf(d.get("text_config", {}), **rt)
            text = (
                SiglipTextConfig.from_hf(clip_config, **rt)
                if clip_config is not None
                else SiglipTextConfig(**_SIGLIP_SO400M_TEXT, **rt)
            )
            d = {"btadapter": False, **d}
        else:
            vision = CLIPVisionConfig.from_hf(d.get("vision_config", {}), **rt)
            llm = LlamaConfig.from_hf(d.get("text_config", {}), **rt)
            text = (
                CLIPTextConfig.from_hf(clip_config, **rt)
                if clip_config is not None
                else CLIPTextConfig(**_OPENAI_CLIP_L336_TEXT, **rt)
            )
        extend = bool(d.get("extend_clip", cls.extend_clip))
        if extend:
            base = (
                text.max_position_embeddings if not text.extended else (64 if d.get("qwen") else 77)
            )
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
        """The original's config.json (LLaVA-NeXT layout plus the PPLLaVA fields; LLaVA-OneVision
        for the Qwen variant)."""
        d: dict[str, Any] = {k: _listify(getattr(self, k)) for k in _PPLLAVA_FIELDS}
        if self.qwen:
            d.update(
                model_type="llava_onevision",
                vision_config=self.vision.to_hf(),
                text_config=self.llm.to_hf(),
                hidden_size=self.llm.hidden_size,
                video_token_index=self.image_token_index + 1,  # unused: videos use <image>
                vision_aspect_ratio="anyres_max_9",  # unused by PPLLaVA
                tie_word_embeddings=self.llm.tie_word_embeddings,
            )
            return d
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
        positions before the extension; vision tower = the LLaVA vision config). The Qwen
        variant writes a ``SiglipModel`` config (64 positions, the vision tower with its head)."""
        text = self.clip_text.to_hf()
        if self.clip_text.extended:
            k = self.clip_text.position_keep
            text["max_position_embeddings"] = (self.clip_text.max_position_embeddings + 3 * k) // 4
        if self.qwen:
            return {
                "model_type": "siglip",
                "architectures": ["SiglipModel"],
                "text_config": text,
                "vision_config": {**self.vision.to_hf(), "vision_use_head": True},
            }
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
        kw[name] = cls(**{k: _tuplify(v) for k, v in sub.items()})
    names = {f.name for f in dataclasses.fields(PPLLaVAConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(f"model: unknown fields {bad}; known: {sorted(names - set(subs))}")
    kw.update({k: _tuplify(v) for k, v in d.items()})
    return PPLLaVAConfig(**kw)


def ppllava_qwen7b_config(llm_layers: int = 28, **kw: Any) -> PPLLaVAConfig:
    """The 7B PPLLaVA-Qwen of the original's ``config/qwen/ppllava_qwen7b_videoonly.yaml``:
    LLaVA-OneVision-Qwen2-7B-SI's SigLIP-so400m tower (26 of 27 layers, 384px, 27x27 patches,
    no head) and Qwen2-7B (vocabulary 152128), SigLIP-so400m's text tower extended to 196
    positions, no BT-Adapter. ``kw``: PPLLaVA and runtime fields to change."""
    side = 384
    return PPLLaVAConfig(
        qwen=True,
        vision=SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=side,
            patch_size=14,
            vision_use_head=False,
        ),
        clip_text=SiglipTextConfig(
            **{**_SIGLIP_SO400M_TEXT, "max_position_embeddings": 4 * 64 - 3 * 20}, extended=True
        ),
        llm=Qwen2Config(vocab_size=152128, num_hidden_layers=llm_layers),
        image_token_index=151646,
        pad_token_id=151643,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=tuple((side * i, side * j) for i in range(1, 7) for j in range(1, 7)),
        frame_shape=(27, 27),
        btadapter=False,
        **kw,
    )
