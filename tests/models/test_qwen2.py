"""Qwen2 (the LLaMA decoder with ``Qwen2Config``: GQA, q/k/v bias, rope_theta, untied head)
against transformers' ``Qwen2ForCausalLM`` (tiny, random, float32), converted through the
``qwen2`` family detected from ``config.json``; cached decoding; the export round trip."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

from ppllava_jax.convert import registry
from ppllava_jax.convert.api import convert_checkpoint, export_checkpoint, load_checkpoint
from ppllava_jax.convert.torch_io import TorchCheckpoint
from ppllava_jax.models import llama
from ppllava_jax.models.config import Qwen2Config

B, S, DECODE, V = 2, 12, 6, 96


@functools.cache
def _pair(tmp: str):
    from pathlib import Path

    hf = HFQwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=V - 3,  # <|endoftext|>-like stand-ins inside the tiny vocabulary
        eos_token_id=V - 2,
        pad_token_id=V - 3,
    )
    hf._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = Qwen2ForCausalLM(hf).eval()
    with torch.no_grad():  # O(1) activations: a wrong bias, RoPE or mask shows above 1e-4
        for name, p in tm.named_parameters():
            if p.ndim == 2:
                p.copy_(
                    torch.randn_like(p) / np.sqrt(p.shape[-1]) * (3.0 if "embed" in name else 1)
                )
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    src = Path(tmp) / "hf"
    tm.save_pretrained(src)
    out = convert_checkpoint(src, Path(tmp) / "jax")
    family, cfg, params = load_checkpoint(out)
    return tm, src, out, family, cfg, params


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _pair(str(tmp_path_factory.mktemp("qwen2")))


def _batch(padding, seed=1, s=S):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, s)).astype(np.int32)
    mask = np.ones((B, s), np.int32)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, -5:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, positions, mask


def _fwd(cfg):
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


def test_family_config_and_parameters(pair):
    tm, src, _, family, cfg, params = pair
    hf = json.loads((src / "config.json").read_text())
    assert registry.detect_family(hf).name == "qwen2" and family == "qwen2"
    assert isinstance(cfg, Qwen2Config) and cfg.qkv_bias and not cfg.attention_bias
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (2, 1e6, False)
    attn = params["model"]["layers"]["self_attn"]
    assert {"bias", "kernel"} == set(attn["q_proj"]) == set(attn["k_proj"])
    assert set(attn["o_proj"]) == {"kernel"} and "lm_head" in params


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_transformers(pair, padding):
    tm, _, _, _, cfg, params = pair
    ids, positions, mask = _batch(padding)
    with torch.no_grad():
        ref = tm(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        ).logits.numpy()
    out = np.asarray(_fwd(cfg)(params, ids, positions, mask)["logits"])
    sel = mask.astype(bool)
    assert np.abs(ref).max() > 1.0
    assert np.abs(out[sel] - ref[sel]).max() <= 1e-4
    # the q/k/v biases matter at this tolerance
    nobias = jax.tree.map(lambda x: x, params)
    nobias["model"]["layers"]["self_attn"]["k_proj"]["bias"] = jnp.zeros_like(
        params["model"]["layers"]["self_attn"]["k_proj"]["bias"]
    )
    out2 = np.asarray(_fwd(cfg)(nobias, ids, positions, mask)["logits"])
    assert np.abs(out2[sel] - ref[sel]).max() > 1e-2


def test_cached_decoding_equals_full_forward(pair):
    _, _, _, _, cfg, params = pair
    total = S + DECODE
    ids, positions, mask = _batch("left", seed=3, s=total)
    f = _fwd(cfg)
    full = np.asarray(f(params, ids, positions, mask)["logits"])
    cache = llama.init_cache(cfg, B, total, jnp.float32)
    out = f(params, ids[:, :S], positions[:, :S], mask, cache, jnp.int32(0))
    steps, cache = [np.asarray(out["logits"])], out["cache"]
    for t in range(S, total):
        out = f(params, ids[:, t : t + 1], positions[:, t : t + 1], mask, cache, jnp.int32(t))
        cache = out["cache"]
        steps.append(np.asarray(out["logits"]))
    cached = np.concatenate(steps, axis=1)
    sel = mask.astype(bool)
    assert np.abs(cached[sel] - full[sel]).max() <= 1e-5


def test_export_round_trip_is_exact_and_loads_in_transformers(pair, tmp_path):
    tm, src, out, _, _, _ = pair
    back = export_checkpoint(out, tmp_path / "hf")
    a, b = TorchCheckpoint(src), TorchCheckpoint(back)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    again = Qwen2ForCausalLM.from_pretrained(back).eval()
    assert again.config.num_key_value_heads == 2
    assert again.config.rope_parameters["rope_theta"] == 1e6
    ids = torch.arange(8)[None]
    with torch.no_grad():
        np.testing.assert_allclose(again(ids).logits.numpy(), tm(ids).logits.numpy(), atol=1e-6)
