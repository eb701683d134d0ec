"""The converter under misuse (issue 13): damaged weight files, outputs that are replaced whole
(no stale shards, no new config beside old parameters, never the source), and batches that do
not divide the data-parallel devices."""

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as TorchLlama

import convert_torch_weights
from ppllava_jax import sharding
from ppllava_jax.convert import api
from ppllava_jax.convert.params_io import OutputError
from ppllava_jax.convert.torch_io import CheckpointError, TorchCheckpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random LlamaForCausalLM (safetensors) and its state dict."""
    root = tmp_path_factory.mktemp("hf")
    cfg = HFLlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        rope_theta=1000.0,
    )
    torch.manual_seed(0)
    model = TorchLlama(cfg).eval()
    model.save_pretrained(root / "single")
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {"root": root, "sd": sd, "model": model}


@pytest.fixture(scope="module")
def jax_dir(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("jax") / "llama"
    api.convert_checkpoint(hf["root"] / "single", out)
    return out


def _copy_source(hf, tmp_path, name="src") -> Path:
    d = tmp_path / name
    shutil.copytree(hf["root"] / "single", d)
    return d


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = convert_torch_weights.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


# ----------------------------------------------------------------------- damaged weight files


def _damage(kind: str, good: bytes) -> bytes:
    return {
        "zero": b"",
        "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n",
        "truncated": good[: len(good) - 64],
        "truncated_header": good[:40],
    }[kind]


@pytest.mark.parametrize("kind", ["zero", "text", "truncated", "truncated_header"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_damaged_weight_file_is_one_clear_error(hf, tmp_path, capsys, kind, fmt):
    src = _copy_source(hf, tmp_path)
    good = src / "model.safetensors"
    if fmt == "bin":
        torch.save(hf["model"].state_dict(), src / "pytorch_model.bin")
        good.unlink()
        good = src / "pytorch_model.bin"
    good.write_bytes(_damage(kind, good.read_bytes()))
    with pytest.raises(CheckpointError, match=f"{good}.*(damaged|empty)"):
        TorchCheckpoint(src)
    rc, err = _cli(capsys, "--source", src, "--output", tmp_path / "out")
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(good) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not _siblings(tmp_path / "out")


def test_damaged_tensor_and_index_name_the_file(hf, tmp_path):
    src = _copy_source(hf, tmp_path)
    # a shard index that is not JSON
    (src / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json is not a readable shard index"):
        TorchCheckpoint(src)
    (src / "model.safetensors.index.json").unlink()
    (src / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        api.convert_checkpoint(src, tmp_path / "out")
    # a header whose offsets run past the data: the file is refused when opened
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["w"]["data_offsets"] = [0, 128]
    hb = json.dumps(header).encode().ljust(n)[:n]
    path.write_bytes(bytes(raw[:8]) + hb + bytes(raw[8 + n :]))
    with pytest.raises(CheckpointError, match=f"{path} is not a readable safetensors file"):
        TorchCheckpoint(path)


# ----------------------------------------------------------------------- outputs replaced whole


def test_reexport_leaves_no_stale_shards(jax_dir, hf, tmp_path):
    out = tmp_path / "hf_out"
    api.export_checkpoint(jax_dir, out, max_shard_bytes=2_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    (out / "generation_config.json").write_text("{}")  # a file of the old output
    api.export_checkpoint(jax_dir, out)  # one shard now
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not _siblings(out)
    back = TorchCheckpoint(out)
    assert sorted(back) == sorted(hf["sd"])
    for k, v in hf["sd"].items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert TorchLlama.from_pretrained(out).config.num_hidden_layers == 2


def test_failed_export_keeps_the_previous_output(jax_dir, tmp_path, monkeypatch):
    out = tmp_path / "hf_out"
    api.export_checkpoint(jax_dir, out, max_shard_bytes=2_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(cfg, path):
        raise KeyboardInterrupt  # Ctrl-C after the shards and config.json were written

    fam = api.registry.get_family("llama")
    monkeypatch.setattr(
        api.registry,
        "get_family",
        lambda name: fam.__class__(**{**vars(fam), "write_hf_extras": interrupted}),
    )
    with pytest.raises(KeyboardInterrupt):
        api.export_checkpoint(jax_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _siblings(out)


def test_interrupted_reconversion_keeps_the_previous_output(hf, tmp_path, monkeypatch):
    out = tmp_path / "jax"
    api.convert_checkpoint(hf["root"] / "single", out)
    other = _copy_source(hf, tmp_path, "other")
    c = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**c, "rope_theta": 500.0}))

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        api.convert_checkpoint(other, out)
    monkeypatch.undo()
    _, cfg, params = api.load_checkpoint(out)
    assert cfg.rope_theta == 1000.0  # the old config beside the old parameters
    assert not _siblings(out)
    api.convert_checkpoint(other, out)  # completed: the new config
    assert api.load_checkpoint(out)[1].rope_theta == 500.0


def test_output_that_is_or_holds_the_source_is_refused(hf, jax_dir, tmp_path, capsys):
    src = _copy_source(hf, tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for output in (src, tmp_path):  # the source itself, a directory holding it
        rc, err = _cli(capsys, "--source", src, "--output", output)
        assert rc == 1 and "would overwrite the source" in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    jax_copy = tmp_path / "jax_copy"
    shutil.copytree(jax_dir, jax_copy)
    rc, err = _cli(capsys, "--to_torch", "--source", jax_copy, "--output", jax_copy)
    assert rc == 1 and "would overwrite the source" in err
    assert api.load_checkpoint(jax_copy)[0] == "llama"
    with pytest.raises(OutputError, match="would overwrite the source"):
        api.convert_checkpoint(src, src / ".")
    # an existing directory of other files is not replaced either
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, err = _cli(capsys, "--source", src, "--output", mine)
    assert rc == 1 and "is not a checkpoint directory" in err
    assert (mine / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------- batch divisibility


def test_indivisible_batch_is_refused_saying_what_divides():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # 4 data-parallel devices
    sharding.check_batch_rows(8, mesh)
    with pytest.raises(sharding.ShardingError) as e:
        sharding.check_batch_rows(6, mesh, what="data.batch_size=6", setting="data.batch_size")
    msg = str(e.value)
    assert "6 rows do not split over the mesh's data x fsdp = 4 devices" in msg
    assert "multiple of 4 rows (4 or 8) via data.batch_size" in msg and "(1, 2, 3, 6)" in msg

    from ppllava_jax.train import run

    cfg = ml_collections.ConfigDict(
        {
            "data": {"batch_size": 4, "dpo": False, "micro_batches": 1},
            "train": {"grad_accum_steps": 1},
            "eval": {"split": "eval", "batch_size": 6},
            "synthetic": {},
        }
    )
    run.check_batch(cfg, mesh)  # 4 rows on 4 devices; no eval mesh given
    with pytest.raises(sharding.ShardingError, match="eval.batch_size=6"):
        run.check_batch(cfg, mesh, eval_mesh=mesh)
    cfg.data.micro_batches = 2  # 2 rows per micro-batch
    with pytest.raises(sharding.ShardingError, match="grad_accum_steps=2.*: 2 rows"):
        run.check_batch(cfg, mesh)
    cfg.data.dpo = True  # 4 pairs = 8 rows, 4 per micro-batch
    run.check_batch(cfg, mesh)
    cfg.data.dpo = False  # 4 x 3 hosts / 2 = 6 rows per micro-batch
    with pytest.raises(sharding.ShardingError, match="x 3 hosts"):
        run.check_batch(cfg, mesh, process_count=3)

    from ppllava_jax.evaluate import model_setup

    assert model_setup.eval_batch_size(0, mesh) == 8
    assert model_setup.eval_batch_size(12, mesh) == 12
    with pytest.raises(sharding.ShardingError, match="--batch_size 6"):
        model_setup.eval_batch_size(6, mesh)
    six = sharding.make_mesh({"data": 1, "fsdp": 6, "tensor": 1}, jax.devices()[:6])
    assert model_setup.eval_batch_size(0, six) == 12
