"""Model configurations: frozen, hashable dataclasses (usable as static jit arguments).

Field names are the transformers ``config.json`` names of each family; reading and writing
``config.json`` is ``convert/hf_config.py`` / ``convert/ppllava_config.py``. Every config carries
the runtime fields of ``Runtime`` (dtypes, scan, remat, attention kernel). Defaults are the 7B
PPLLaVA sizes (CLIP ViT-L/14-336, Vicuna-7B).
"""

from __future__ import annotations

import dataclasses
from typing import Any

RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


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
        return {f: getattr(self, f) for f in RUNTIME_FIELDS}

    def replace(self, **kw: Any) -> Any:
        return dataclasses.replace(self, **kw)


class PatchGrid:
    """Patch-grid facts of a vision tower config (fields ``image_size``, ``patch_size``)."""

    image_size: int
    patch_size: int

    @property
    def grid(self) -> int:
        """Patches per side: ``image_size // patch_size`` (pixels past it are not seen)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig(Runtime, PatchGrid):
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipVisionConfig(Runtime, PatchGrid):
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


SIGLIP_SO400M_TEXT = dict(  # text tower of google/siglip-so400m-patch14-384
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


OPENAI_CLIP_L336_TEXT = dict(  # text tower of openai/clip-vit-large-patch14-336
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
            **{**OPENAI_CLIP_L336_TEXT, "max_position_embeddings": 248}, extended=True
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
            **{**SIGLIP_SO400M_TEXT, "max_position_embeddings": 4 * 64 - 3 * 20}, extended=True
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
