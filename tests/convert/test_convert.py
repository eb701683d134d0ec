"""The converter (Python API and command line) with LLaMA as the test family."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta
from safetensors.numpy import load_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as TorchLlama

import convert_torch_weights
from ppllava_jax.convert import api, registry
from ppllava_jax.convert.mapping import ConversionError
from ppllava_jax.convert.torch_io import TorchCheckpoint, write_safetensors
from ppllava_jax.models import llama
from ppllava_jax.models.config import LlamaConfig

REPO = Path(__file__).resolve().parents[2]


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved as one safetensors file, sharded, and as .bin."""
    root = tmp_path_factory.mktemp("hf")
    cfg = HFLlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1000.0,
    )
    torch.manual_seed(0)
    model = TorchLlama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    (root / "bin").mkdir()
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    shutil.copy(root / "single" / "config.json", root / "bin" / "config.json")
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {"root": root, "model": model, "sd": sd}


def _variant(hf, name, *, drop=(), add=None, config=None) -> Path:
    """Copy of the checkpoint with tensors dropped/added or config.json fields changed."""
    d = hf["root"] / name
    sd = {k: v for k, v in hf["sd"].items() if k not in drop}
    sd.update(add or {})
    write_safetensors(sd, d)
    c = json.loads((hf["root"] / "single" / "config.json").read_text())
    c.update(config or {})
    (d / "config.json").write_text(json.dumps(c))
    return d


def test_write_safetensors_sharding(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((10, 10)).astype(np.float32),  # 400 B
        "b": rng.standard_normal((30,)).astype(np.float32),  # 120 B
        "c": rng.standard_normal((200,)).astype(np.float32),  # 800 B: over the limit, alone
        "d": rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16),
        "e": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    files = write_safetensors(iter(tensors.items()), tmp_path / "sharded", max_shard_bytes=600)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": files[0].name,
        "b": files[0].name,
        "c": files[1].name,
        "d": files[2].name,
        "e": files[2].name,
    }
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert not list((tmp_path / "sharded").glob(".shard-*"))
    back = TorchCheckpoint(tmp_path / "sharded")
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back.shape(k) == v.shape
        np.testing.assert_array_equal(back[k], v)
    # the reference reader agrees (float tensors; safetensors.numpy has no bfloat16)
    np.testing.assert_array_equal(load_file(files[1])["c"], tensors["c"])
    # small enough: one file, no index
    files = write_safetensors(tensors, tmp_path / "one")
    assert [f.name for f in files] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert sorted(TorchCheckpoint(files[0])) == sorted(tensors)


def test_single_sharded_and_bin_give_the_same_params(hf, tmp_path):
    assert (hf["root"] / "sharded" / "model.safetensors.index.json").exists()
    out = {}
    for src in ("single", "sharded", "bin"):
        api.convert_checkpoint(hf["root"] / src, tmp_path / src)
        out[src] = api.load_checkpoint(tmp_path / src)
    fam, cfg, params = out["single"]
    assert fam == "llama" and isinstance(cfg, LlamaConfig)
    assert cfg.scan_layers and cfg.num_key_value_heads == 2 and cfg.rope_theta == 1000.0
    assert cfg.dtype == "float32"  # HF's "dtype" field is not the compute dtype
    for src in ("sharded", "bin"):
        assert out[src][:2] == out["single"][:2]
        _assert_trees_equal(out[src][2], params)
    sd = hf["sd"]
    layers = params["model"]["layers"]
    np.testing.assert_array_equal(
        layers["self_attn"]["k_proj"]["kernel"][1], sd["model.layers.1.self_attn.k_proj.weight"].T
    )
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(
        params["model"]["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"]
    )
    # the params fit the model
    abstract = traverse_util.flatten_dict(meta.unbox(llama.abstract_params(cfg)))
    got = traverse_util.flatten_dict(params)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in got.items()
    }


def test_missing_and_extra_keys_are_reported_together(hf):
    missing = "model.layers.1.mlp.up_proj.weight"
    extra = "model.layers.0.self_attn.rotary_extra.weight"
    src = _variant(hf, "broken", drop=[missing], add={extra: np.zeros((4, 4), np.float32)})
    with pytest.raises(ConversionError) as e:
        api.convert_checkpoint(src, hf["root"] / "never", scan_layers=False)
    msg = str(e.value)
    assert "1 model parameters not found" in msg and "model/layers_1/mlp/up_proj/kernel" in msg
    assert "1 checkpoint tensors not used" in msg and extra in msg
    assert not (hf["root"] / "never").exists()
    with pytest.raises(ConversionError) as e:  # scanned: the stacked leaf and the layer
        api.convert_checkpoint(_variant(hf, "missing", drop=[missing]), hf["root"] / "never")
    assert re.search(r"model/layers/mlp/up_proj/kernel .*\(layers \[1\]\)", str(e.value))
    with pytest.raises(ConversionError, match="rotary_extra"):
        api.convert_checkpoint(
            _variant(hf, "extra", add={extra: np.zeros((4, 4), np.float32)}), hf["root"] / "never"
        )


