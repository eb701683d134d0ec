"""The LLaMA decoder against transformers' ``LlamaForCausalLM`` (tiny, random, float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as TorchLlama

from ppllava_jax.convert import llama_keys
from ppllava_jax.convert.hf_config import llama_from_hf
from ppllava_jax.convert.mapping import KeyMap, Rule, convert_state_dict
from ppllava_jax.models import layers, llama
from ppllava_jax.models.config import LlamaConfig

CONFIGS = {
    # multi-head, biases in attention and MLP, untied head
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    # grouped-query, explicit head_dim != hidden / heads, other theta, tied embeddings
    "gqa": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        rope_theta=500.0,
        tie_word_embeddings=True,
    ),
}
B, S, DECODE = 2, 12, 8


def _torch_model(kind: str) -> TorchLlama:
    hf = HFLlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=3,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        **CONFIGS[kind],
    )
    hf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = TorchLlama(hf).eval()
    # O(1) activations so that a wrong RoPE, transpose or mask shows far above 1e-4.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(
                    torch.randn_like(p) / np.sqrt(p.shape[-1]) * (3.0 if "embed" in name else 1)
                )
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _state_dict(model: TorchLlama) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as embed_tokens (not saved by HF)
    return sd


@functools.cache
def _pair(kind: str, scan: bool = True):
    tm = _torch_model(kind)
    cfg = llama_from_hf(tm.config.to_dict(), scan_layers=scan)
    fam = llama_keys.FAMILIES[0]
    params = convert_state_dict(
        _state_dict(tm), fam.keymap(cfg, []), llama.abstract_params(cfg), ignore=fam.ignore
    )
    return tm, cfg, params


@functools.cache
def _forward(cfg: LlamaConfig):
    model = llama.LlamaForCausalLM(cfg)

    @jax.jit
    def f(params, ids, positions, mask, cache=None, cache_index=None):
        return model.apply(
            {"params": params},
            ids,
            positions=positions,
            attention_mask=mask,
            cache=cache,
            cache_index=cache_index,
        )

    return f


def _batch(padding: str | None, seed: int = 1, s: int = S):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 96, size=(B, s)).astype(np.int32)
    mask = np.ones((B, s), np.int32)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, -5:] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, positions, mask


def _torch_logits(tm, ids, positions, mask) -> np.ndarray:
    with torch.no_grad():
        out = tm(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.numpy()


def _max_diff(a, b, mask) -> float:
    sel = np.asarray(mask, bool)
    return float(np.abs(np.asarray(a)[sel] - np.asarray(b)[sel]).max())


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_transformers(kind, padding):
    tm, cfg, params = _pair(kind)
    ids, positions, mask = _batch(padding)
    ref = _torch_logits(tm, ids, positions, mask)
    out = _forward(cfg)(params, ids, positions, mask)["logits"]
    assert out.dtype == jnp.float32 and out.shape == (B, S, 96)
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small
    assert np.isfinite(np.asarray(out)).all()  # padded rows too (no NaN from all-masked rows)
    assert _max_diff(out, ref, mask) <= 1e-4


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_scanned_and_unscanned_layouts_agree(kind):
    _, cfg, params = _pair(kind, True)
    _, cfg_u, params_u = _pair(kind, False)
    assert "layers" in params["model"] and "layers_2" in params_u["model"]
    np.testing.assert_array_equal(
        params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][1],
        params_u["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"],
    )
    ids, positions, mask = _batch("left")
    a = _forward(cfg)(params, ids, positions, mask)["logits"]
    b = _forward(cfg_u)(params_u, ids, positions, mask)["logits"]
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,scan", [("gqa", True), ("mha", False)])
def test_cached_decoding_equals_full_forward(kind, scan):
    _, cfg, params = _pair(kind, scan)
    total = S + DECODE
    ids, positions, mask = _batch("left", seed=3, s=total)
    f = _forward(cfg)
    full = f(params, ids, positions, mask)["logits"]
    cache = llama.init_cache(cfg, B, total + 3, jnp.float32)  # longer than needed
    cache_mask = np.pad(mask, ((0, 0), (0, 3)))  # slots never written stay masked
    out = f(params, ids[:, :S], positions[:, :S], cache_mask, cache, jnp.int32(0))
    steps = [out["logits"]]
    cache = out["cache"]
    assert cache["k"].shape == (
        cfg.num_hidden_layers,
        B,
        total + 3,
        cfg.num_key_value_heads,
        12 if kind == "gqa" else 8,
    )
    for t in range(S, total):
        out = f(params, ids[:, t : t + 1], positions[:, t : t + 1], cache_mask, cache, jnp.int32(t))
        cache = out["cache"]
        steps.append(out["logits"])
    cached = np.concatenate([np.asarray(x) for x in steps], axis=1)
    assert _max_diff(cached, full, mask) <= 1e-5


def test_inputs_embeds_and_embed_method():
    _, cfg, params = _pair("mha")
    model = llama.LlamaForCausalLM(cfg)
    ids, positions, mask = _batch("right")
    emb = model.apply({"params": params}, ids, method="embed")
    np.testing.assert_array_equal(emb, params["model"]["embed_tokens"]["embedding"][ids])
    a = model.apply(
        {"params": params}, ids, positions=positions, attention_mask=mask, return_hidden=True
    )
    b = model.apply({"params": params}, inputs_embeds=emb, positions=positions, attention_mask=mask)
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6, rtol=0)
    assert a["hidden"].shape == (B, S, 32) and b["hidden"] is None and a["cache"] is None
    # init from embeddings alone still creates the embedding table
    p = model.init(jax.random.PRNGKey(0), inputs_embeds=emb, positions=positions)["params"]
    assert jax.tree.structure(p) == jax.tree.structure(
        model.init(jax.random.PRNGKey(0), ids, positions=positions)["params"]
    )


def test_bfloat16_compute_runs():
    _, cfg, params = _pair("gqa")
    cfg16 = cfg.replace(dtype="bfloat16")
    ids, positions, mask = _batch("left", s=S + 1)
    f = _forward(cfg16)
    out = f(
        params,
        ids[:, :S],
        positions[:, :S],
        mask,
        llama.init_cache(cfg16, B, S + 1, "bfloat16"),
        jnp.int32(0),
    )
    assert out["logits"].dtype == jnp.float32 and out["cache"]["k"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out["logits"])).all()
    out = f(params, ids[:, S:], positions[:, S:], mask, out["cache"], jnp.int32(S))
    ref = _forward(cfg)(params, ids, positions, mask)["logits"][:, S:]
    rel = np.abs(np.asarray(out["logits"]) - ref).max() / np.abs(ref).max()
    assert rel < 0.1


@pytest.mark.parametrize("scan", [True, False])
def test_remat_gives_the_same_gradients(scan):
    _, cfg, params = _pair("gqa", scan)
    ids, positions, mask = _batch("right")

    def loss(p, c):
        out = llama.LlamaForCausalLM(c).apply(
            {"params": p}, ids, positions=positions, attention_mask=mask
        )
        return (out["logits"] * mask[..., None]).astype(jnp.float32).mean()

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat_policy="full"))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def _interleaved_rope(x, cos, sin):  # GPT-J layout: rotates pairs (0,1), (2,3), ...
    x1, x2 = x[..., ::2], x[..., 1::2]
    c, s = cos[:, :, None, : x.shape[-1] // 2], sin[:, :, None, : x.shape[-1] // 2]
    return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)


@pytest.mark.parametrize("mutation", ["rope_layout", "q_proj_not_transposed", "no_mask"])
def test_parity_check_catches_mistakes(mutation, monkeypatch):
    tm, cfg, params = _pair("mha")
    ids, positions, mask = _batch("left")
    ref = _torch_logits(tm, ids, positions, mask)
    model = llama.LlamaForCausalLM(cfg)
    if mutation == "rope_layout":
        monkeypatch.setattr(layers, "apply_rope", _interleaved_rope)
    if mutation == "q_proj_not_transposed":
        rules = [
            Rule(r.torch, r.jax, "none") if "q_proj.weight" in r.torch else r
            for r in llama_keys.llama_rules()
        ]
        params = convert_state_dict(
            _state_dict(tm), KeyMap(rules), llama.abstract_params(cfg), ignore=llama_keys.IGNORE
        )
    out = model.apply(
        {"params": params},
        ids,
        positions=positions,
        attention_mask=None if mutation == "no_mask" else mask,
    )["logits"]
    assert _max_diff(out, ref, mask) > 1e-2


def test_config_from_hf_ignores_the_storage_dtype():
    hf = _torch_model("gqa").config.to_dict()
    hf["dtype"] = "bfloat16"  # what save_pretrained writes for a bf16 checkpoint
    cfg = llama_from_hf(hf, scan_layers=False)
    assert cfg.dtype == "float32" and not cfg.scan_layers
    assert (cfg.head_dim, cfg.rope_theta, cfg.num_key_value_heads) == (12, 500.0, 2)
    assert cfg.tie_word_embeddings
