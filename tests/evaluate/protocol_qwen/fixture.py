"""The Qwen protocol fixture (``reference_protocols_qwen``), shared by the Qwen parity tests.

The directory comes from ``PPLLAVA_QWEN_PROTOCOLS_DIR`` (default
``tests/fixtures/reference_protocols_qwen``); every case is read from its ``protocols.json`` and
``pixel_values.npz``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

QWEN_PROTOCOLS_DIR = Path(
    os.environ.get(
        "PPLLAVA_QWEN_PROTOCOLS_DIR",
        Path(__file__).resolve().parents[2] / "fixtures" / "reference_protocols_qwen",
    )
)


@functools.lru_cache(maxsize=1)
def protocols() -> dict[str, Any]:
    """The parsed ``protocols.json``."""
    with open(QWEN_PROTOCOLS_DIR / "protocols.json", encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def pixel_arrays() -> dict[str, np.ndarray]:
    """Every array of ``pixel_values.npz`` by its key (``{case}/pixel_values``, ...)."""
    with np.load(QWEN_PROTOCOLS_DIR / "pixel_values.npz") as z:
        return {k: z[k] for k in z.files}


def tokenizer_dir() -> str:
    return os.fspath(QWEN_PROTOCOLS_DIR / "tokenizer")


@functools.lru_cache(maxsize=1)
def llm_tokenizer():
    """The fixture's Qwen2 tokenizer (``<image>``, ``<video>`` included), loaded as is."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def case_ids(cases: list[dict]) -> list[str]:
    return [str(c.get("id", i)) for i, c in enumerate(cases)]


def eval_tokenizer(legacy: bool = True):
    """The fixture's Qwen2 tokenizer as eval.py loads it (``Setup.eval_tokenizer``: the
    project's ``load_llm_tokenizer(dir, legacy)``; the Llama pre-tokenization switch leaves a
    byte-level BPE unchanged)."""
    return _eval_tokenizer(bool(legacy))


@functools.lru_cache(maxsize=2)
def _eval_tokenizer(legacy: bool):
    from ppllava_jax.data.tokenizers import load_llm_tokenizer

    return load_llm_tokenizer(tokenizer_dir(), legacy=legacy)
