"""Tiny stand-ins of the released start points, written as transformers writes them, and the
command lines of the user journeys (tests/test_journeys.py).

``vicuna_start_sources``: a ``LlavaNextForConditionalGeneration`` (LLaMA) + a ``CLIPModel``;
``qwen_start_sources``: a ``LlavaOnevisionForConditionalGeneration`` (Qwen2) + a ``SiglipModel``;
their vocabularies are those of the synthetic dataset's tokenizers, so that a run trains the
converted start point on the synthetic clips as a user trains the real one on theirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # clip and tower resolution
PATCH = 8


def _randomize(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _vision(**kw) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=PATCH,
        **kw,
    )


def _text_tower(clip_vocab: int) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=clip_vocab,
    )


def vicuna_start_sources(root: Path, vocab: int, image_token: int, clip_vocab: int) -> tuple:
    """``root/llava`` (LLaVA-NeXT, LLaMA decoder) and ``root/clip`` (OpenAI CLIP layout)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    llava = LlavaNextForConditionalGeneration(
        LlavaNextConfig(
            vision_config=dict(model_type="clip_vision_model", **_vision()),
            text_config=dict(
                model_type="llama",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=vocab,
                max_position_embeddings=512,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=3,
            ),
            image_grid_pinpoints=[[SIZE, 2 * SIZE], [2 * SIZE, SIZE]],
            image_token_index=image_token,
            vision_feature_layer=-2,
        )
    ).eval()
    _randomize(llava, 0)
    llava.save_pretrained(root / "llava")
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                **_text_tower(clip_vocab),
                max_position_embeddings=77,
                bos_token_id=clip_vocab - 2,
                eos_token_id=2,
                pad_token_id=clip_vocab - 1,
            ),
            vision_config=_vision(),
            projection_dim=16,
        )
    ).eval()
    _randomize(clip, 1)
    clip.save_pretrained(root / "clip")
    return root / "llava", root / "clip"


def qwen_start_sources(root: Path, vocab: int, image_token: int, clip_vocab: int) -> tuple:
    """``root/llava`` (LLaVA-OneVision, Qwen2 decoder, SigLIP tower) and ``root/siglip``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        SiglipConfig,
        SiglipModel,
    )

    llava = LlavaOnevisionForConditionalGeneration(
        LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", **_vision(vision_use_head=False)),
            text_config=dict(
                model_type="qwen2",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocab,
                max_position_embeddings=512,
                bos_token_id=image_token - 3,
                eos_token_id=image_token - 1,
                pad_token_id=image_token - 3,
            ),
            image_grid_pinpoints=[[SIZE, 2 * SIZE], [2 * SIZE, SIZE]],
            image_token_index=image_token,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    ).eval()
    _randomize(llava, 2)
    llava.save_pretrained(root / "llava")
    siglip = SiglipModel(
        SiglipConfig(
            text_config=dict(**_text_tower(clip_vocab), max_position_embeddings=32),
            vision_config=_vision(),
        )
    ).eval()
    _randomize(siglip, 3)
    siglip.save_pretrained(root / "siglip")
    return root / "llava", root / "siglip"


def run_command(args: list[str], *, stdin: str | None = None, timeout: int = 900) -> str:
    """A command line as a user types it (from the repository root); its output, or an
    AssertionError with its output when it exits non-zero."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the test session's compilation cache (tests/conftest.py): a program compiled by an earlier
    # command of the journey (the same step from another start) is read back
    import jax

    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def dpo_pairs(data_dir: Path) -> Path:
    """``data_dir/dpo.json``: the training questions as preference pairs (chosen: the right
    option, rejected: the next one), in the original's DPO annotation fields."""
    anns = json.loads((data_dir / "train.json").read_text())
    pairs = []
    for a in anns:
        if len(a.get("QA", ())) != 1 or "candidates" not in a:
            continue
        wrong = a["candidates"][(a["answer_index"] + 1) % len(a["candidates"])]
        pairs.append(dict(a, QA=[dict(a["QA"][0], rejected=wrong)]))
    path = data_dir / "dpo.json"
    path.write_text(json.dumps(pairs))
    return path
