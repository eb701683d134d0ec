"""``evaluate/model_setup.py`` without a checkpoint: mesh specs, local meshes, the checkpoint's
``inference.json`` defaults, the video prompt buckets and the decoding settings of a set-up.
Loading a real checkpoint: test_runner.py, test_reliability.py."""

import json
from types import SimpleNamespace

import jax
import pytest

from ppllava_jax.data import collate as col
from ppllava_jax.evaluate import model_setup
from ppllava_jax.evaluate.model_setup import Setup
from tests.evaluate.tiny import tiny_config


def test_parse_mesh():
    assert model_setup.parse_mesh("data=2, fsdp=-1,tensor=1") == {
        "data": 2,
        "fsdp": -1,
        "tensor": 1,
    }
    assert model_setup.parse_mesh(None) == {"fsdp": -1}
    assert model_setup.parse_mesh("") == {"fsdp": -1}
    assert model_setup.parse_mesh({"data": "2", "fsdp": 4}) == {"data": 2, "fsdp": 4}


def test_local_mesh():
    n = len(jax.local_devices())
    assert dict(model_setup.local_mesh().shape) == {"data": 1, "fsdp": n, "tensor": 1}
    small = model_setup.local_mesh("data=2,fsdp=1,tensor=1")
    assert dict(small.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert list(small.devices.flat) == jax.local_devices()[:2]
    assert dict(model_setup.local_mesh("data=2").shape) == {"data": 2, "fsdp": 1, "tensor": 1}


def test_inference_defaults(tmp_path):
    assert model_setup.inference_defaults(tmp_path) == {}
    (tmp_path / "inference.json").write_text('{"num_frames": 8, "template": "plain_v1"}')
    assert model_setup.inference_defaults(tmp_path) == {"num_frames": 8, "template": "plain_v1"}
    (tmp_path / "inference.json").write_text("[1, 2]")
    assert model_setup.inference_defaults(tmp_path) == {}
    (tmp_path / "inference.json").write_text("{not json")
    assert model_setup.inference_defaults(tmp_path) == {}


def test_video_buckets_leave_room_for_the_answer():
    cfg = tiny_config(100, 99, 50)  # 512 decoder positions
    t, h, w = col.Planner(cfg).item_grid("video", 8)
    visual = t * h * w
    buckets = model_setup.video_buckets(cfg, 8, 64)
    assert buckets == sorted(buckets) and len(buckets) > 1
    assert buckets[0] > visual and buckets[-1] <= 512 - 64
    fewer = model_setup.video_buckets(cfg, 8, 200)  # less room, fewer buckets
    assert fewer == [b for b in buckets if b <= 512 - 200] and len(fewer) < len(buckets)
    # no bucket fits: one that takes all the room left
    assert model_setup.video_buckets(cfg, 8, 512 - visual - 4) == [visual + 16]


def _setup(eos, pad, tokenizer_eos=7):
    llm = SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
    s = Setup(
        model=None,
        cfg=SimpleNamespace(llm=llm),
        params=None,
        mesh=None,
        tokenizer_dir="",
        clip_tokenizer_dir="",
    )
    s._tok = SimpleNamespace(eos_token_id=tokenizer_eos)
    return s


def test_sampling_uses_the_checkpoints_tokens():
    sc = _setup(2, 3).sampling(20, temperature=0.5, top_k=4)
    assert (sc.max_new_tokens, sc.eos_token_id, sc.pad_token_id) == (20, 2, 3)
    assert (sc.temperature, sc.top_k, sc.top_p) == (0.5, 4, 1.0)
    sc = _setup(None, None).sampling(5)  # the tokenizer's EOS, pad 0
    assert (sc.eos_token_id, sc.pad_token_id, sc.temperature) == (7, 0, 0.0)


def test_missing_checkpoint_is_said_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        model_setup.load_setup(str(tmp_path / "nope"))
    (tmp_path / "inference.json").write_text(json.dumps({"num_frames": 8}))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_setup.load_setup(str(tmp_path))


@pytest.mark.parametrize("qwen", [False, True])
def test_template_defaults_to_the_checkpoints_family(tmp_path, monkeypatch, qwen):
    """Without inference.json (a converted checkpoint) the chat and template questions use the
    family's template; inference.json and the flag beat it."""
    from ppllava_jax.models.config import ppllava_qwen7b_config

    cfg = ppllava_qwen7b_config() if qwen else tiny_config(64, 63, 32)
    monkeypatch.setattr(model_setup.checkpoint_check, "check_checkpoint", lambda *a: None)
    monkeypatch.setattr(
        model_setup.sharding, "restore_params_onto_mesh", lambda *a, **k: (cfg, {}, None)
    )
    monkeypatch.setattr(model_setup, "per_layer", lambda c, p: (c, p))
    for name in ("tokenizer", "clip_tokenizer"):
        (tmp_path / name).mkdir()
    want = "plain_qwen" if qwen else "plain_v1"
    assert model_setup.load_setup(str(tmp_path)).template == want
    assert model_setup.load_setup(str(tmp_path), template="vicuna_v1").template == "vicuna_v1"
    (tmp_path / "inference.json").write_text(json.dumps({"template": "vicuna_v1"}))
    assert model_setup.load_setup(str(tmp_path)).template == "vicuna_v1"
