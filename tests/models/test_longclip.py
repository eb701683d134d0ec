"""Long-CLIP: the 77 -> 248 position table extension and the extended (split-table) text tower."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel

from ppllava_jax.convert import clip_keys, mapping
from ppllava_jax.convert.torch_io import TorchCheckpoint
from ppllava_jax.models.clip import CLIPTextTransformer
from ppllava_jax.models.longclip import extend_positions, extended_length

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference_ppllava"
TEXT_FAMILY = next(f for f in clip_keys.FAMILIES if f.name == "clip_text")


def test_extend_positions_matches_reference_fixture():
    z = np.load(FIXTURES / "longclip.npz")
    out = extend_positions(z["position_embedding_77"])
    assert out.shape == z["position_embedding_248"].shape == (248, 32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, z["position_embedding_248"], rtol=0, atol=1e-6)


def test_extend_positions_rule_on_hand_made_table():
    r = np.arange(77, dtype=np.float64)
    table = np.stack([r, r**2, np.sin(r)], axis=1)  # linear, quadratic, arbitrary columns
    out = extend_positions(table, keep=20, factor=4)
    assert out.shape == (extended_length(77, 20, 4), 3) == (248, 3)
    np.testing.assert_array_equal(out[:20], table[:20])
    for i in range(56):  # gaps between rows 20+i and 21+i
        for j in range(4):
            want = (1 - j / 4) * table[20 + i] + (j / 4) * table[21 + i]
            np.testing.assert_allclose(out[20 + 4 * i + j], want, rtol=1e-12, atol=1e-12)
    for j in range(4):  # extrapolation past the last row
        want = table[76] + (j / 4) * (table[76] - table[75])
        np.testing.assert_allclose(out[244 + j], want, rtol=1e-12, atol=1e-12)
    # the linear column is a straight line through every new row, extrapolated ones included
    np.testing.assert_allclose(out[20:, 0], 20 + np.arange(228) / 4, rtol=0, atol=1e-12)
    # another keep/factor
    small = extend_positions(table[:10], keep=3, factor=2)
    assert small.shape == (2 * 10 - 3, 3)
    np.testing.assert_allclose(small[3:, 0], 3 + np.arange(14) / 2, atol=1e-12)
    with pytest.raises(ValueError):
        extend_positions(table[:5], keep=4)


def test_extended_text_tower_against_torch(tmp_path):
    """A 77-position CLIP text tower extended to 248 positions: the JAX tower with split tables
    (rows < 20 from ``position_embedding``, the rest from ``position_embedding_res``) against a
    248-position torch CLIPTextModel whose single table is that combination, on prompts longer
    than 77 tokens."""
    torch.manual_seed(0)
    hf_cfg = HFTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=99,
        max_position_embeddings=77,
        bos_token_id=97,
        eos_token_id=98,
        pad_token_id=98,
    )
    short = HFTextModel(hf_cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in short.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    sd = {k: v.numpy() for k, v in short.state_dict().items()}
    pe248 = extend_positions(sd.pop("embeddings.position_embedding.weight"))
    pe_res = pe248 + 0.1 * np.random.RandomState(6).randn(*pe248.shape).astype(np.float32)
    # a released PPLLaVA-style checkpoint: raw tables, no ".weight"
    ckpt = {
        **sd,
        "embeddings.position_embedding": pe248,
        "embeddings.position_embedding_res": pe_res,
    }

    # torch reference: one 248-row table = rows 0-19 of the frozen table, rows 20+ of the copy
    combined = np.concatenate([pe248[:20], pe_res[20:]], axis=0)
    long_cfg = HFTextConfig(**{**hf_cfg.to_dict(), "max_position_embeddings": 248})
    long_cfg._attn_implementation = "eager"
    ref_model = HFTextModel(long_cfg).eval()
    ref_sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    ref_sd["embeddings.position_embedding.weight"] = torch.from_numpy(combined)
    ref_model.load_state_dict(ref_sd, strict=False)
    np.testing.assert_array_equal(
        ref_model.embeddings.position_embedding.weight.detach().numpy(), combined
    )

    cfg = TEXT_FAMILY.config_from_hf(hf_cfg.to_dict()).replace(
        extended=True, max_position_embeddings=248
    )
    params = mapping.convert_state_dict(
        ckpt, TEXT_FAMILY.keymap(cfg, list(ckpt)), TEXT_FAMILY.abstract_params(cfg)
    )
    emb = params["embeddings"]
    assert emb["position_embedding"].shape == emb["position_embedding_res"].shape == (248, 32)

    # padded batch: lengths 90, 120, 30 (real CLIP pads right with end-of-text)
    s = 120
    rs = np.random.RandomState(7)
    ids = np.full((3, s), 98, np.int64)
    mask = np.zeros((3, s), np.int64)
    for row, n in enumerate((90, 120, 30)):
        ids[row, :n] = rs.randint(1, 97, size=n)
        ids[row, 0], ids[row, n - 1] = 97, 98
        mask[row, :n] = 1
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = jax.jit(lambda p, i, m: CLIPTextTransformer(cfg).apply({"params": p}, i, m))(
        params, ids.astype(np.int32), mask.astype(np.int32)
    )
    valid = mask.astype(bool)
    got = np.asarray(out["last_hidden_state"])
    assert np.abs(got[valid] - ref.last_hidden_state.numpy()[valid]).max() <= 1e-5
    assert np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max() <= 1e-5

    # export writes the raw tables back under their own names
    exported = dict(mapping.export_state_dict(params, TEXT_FAMILY.export_keymap(cfg)))
    assert set(exported) == set(ckpt)
    for k, v in ckpt.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_ppllava_text_tower_keys_fit():
    """The text tower of a released PPLLaVA checkpoint converts strictly with the extended table."""
    ckpt = TorchCheckpoint(FIXTURES)
    prefix = "multi_modal_projector.clip_text_model."
    sd = {k: ckpt[k] for k in ckpt if k.startswith(prefix)}
    hf = json.loads((FIXTURES / "clip" / "config.json").read_text())
    cfg = clip_keys.text_config_from_hf(hf).replace(extended=True, max_position_embeddings=248)
    keymap = mapping.KeyMap(clip_keys.text_rules(prefix, "clip_text/", extended=True))
    params = mapping.convert_state_dict(
        sd, keymap, {"clip_text": clip_keys.text_abstract_params(cfg)}
    )
    emb = params["clip_text"]["embeddings"]
    for name in ("position_embedding", "position_embedding_res"):  # both drawn afresh there
        np.testing.assert_array_equal(emb[name], sd[prefix + "embeddings." + name])
