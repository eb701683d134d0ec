"""``test_reference_parity.py`` once more, on the Qwen2 + SigLIP family's fixtures.

The parity module reads one fixture directory (``PPLLAVA_REFERENCE_DIR``, the Vicuna family's by
default), so a plain ``pytest`` run would never compare the Qwen family with the authors'
outputs. This runs it in a subprocess on ``PPLLAVA_QWEN_REFERENCE_DIR`` (default
``tests/fixtures/reference_ppllava_qwen``): logits, loss, visual tokens and attention, pooling,
the prompt encoder's pooled output, greedy generation, the trimmed CLIP prompt. Every case must
run: that family records ``clip_text_embeds``, so nothing may skip.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QWEN_REF = Path(
    os.environ.get(
        "PPLLAVA_QWEN_REFERENCE_DIR", ROOT / "tests" / "fixtures" / "reference_ppllava_qwen"
    )
)


def test_reference_parity_on_the_qwen_family():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         str(Path(__file__).with_name("test_reference_parity.py"))],
        cwd=ROOT,
        env=dict(os.environ, PPLLAVA_REFERENCE_DIR=str(QWEN_REF)),
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and "skipped" not in out and "failed" not in out, out[-3000:]
