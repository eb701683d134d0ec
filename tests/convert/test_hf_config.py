"""config.json translations (convert/hf_config.py, convert/ppllava_config.py): round trips of
every tower, decoder and whole-model config, and what a config.json may leave out or carry."""

import pytest

from ppllava_jax.convert import hf_config, ppllava_config
from ppllava_jax.models.config import (
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    PPLLaVAConfig,
    Qwen2Config,
    SiglipTextConfig,
    SiglipVisionConfig,
    ppllava_qwen7b_config,
)

TOWERS = [
    CLIPVisionConfig(hidden_size=32, image_size=28, patch_size=14),
    CLIPTextConfig(vocab_size=99, max_position_embeddings=248, extended=True),
    SiglipVisionConfig(vision_use_head=False),
    SiglipTextConfig(projection_size=16),
]


@pytest.mark.parametrize("cfg", TOWERS, ids=lambda c: type(c).__name__)
def test_tower_round_trip_keeps_fields_and_drops_runtime(cfg):
    d = hf_config.tower_to_hf(cfg.replace(dtype="bfloat16"))
    assert "dtype" not in d and "scan_layers" not in d and "extended" not in d
    assert d["model_type"].endswith(("_vision_model", "_text_model"))
    back = hf_config.tower_from_hf(type(cfg), d, dtype="bfloat16")
    expected = cfg.replace(dtype="bfloat16")
    if hasattr(cfg, "extended"):  # not a config.json field: the dataclass default comes back
        expected = expected.replace(extended=False)
    assert back == expected
    standalone = hf_config.tower_to_hf(cfg, standalone=True)
    assert standalone["architectures"] == [type(cfg).__name__.replace("Config", "Model")]


def test_tower_from_a_whole_model_config_takes_its_part_and_projection():
    d = {"projection_dim": 64, "vision_config": {"hidden_size": 40}, "text_config": {}}
    v = hf_config.tower_from_hf(CLIPVisionConfig, d)
    assert (v.hidden_size, v.projection_dim) == (40, 64)
    # transformers' class defaults fill what a 4.x diff-only file omits
    v = hf_config.tower_from_hf(CLIPVisionConfig, {"vision_config": {}}, hf_defaults=True)
    assert (v.hidden_size, v.patch_size, v.image_size) == (768, 32, 224)
    t = hf_config.tower_from_hf(SiglipTextConfig, {"text_config": {"eos_token_id": [7, 8]}})
    assert t.eos_token_id == 7


def test_decoder_round_trip_and_refusals():
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    d = hf_config.llama_to_hf(cfg)
    assert d["model_type"] == "qwen2" and "head_dim" not in d and "qkv_bias" not in d
    assert hf_config.qwen2_from_hf(d) == cfg
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    assert hf_config.llama_from_hf(hf_config.llama_to_hf(llama)) == llama
    got = hf_config.llama_from_hf(
        {"num_attention_heads": 8, "hidden_size": 64, "rope_parameters": {"rope_theta": 5.0}}
    )
    assert (got.num_key_value_heads, got.rope_theta) == (8, 5.0)
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        hf_config.llama_from_hf({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(NotImplementedError, match="sliding"):
        hf_config.qwen2_from_hf({"use_sliding_window": True})


@pytest.mark.parametrize("cfg", [PPLLaVAConfig(), ppllava_qwen7b_config()], ids=["clip", "qwen"])
def test_ppllava_round_trip(cfg):
    d = ppllava_config.ppllava_config_to_hf(cfg)
    assert d["model_type"] == ("llava_onevision" if cfg.qwen else "llava_next")
    assert d["clip_weight"] == "clip" and "clip_config" in d
    # the CLIP config is read back from clip_config; clip_weight names where it is written
    assert ppllava_config.ppllava_config_from_hf(d) == cfg.replace(clip_weight="clip")


def test_llava_next_and_onevision_read_as_ppllava_without_pooling():
    cfg = ppllava_config.llava_config_from_hf({"model_type": "llava_next"})
    assert (cfg.pooling, cfg.btadapter, cfg.qwen, cfg.image_token_index) == (
        "none",
        False,
        False,
        32000,
    )
    assert cfg.vision.patch_size == 32  # transformers' CLIPVisionConfig default
    ov = ppllava_config.llava_config_from_hf(
        {"model_type": "llava_onevision", "text_config": {"vocab_size": 151700}}, qwen=True
    )
    assert (ov.qwen, ov.pad_token_id, ov.vision_feature_select_strategy) == (
        True,
        ppllava_config.QWEN_PAD_ID,
        "full",
    )
    with pytest.raises(ValueError, match="outside the Qwen2 vocabulary"):
        ppllava_config.llava_config_from_hf(
            {"model_type": "llava_onevision", "text_config": {"vocab_size": 100}}, qwen=True
        )


def test_config_from_dict_names_unknown_fields():
    cfg = ppllava_config.ppllava_config_from_dict({"pooling": "avp", "llm": {"vocab_size": 99}})
    assert (cfg.pooling, cfg.llm.vocab_size) == ("avp", 99)
    with pytest.raises(ValueError, match=r"model.llm: unknown fields \['vocab'\]"):
        ppllava_config.ppllava_config_from_dict({"llm": {"vocab": 99}})
