"""A ``.bin`` that ``torch.load(weights_only=True)`` refuses (issue 22, item 3): the message
names the file and says how to convert it safely; it does not pass on torch's hint to load it
with ``weights_only=False`` (arbitrary code from the file), nor call the file damaged."""

import argparse

import pytest

from ppllava_jax.convert.torch_io import CheckpointError, TorchCheckpoint

torch = pytest.importorskip("torch")


def test_refused_pickle_says_what_to_do(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError) as e:
        TorchCheckpoint(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path} holds Python objects besides tensors (e.g. argparse.Namespace)")
    assert "safetensors" in msg and "--source" in msg and "\n" not in msg
    for unsafe in ("weights_only", "can still be loaded", "damaged", "\x1b"):
        assert unsafe not in msg


def test_plain_state_dict_still_loads(tmp_path):
    torch.save({"w": torch.arange(3, dtype=torch.float32)}, tmp_path / "pytorch_model.bin")
    assert TorchCheckpoint(tmp_path)["w"].tolist() == [0.0, 1.0, 2.0]


def test_damaged_bin_gets_no_unsafe_hint_either(tmp_path):
    """torch refuses a text file (a Git LFS pointer) the same way; its first line advised
    ``weights_only=False``: the message gives torch's detail and calls the file damaged."""
    path = tmp_path / "pytorch_model.bin"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n")
    with pytest.raises(CheckpointError) as e:
        TorchCheckpoint(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a readable PyTorch checkpoint (") and "damaged" in msg
    assert "weights_only" not in msg and "\n" not in msg
