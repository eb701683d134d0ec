"""Memory-efficient attention (``models/attention.py``, ``models/blockwise.py``) against the
reference XLA path.

Forward and gradients of ``blockwise`` for causal and padding masks, GQA, padding on either side,
per-head masks, queries != keys (cross attention, cached decoding), block sizes that do not divide
the sequence and fully-masked (padding) rows; that it never builds a ``[T, S]`` tile; the
dispatch of ``splash``/``cudnn``/``auto`` (the TPU kernel itself in the Pallas interpreter); and
whole models (LLaMA with GQA, padding and a KV cache; PPLLaVA's towers) switched to it.
"""

from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.models import attention, blockwise, llama
from ppllava_jax.models.attention import choose_impl, dot_product_attention
from ppllava_jax.models.config import LlamaConfig

REF = Path(__file__).resolve().parents[1] / "fixtures/reference_ppllava"


def _qkv(rng, b, t, s, n, k, h, dtype=jnp.float32):
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return f(b, t, n, h), f(b, s, k, h), f(b, s, k, h)


def _slot_mask(b, t, s, pad_left, pad_right, q_start=0):
    """LLaMA's mask ``[B, 1, T, S]``: key slot <= query slot, and real keys (row 0 left-padded
    by ``pad_left``, row 1 right-padded by ``pad_right``)."""
    key_ok = np.ones((b, s), bool)
    key_ok[0, :pad_left] = False
    if b > 1 and pad_right:
        key_ok[1, s - pad_right :] = False
    q_slot = q_start + np.arange(t)[:, None]
    causal = np.arange(s)[None, :] <= q_slot
    return jnp.asarray(causal[None, None] & key_ok[:, None, None, :])


def _case(name, rng):
    """(q, k, v, kwargs) of one parity case."""
    if name == "full_mha":
        q, k, v = _qkv(rng, 2, 9, 9, 2, 2, 8)
        return q, k, v, dict(block_q=4, block_k=4)
    if name == "causal_gqa_key_mask":  # left-padded row 0: queries 0-2 see no key
        q, k, v = _qkv(rng, 2, 11, 11, 4, 2, 8)
        km = np.ones((2, 11), bool)
        km[0, :3] = False
        km[1, -2:] = False
        return q, k, v, dict(is_causal=True, key_mask=jnp.asarray(km), block_q=4, block_k=3)
    if name == "dense_slots_both_sides":  # LLaMA's dense mask, left and right padding
        q, k, v = _qkv(rng, 2, 10, 10, 4, 1, 8)
        return q, k, v, dict(mask=_slot_mask(2, 10, 10, 4, 3), block_q=3, block_k=4)
    if name == "per_head_mask":
        q, k, v = _qkv(rng, 2, 7, 13, 4, 2, 8)
        m = rng.random((2, 4, 7, 13)) < 0.6
        m[1, 2, 3] = False  # one fully-masked row of one head
        return q, k, v, dict(mask=jnp.asarray(m), block_q=3, block_k=5)
    if name == "cross_2d_mask":  # T != S, a [T, S] mask broadcast over batch and heads
        q, k, v = _qkv(rng, 1, 5, 12, 2, 2, 8)
        m = rng.random((5, 12)) < 0.5
        return q, k, v, dict(mask=jnp.asarray(m), block_q=2, block_k=5)
    if name == "causal_t_ne_s":
        q, k, v = _qkv(rng, 2, 6, 10, 2, 1, 8)
        return q, k, v, dict(is_causal=True, block_q=4, block_k=3)
    if name == "decode_with_cache":  # one query at slot 6 of a 10-slot cache
        q, k, v = _qkv(rng, 2, 1, 10, 4, 2, 8)
        return q, k, v, dict(mask=_slot_mask(2, 1, 10, 2, 0, q_start=6), block_k=4)
    raise KeyError(name)


CASES = [
    "full_mha",
    "causal_gqa_key_mask",
    "dense_slots_both_sides",
    "per_head_mask",
    "cross_2d_mask",
    "causal_t_ne_s",
    "decode_with_cache",
]


