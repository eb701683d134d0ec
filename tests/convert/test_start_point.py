"""The training start point (SPEC §9) as the original builds it, and the BT-Adapter's drop-path.

The original (``LlavaInterleaveForConditionalGeneration.from_config``) constructs
``CLIPVisionModel_BTAdapter``, which transformers initialises with
``CLIPPreTrainedModel._init_weights``; loads LLaVA-NeXT over it; then ``init_weights`` copies the
trunk's last ``depth`` layers into the spatial layers. So: spatial layers = trunk layers
``N - D + j`` exactly; temporal layers fresh (CLIP's attention initialisation, LayerNorm 1 / 0,
biases 0, ``temporal_fc`` 0); time embedding ``nn.Embedding``'s N(0, 1) with ``max_T`` = 64 rows
(``cfg.get("max_T", 64)``; no shipped yaml sets it); class token 0.

The start point is built from a tiny random transformers ``LlavaNextForConditionalGeneration`` +
``CLIPModel`` written to disk, with ``build_start_point`` (what ``convert_torch_weights.py
--clip`` runs), exported back to the original tensor names with ``export_checkpoint``, and
compared in those names. The distributions of the fresh tensors are compared (two-sample
Kolmogorov-Smirnov) with the tensors transformers' own CLIP initialisation draws for the same
vision config (``initializer_factor`` 0.5 so that the factor matters).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.clip.modeling_clip import CLIPAttention

from ppllava_jax.convert.api import export_checkpoint, load_checkpoint
from ppllava_jax.convert.start_point import build_start_point
from ppllava_jax.convert.torch_io import TorchCheckpoint
from ppllava_jax.models.btadapter import PPLLaVAVisionModel
from ppllava_jax.models.config import CLIPVisionConfig as JaxVisionConfig
from ppllava_jax.models.config import PPLLaVAConfig

VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=24,
    patch_size=4,
    initializer_factor=0.5,
)
DEPTH = 2
ORIGINAL_MAX_T = 64  # the original's from_config default (no shipped yaml sets max_T)
BT = "vision_tower.vision_model.btadapter_"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    llava_cfg = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **VISION),
        text_config=dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            pad_token_id=0,
        ),
        image_grid_pinpoints=[[24, 48], [48, 24]],
        image_token_index=100,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    llava = LlavaNextForConditionalGeneration(llava_cfg).eval()
    _randomize(llava, 0)
    llava.save_pretrained(root / "llava")
    vision = {k: v for k, v in VISION.items() if k != "initializer_factor"}
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                vocab_size=99,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=2,
            ),
            vision_config=vision,
            projection_dim=16,
        )
    ).eval()
    _randomize(clip, 1)
    clip.save_pretrained(root / "clip")
    build_start_point(
        root / "llava", root / "clip", root / "start", btadapter_depth=DEPTH, scan_layers=False
    )
    export_checkpoint(root / "start", root / "export")
    return TorchCheckpoint(root / "llava"), TorchCheckpoint(root / "export"), root


@pytest.fixture(scope="module")
def clip_init():
    """Tensors of transformers' own CLIP initialisation for the same vision config."""
    torch.manual_seed(1)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    attn = [m for m in model.modules() if isinstance(m, CLIPAttention)]
    assert len(attn) == VISION["num_hidden_layers"]
    att = lambda names: np.concatenate(
        [getattr(a, n).weight.detach().numpy().ravel() for a in attn for n in names]
    )
    return {"in_proj": att(("q_proj", "k_proj", "v_proj")), "out_proj": att(("out_proj",))}


def _trunk(llava: TorchCheckpoint, layer: int, rest: str) -> np.ndarray:
    (key,) = [k for k in llava if k.endswith(f"encoder.layers.{layer}.{rest}")]
    return llava[key]


def test_spatial_layers_are_the_trunk_s_last_layers(start) -> None:
    llava, exp, _ = start
    n = VISION["num_hidden_layers"]
    keys = [k for k in exp if k.startswith(f"{BT}S_layers.")]
    assert len(keys) == DEPTH * 16  # 2 LayerNorms, q/k/v/out, fc1/fc2: weights and biases
    for key in keys:
        j, rest = re.match(rf"{BT}S_layers\.(\d+)\.(.+)", key).groups()
        np.testing.assert_array_equal(exp[key], _trunk(llava, n - DEPTH + int(j), rest), key)


def test_temporal_layers_are_fresh_with_clip_initialisation(start, clip_init) -> None:
    _, exp, _ = start
    keys = sorted(k for k in exp if k.startswith(f"{BT}T_layers."))
    assert len(keys) == DEPTH * 12  # layer_norm1, q/k/v/out, temporal_fc: weights and biases
    drawn = {"in_proj": [], "out_proj": []}
    for key in keys:
        rest = key.split(".", 4)[-1]
        x = exp[key]
        if rest.endswith("bias") or rest.startswith("temporal_fc."):
            assert not np.any(x), key  # every bias 0, temporal_fc weight 0 (constant_init)
        elif rest == "layer_norm1.weight":
            np.testing.assert_array_equal(x, np.ones_like(x), key)
        elif rest in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
        ):
            drawn["in_proj"].append(x.ravel())
        elif rest == "self_attn.out_proj.weight":
            drawn["out_proj"].append(x.ravel())
        else:
            raise AssertionError(f"{key}: a temporal-layer tensor this test does not know")
    for name, ref in clip_init.items():
        ours = np.concatenate(drawn[name])
        assert len(ours) == DEPTH * (3 if name == "in_proj" else 1) * VISION["hidden_size"] ** 2
        p = stats.ks_2samp(ours, ref).pvalue
        assert p > 1e-3, f"{name}: std {ours.std():.5f} vs CLIP's {ref.std():.5f} (KS p={p:.2g})"
        assert abs(ours.mean()) < 4 * ref.std() / np.sqrt(len(ours))
    # different layers draw different tensors
    q = [exp[f"{BT}T_layers.{j}.self_attn.q_proj.weight"] for j in range(DEPTH)]
    assert not np.array_equal(q[0], q[1])


