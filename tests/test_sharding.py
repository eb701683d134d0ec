"""Sharding on 8 simulated CPU devices (tests/conftest.py): parameter placement, indivisible
dimensions, a 2x2x2 mesh giving the single-device loss and gradients, checkpoints moving between
mesh shapes, the KV cache, multi-slice meshes."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ppllava_jax import sharding
from ppllava_jax.convert import params_io
from ppllava_jax.convert.api import checkpoint_layout
from ppllava_jax.convert.ppllava_config import ppllava_config_from_hf, ppllava_config_to_hf
from ppllava_jax.data.collate import Media, Sample, collate
from ppllava_jax.models.config import PPLLaVAConfig
from ppllava_jax.models.ppllava import PPLLaVA, abstract_params, init_params
from tests.sft_loss import mean_loss

REF = Path(__file__).parent / "fixtures/reference_ppllava"
KINDS = {"video": "video", "image": "image", "multi-image": "multi", "multi_image": "multi"}


def tiny_config(**runtime) -> PPLLaVAConfig:
    d = json.loads((REF / "config.json").read_text())
    clip = json.loads((REF / "clip/config.json").read_text())
    return ppllava_config_from_hf(d, clip, **runtime)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def params(cfg):
    return jax.device_get(nn.unbox(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))))


def fixture_batch(cfg) -> dict:
    """The fixture's training batch (a video, an any-resolution image, a 3-image set) plus a
    second copy of the video sample: 4 rows, so text arrays split over data x fsdp = 4."""
    data = dict(np.load(REF / "forward_train_batch.npz"))
    samples = []
    for i, kind in enumerate(data["media_types"]):
        m = data["attention_mask"][i].astype(bool)
        px = data[f"pixel_values_{i}"]
        kind = KINDS[str(kind)]
        pixels = px[0].transpose(0, 2, 3, 1) if kind == "image" else px[:, 0].transpose(0, 2, 3, 1)
        samples.append(
            Sample(
                input_ids=data["input_ids"][i][m],
                labels=data["labels"][i][m],
                media=Media(kind, pixels, tuple(int(v) for v in data["image_sizes"][i])),
                clip_ids=data["clip_ids"][i],
                clip_mask=data["clip_mask"][i],
            )
        )
    samples.append(samples[0])
    return collate(samples, cfg)


def _spec(x) -> PartitionSpec:
    return x.sharding.spec


# ----------------------------------------------------------------------------- names, rules


def test_every_parameter_has_logical_names(cfg):
    assert sharding.unnamed_params(abstract_params(cfg)) == []
    assert sharding.unnamed_params(abstract_params(cfg.replace(scan_layers=False))) == []


def test_7b_rules_on_fsdp_only_mesh():
    """The real 7B tree on 8 fsdp devices: nothing unnamed, nothing indivisible, every large
    matrix split 8 ways (about 1/8 of the bytes per device)."""
    boxed = abstract_params(PPLLaVAConfig())
    mesh = sharding.make_mesh({"fsdp": 8})
    rep = sharding.sharding_report(boxed, mesh)
    assert rep["unnamed"] == [] and rep["fallbacks"] == []
    for path, shape, _, spec, local in rep["rows"]:
        size = int(np.prod(shape)) * 4
        if len(shape) >= 2 and size >= 2**20:
            assert "fsdp" in jax.tree.leaves(tuple(spec)), path
            assert local * 8 == size, path
    assert rep["bytes_per_device"] < rep["bytes_total"] / 8 * 1.01


# ----------------------------------------------------------------------------- placement


def test_parameters_land_where_the_rules_say(cfg):
    mesh = sharding.make_mesh({"fsdp": 8})
    params, shardings = sharding.sharded_init(
        lambda k: init_params(cfg, k), mesh, jax.random.key(0)
    )
    llm = params["language_model"]
    layer = llm["model"]["layers"]
    vit = params["vision_tower"]["vision_model"]
    expect = {
        "q_proj": (layer["self_attn"]["q_proj"]["kernel"], PartitionSpec(None, "fsdp", "tensor")),
        "o_proj": (layer["self_attn"]["o_proj"]["kernel"], PartitionSpec(None, "tensor", "fsdp")),
        "gate": (layer["mlp"]["gate_proj"]["kernel"], PartitionSpec(None, "fsdp", "tensor")),
        "down": (layer["mlp"]["down_proj"]["kernel"], PartitionSpec(None, "tensor", "fsdp")),
        "embed_tokens": (
            llm["model"]["embed_tokens"]["embedding"],
            PartitionSpec("tensor", "fsdp"),
        ),
        "lm_head": (llm["lm_head"]["kernel"], PartitionSpec("fsdp", "tensor")),
        "vit_fc1": (
            vit["encoder"]["layers"]["mlp"]["fc1"]["kernel"],
            PartitionSpec(None, "fsdp", "tensor"),
        ),
        "vit_pos": (
            vit["embeddings"]["position_embedding"]["embedding"],
            PartitionSpec(None, "fsdp"),
        ),
        "patch": (
            vit["embeddings"]["patch_embedding"]["kernel"],
            PartitionSpec(None, None, None, "fsdp"),
        ),
        "norm": (layer["input_layernorm"]["weight"], PartitionSpec()),
    }
    for name, (x, spec) in expect.items():
        assert _spec(x) == spec, name
    # each device holds 1/8 of an fsdp-sharded parameter, along the embed axis
    for x, axis in (
        (layer["self_attn"]["q_proj"]["kernel"], 1),
        (layer["mlp"]["down_proj"]["kernel"], 2),
        (llm["model"]["embed_tokens"]["embedding"], 1),
        (vit["encoder"]["layers"]["mlp"]["fc1"]["kernel"], 1),
    ):
        shards = x.addressable_shards
        assert len(shards) == 8
        want = list(x.shape)
        want[axis] //= 8
        assert all(list(s.data.shape) == want for s in shards)
        np.testing.assert_array_equal(
            np.concatenate(
                [np.asarray(s.data) for s in sorted(shards, key=lambda s: s.index[axis].start)],
                axis,
            ),
            np.asarray(x),
        )
    # the same values as an unsharded init (the random bits do not depend on the sharding)
    ref = jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_2x2x2_mesh_placement(cfg):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = sharding.param_shardings(abstract_params(cfg), mesh)
    layer = sh["language_model"]["model"]["layers"]
    assert layer["self_attn"]["q_proj"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")
    assert layer["mlp"]["up_proj"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")


def test_indivisible_dimension_falls_back_or_raises(cfg):
    """The fixture's CLIP text vocabulary (99 rows) does not divide tensor=2: replicated on that
    dimension (and reported), or a clear error with strict=True; nothing reaches the compiler."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = abstract_params(cfg)
    notes: list[str] = []
    sh = sharding.param_shardings(boxed, mesh, notes=notes)
    tok = sh["multi_modal_projector"]["clip_text_model"]["embeddings"]["token_embedding"]
    assert tok["embedding"].spec == PartitionSpec(None, "fsdp")
    assert any("token_embedding" in n and "99" in n for n in notes)
    assert sharding.sharding_report(boxed, mesh)["fallbacks"] == notes
    with pytest.raises(sharding.ShardingError, match="token_embedding.*size 99"):
        sharding.param_shardings(boxed, mesh, strict=True)
    spec, _ = sharding.fit_spec((6, 5), PartitionSpec(("data", "fsdp"), "tensor"), mesh)
    assert spec == PartitionSpec("data")  # 6 % 4 != 0 -> keep "data"; 5 % 2 -> replicated


