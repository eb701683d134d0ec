"""Which samples a host reads, in which order, epoch after epoch; and resharding a resume.

Each epoch is a deterministic function of (seed, epoch): every source contributes
``floor(weight * size)`` samples plus one more with probability ``frac(weight * size)``, then
the epoch is shuffled (training). Host ``p`` of ``P`` takes positions ``p, p + P, ...`` of each
epoch (training: each epoch cut to a multiple of P so all hosts stay in step; evaluation: padded
with invalid rows up to a multiple of P).
"""

from __future__ import annotations

import bisect
import copy
import sys
from collections.abc import Sequence

import numpy as np


class EpochOrder:
    """A sequence over this shard: ``k -> {epoch, position, source, index, pad}``.

    ``position`` is the sample's place in the global epoch order (before sharding).
    Infinite (``len == sys.maxsize``) when ``num_epochs == 0``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        *,
        seed: int,
        shuffle: bool,
        training: bool,
        num_epochs: int,
        shard_index: int,
        shard_count: int,
    ):
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) for w in weights] if training else [1.0] * len(sizes)
        self.seed, self.shuffle, self.training = int(seed), bool(shuffle), bool(training)
        self.num_epochs = int(num_epochs) if training else 1
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self._fixed = all(float(w * n).is_integer() for w, n in zip(self.weights, self.sizes))
        self._cum = [0]  # cumulative shard lengths of epochs 0..len-2
        self._cache: dict[int, np.ndarray] = {}
        if self.shard_length(0) == 0:
            n = self.global_length(0)
            if n == 0:
                raise ValueError(
                    f"an epoch draws no sample: data.sources have {self.sizes} valid samples "
                    f"with weights {self.weights}; add data or raise the weights"
                )
            raise ValueError(
                f"an epoch of {n} samples is fewer than the {self.shard_count} hosts (each reads "
                "its own samples, at least one); add data or use fewer hosts"
            )

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = {}
        return d

    def _counts(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch, 0])
        out = []
        for w, n in zip(self.weights, self.sizes):
            want = w * n
            frac = rng.random()
            out.append(int(want) + int(frac < want - int(want)) if n else 0)
        return out

    def global_length(self, epoch: int) -> int:
        return sum(self._counts(epoch))

    def shard_length(self, epoch: int) -> int:
        n, p = self.global_length(epoch), self.shard_count
        return n // p if self.training else -(-n // p)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64[N_e, 2] (source, index) of one epoch, before sharding."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch, 1])
        parts = []
        for k, (n, count) in enumerate(zip(self.sizes, self._counts(epoch))):
            if n == 0 or count == 0:
                continue
            reps, rest = divmod(count, n)
            idx = np.concatenate([np.tile(np.arange(n), reps), rng.permutation(n)[:rest]])
            parts.append(np.stack([np.full(len(idx), k), idx], axis=1))
        order = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)
        if self.shuffle and self.training:
            order = order[rng.permutation(len(order))]
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = order
        return order

    def __len__(self) -> int:
        if self.num_epochs == 0:
            return sys.maxsize
        if self._fixed:
            return self.num_epochs * self.shard_length(0)
        return sum(self.shard_length(e) for e in range(self.num_epochs))

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, offset in this shard's part of the epoch) of item k."""
        if self._fixed:
            return divmod(k, self.shard_length(0))
        while self._cum[-1] <= k:
            self._cum.append(self._cum[-1] + self.shard_length(len(self._cum) - 1))
        e = bisect.bisect_right(self._cum, k) - 1
        return e, k - self._cum[e]

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(k)
        epoch, off = self.locate(k)
        pos = off * self.shard_count + self.shard_index
        order = self.epoch_order(epoch)
        if pos >= len(order):  # evaluation: padding up to a multiple of the host count
            return {"epoch": epoch, "position": pos, "source": -1, "index": -1, "pad": True}
        src, idx = order[pos]
        return {
            "epoch": epoch,
            "position": pos,
            "source": int(src),
            "index": int(idx),
            "pad": False,
        }

    def resharded(self, shard_index: int, shard_count: int) -> EpochOrder:
        """The same epochs, cut for shard ``shard_index`` of ``shard_count``."""
        out = copy.copy(self)
        out.shard_index, out.shard_count = int(shard_index), int(shard_count)
        out._cum, out._cache = [0], {}
        return out

    def start_of(self, epoch: int) -> int:
        """Index k of this shard's first item of ``epoch``."""
        if self._fixed:
            return epoch * self.shard_length(0)
        return sum(self.shard_length(e) for e in range(epoch))


def consumed(state: dict) -> int:
    """Samples of its shard a grain iterator (``get_state()``) has consumed."""
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state and not state.get("future_states"):
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    raise ValueError(f"cannot read the position of a data iterator state {state!r}")


def with_consumed(state: dict, k: int) -> dict:
    """A grain iterator state like ``state`` positioned after ``k`` samples of its shard
    (worker ``w`` of ``W`` reads shard items ``w, w + W, ...``)."""
    if "next_index" in state:
        return {**state, "next_index": int(k)}
    workers = len(state["iterators_in_use_states"])
    return {
        **state,
        "next_index_in_cycle": k % workers,
        "iterators_in_use_states": [
            {**s, "next_index": max(0, -(-(k - w) // workers))}
            for w, s in enumerate(state["iterators_in_use_states"])
        ],
        "exhausted": [0] * len(state.get("exhausted", [0] * workers)),
        "future_states": {},
    }


def reshard_state(
    order: EpochOrder, states: Sequence[dict], shard_index: int, shard_count: int
) -> dict:
    """Training on another number of hosts: the iterator state for shard ``shard_index`` of
    ``shard_count`` that resumes where the ``len(states)`` old hosts' iterators stopped
    (``states``: their ``get_state()``, in host order).

    The old hosts read global positions ``p, p + P, ...`` of each epoch; the new shard
    starts at the first of its positions not before the earliest next position of any old
    host. Exact (no sample read twice or left out) when every old host read as many
    samples (no skipped sample, the usual case); with skips, a few samples after the
    earliest host's position are read again. Skip counts carry over (summed into the new
    hosts by ``old index % shard_count``). Supports ``num_workers=0`` and grain worker
    processes (``mp_prefetch``)."""
    old_n = len(states)
    cursor: tuple[int, int] | None = None
    for p, st in enumerate(states):
        k = consumed(st["parent"])
        e, off = order.resharded(p, old_n).locate(k)
        pos = (e, off * old_n + p)
        cursor = pos if cursor is None else min(cursor, pos)
    epoch, pos = cursor or (0, 0)
    new = order.resharded(shard_index, shard_count)
    off = max(0, -(-(pos - shard_index) // shard_count))
    if off >= new.shard_length(epoch):
        epoch, off = epoch + 1, 0
    k = new.start_of(epoch) + off
    skipped: dict[str, int] = {}
    for p, st in enumerate(states):
        if p % shard_count == shard_index:
            for r, v in st.get("skipped", {}).items():
                skipped[r] = skipped.get(r, 0) + int(v)
    return {
        "parent": with_consumed(states[0]["parent"], k),
        "skipped": skipped,
        "batches": int(states[0].get("batches", 0)),
    }