def _fwd_and_grads(impl, q, k, v, kw, ct):
    def f(q, k, v):
        return dot_product_attention(q, k, v, impl=impl, **kw)

    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    return out, vjp(ct)


@pytest.mark.parametrize("name", CASES)
def test_blockwise_matches_xla(name):
    rng = np.random.default_rng(CASES.index(name))
    q, k, v, kw = _case(name, rng)
    ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    ref, ref_g = _fwd_and_grads("xla", q, k, v, kw, ct)
    got, got_g = _fwd_and_grads("blockwise", q, k, v, kw, ct)
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
    for a, b, what in zip(got_g, ref_g, "qkv", strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{what}")
    assert float(jnp.abs(ref_g[0]).max()) > 0.1  # the gradients are not trivially zero


def test_fully_masked_rows_average_all_values():
    """A query row with no visible key (left padding) gets the uniform average of every value,
    as the reference's finite mask fill gives, on both paths."""
    rng = np.random.default_rng(0)
    q, k, v, kw = _case("causal_gqa_key_mask", rng)
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl="blockwise", **kw))(q, k, v)
    mean_v = jnp.repeat(v.mean(axis=1), 2, axis=1)  # [B, N, H]
    for impl_out in (got, dot_product_attention(q, k, v, impl="xla", **kw)):
        np.testing.assert_allclose(impl_out[0, :3], jnp.broadcast_to(mean_v[0], (3, 4, 8)), 1e-5)
    assert not np.allclose(got[0, 3], mean_v[0], atol=1e-3)  # a real row is not the average


def test_blockwise_bfloat16_close_to_xla():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 2, 33, 33, 4, 2, 16, jnp.bfloat16)
    kw = dict(is_causal=True, block_q=8, block_k=16)
    ct = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)
    ref, ref_g = _fwd_and_grads("xla", q, k, v, kw, ct)
    got, got_g = _fwd_and_grads("blockwise", q, k, v, kw, ct)
    assert got.dtype == jnp.bfloat16
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(got), f32(ref), atol=3e-2)
    for a, b in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(f32(a), f32(b), atol=6e-2)


def _shapes(jaxpr, out=None):
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out.extend(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    for sub in jax.extend.core.subjaxprs(jaxpr):
        _shapes(sub, out)
    return out


def test_blockwise_never_builds_a_full_score_tile():
    """Neither the forward nor the backward of ``blockwise`` has an intermediate with both the
    full query and the full key length (the reference path does)."""
    rng = np.random.default_rng(0)
    t = 96
    q, k, v = _qkv(rng, 1, t, t, 2, 1, 8)

    def loss(impl):
        f = lambda q, k, v: jnp.sum(  # noqa: E731
            dot_product_attention(q, k, v, impl=impl, is_causal=True, block_q=16, block_k=32)
        )
        return _shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr)

    full = lambda shapes: [s for s in shapes if list(s).count(t) >= 2]  # noqa: E731
    assert full(loss("xla"))
    assert not full(loss("blockwise"))


@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_in_a_differentiated_layer_scan_stays_linear(masked):
    """Inside a ``lax.scan`` over (rematerialised) layers under ``jax.grad``, as the towers run,
    no intermediate holds as many elements as one layer's scores ``B x N x T x S``: JAX's scan
    partial evaluation once hoisted the loop-invariant mask tiles (and the fills of the masked
    scores) out of the layer loop as ``[nq, nk, B, K, G, bq, bk]`` stacks."""
    rng = np.random.default_rng(0)
    b, t, n, h, depth = 1, 128, 4, 8, 3
    x = jnp.asarray(rng.normal(size=(b, t, n * h)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(depth, n * h, n * h)) * 0.1, jnp.float32)
    mask = _slot_mask(b, t, t, 5, 0) if masked else None

    def layer(x, w):
        q = (x @ w).reshape(b, t, n, h)
        o = dot_product_attention(q, q, q, mask=mask, impl="blockwise", block_q=16, block_k=16)
        return x + o.reshape(b, t, n * h)

    def loss(ws, x):
        body = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        y, _ = jax.lax.scan(lambda c, w: (body(c, w), None), x, ws)
        return jnp.sum(y)

    shapes = _shapes(jax.make_jaxpr(jax.grad(loss))(ws, x).jaxpr)
    assert max(int(np.prod(s)) for s in shapes) < b * n * t * t


