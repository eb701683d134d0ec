"""Long-CLIP context extension of the CLIP text position table (SPEC section 4).

A table of ``L`` rows (77) becomes ``factor * L - (factor - 1) * keep`` rows (248): rows
``< keep`` are copied; each gap between original rows ``keep + i`` and ``keep + i + 1`` is filled
by ``factor`` rows interpolated at ``0, 1/factor, ..., (factor-1)/factor``; the last ``factor``
rows extrapolate from the final two original rows. The arithmetic follows the Long-CLIP
reference (``3*a/4 + 1*b/4``) in the table's dtype, so the result matches it bit for bit.
"""

from __future__ import annotations

import numpy as np


def extended_length(length: int = 77, keep: int = 20, factor: int = 4) -> int:
    """Rows of the extended table: ``factor * length - (factor - 1) * keep`` (248)."""
    return factor * length - (factor - 1) * keep


def extend_positions(table: np.ndarray, keep: int = 20, factor: int = 4) -> np.ndarray:
    """``[L, C] -> [factor*L - (factor-1)*keep, C]`` (``[77, C] -> [248, C]``), same dtype."""
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"position table must be [L, C], got shape {table.shape}")
    length = table.shape[0]
    if not 0 <= keep <= length - 2:
        raise ValueError(f"keep={keep} needs at least keep + 2 rows, table has {length}")
    dt = table.dtype
    f = dt.type(factor)
    out = np.empty((extended_length(length, keep, factor), table.shape[1]), dt)
    out[:keep] = table[:keep]
    a = table[keep:-1]  # rows keep .. L-2
    b = table[keep + 1 :]  # rows keep+1 .. L-1
    for j in range(factor):
        # Long-CLIP: (factor-j)*a/factor + j*b/factor
        out[keep + j : keep + factor * (length - 1 - keep) : factor] = (
            dt.type(factor - j) * a / f + dt.type(j) * b / f
        )
    last, prev = table[-1], table[-2]
    base = factor * (length - 1 - keep) + keep
    for j in range(factor):
        out[base + j] = last + dt.type(j) * (last - prev) / f
    return out
