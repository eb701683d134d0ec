"""CLIP towers against transformers' PyTorch CLIP at float32: tiny random models, converted with
the project's converter and key tables, compared layer by layer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel as HFCLIPModel
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModel as HFVisionModel

from ppllava_jax.convert import clip_keys, mapping
from ppllava_jax.convert.mapping import ConversionError
from ppllava_jax.convert.torch_io import TorchCheckpoint, write_safetensors
from ppllava_jax.models.clip import CLIPTextTransformer, CLIPVisionTransformer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference_ppllava"
FAM = {f.name: f for f in clip_keys.FAMILIES}
TOL = 1e-5

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=99,
    max_position_embeddings=77,
    bos_token_id=97,
    pad_token_id=98,
)
L = 12  # text length of every batch


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that a wrong transpose, mask or position shows far above 1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(torch.tensor(2.3))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> tuple[TorchCheckpoint, dict]:
    model.save_pretrained(path)
    return TorchCheckpoint(path), json.loads((path / "config.json").read_text())


def convert(family: str, cfg, ckpt) -> dict:
    fam = FAM[family]
    keymap = fam.keymap(cfg, list(ckpt))
    return mapping.convert_state_dict(ckpt, keymap, fam.abstract_params(cfg), ignore=fam.ignore)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    """float32[n, 3, H, W] (torch layout)."""
    s = VISION["image_size"]
    return np.random.RandomState(seed).randn(n, 3, s, s).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---- vision ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    torch.manual_seed(0)
    tm = randomize(HFVisionModel(HFVisionConfig(**VISION)), 1)
    ckpt, hf = save(tm, tmp_path_factory.mktemp("vision"))
    x = pixels(2)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), output_hidden_states=True)
    return tm, ckpt, hf, x, ref


@pytest.mark.parametrize(
    "scan,remat",
    [(True, "none"), (False, "none"), (True, "full")],
    ids=["scan", "unrolled", "remat"],
)
def test_vision_every_hidden_state(vision, scan, remat):
    _, ckpt, hf, x, ref = vision
    cfg = FAM["clip_vision"].config_from_hf(hf, scan_layers=scan, remat_policy=remat)
    assert cfg.num_hidden_layers == 3 and cfg.patch_size == 4
    params = convert("clip_vision", cfg, ckpt)
    n = cfg.num_hidden_layers
    taps = (*range(n + 1), -2, 1)  # every hidden state, a negative index and a repeat
    fn = jax.jit(lambda p, v: CLIPVisionTransformer(cfg).apply({"params": p}, v, taps=taps))
    out = fn(params, nhwc(x))
    assert out["hidden_states"].shape == (len(taps), 2, 17, 32)
    want = [ref.hidden_states[t].numpy() for t in taps]
    for i, t in enumerate(taps):
        assert maxdiff(out["hidden_states"][i], want[i]) <= TOL, f"hidden state {t}"
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state.numpy()) <= TOL
    assert maxdiff(out["pooler_output"], ref.pooler_output.numpy()) <= TOL
    # the model is not trivially close to its input: layers matter at this tolerance
    assert maxdiff(want[0], want[-3]) > 1e-2


def test_vision_no_taps_and_scan_layout(vision):
    _, ckpt, hf, x, _ = vision
    cfg = FAM["clip_vision"].config_from_hf(hf)
    params = convert("clip_vision", cfg, ckpt)
    assert params["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
    assert params["embeddings"]["patch_embedding"]["kernel"].shape == (4, 4, 3, 32)
    unrolled = convert("clip_vision", cfg.replace(scan_layers=False), ckpt)
    np.testing.assert_array_equal(
        unrolled["encoder"]["layers_2"]["mlp"]["fc1"]["kernel"],
        params["encoder"]["layers"]["mlp"]["fc1"]["kernel"][2],
    )
    out = jax.eval_shape(
        lambda p, v: CLIPVisionTransformer(cfg).apply({"params": p}, v), params, nhwc(x)
    )
    assert out["hidden_states"].shape == (0, 2, 17, 32)


def test_vision_transformers4_layout(vision):
    """transformers 4 wrote CLIPVisionModel keys under ``vision_model.``; both layouts read."""
    tm, ckpt, hf, _, _ = vision
    cfg = FAM["clip_vision"].config_from_hf(hf)
    old = {"vision_model." + k: ckpt[k] for k in ckpt}
    old["vision_model.embeddings.position_ids"] = np.arange(17)[None]  # 4.x buffer
    a, b = convert("clip_vision", cfg, ckpt), convert("clip_vision", cfg, old)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ConversionError, match="vision_model.embeddings.class_embedding"):
        mapping.convert_state_dict(  # wrong table for that layout: nothing fits
            old, mapping.KeyMap(clip_keys.vision_rules()), FAM["clip_vision"].abstract_params(cfg)
        )


# ---- text ------------------------------------------------------------------------------------


def text_batch(eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Three rows: right-padded, full, left-padded. Ids above ``eos`` and a ``2`` appear before
    the end-of-text token so that the two pooling rules pick different positions."""
    rs = np.random.RandomState(3)
    ids = np.zeros((3, L), np.int64)
    mask = np.zeros((3, L), np.int64)
    for r, (start, n) in enumerate([(0, 7), (0, L), (4, L - 4)]):
        row = rs.randint(3, 96, size=n)
        row[0], row[-1] = 97, eos
        row[1] = 2
        ids[r, start : start + n] = row
        mask[r, start : start + n] = 1
        ids[r, :start] = 5  # left pad
        ids[r, start + n :] = eos  # right pad with end-of-text, as CLIP's tokenizer does
    return ids, mask