def test_default_blocks_bound_the_tile():
    """Default tiles: one float32 score tile within ``TILE_BYTES`` where ``MIN_BLOCK`` allows,
    little padding (577 CLIP tokens in 5 blocks of 120), short sequences in one block."""
    rows = 32 * 16  # a 32-frame CLIP layer: frames x heads
    bq, bk = blockwise.default_blocks(rows, 577, 577)
    assert rows * bq * bk * 4 <= blockwise.TILE_BYTES
    assert (bq, bk) == (120, 120) and 5 * bq - 577 < 8 * 5
    assert blockwise.default_blocks(32, 2048, 2048) == (512, 512)  # LLaMA-7B, one row
    assert blockwise.default_blocks(64, 10, 7) == (10, 7)


def test_dispatch_and_errors():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 4, 4, 2, 1, 8)
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
        dot_product_attention(q, k, v, impl="flash")
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="runs only on TPU"):
            dot_product_attention(q, k, v, impl="splash", is_causal=True)
    with pytest.raises(ValueError, match="not a dense mask"):
        dot_product_attention(q, k, v, impl="splash", mask=jnp.ones((4, 4), bool))
    # auto: kernels where they exist, else the reference while its scores are small
    big = jnp.zeros((1, 1024, 8, 128), jnp.bfloat16)
    assert choose_impl(big, big, is_causal=True, backend="tpu") == "splash"
    assert choose_impl(big, big, mask=jnp.ones((1024, 1024), bool), backend="tpu") != "splash"
    assert choose_impl(big, big, backend="gpu") == "cudnn"
    assert choose_impl(big.astype(jnp.float32), big, backend="gpu") == "xla"
    assert choose_impl(big, big, backend="cpu") == "xla"
    huge = jax.ShapeDtypeStruct((8, 4096, 32, 128), jnp.float32)
    assert choose_impl(huge, huge, backend="cpu") == "blockwise"
    # auto on this machine computes the reference's numbers
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, impl="auto", is_causal=True),
        dot_product_attention(q, k, v, impl="xla", is_causal=True),
        atol=1e-6,
    )


CUDNN_CASES = {  # (b, t, s, n, k, h, is_causal, mask kind): the shapes the kernel refuses
    "odd_both_no_mask": (2, 9, 9, 2, 2, 8, False, None),  # CLIP's 577 tokens
    "odd_keys_causal_gqa": (2, 6, 7, 4, 2, 8, True, None),  # kernel padding hides the key
    "key_mask_odd": (3, 5, 5, 2, 2, 8, False, "keys"),  # the BT-Adapter's [B*P, 1, 1, T]
    "dense_slots_odd": (2, 11, 11, 4, 1, 8, False, "slots"),  # LLaMA, both sides padded
    "causal_and_key_mask": (2, 7, 7, 2, 2, 8, True, "keys"),  # CLIP text: causal + padding
    "decode_one_query": (2, 1, 13, 4, 2, 8, False, "decode"),  # a cached step: T = 1
    "even_causal_per_head": (2, 8, 8, 2, 2, 8, True, "heads"),
}


def _cudnn_case(name, rng):
    b, t, s, n, kh, h, causal, kind = CUDNN_CASES[name]
    q, k, v = _qkv(rng, b, t, s, n, kh, h)
    mask = None
    if kind == "keys":
        km = np.ones((b, s), bool)
        km[0, -2:] = False  # padded frames last
        km[1, 1:] = False
        mask = jnp.asarray(km[:, None, None, :])
    elif kind == "slots":
        mask = _slot_mask(b, t, s, 3, 2)
    elif kind == "decode":  # query in slot 9 of 13, row 0 left-padded by 4
        mask = _slot_mask(b, t, s, 4, 0, q_start=9)
    elif kind == "heads":
        mask = jnp.asarray(rng.random((1, n, t, s)) < 0.7)
    return q, k, v, mask, causal


