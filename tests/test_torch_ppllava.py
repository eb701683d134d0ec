"""The benchmarks' eager PyTorch PPLLaVA (``benchmarks/torch_ppllava.py``) against the authors'
outputs: it is a valid baseline only if it computes what their code computes.

The fixture directory comes from ``PPLLAVA_REFERENCE_DIR`` (default
``tests/fixtures/reference_ppllava``); sizes, kernels, depths and token ids are read from its
files. Covered: the training batch (a video, an any-resolution image, a multi-image sample;
right padding) and the inference batch (two videos, left padding): visual tokens per sample, the
visual-attention map, logits at the attended positions, the loss. Only the Vicuna family (CLIP +
BT-Adapter) is implemented; a Qwen2 + SigLIP fixture directory is skipped. Also: what
``TorchPPLLaVA.save`` writes is what ``ppllava_jax.convert`` reads (the benchmark relies on it).
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("PPLLAVA_REFERENCE_DIR", ROOT / "tests/fixtures/reference_ppllava"))


def _module():
    spec = importlib.util.spec_from_file_location(
        "torch_ppllava", ROOT / "benchmarks/torch_ppllava.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tp = _module()

if json.loads((REF / "config.json").read_text()).get("qwen"):
    pytest.skip("the PyTorch reference covers the Vicuna family only", allow_module_level=True)


@pytest.fixture(scope="module", params=[False, True], ids=["as_original", "lean"])
def model(request):
    torch.manual_seed(0)
    return tp.TorchPPLLaVA.from_pretrained(REF, lean=request.param).eval()


def _inputs(data):
    """Fixture arrays -> the model's arguments (pixels per sample as ``[T or V, 3, S, S]``)."""
    pixels = []
    for i, kind in enumerate(data["media_types"]):
        px = torch.tensor(data[f"pixel_values_{i}"])
        pixels.append(px[0] if str(kind) == "image" else px[:, 0])  # (1,V,..) / (T,1,..)
    return dict(
        input_ids=torch.tensor(data["input_ids"]),
        attention_mask=torch.tensor(data["attention_mask"]),
        pixel_values=pixels,
        media_types=[str(k) for k in data["media_types"]],
        clip_ids=torch.tensor(data["clip_ids"]),
        clip_mask=torch.tensor(data["clip_mask"]),
        image_sizes=data["image_sizes"].tolist(),
        labels=torch.tensor(data["labels"]) if "labels" in data else None,
    )


@pytest.fixture(params=["forward_train_batch", "forward_infer_batch"])
def run(request, model):
    data = dict(np.load(REF / f"{request.param}.npz", allow_pickle=False))
    with torch.no_grad():
        out = model(**_inputs(data))
    return request.param, data, {k: v.numpy() for k, v in out.items()}


def test_logits_at_attended_positions(run):
    name, data, out = run
    ref = data["logits"]
    left = (data["attention_mask"][:, 0] == 0).any()
    for i in range(ref.shape[0]):
        m = out["attention_mask"][i].astype(bool)
        n = int(m.sum())
        ref_i = ref[i, ref.shape[1] - n :] if left else ref[i, :n]
        np.testing.assert_allclose(out["logits"][i][m], ref_i, atol=1e-4, err_msg=f"{name} {i}")


def test_loss(model):
    """Every fixture batch that records a loss (the training batch does) gives it."""
    checked = []
    for name in ("forward_train_batch", "forward_infer_batch"):
        data = dict(np.load(REF / f"{name}.npz", allow_pickle=False))
        if "loss" not in data:
            continue
        with torch.no_grad():
            out = model(**_inputs(data))
        np.testing.assert_allclose(out["loss"].numpy(), data["loss"], rtol=1e-5, err_msg=name)
        checked.append(name)
    assert checked, f"no fixture batch in {REF} records a loss"


def test_visual_tokens_and_attention(model):
    for name in ("forward_train_batch", "forward_infer_batch"):
        data = dict(np.load(REF / f"{name}.npz", allow_pickle=False))
        inp = _inputs(data)
        for i, kind in enumerate(inp["media_types"]):
            with torch.no_grad():
                toks = model.encode(
                    inp["pixel_values"][i],
                    kind,
                    inp["clip_ids"][i],
                    inp["clip_mask"][i],
                    inp["image_sizes"][i],
                )
            got = torch.cat(toks).numpy()
            ref = data[f"visual_tokens_{i}"].reshape(-1, got.shape[-1])
            assert got.shape == ref.shape, (name, i, got.shape, ref.shape)
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{name} {i}")
            if i == 0:
                att = model.last_visual_attention.numpy()
                np.testing.assert_allclose(att, data["visual_attention_0"], atol=1e-5)


def test_state_dict_is_the_checkpoint_layout(tmp_path):
    """Every tensor of the fixture checkpoint is a parameter of the module (strict load), and a
    randomly built module saved with ``save`` converts with ``ppllava_jax.convert``."""
    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint

    hf, clip = tp.read_config(REF)
    torch.manual_seed(1)
    model = tp.TorchPPLLaVA(hf, clip)
    model.save(tmp_path / "pt", clip)
    again = tp.TorchPPLLaVA.from_pretrained(tmp_path / "pt")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    convert_checkpoint(tmp_path / "pt", tmp_path / "jax")
    family, cfg, params = load_checkpoint(tmp_path / "jax")
    assert family == "ppllava" and cfg.btadapter and cfg.pooling == "ppllava"
    import jax

    n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n_jax == sum(p.numel() for p in model.parameters())
    # the trainable set matches the JAX preset's
    from ppllava_jax.train.optimizer import (
        default_optimizer_config,
        split_params,
        trainable_predicate,
    )

    trainable, _ = split_params(params, trainable_predicate(default_optimizer_config()))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    assert model.set_trainable() == n_train