def test_shape_mismatch_is_reported(hf):
    src = _variant(hf, "wide", config={"intermediate_size": 64})
    with pytest.raises(ConversionError) as e:
        api.convert_checkpoint(src, hf["root"] / "never")
    msg = str(e.value)
    assert "6 shape mismatches" in msg
    assert "model.layers.0.mlp.gate_proj.weight -> model/layers/mlp/gate_proj/kernel" in msg
    assert "checkpoint (32, 56), model (32, 64)" in msg


def test_bfloat16_conversion(hf, tmp_path):
    api.convert_checkpoint(hf["root"] / "single", tmp_path / "bf16", dtype="bfloat16")
    _, _, params = api.load_checkpoint(tmp_path / "bf16")
    flat = _flat(params)
    assert {v.dtype for v in flat.values()} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(
        flat["model/norm/weight"], hf["sd"]["model.norm.weight"].astype(ml_dtypes.bfloat16)
    )
    with pytest.raises(ValueError, match="dtype"):
        api.convert_checkpoint(hf["root"] / "single", tmp_path / "x", dtype="int8")


@pytest.mark.parametrize("scan", [True, False])
def test_round_trip_to_transformers(hf, tmp_path, scan):
    api.convert_checkpoint(hf["root"] / "single", tmp_path / "jax", scan_layers=scan)
    _, cfg, params = api.load_checkpoint(tmp_path / "jax")
    assert cfg.scan_layers == scan
    out = api.export_checkpoint(tmp_path / "jax", tmp_path / "hf", max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    back = TorchCheckpoint(out)
    assert sorted(back) == sorted(hf["sd"])
    for k, v in hf["sd"].items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    reloaded = TorchLlama.from_pretrained(out).eval()
    ids = torch.arange(1, 15).reshape(2, 7)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf["model"](ids).logits.numpy())
    # and JAX agrees with both at 1e-4
    logits = llama.LlamaForCausalLM(cfg).apply(
        {"params": params},
        ids.numpy().astype(np.int32),
        positions=np.broadcast_to(np.arange(7, dtype=np.int32), (2, 7)),
    )["logits"]
    np.testing.assert_allclose(logits, reloaded(ids).logits.detach().numpy(), atol=1e-4, rtol=0)


def test_unknown_family_and_missing_directory(hf, tmp_path, capsys):
    assert "llama" in [f.name for f in registry.families()]
    rc = convert_torch_weights.main(
        ["--source", str(hf["root"] / "single"), "--output", str(tmp_path / "o"), "--family", "gpt"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "unknown model family 'gpt'" in err and "Traceback" not in err
    rc = convert_torch_weights.main(["--source", str(tmp_path / "nope"), "--output", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist" in err
    rc = convert_torch_weights.main(
        ["--source", str(_variant(hf, "bad", drop=["model.norm.weight"])), "--output", "x"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error:") and "model/norm/weight" in err
    bert = _variant(hf, "bert", config={"model_type": "bert", "architectures": ["BertModel"]})
    rc = convert_torch_weights.main(["--source", str(bert), "--output", "x"])
    assert rc == 1 and "not a family this converter knows" in capsys.readouterr().err
    rc = convert_torch_weights.main(["--to_torch", "--source", str(tmp_path), "--output", "x"])
    assert rc == 1 and "not a directory written by" in capsys.readouterr().err


def test_help_shows_the_readme_examples(capsys):
    with pytest.raises(SystemExit) as e:
        convert_torch_weights.main(["--help"])
    assert e.value.code == 0

    def joined(text: str) -> str:  # shell continuation lines joined, spaces folded
        return " ".join(text.replace("\\\n", " ").split())

    help_text = joined(capsys.readouterr().out)
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Converting checkpoints", 1)[1].split("```bash", 1)[1].split("```")[0]
    lines = block.replace("\\\n", " ").splitlines()
    commands = [joined(x) for x in lines if x.startswith("python convert_torch_weights.py")]
    assert len(commands) == 3
    for command in commands:
        assert command in help_text, command


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("PPLLAVA_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_torch_weights.main(["--source", str(tmp_path / "nope"), "--output", "x"])


def test_command_line(hf, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(REPO / "convert_torch_weights.py")]
    r = subprocess.run(
        [
            *cmd,
            "--source",
            str(hf["root"] / "sharded"),
            "--output",
            str(tmp_path / "j"),
            "--dtype",
            "bfloat16",
            "--no-scan",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    fam, cfg, params = api.load_checkpoint(tmp_path / "j")
    assert fam == "llama" and not cfg.scan_layers and "layers_1" in params["model"]
    assert params["model"]["norm"]["weight"].dtype == ml_dtypes.bfloat16
    out = api.export_checkpoint(tmp_path / "j", tmp_path / "t", dtype="float32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    np.testing.assert_array_equal(
        TorchCheckpoint(out)["model.norm.weight"],
        hf["sd"]["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32),
    )
