"""SigLIP towers against transformers' PyTorch SigLIP at float32: tiny random models saved with
``save_pretrained``, converted with the project's converter (families detected from
``config.json``), compared layer by layer; and the export round trip."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipModel as HFSiglipModel
from transformers import SiglipTextConfig as HFTextConfig
from transformers import SiglipTextModel as HFTextModel
from transformers import SiglipVisionConfig as HFVisionConfig
from transformers import SiglipVisionModel as HFVisionModel

from ppllava_jax.convert import registry
from ppllava_jax.convert.api import convert_checkpoint, export_checkpoint, load_checkpoint
from ppllava_jax.convert.mapping import ConversionError
from ppllava_jax.convert.torch_io import TorchCheckpoint, write_safetensors
from ppllava_jax.models.siglip import SiglipModel, SiglipTextTransformer, SiglipVisionTransformer

TOL = 1e-5
# image_size 18 with patch 4: a 4x4 grid, the last 2 pixel rows/columns ignored ("valid" conv)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=18,
    patch_size=4,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=99,
    max_position_embeddings=16,
    projection_size=24,
    pad_token_id=1,
    eos_token_id=1,
    bos_token_id=None,
)
L = 12


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(0.1) weights, norms around 1, so that a wrong transpose, mask or pooling position shows
    far above 1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.copy_(torch.tensor([2.3]))
            elif name.endswith("logit_bias"):
                p.copy_(torch.tensor([-4.0]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def pixels(n: int, seed: int = 0) -> np.ndarray:
    s = VISION["image_size"]
    return np.random.RandomState(seed).randn(n, 3, s, s).astype(np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def text_ids(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two rows; row 1 right-padded with ``</s>`` (= pad, id 1) after 7 tokens."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 99, size=(2, L)).astype(np.int64)
    mask = np.ones((2, L), np.int64)
    ids[0, -1] = 1
    ids[1, 6] = 1
    ids[1, 7:] = 1
    mask[1, 7:] = 0
    return ids, mask


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _convert(src, tmp, **kw):
    out = convert_checkpoint(src, tmp / "jax", **kw)
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    torch.manual_seed(0)
    hfc = HFVisionConfig(**VISION)
    hfc._attn_implementation = "eager"
    tm = randomize(HFVisionModel(hfc), 1)
    path = tmp_path_factory.mktemp("siglip_vision")
    tm.save_pretrained(path)
    x = pixels(2)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), output_hidden_states=True)
    return tm, path, x, ref


@pytest.mark.parametrize("scan,remat", [(True, "full"), (False, "none")], ids=["scan", "unrolled"])
def test_vision_every_hidden_state_and_head(vision, tmp_path, scan, remat):
    _, path, x, ref = vision
    family, cfg, params = _convert(path, tmp_path, scan_layers=scan)
    assert family == "siglip_vision" and cfg.grid == 4 and cfg.vision_use_head
    cfg = cfg.replace(remat_policy=remat)
    n = cfg.num_hidden_layers
    taps = (*range(n + 1), -1)
    fn = jax.jit(lambda p, v: SiglipVisionTransformer(cfg).apply({"params": p}, v, taps=taps))
    out = fn(params, nhwc(x))
    assert out["hidden_states"].shape == (len(taps), 2, 16, 32)
    want = [ref.hidden_states[t].numpy() for t in taps]
    assert len(ref.hidden_states) == n + 1
    for i, t in enumerate(taps):
        assert maxdiff(out["hidden_states"][i], want[i]) <= TOL, f"hidden state {t}"
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state.numpy()) <= TOL
    assert maxdiff(out["pooler_output"], ref.pooler_output.numpy()) <= TOL
    assert maxdiff(want[0], want[-1]) > 1e-2  # the layers matter at this tolerance


def test_vision_transformers4_layout_and_no_head(vision, tmp_path):
    """transformers 4 wrote ``vision_model.``-prefixed keys; a tower without a head (as in
    LLaVA-OneVision) converts without ``head.*``."""
    _, path, _, _ = vision
    ck = TorchCheckpoint(path)
    hf = json.loads((path / "config.json").read_text())
    old = tmp_path / "v4"
    write_safetensors({"vision_model." + k: ck[k] for k in ck}, old)
    (old / "config.json").write_text(json.dumps(hf))
    _, _, a = _convert(path, tmp_path / "a")
    _, _, b = _convert(old, tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    headless = tmp_path / "headless"
    write_safetensors({k: ck[k] for k in ck if not k.startswith("head.")}, headless)
    (headless / "config.json").write_text(json.dumps({**hf, "vision_use_head": False}))
    _, cfg, p = _convert(headless, tmp_path / "c")
    assert not cfg.vision_use_head and "head" not in p
    with pytest.raises(ConversionError, match="head.probe"):  # strict: unused tensors named
        write_safetensors({k: ck[k] for k in ck}, headless)
        convert_checkpoint(headless, tmp_path / "d")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    torch.manual_seed(0)
    hfc = HFTextConfig(**TEXT)
    hfc._attn_implementation = "eager"
    tm = randomize(HFTextModel(hfc), 2)
    path = tmp_path_factory.mktemp("siglip_text")
    tm.save_pretrained(path)
    return tm, path


def test_text_pooled_at_last_position_bidirectional(text, tmp_path):
    tm, path = text
    family, cfg, params = _convert(path, tmp_path)
    assert family == "siglip_text" and cfg.projection_size == 24 and cfg.eos_token_id == 1
    ids, mask = text_ids()
    model = SiglipTextTransformer(cfg)
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids))  # no mask, as SigLIP's tokenizer gives none
        ref_m = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids.astype(np.int32))
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state.numpy()) <= TOL
    assert maxdiff(out["pooler_output"], ref.pooler_output.numpy()) <= TOL
    outm = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(
        params, ids.astype(np.int32), mask.astype(np.int32)
    )
    valid = mask.astype(bool)
    got, want = np.asarray(outm["last_hidden_state"]), ref_m.last_hidden_state.numpy()
    assert maxdiff(got[valid], want[valid]) <= TOL
    assert maxdiff(outm["pooler_output"], ref_m.pooler_output.numpy()) <= TOL
    # bidirectional: position 0 sees the last token (a causal tower would not)
    ids2 = ids.copy()
    ids2[0, -2] = 5 if ids[0, -2] != 5 else 6
    with torch.no_grad():
        ref2 = tm(torch.from_numpy(ids2))
    assert maxdiff(ref2.last_hidden_state[0, 0], ref.last_hidden_state[0, 0]) > 1e-3
    out2 = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids2.astype(np.int32))
    assert maxdiff(out2["last_hidden_state"], ref2.last_hidden_state.numpy()) <= TOL


def test_text_pool_index_equals_an_unpadded_run(text, tmp_path):
    """PPLLaVA-Qwen runs each prompt alone and unpadded; in a batch the mask hides the batch's
    padding and ``pool_index`` picks each row's last real token: same numbers."""
    tm, path = text
    _, cfg, params = _convert(path, tmp_path)
    ids, mask = text_ids()
    ids[1, 7:] = 0  # whatever the batch pads with must not matter
    n = int(mask[1].sum())
    with torch.no_grad():
        alone = tm(torch.from_numpy(ids[1:, :n])).pooler_output.numpy()
    out = SiglipTextTransformer(cfg).apply(
        {"params": params},
        ids.astype(np.int32),
        mask.astype(np.int32),
        pool_index=np.array([L - 1, n - 1]),
    )
    assert maxdiff(out["pooler_output"][1:], alone) <= TOL


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    hfc = HFSiglipConfig(text_config=TEXT, vision_config=VISION)
    hfc.text_config._attn_implementation = "eager"
    hfc.vision_config._attn_implementation = "eager"
    hfc.text_config.projection_size = VISION["hidden_size"]  # embeddings share one width
    tm = randomize(HFSiglipModel(hfc), 3)
    path = tmp_path_factory.mktemp("siglip")
    tm.save_pretrained(path)
    return tm, path