def test_time_embedding_and_class_token(start) -> None:
    _, exp, root = start
    time = exp[f"{BT}time_embed.weight"]
    assert time.shape == (ORIGINAL_MAX_T, VISION["hidden_size"])
    p = stats.kstest(time.ravel(), "norm").pvalue  # nn.Embedding's default N(0, 1)
    assert p > 1e-3, f"time embedding std {time.std():.4f}, KS p={p:.2g}"
    assert not np.any(exp[f"{BT}cls_token"]) and exp[f"{BT}cls_token"].shape == (1, 1, 64)
    _, cfg, _ = load_checkpoint(root / "start")
    assert cfg.max_T == ORIGINAL_MAX_T and cfg.btadapter_depth == DEPTH
    # every BT-Adapter tensor is one of the above
    rest = {k for k in exp if k.startswith(BT)} - {
        k for k in exp if k.startswith((f"{BT}S_layers.", f"{BT}T_layers."))
    }
    assert rest == {f"{BT}time_embed.weight", f"{BT}cls_token"}


def test_start_point_is_reproducible_by_seed(start, tmp_path) -> None:
    _, exp, root = start
    build_start_point(
        root / "llava", root / "clip", tmp_path / "again", btadapter_depth=DEPTH, scan_layers=False
    )
    _, _, p = load_checkpoint(tmp_path / "again")
    vm = p["vision_tower"]["vision_model"]
    np.testing.assert_array_equal(
        vm["btadapter_time_embed"]["embedding"], exp[f"{BT}time_embed.weight"]
    )


# -- drop-path --------------------------------------------------------------------------------


def test_drop_path_rates_as_the_original_passes_them() -> None:
    """``dpr = np.linspace(0, 0.1, depth)``; ``CLIPLayer_Spatial(config, dpr[i])`` uses it,
    ``CLIPLayer_AttnTime(config, dpr[i])`` takes it as its unused ``T`` and keeps its default
    ``layer_num=0.1``."""
    depth = 4
    cfg = PPLLaVAConfig(
        vision=JaxVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=depth,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        btadapter=True,
        btadapter_depth=depth,
        max_T=4,
        frame_shape=(2, 2),
    )
    model = PPLLaVAVisionModel(cfg)
    px = jax.ShapeDtypeStruct((1, 2, 8, 8, 3), jnp.float32)
    bound = model.bind(jax.eval_shape(model.init, jax.random.key(0), px))
    spatial = [bound.btadapter_S_layers[j].drop_path for j in range(depth)]
    temporal = [bound.btadapter_T_layers[j].drop_path for j in range(depth)]
    np.testing.assert_allclose(spatial, np.linspace(0, 0.1, depth), rtol=0, atol=1e-12)
    assert temporal == [0.1] * depth
    # the rate acts: temporal layer 0 (linspace would give it 0) drops ~10% of its sequences
    # in training (a dropped sequence's residual is temporal_fc(0) = its bias, here 0)
    layer = bound.btadapter_T_layers[0].clone(parent=None)
    patches = jax.random.normal(jax.random.key(2), (1, 4000, 2, 8))
    mask = jnp.ones((1, 2), bool)
    params = layer.init(jax.random.key(3), patches, mask)
    run = jax.jit(
        lambda det: layer.apply(params, patches, mask, det, rngs={"dropout": jax.random.key(1)}),
        static_argnums=0,
    )
    dropped = np.all(np.asarray(run(False)) == np.asarray(patches), axis=(0, 2, 3))
    assert 0.08 < dropped.mean() < 0.12, dropped.mean()
    assert not np.any(np.all(np.asarray(run(True)) == np.asarray(patches), axis=(0, 2, 3)))


# -- the 7B recipes ---------------------------------------------------------------------------


def test_video_only_recipe_as_shipped() -> None:
    """The original's ``config/vicuna/ppllava_vicuna7b_videoonly.yaml``: ``llava_hound_300k``
    alone (32 frames), ``num_train_epochs: 2``, 8 per GPU x 2 accumulation x 8 GPUs, lr 2e-5
    cosine, 3% warmup; every 7B SFT recipe normalises the loss as the original does."""
    from configs import ppllava_vicuna7b_image_video, ppllava_vicuna7b_videoonly

    c = ppllava_vicuna7b_videoonly.get_config()
    assert [s["name"] for s in c.data.sources] == ["llava_hound_300k"]
    assert [s["media_type"] for s in c.data.sources] == ["video"]
    assert c.data.num_frames == 32 and c.train.epochs == 2
    assert c.train.total_steps == -(-c.train.num_samples * 2 // (8 * 2 * 8))
    assert (c.optimizer.lr, c.optimizer.schedule, c.optimizer.warmup_ratio) == (
        2e-5,
        "cosine",
        0.03,
    )
    iv = ppllava_vicuna7b_image_video.get_config()
    assert iv.train.epochs == 1 and len(iv.data.sources) == 7
    for cfg in (c, iv):
        assert cfg.train.loss_normalization == "per_device_mean"
        assert cfg.train.loss_group_size == 8  # the original's per_device_train_batch_size