@pytest.mark.parametrize(
    "eos,scan,remat",
    [(2, True, "full"), (50, False, "none"), (50, True, "none")],
    ids=["legacy_argmax", "eos_id_unrolled", "eos_id_scan"],
)
def test_text_pooled_with_padding(tmp_path, eos, scan, remat):
    torch.manual_seed(0)
    hfc = HFTextConfig(**TEXT, eos_token_id=eos)
    hfc._attn_implementation = "eager"  # well defined on fully padded query rows
    tm = randomize(HFTextModel(hfc), 2)
    ckpt, hf = save(tm, tmp_path)
    cfg = FAM["clip_text"].config_from_hf(hf, scan_layers=scan, remat_policy=remat)
    assert cfg.eos_token_id == eos
    params = convert("clip_text", cfg, ckpt)
    ids, mask = text_batch(98 if eos == 2 else eos)
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    fn = jax.jit(lambda p, i, m: CLIPTextTransformer(cfg).apply({"params": p}, i, m))
    out = fn(params, ids.astype(np.int32), mask.astype(np.int32))
    assert maxdiff(out["pooler_output"], ref.pooler_output.numpy()) <= TOL
    valid = mask.astype(bool)
    got, want = np.asarray(out["last_hidden_state"]), ref.last_hidden_state.numpy()
    assert maxdiff(got[valid], want[valid]) <= TOL
    # the pooled rows really are the rule's positions, and the rules disagree on this batch
    legacy = ids.argmax(-1)
    first = (ids == eos).argmax(-1)
    pick = legacy if eos == 2 else first
    other = first if eos == 2 else legacy
    np.testing.assert_allclose(out["pooler_output"], got[np.arange(3), pick], atol=0)
    assert (pick != other).all()


# ---- CLIPModel, strictness, export -------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(0)
    hfc = HFCLIPConfig(
        text_config={**TEXT, "eos_token_id": 98},
        vision_config=VISION,
        projection_dim=16,
    )
    hfc.text_config._attn_implementation = "eager"
    tm = randomize(HFCLIPModel(hfc), 3)
    path = tmp_path_factory.mktemp("clip")
    ckpt, hf = save(tm, path)
    return tm, ckpt, hf, path


def test_clip_model_embeds_and_logits(clip):
    tm, ckpt, hf, _ = clip
    fam = FAM["clip"]
    assert fam.detect(hf) and not FAM["clip_text"].detect(hf)
    cfg = fam.config_from_hf(hf)
    assert cfg.projection_dim == 16 and cfg.text.eos_token_id == 98
    params = convert("clip", cfg, ckpt)
    model = clip_keys.clip_model(cfg)
    x = pixels(2, seed=1)
    ids, mask = text_batch(98)
    with torch.no_grad():
        ref = tm(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(x),
            attention_mask=torch.from_numpy(mask),
        )
        img_f = tm.get_image_features(pixel_values=torch.from_numpy(x))
        txt_f = tm.get_text_features(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        )
    img_f = getattr(img_f, "pooler_output", img_f).numpy()
    txt_f = getattr(txt_f, "pooler_output", txt_f).numpy()

    @jax.jit
    def run(p, v, i, m):
        out = model.apply({"params": p}, v, i, m)
        out["image_features"] = model.apply({"params": p}, v, method="get_image_features")
        out["text_features"] = model.apply({"params": p}, i, m, method="get_text_features")
        return out

    out = run(params, nhwc(x), ids.astype(np.int32), mask.astype(np.int32))
    assert maxdiff(out["image_features"], img_f) <= TOL
    assert maxdiff(out["text_features"], txt_f) <= TOL
    assert maxdiff(out["image_embeds"], ref.image_embeds.numpy()) <= TOL
    assert maxdiff(out["text_embeds"], ref.text_embeds.numpy()) <= TOL
    assert out["logits_per_image"].shape == (2, 3)
    assert maxdiff(out["logits_per_image"], ref.logits_per_image.numpy()) <= TOL
    assert maxdiff(out["logits_per_text"], ref.logits_per_text.numpy()) <= TOL