# ----------------------------------------------------------------------------- numerics


def _loss(model):
    def f(p, b):
        return mean_loss(model.apply({"params": p}, b)["logits"], b)

    return jax.value_and_grad(f)


def test_2x2x2_loss_and_grads_equal_one_device(cfg, params):
    batch = fixture_batch(cfg)
    model = PPLLaVA(cfg)
    vg = _loss(model)
    one = jax.devices()[0]
    loss1, g1 = jax.jit(vg)(jax.device_put(params, one), jax.device_put(batch, one))
    # finish the one-device program before the 8-device one starts: a CPU collective needs all
    # 8 device threads at once, and a busy device 0 on 2 cores can stall its rendezvous
    jax.block_until_ready((loss1, g1))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    p_sh = sharding.param_shardings(abstract_params(cfg), mesh)
    p_mesh = sharding.place(params, p_sh)
    b_mesh = sharding.shard_batch(batch, mesh)
    assert _spec(b_mesh["input_ids"]) == PartitionSpec(("data", "fsdp"))
    assert _spec(b_mesh["video_pixels"]) == PartitionSpec("data")  # 2 videos: data only
    assert _spec(b_mesh["image_pixels"]) == PartitionSpec()  # 1 image: replicated
    with sharding.mesh_context(mesh):
        loss8, g8 = jax.jit(vg, out_shardings=(sharding.replicated(mesh), p_sh))(p_mesh, b_mesh)
    assert _spec(g8["language_model"]["lm_head"]["kernel"]) == PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6, atol=1e-6)
    flat1 = jax.tree_util.tree_flatten_with_path(g1)[0]
    for (path, a), b in zip(flat1, jax.tree.leaves(g8), strict=True):
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_moves_between_mesh_shapes(cfg, params, tmp_path):
    src = sharding.make_mesh({"fsdp": 8})
    p_src = sharding.place(params, sharding.param_shardings(abstract_params(cfg), src))
    params_io.save_params(tmp_path / "ck", p_src, "ppllava", ppllava_config_to_hf(cfg))
    assert checkpoint_layout(tmp_path / "ck") is True

    dst = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg2, restored, shardings = sharding.restore_params_onto_mesh(tmp_path / "ck", dst)
    assert cfg2.scan_layers and cfg2.llm == cfg.llm
    q = restored["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == dst.shape and _spec(q) == PartitionSpec(None, "fsdp", "tensor")
    for a, b, s in zip(
        jax.tree.leaves(restored), jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True
    ):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- cache, meshes


def test_kv_cache_sharding(cfg):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cache = sharding.init_sharded_cache(cfg.llm, 4, 16, mesh)
    k = cache["k"]
    assert k.shape == (
        cfg.llm.num_hidden_layers,
        4,
        16,
        cfg.llm.num_key_value_heads,
        cfg.llm.head_dim,
    )
    assert _spec(k) == PartitionSpec(None, ("data", "fsdp"), None, "tensor")
    assert k.addressable_shards[0].data.shape == (k.shape[0], 1, 16, k.shape[3] // 2, k.shape[4])
    one = sharding.cache_shardings(cfg.llm, 1, 16, mesh)["v"]  # a batch of 1: replicated rows
    assert one.spec == PartitionSpec(None, None, None, "tensor")


def test_make_mesh_shapes_and_slices():
    m = sharding.make_mesh({"fsdp": -1})
    assert dict(m.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    m = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2})
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(m.devices)
    # slice 0 (devices 0-3) fills data row 0, slice 1 (4-7) row 1: only `data` crosses slices
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 2, "fsdp": 8})
    with pytest.raises(ValueError, match="unknown"):
        sharding.make_mesh({"model": 2})


def test_shard_batch_replicates_indivisible_keys():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = sharding.shard_batch({"a": np.zeros((8, 3)), "b": np.ones((1, 5))}, mesh)
    assert _spec(b["a"]) == PartitionSpec(("data", "fsdp"))
    assert b["a"].addressable_shards[0].data.shape == (2, 3)
    assert _spec(b["b"]) == PartitionSpec()
    assert isinstance(b["b"].sharding, NamedSharding)
    assert float(jnp.sum(b["b"])) == 5.0