def test_siglip_model_logits(siglip, tmp_path):
    tm, path = siglip
    family, cfg, params = _convert(path, tmp_path)
    assert family == "siglip" and params["logit_scale"].shape == (1,)
    ids, _ = text_ids()
    x = pixels(3, seed=1)
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(x))
    out = jax.jit(lambda p, v, i: SiglipModel(cfg.vision, cfg.text).apply({"params": p}, v, i))(
        params, nhwc(x), ids.astype(np.int32)
    )
    assert out["logits_per_text"].shape == (2, 3)
    for k in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert maxdiff(out[k], getattr(ref, k).numpy()) <= TOL, k


def test_families_detected_and_export_round_trip_is_exact(siglip, vision, text, tmp_path):
    for (src, name), i in zip(
        [(siglip[1], "siglip"), (vision[1], "siglip_vision"), (text[1], "siglip_text")], range(3)
    ):
        hf = json.loads((src / "config.json").read_text())
        assert registry.detect_family(hf).name == name
        ckpt = convert_checkpoint(src, tmp_path / f"j{i}")
        back = export_checkpoint(ckpt, tmp_path / f"hf{i}")
        a, b = TorchCheckpoint(src), TorchCheckpoint(back)
        assert sorted(a) == sorted(b), name
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=f"{name}: {k}")
        # transformers loads the exported config and weights back
        cls = {"siglip": HFSiglipModel, "siglip_vision": HFVisionModel}.get(name, HFTextModel)
        cls.from_pretrained(back)
