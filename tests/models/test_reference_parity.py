"""Parity with the authors' PyTorch PPLLaVA through the reference fixtures.

The fixture directory comes from ``PPLLAVA_REFERENCE_DIR`` (default
``tests/fixtures/reference_ppllava``); every size, kernel, stride, temperature, depth, token id
and pinpoint is read from its ``config.json``, so another directory of the same layout but a
different configuration runs unchanged. The checkpoint is converted with the project's converter.
Either family runs: the Vicuna one (CLIP + BT-Adapter) or the Qwen2 + SigLIP one
(``tests/fixtures/reference_ppllava_qwen``, ``qwen: true`` in its ``config.json``; its CLIP
prompts are per-sample ``clip_ids_i`` without a mask).
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint
from ppllava_jax.data.clip_prompts import clip_prompt_length, trim_clip_prompts
from ppllava_jax.data.collate import Media, Sample, collate
from ppllava_jax.generate import SamplingConfig, generate
from ppllava_jax.layout import pool_windows
from ppllava_jax.models.longclip import extend_positions
from ppllava_jax.models.pooling import weighted_pool3d
from ppllava_jax.models.ppllava import PPLLaVA
from tests.sft_loss import mean_loss

REF = Path(
    os.environ.get(
        "PPLLAVA_REFERENCE_DIR", Path(__file__).resolve().parents[1] / "fixtures/reference_ppllava"
    )
)
KINDS = {"video": "video", "image": "image", "multi-image": "multi", "multi_image": "multi"}


def _load(name):
    return dict(np.load(REF / f"{name}.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ckpt"
    convert_checkpoint(REF, out)
    family, cfg, params = load_checkpoint(out)
    assert family == "ppllava"
    return cfg, params


def _clip_prompt(data, i):
    """The prompt-encoder ids and mask of sample ``i``: one ``[B, L]`` array with a mask
    (Vicuna fixtures) or one unpadded array per sample and no mask (Qwen fixtures)."""
    if f"clip_ids_{i}" in data:
        return data[f"clip_ids_{i}"], None
    return data["clip_ids"][i], data["clip_mask"][i]


def _samples(data, cfg, with_labels):
    samples = []
    for i, kind in enumerate(data["media_types"]):
        m = data["attention_mask"][i].astype(bool)
        px = data[f"pixel_values_{i}"]
        kind = KINDS[str(kind)]
        if kind == "image":  # (1, V, 3, H, W)
            pixels = px[0].transpose(0, 2, 3, 1)
        else:  # (T, 1, 3, H, W)
            pixels = px[:, 0].transpose(0, 2, 3, 1)
        media = Media(kind, pixels, tuple(int(v) for v in data["image_sizes"][i]))
        clip_ids, clip_mask = _clip_prompt(data, i)
        samples.append(
            Sample(
                input_ids=data["input_ids"][i][m],
                labels=data["labels"][i][m] if with_labels else None,
                media=media,
                clip_ids=clip_ids,
                clip_mask=clip_mask,
            )
        )
    return samples


def _padding_side(data):
    return "left" if (data["attention_mask"][:, 0] == 0).any() else "right"


_FORWARD_CACHE = {}


def _forward(converted, name):
    if name not in _FORWARD_CACHE:
        cfg, params = converted
        data = _load(name)
        side = _padding_side(data)
        batch = collate(_samples(data, cfg, "labels" in data), cfg, padding_side=side)
        model = PPLLaVA(cfg)

        def fwd(p, b):
            out = model.apply({"params": p}, b, return_visual_attention=True)
            if "labels" in b:
                out["loss"] = mean_loss(out["logits"], b)
            return out

        out = jax.jit(fwd)(params, batch)
        emb, _ = jax.jit(lambda p, b: model.apply({"params": p}, b, method="embed_inputs"))(
            params, batch
        )
        _FORWARD_CACHE[name] = (name, data, batch, jax.device_get(out), np.asarray(emb), side)
    return _FORWARD_CACHE[name]


@pytest.fixture(params=["forward_train_batch", "forward_infer_batch"])
def forward(request, converted):
    return _forward(converted, request.param)


def test_pooling_cases():
    data = _load("pooling")
    cases = sorted({k.split("_")[0] for k in data})
    assert cases
    for c in cases:
        args = json.loads(str(data[f"{c}_args"]))
        x = data[f"{c}_input"].transpose(0, 2, 3, 4, 1)  # (N,C,D,H,W) -> (N,D,H,W,C)
        w = data.get(f"{c}_weights")
        k, s, _ = pool_windows(
            x.shape[1:4],
            kernel=args.get("kernel"),
            stride=args.get("stride"),
            output_size=args.get("output_size"),
        )
        temp = args.get("temperature")
        y = weighted_pool3d(
            jnp.asarray(x), None if w is None else jnp.asarray(w), k, s, temp or 1.0
        )
        np.testing.assert_allclose(
            np.asarray(y).transpose(0, 4, 1, 2, 3), data[f"{c}_output"], atol=1e-5, err_msg=c
        )


def test_longclip_table(converted):
    cfg, params = converted
    data = _load("longclip")
    short, long = sorted(data.values(), key=len)  # position_embedding_{77,248} or _{64,196}
    assert len(long) == cfg.clip_text.max_position_embeddings
    ext = extend_positions(short, keep=cfg.clip_text.position_keep)
    np.testing.assert_allclose(ext, long, atol=1e-6)


def test_clip_text_embeds(converted):
    """The prompt encoder's pooled output (the Qwen fixtures record it: SigLIP's text tower at
    the last position through its head)."""
    cfg, params = converted
    model = PPLLaVA(cfg)
    found = 0
    for name in ("forward_train_batch", "forward_infer_batch"):
        data = _load(name)
        for i in range(len(data["media_types"])):
            if f"clip_text_embeds_{i}" not in data:
                continue
            ids, mask = _clip_prompt(data, i)
            mask = np.ones_like(ids) if mask is None else mask
            got = model.apply(
                {"params": params},
                ids[None].astype(np.int32),
                mask[None].astype(np.int32),
                method=lambda m, a, b: m.multi_modal_projector.text_embeds(a, b),
            )
            ref = data[f"clip_text_embeds_{i}"]
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{name} {i}")
            found += 1
    if not found:
        pytest.skip("this fixture set records no clip_text_embeds")


def test_visual_tokens(forward):
    name, data, batch, _, emb, _ = forward
    n = len(data["media_types"])
    for i in range(n):
        ref = data[f"visual_tokens_{i}"].reshape(-1, data[f"visual_tokens_{i}"].shape[-1])
        got = emb[i][batch["visual_index"][i] >= 0]
        assert got.shape == ref.shape, f"{name} sample {i}: {got.shape} vs {ref.shape}"
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{name} sample {i}")


def test_logits_at_attended_positions(forward):
    name, data, batch, out, _, side = forward
    ref = data["logits"]
    for i in range(ref.shape[0]):
        m = batch["attention_mask"][i].astype(bool)
        n = int(m.sum())
        ref_i = ref[i, :n] if side == "right" else ref[i, ref.shape[1] - n :]
        np.testing.assert_allclose(out["logits"][i][m], ref_i, atol=1e-4, err_msg=f"{name} {i}")


def test_loss(converted):
    _, data, _, out, _, _ = _forward(converted, "forward_train_batch")
    np.testing.assert_allclose(out["loss"], data["loss"], rtol=1e-5)


def test_visual_attention(forward):
    name, data, batch, out, _, _ = forward
    kind = KINDS[str(data["media_types"][0])]
    ref = data["visual_attention_0"]
    got = out["visual_attention"][kind][0]
    t = ref.shape[1]
    np.testing.assert_allclose(got[:t], ref[0], atol=1e-5, err_msg=name)


def test_greedy_generation(converted):
    cfg, params = converted
    data = _load("generate_greedy")
    px = data["pixel_values_0"][:, 0].transpose(0, 2, 3, 1)
    clip_ids, clip_mask = _clip_prompt(data, 0)
    sample = Sample(
        input_ids=data["input_ids"][0],
        media=Media("video", px),
        clip_ids=clip_ids,
        clip_mask=clip_mask,
    )
    batch = collate([sample], cfg, padding_side="left")
    n_new = data["step_logits"].shape[1]
    sc = SamplingConfig(max_new_tokens=n_new, eos_token_id=cfg.llm.eos_token_id, return_logits=True)
    model = PPLLaVA(cfg)
    out = jax.jit(lambda p, b: generate(model, p, b, sc))(params, batch)
    prompt = data["input_ids"].shape[1]
    np.testing.assert_array_equal(np.asarray(out["tokens"][0]), data["output_ids"][0, prompt:])
    np.testing.assert_allclose(np.asarray(out["logits"]), data["step_logits"], atol=1e-4)


def test_trimmed_clip_prompt_padding_changes_nothing(converted):
    """Training cuts the CLIP prompts' padding (``clip_prompts.trim_clip_prompts``): the fixture
    sample with the shortest prompt, its prompt padded by up to 37 more positions, gives the same
    logits with the padding cut, and both match the authors' logits."""
    cfg, params = converted

    def real(s):  # right-padded prompts: the real tokens come first
        return len(s.clip_ids) if s.clip_mask is None else int(np.sum(s.clip_mask != 0))

    cases = []
    for name in ("forward_train_batch", "forward_infer_batch"):
        data = _load(name)
        cases += [(real(s), name, i, s) for i, s in enumerate(_samples(data, cfg, False))]
    need, name, i, sample = min(cases, key=lambda c: c[0])
    pad = min(37, cfg.clip_text.max_position_embeddings - need)
    assert pad > 0, "every prompt fills the prompt encoder's positions: nothing to cut"
    padded = collate([sample], cfg, clip_length=need + pad)
    assert clip_prompt_length(padded) == need
    trimmed = trim_clip_prompts(padded, need)
    key = next(k for k in padded if k.endswith("_clip_ids"))
    assert padded[key].shape[-1] == need + pad and trimmed[key].shape[-1] == need
    model = PPLLaVA(cfg)
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b)["logits"])
    a, b = np.asarray(fwd(params, padded)), np.asarray(fwd(params, trimmed))
    m = padded["attention_mask"][0].astype(bool)
    np.testing.assert_allclose(b[0][m], a[0][m], atol=1e-5)
    data = _load(name)
    ref, n = data["logits"][i], int(m.sum())
    ref_i = ref[:n] if _padding_side(data) == "right" else ref[ref.shape[0] - n :]
    np.testing.assert_allclose(b[0][m], ref_i, atol=1e-4, err_msg=f"{name} sample {i}")