@pytest.mark.parametrize("name", sorted(CUDNN_CASES))
def test_cudnn_padding_and_mask_shape_change_nothing(name):
    """``cudnn_attention``'s even-length padding and full-shape mask (run through the reference
    kernel here; the GPU run is ``benchmarks/accelerator.py``'s probe) give the reference's
    outputs and gradients on every row that sees a key."""
    rng = np.random.default_rng(3)
    q, k, v, mask, causal = _cudnn_case(name, rng)
    b, t, n, _ = q.shape
    visible = jnp.ones((b, n, t, k.shape[1]), bool) if mask is None else mask
    if causal:
        visible = visible & jnp.tril(jnp.ones((t, k.shape[1]), bool))
    rows = jnp.any(jnp.broadcast_to(visible, (b, n, t, k.shape[1])), -1)  # [B, N, T]
    weight = jnp.moveaxis(rows, 1, 2)[..., None].astype(jnp.float32)  # [B, T, N, 1]
    g = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * weight

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * g)

    ref = lambda q, k, v: dot_product_attention(q, k, v, mask=mask, is_causal=causal)  # noqa: E731
    got = lambda q, k, v: attention.cudnn_attention(  # noqa: E731
        q, k, v, mask=mask, is_causal=causal, implementation="xla"
    )
    np.testing.assert_allclose(got(q, k, v) * weight, ref(q, k, v) * weight, atol=2e-6)
    assert got(q, k, v).shape == q.shape and bool(jnp.all(jnp.isfinite(got(q, k, v))))
    for a, e in zip(
        jax.grad(lambda *x: loss(got, *x), argnums=(0, 1, 2))(q, k, v),
        jax.grad(lambda *x: loss(ref, *x), argnums=(0, 1, 2))(q, k, v),
    ):
        np.testing.assert_allclose(a, e, atol=2e-6)


def test_cudnn_impl_dispatches_with_merged_masks(monkeypatch):
    """``impl='cudnn'`` goes through ``cudnn_attention`` with ``key_mask`` merged into a 4-d
    mask (the CPU has no cuDNN: the kernel is swapped for the reference inside it)."""
    seen = {}

    def fake(q, k, v, *, mask=None, is_causal=False, scale=None):
        seen["mask"] = None if mask is None else mask.shape
        return attention.__dict__["_real_cudnn"](
            q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation="xla"
        )

    monkeypatch.setitem(attention.__dict__, "_real_cudnn", attention.cudnn_attention)
    monkeypatch.setattr(attention, "cudnn_attention", fake)
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 2, 7, 7, 4, 2, 8)
    km = np.ones((2, 7), bool)
    km[1, -3:] = False
    kw = dict(is_causal=True, key_mask=jnp.asarray(km))
    got = dot_product_attention(q, k, v, impl="cudnn", **kw)
    np.testing.assert_allclose(got, dot_product_attention(q, k, v, **kw), atol=2e-6)
    assert seen["mask"] == (2, 1, 1, 7)


def test_splash_kernel_in_interpreter():
    """The TPU splash kernel (run by the Pallas interpreter) computes the reference's attention
    for causal GQA with key padding (real rows only: splash leaves no-key rows undefined)."""
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 1, 128, 128, 2, 1, 128)
    km = np.ones((1, 128), bool)
    km[0, -5:] = False
    ref = dot_product_attention(q, k, v, impl="xla", is_causal=True, key_mask=jnp.asarray(km))
    got = attention.splash_attention(
        q, k, v, is_causal=True, key_mask=jnp.asarray(km), interpret=True
    )
    np.testing.assert_allclose(got[:, :-5], ref[:, :-5], atol=2e-5)


# -- whole models ----------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the test sequences, so the models run several (partial) tiles."""
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK_Q", 4)
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK_K", 3)


def _llama(impl):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_impl=impl,
    )
    return cfg, llama.LlamaForCausalLM(cfg)


