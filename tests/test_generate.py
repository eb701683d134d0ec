"""Cached generation on a tiny random PPLLaVA (the reference fixture's configuration).

Batching with left padding, sampling keys, top-k, beams, EOS handling, bucketed prompts,
streaming and decoding on a mesh.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax import sharding
from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint
from ppllava_jax.data.collate import Media, Sample, collate
from ppllava_jax.generate import (
    SamplingConfig,
    StepDecoder,
    beam_search,
    generate,
    make_generate,
    prompt_buckets,
)
from ppllava_jax.models.ppllava import PPLLaVA

REF = Path(__file__).parent / "fixtures/reference_ppllava"
N_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ckpt"
    convert_checkpoint(REF, out)
    _, cfg, params = load_checkpoint(out)
    return cfg, params, PPLLaVA(cfg)


def _sample(cfg, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.image_token_index - 1, length).astype(np.int32)
    ids[0] = 1
    ids[1] = cfg.image_token_index
    s = cfg.vision.image_size
    px = rng.normal(size=(4, s, s, 3)).astype(np.float32)
    clip = rng.integers(1, 90, 6).astype(np.int32)
    return Sample(input_ids=ids, media=Media("video", px), clip_ids=clip, clip_mask=np.ones(6))


def _batch(cfg, samples, buckets=None):
    return collate(samples, cfg, padding_side="left", buckets=buckets, clip_length=6)


_JIT = {}


def _gen(model, params, batch, sc, rng=None):
    key = (id(model), sc)
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda p, b, r: generate(model, p, b, sc, r))
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.device_get(_JIT[key](params, batch, rng))


def test_batch_equals_alone(tiny):
    cfg, params, model = tiny
    samples = [_sample(cfg, n, i) for i, n in enumerate((5, 11, 8))]
    sc = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1)
    together = _gen(model, params, _batch(cfg, samples), sc)
    assert together["tokens"].shape == (3, N_NEW)
    for i, s in enumerate(samples):
        alone = _gen(model, params, _batch(cfg, [s]), sc)
        np.testing.assert_array_equal(together["tokens"][i], alone["tokens"][0], err_msg=str(i))
        np.testing.assert_allclose(together["scores"][i], alone["scores"][0], rtol=1e-4)


def test_bucketed_prompt_same_tokens(tiny):
    """Padding a prompt further to the left (a bigger bucket) changes nothing."""
    cfg, params, model = tiny
    samples = [_sample(cfg, 7, 3), _sample(cfg, 9, 4)]
    sc = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1)
    exact = _batch(cfg, samples)
    visual = exact["attention_mask"].shape[1] - 8
    buckets = prompt_buckets(visual, (16, 32))
    padded = _batch(cfg, samples, buckets)
    assert padded["input_ids"].shape[1] == visual + 16 > exact["input_ids"].shape[1]
    a, b = _gen(model, params, exact, sc), _gen(model, params, padded, sc)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_sampling_keys_and_top_k(tiny):
    cfg, params, model = tiny
    batch = _batch(cfg, [_sample(cfg, 6, 0), _sample(cfg, 9, 1)])
    sc = SamplingConfig(max_new_tokens=N_NEW, temperature=5.0, eos_token_id=-1)
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    a = _gen(model, params, batch, sc, k0)["tokens"]
    b = _gen(model, params, batch, sc, k0)["tokens"]
    c = _gen(model, params, batch, sc, k1)["tokens"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = _gen(model, params, batch, SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1))
    topk1 = SamplingConfig(max_new_tokens=N_NEW, temperature=5.0, top_k=1, eos_token_id=-1)
    np.testing.assert_array_equal(_gen(model, params, batch, topk1, k1)["tokens"], greedy["tokens"])
    tiny_p = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6, eos_token_id=-1)
    np.testing.assert_array_equal(
        _gen(model, params, batch, tiny_p, k1)["tokens"], greedy["tokens"]
    )


def test_beam_search(tiny):
    cfg, params, model = tiny
    batch = _batch(cfg, [_sample(cfg, 6, 5), _sample(cfg, 10, 6)])
    sc = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1, length_penalty=0.0)
    greedy = _gen(model, params, batch, sc)
    one = jax.device_get(
        jax.jit(lambda p, b: beam_search(model, p, b, sc.__class__(**{**sc.__dict__})))(
            params, batch
        )
    )
    np.testing.assert_array_equal(one["tokens"], greedy["tokens"])
    np.testing.assert_allclose(one["scores"], greedy["scores"], rtol=1e-5)
    three = _gen(model, params, batch, SamplingConfig(**{**sc.__dict__, "num_beams": 3}))
    assert three["tokens"].shape == greedy["tokens"].shape
    assert np.all(three["scores"] >= greedy["scores"] - 1e-5), (three["scores"], greedy["scores"])


def test_eos_stops_each_row(tiny):
    cfg, params, model = tiny
    batch = _batch(cfg, [_sample(cfg, 6, 7), _sample(cfg, 9, 8)])
    free = _gen(model, params, batch, SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1))
    # make row 0's third token the EOS: row 0 stops after 3 tokens; row 1 only if it emits it
    eos = int(free["tokens"][0, 2])
    sc = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    out = _gen(model, params, batch, sc)
    for i in range(2):
        row = list(free["tokens"][i])
        n = row.index(eos) + 1 if eos in row else N_NEW
        assert out["lengths"][i] == n
        np.testing.assert_array_equal(out["tokens"][i, :n], free["tokens"][i, :n])
        assert np.all(out["tokens"][i, n:] == 0)
    assert out["lengths"][0] <= 3
    # beams stop on EOS too (lengths within bounds, padding after the end)
    beams = _gen(model, params, batch, SamplingConfig(**{**sc.__dict__, "num_beams": 2}))
    for i in range(2):
        n = int(beams["lengths"][i])
        assert 1 <= n <= N_NEW and np.all(beams["tokens"][i, n:] == 0)
        if n < N_NEW:
            assert beams["tokens"][i, n - 1] == eos


def test_stream_and_mesh_match_generate(tiny):
    cfg, params, model = tiny
    batch = _batch(cfg, [_sample(cfg, 6, 9), _sample(cfg, 8, 10)])
    sc = SamplingConfig(max_new_tokens=N_NEW, temperature=2.0, eos_token_id=-1)
    key = jax.random.PRNGKey(3)
    ref = _gen(model, params, batch, sc, key)
    streamed = np.stack(list(StepDecoder(model, sc).stream(params, batch, key)), axis=1)
    np.testing.assert_array_equal(streamed, ref["tokens"])
    # on a data x tensor mesh: params sharded by their logical names, batch over data
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    from ppllava_jax.models.ppllava import abstract_params

    shardings = sharding.param_shardings(abstract_params(cfg), mesh)
    placed = sharding.place(params, shardings)
    fn = make_generate(model, SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1), mesh)
    out = jax.device_get(fn(placed, sharding.shard_batch(batch, mesh)))
    greedy = _gen(model, params, batch, SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1))
    np.testing.assert_array_equal(out["tokens"], greedy["tokens"])
    assert jnp.asarray(out["lengths"]).shape == (2,)


def test_unstacked_layers_answer_the_same(tiny):
    """``convert.api.unstack_layers`` (what ``load_setup`` answers with): the scanned
    checkpoint's layers split into the unscanned model's tree, same logits and tokens."""
    import flax.linen as nn
    from flax import traverse_util

    from ppllava_jax.convert.api import unstack_layers, with_runtime
    from ppllava_jax.models.ppllava import abstract_params

    cfg, params, model = tiny
    assert cfg.scan_layers
    flat_cfg = with_runtime(cfg, scan_layers=False)
    flat = unstack_layers(params)
    want = traverse_util.flatten_dict(nn.unbox(abstract_params(flat_cfg)))
    got = traverse_util.flatten_dict(flat)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    q = params["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        flat["language_model"]["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"], q[1]
    )
    samples = [_sample(cfg, n, 10 + i) for i, n in enumerate((5, 9))]
    batch = _batch(cfg, samples)
    sc = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=-1, return_logits=True)
    a = _gen(model, params, batch, sc)
    b = _gen(PPLLaVA(flat_cfg), flat, batch, sc)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)


FAMILY_DIRS = {  # the fixture sets of both families, as the parity tests find them
    "vicuna": ("PPLLAVA_REFERENCE_DIR", "reference_ppllava"),
    "qwen": ("PPLLAVA_QWEN_REFERENCE_DIR", "reference_ppllava_qwen"),
}


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_unstack_layers_fits_the_unscanned_tree(family):
    """Both families' scanned trees (CLIP / SigLIP towers, LLaMA / Qwen2, the BT-Adapter's own
    per-layer names) unstack into exactly the unscanned model's tree."""
    import json
    import os

    import flax.linen as nn
    from flax import traverse_util

    from ppllava_jax.convert.api import unstack_layers, with_runtime
    from ppllava_jax.convert.ppllava_config import ppllava_config_from_hf
    from ppllava_jax.models.ppllava import abstract_params

    var, default = FAMILY_DIRS[family]
    ref = Path(os.environ.get(var, REF.parent / default))
    clip = ref / "clip/config.json"
    cfg = ppllava_config_from_hf(
        json.loads((ref / "config.json").read_text()),
        json.loads(clip.read_text()) if clip.exists() else None,
        scan_layers=True,
    )
    stacked = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.unbox(abstract_params(cfg)))
    got = traverse_util.flatten_dict(unstack_layers(stacked))
    want = traverse_util.flatten_dict(
        nn.unbox(abstract_params(with_runtime(cfg, scan_layers=False)))
    )
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