def test_conversion_is_strict(clip):
    _, ckpt, hf, _ = clip
    cfg = FAM["clip"].config_from_hf(hf)
    sd = {k: ckpt[k] for k in ckpt}

    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(
        ConversionError,
        match=r"text_model/encoder/layers/mlp/fc1/kernel "
        r"\(torch: text_model\.encoder\.layers\.1\.mlp\.fc1\.weight\) \(layers \[1\]\)",
    ):
        convert("clip", cfg, missing)
    with pytest.raises(ConversionError, match="text_model/encoder/layers_1/mlp/fc1/kernel"):
        convert("clip", dataclasses.replace(cfg, text=cfg.text.replace(scan_layers=False)), missing)
    del missing["logit_scale"]
    with pytest.raises(ConversionError, match="logit_scale"):
        convert("clip", cfg, missing)

    for extra in ("text_model.encoder.layers.2.mlp.fc1.weight", "vision_model.extra.weight"):
        with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
            convert("clip", cfg, {**sd, extra: sd["text_model.encoder.layers.1.mlp.fc1.weight"]})

    bad = {**sd, "visual_projection.weight": sd["visual_projection.weight"].T}
    with pytest.raises(ConversionError, match="visual_projection.weight"):
        convert("clip", cfg, bad)


@pytest.mark.parametrize("family", ["clip", "clip_vision", "clip_text"])
def test_export_roundtrip_from_pretrained(clip, tmp_path, family):
    """fixture checkpoint -> jax -> safetensors + config.json -> transformers from_pretrained:
    every tensor equal, and the loaded model computes the same."""
    tm, ckpt, hf, _ = clip
    fam = FAM[family]
    sub = {
        "clip": (tm, ""),
        "clip_vision": (tm.vision_model, "vision_model."),
        "clip_text": (tm.text_model, "text_model."),
    }[family]
    src, prefix = sub
    sd = {k[len(prefix) :]: ckpt[k] for k in ckpt if k.startswith(prefix)}
    if family == "clip":
        cfg = fam.config_from_hf(hf)
    else:
        cfg = fam.config_from_hf(hf["vision_config" if family == "clip_vision" else "text_config"])
    params = convert(family, cfg, sd)
    write_safetensors(mapping.export_state_dict(params, fam.export_keymap(cfg)), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(fam.config_to_hf(cfg)))
    cls = {"clip": HFCLIPModel, "clip_vision": HFVisionModel, "clip_text": HFTextModel}[family]
    loaded = cls.from_pretrained(tmp_path).eval()
    want = src.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a second conversion of the export gives the same parameters
    again = convert(family, cfg, TorchCheckpoint(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, again)
    if family == "clip":
        x = torch.from_numpy(pixels(1))
        ids = torch.from_numpy(text_batch(98)[0])
        with torch.no_grad():
            a, b = tm(input_ids=ids, pixel_values=x), loaded(input_ids=ids, pixel_values=x)
        # same weights; only the attention kernel may differ (eager vs sdpa)
        torch.testing.assert_close(a.logits_per_image, b.logits_per_image, atol=1e-5, rtol=0)


# ---- configs and real checkpoint layouts ----------------------------------------------------


def test_transformers4_clip_fixture_converts():
    """The fixture's CLIP (transformers 4.45, diff-only config.json) converts strictly."""
    hf = json.loads((FIXTURES / "clip" / "config.json").read_text())
    fam = FAM["clip"]
    assert fam.detect(hf)
    cfg = fam.config_from_hf(hf)
    assert (cfg.text.hidden_size, cfg.text.max_position_embeddings, cfg.text.eos_token_id) == (
        32,
        77,
        2,
    )
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.num_hidden_layers) == (
        24,
        4,
        4,
    )
    assert cfg.projection_dim == 16 and cfg.vision.hidden_act == "quick_gelu"
    ckpt = TorchCheckpoint(FIXTURES / "clip")
    params = convert("clip", cfg, ckpt)
    np.testing.assert_array_equal(
        params["visual_projection"]["kernel"], ckpt["visual_projection.weight"].T
    )
    assert np.shape(params["logit_scale"]) == ()


def test_ppllava_vision_tower_keys_fit():
    """The vision tower of a released PPLLaVA checkpoint (minus the BT-Adapter) fits the table."""
    hf = json.loads((FIXTURES / "config.json").read_text())
    cfg = clip_keys.vision_config_from_hf(hf["vision_config"])
    ckpt = TorchCheckpoint(FIXTURES)
    prefix = "vision_tower.vision_model."
    sd = {k: ckpt[k] for k in ckpt if k.startswith(prefix) and "btadapter" not in k}
    keymap = mapping.KeyMap(clip_keys.vision_rules(prefix, "tower/"))
    abstract = {"tower": clip_keys.vision_abstract_params(cfg)}
    params = mapping.convert_state_dict(sd, keymap, abstract)
    assert params["tower"]["embeddings"]["position_embedding"]["embedding"].shape == (37, 32)