def test_llama_padding_gqa_and_cache(small_blocks):
    rng = np.random.default_rng(0)
    b, s, extra = 2, 8, 2
    cfg, ref_model = _llama("xla")
    _, model = _llama("blockwise")
    ids = jnp.asarray(rng.integers(0, 64, (b, s)), jnp.int32)
    mask = np.ones((b, s), np.int32)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    mask = jnp.asarray(mask)
    init = jax.jit(lambda r, i, p: ref_model.init(r, i, positions=p)["params"])
    params = init(jax.random.PRNGKey(0), ids, pos)

    def loss(m, p):
        out = m.apply({"params": p}, ids, positions=pos, attention_mask=mask)["logits"]
        return jnp.sum(jnp.where(mask[..., None] > 0, out, 0) ** 2), out

    def vg(m):
        return jax.jit(jax.value_and_grad(lambda p: loss(m, p), has_aux=True))(params)

    (l_ref, o_ref), g_ref = vg(ref_model)
    (l_got, o_got), g_got = vg(model)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(o_got)[real], np.asarray(o_ref)[real], atol=2e-5)
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
    for a, r in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, r, atol=2e-4, rtol=1e-4)

    # prefill into a cache, then decode: same logits as the reference path
    def run(m):
        call = jax.jit(
            lambda ids, pos, kv_mask, cache, i: m.apply(
                {"params": params},
                ids,
                positions=pos,
                attention_mask=kv_mask,
                cache=cache,
                cache_index=i,
            )
        )
        kv_mask = jnp.zeros((b, s + extra), jnp.int32).at[:, :s].set(mask)
        out = call(ids, pos, kv_mask, llama.init_cache(cfg, b, s + extra), 0)
        logits, cache = [out["logits"][:, -1]], out["cache"]
        for i in range(extra):  # greedy decoding, one cached step per token
            kv_mask = kv_mask.at[:, s + i].set(1)
            tok = jnp.argmax(logits[-1], -1)[:, None].astype(jnp.int32)
            out = call(tok, pos[:, -1:] + 1 + i, kv_mask, cache, s + i)
            logits.append(out["logits"][:, -1])
            cache = out["cache"]
        return jnp.stack(logits, 1)

    np.testing.assert_allclose(run(model), run(ref_model), atol=2e-5)


def test_ppllava_towers_with_blockwise(small_blocks, tmp_path):
    """The reference fixture's model (CLIP vision + BT-Adapter, causal CLIP text tower with
    padding, LLaMA; video, any-resolution image and multi-image) with every attention blockwise:
    the same logits and visual-attention maps as with the reference path."""
    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint
    from ppllava_jax.data.collate import Media, Sample, collate
    from ppllava_jax.models.ppllava import PPLLaVA

    convert_checkpoint(REF, tmp_path / "ckpt")
    _, cfg, params = load_checkpoint(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    samples = []
    for kind, frames, n in (("video", 4, 9), ("multi", 2, 6)):
        ids = rng.integers(3, cfg.image_token_index - 1, n).astype(np.int32)
        ids[1] = cfg.image_token_index
        ids[3] = cfg.image_token_index if kind == "multi" else ids[3]  # one per image
        px = rng.normal(size=(frames, s, s, 3)).astype(np.float32)
        clip = rng.integers(1, 90, 5 + frames).astype(np.int32)
        samples.append(
            Sample(ids, media=Media(kind, px), clip_ids=clip, clip_mask=np.ones(len(clip)))
        )
    batch = collate(samples, cfg, padding_side="left", clip_length=12)
    outs = {}
    for impl in ("xla", "blockwise"):
        model = PPLLaVA(cfg.replace(attention_impl=impl))
        fn = jax.jit(lambda p, b, m=model: m.apply({"params": p}, b, return_visual_attention=True))
        outs[impl] = jax.device_get(fn(params, batch))
    real = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(
        outs["blockwise"]["logits"][real], outs["xla"]["logits"][real], atol=5e-5
    )
    for g, m in outs["xla"]["visual_attention"].items():
        np.testing.assert_allclose(outs["blockwise"]["visual_attention"][g], m, atol=1e-5)
