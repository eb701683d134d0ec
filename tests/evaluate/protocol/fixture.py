"""The protocol fixture (``reference_protocols``), shared by the protocol parity tests.

The directory comes from ``PPLLAVA_PROTOCOLS_DIR`` (default
``tests/fixtures/reference_protocols``); every case is read from its ``protocols.json``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

PROTOCOLS_DIR = Path(
    os.environ.get(
        "PPLLAVA_PROTOCOLS_DIR",
        Path(__file__).resolve().parents[2] / "fixtures" / "reference_protocols",
    )
)


@functools.lru_cache(maxsize=1)
def protocols() -> dict[str, Any]:
    """The parsed ``protocols.json``."""
    with open(PROTOCOLS_DIR / "protocols.json", encoding="utf-8") as f:
        return json.load(f)


def tokenizer_dir() -> str:
    return os.fspath(PROTOCOLS_DIR / "tokenizer")


@functools.lru_cache(maxsize=2)
def llm_tokenizer(legacy: bool = True):
    """The fixture's Vicuna tokenizer with ``<image>`` added, through the project's loader."""
    from ppllava_jax.data.tokenizers import load_llm_tokenizer

    return load_llm_tokenizer(tokenizer_dir(), legacy=legacy)


def ids_key(legacy: bool, key: str = "input_ids") -> str:
    """The fixture field holding ``key`` for that tokenizer variant."""
    return key if legacy else f"{key}_nonlegacy"


def case_ids(cases: list[dict]) -> list[str]:
    return [str(c.get("id", i)) for i, c in enumerate(cases)]
