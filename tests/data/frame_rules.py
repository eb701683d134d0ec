"""Checks that seeded ``rand`` draws follow the original's ``get_frame_indices`` rule.

Shared by the frame-index tests and the protocol tests. They test the rule itself, whatever the
inputs: every draw inside its segment (a segment's last frame never drawn), draws uniform over a
segment or, in the fallback, over the frames, within a tolerance. Coverage of every frame by a
few hundred draws is not asserted (false for wide segments, e.g. 8 segments of 1,000 frames).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# the Kolmogorov-Smirnov critical value for alpha = 0.001 (conservative for discrete laws)
KS_C = 1.95
SIGMAS = 5.0  # tolerance of a binomial count
MIN_PER_OFFSET = 20  # expected draws per offset for the per-offset counts to be checked


def check_segment_draws(body: np.ndarray, ranges: Sequence[Sequence[int]]) -> None:
    """``body`` int[seeds, k]: column i drawn from ``range(lo_i, hi_i)`` (``ranges[i]``),
    uniformly. Offsets ``draw - lo`` are pooled over the segments of each width ``w`` and
    compared with the discrete uniform law on ``0..w-1`` (Kolmogorov-Smirnov distance; with
    ``MIN_PER_OFFSET`` expected draws per offset, also each offset's count)."""
    ranges = [(int(lo), int(hi)) for lo, hi in ranges]
    assert body.shape[1] == len(ranges), (body.shape, len(ranges))
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    assert (hi > lo).all(), "an empty segment has no draws (the fallback applies)"
    assert (body >= lo).all() and (body < hi).all(), "a draw outside [lo, hi)"
    assert not (body == hi).any(), "a segment's last frame was drawn"
    offsets = body - lo
    for w in np.unique(hi - lo):
        x = np.sort(offsets[:, hi - lo == w].ravel())
        grid = np.arange(int(w))
        empirical = np.searchsorted(x, grid, side="right") / len(x)
        uniform = (grid + 1) / float(w)
        d = float(np.abs(empirical - uniform).max())
        assert d <= KS_C / np.sqrt(len(x)), (int(w), d, len(x))
        if len(x) >= MIN_PER_OFFSET * w:  # enough draws: every offset's count, both ends too
            p = 1.0 / float(w)
            counts = np.bincount(x, minlength=int(w))
            sd = np.sqrt(len(x) * p * (1 - p))
            assert np.abs(counts - len(x) * p).max() <= SIGMAS * sd + 1e-9, (int(w), counts)


def check_fallback_draws(body: np.ndarray, vlen: int) -> None:
    """``body`` int[seeds, acc]: each row a sorted subset of ``acc`` distinct frames of
    ``range(vlen)`` (the original's ``sorted(np.random.permutation(vlen)[:acc])``), each frame
    in a row with probability ``acc / vlen`` (its count over the rows within ``SIGMAS``
    binomial standard deviations)."""
    seeds, acc = body.shape
    assert (np.diff(body, axis=1) > 0).all(), "not sorted and distinct"
    assert body.min() >= 0 and body.max() < vlen
    counts = np.bincount(body.ravel(), minlength=vlen)
    p = acc / float(vlen)
    if p >= 1.0:
        assert (body == np.arange(vlen)).all()
        return
    sd = np.sqrt(seeds * p * (1 - p))
    assert np.abs(counts - seeds * p).max() <= SIGMAS * sd, (counts.tolist(), seeds * p)
