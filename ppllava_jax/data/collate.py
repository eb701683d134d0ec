"""Host-side planning of the visual-token merge: per-sample inputs -> one static-shape batch.

The model never sees Python lists or variable lengths. Every variable thing (how many visual
tokens each sample gets, where they go, which rows of an any-resolution grid survive unpadding,
where the ``image_newline`` tokens stand, padding side, sequence bucket) is decided here in NumPy.

Visual inputs are grouped by kind; each group is one static array that the vision tower and the
projector process in one go:

    video_pixels   float32[Nv, T, S, S, 3]   one video per item, T frames
    image_pixels   float32[Ni, V, S, S, 3]   any-resolution image: base view + grid crops (V max)
    image_views    bool[Ni, V]               which views are real
    multi_pixels   float32[Nm, N, S, S, 3]   multi-image sample: N images
    multi_frames   bool[Nm, N]               which images are real
    <group>_clip_ids / <group>_clip_mask  int32[N_g, Lc]  the CLIP prompt of each item

The projector turns group ``g`` into ``tokens[N_g, n_g, D]``; the model concatenates the groups in
the order of ``GROUPS`` into one pool ``[sum_g N_g * n_g + 1, D]`` whose last row is
``image_newline``. ``visual_index[b, l]`` is the pool row that fills merged position ``(b, l)``
(-1: a text token, embedded from ``input_ids``). Text arrays are in the merged layout:

    input_ids      int32[B, L]   text ids (pad id at visual and padding positions)
    visual_index   int32[B, L]
    attention_mask int32[B, L]   1 on text and visual tokens, 0 on padding
    positions      int32[B, L]   running count of attended tokens (0 on left padding)
    labels         int32[B, L]   -100 on visual tokens, padding and unsupervised text (optional)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ppllava_jax.layout import (
    GROUPS,
    IGNORE_INDEX,
    NEWLINE,
    anyres_token_order,
    num_pooled,
)


@dataclasses.dataclass
class Media:
    """One visual input of a sample.

    kind: 'video' (frames [T,S,S,3]), 'image' (any-resolution views [V,S,S,3], base view first;
      ``image_size`` = original (height, width)), or 'multi' (images [N,S,S,3], one image token
      each in the prompt).
    """

    kind: str
    pixels: np.ndarray
    image_size: tuple[int, int] | None = None


@dataclasses.dataclass
class Sample:
    """One sample before collation.

    input_ids: int[S] with ``image_token_index`` where each visual input goes.
    labels: int[S] or None (-100 = not supervised).
    media: the sample's visual input or None (text only).
    clip_ids, clip_mask: int[Lc], the CLIP prompt.
    media_from: index of another sample of the same batch whose visual input this one reuses
      (e.g. the rejected twin of a DPO pair): its image tokens get the same pool rows, the
      visual input is not a second item of its group (the vision tower and the projector run
      once for both), and ``media``/``clip_ids`` of this sample are ignored. The referenced
      sample must have a visual input of its own (no chains).
    """

    input_ids: np.ndarray
    labels: np.ndarray | None = None
    media: Media | None = None
    clip_ids: np.ndarray | None = None
    clip_mask: np.ndarray | None = None
    media_from: int | None = None


class Planner:
    """Computes token layouts from a ``PPLLaVAConfig`` (everything static comes from it)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def item_grid(self, kind: str, num_frames: int) -> tuple[int, int, int]:
        """(t, h, w) of the projector's output for one item of a group with ``num_frames``
        frames/views per item (the projector's own rule, ``layout.num_pooled``)."""

        if kind not in GROUPS:
            raise ValueError(f"media kind {kind!r} is not one of {GROUPS}")
        return tuple(num_pooled(self.cfg, num_frames, kind == "video"))

    def local_layout(self, media: Media, num_frames: int) -> list[np.ndarray]:
        """For each image token of the sample, the item-local token indices (into the item's
        flattened ``[t, h, w]`` output) that replace it, ``NEWLINE`` for ``image_newline``."""
        t, h, w = self.item_grid(media.kind, num_frames)
        if media.kind == "video":
            return [np.arange(t * h * w)]
        if media.kind == "multi":
            n = media.pixels.shape[0]
            per = (t // num_frames) * h * w if t == num_frames else None
            if per is None:
                raise ValueError("multi-image pooling must keep one output per image")
            return [np.arange(i * per, (i + 1) * per) for i in range(n)]
        if media.kind == "image":
            return [self._anyres_layout(media, h, w)]
        raise ValueError(f"media kind {media.kind!r} is not one of {GROUPS}")

    def _anyres_layout(self, media: Media, h: int, w: int) -> np.ndarray:
        views = media.pixels.shape[0]
        if views > 1 and media.image_size is None:
            raise ValueError("an any-resolution image needs its original image_size (h, w)")
        size = media.image_size or media.pixels.shape[1:3]
        cfg = self.cfg
        order = anyres_token_order(
            size, cfg.image_grid_pinpoints, cfg.vision.image_size, (h, w), views
        )
        return order  # -1 (NEWLINE) marks image_newline


def _padding(pad_id: int) -> dict[str, int]:
    """What a padded position holds in each ``[B, L]`` array (``positions`` aside)."""
    return {"input_ids": pad_id, "visual_index": -1, "attention_mask": 0, "labels": IGNORE_INDEX}


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(
        f"merged sequence of {length} tokens is longer than the largest bucket {max(buckets)}; "
        "raise data.max_length / data.buckets or drop the sample in the pipeline"
    )


def collate(
    samples: Sequence[Sample],
    cfg: Any,
    *,
    buckets: Sequence[int] | None = None,
    padding_side: str = "right",
    capacity: dict[str, int] | None = None,
    num_frames: dict[str, int] | None = None,
    clip_length: int | None = None,
    micro_batches: int = 1,
    groups: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Collate samples into the static-shape batch described in the module docstring.

    buckets: allowed merged lengths L (smallest that fits is used); None = exact longest.
    padding_side: 'right' (training) or 'left' (generation).
    capacity: items per group (padded with empty items); default = items present, rounded up to
      a power of two so few shapes are compiled.
    num_frames: frames/views per item of each group (default: the largest present).
    clip_length: CLIP prompt length (default: the longest present).
    micro_batches: k for gradient accumulation. The train step splits every array by rows
      ``j, j+k, j+2k, ...`` into micro-batch ``j`` (``train.step.microbatch``); with k > 1 each
      group item sits in a slot ``s`` with ``s % k`` equal to its sample's row ``% k`` and
      ``visual_index`` counts rows of micro-batch ``j``'s own pool (its items ``s // k``), so
      every micro-batch is a self-contained batch. Capacities are then multiples of k.
    groups: groups present in the batch even without items (empty, frame masks all False;
      needs ``num_frames`` for them), so batches of other hosts or steps have the same arrays.
    """
    k = int(micro_batches)
    if k < 1 or len(samples) % k:
        raise ValueError(f"{len(samples)} samples do not split into {k} micro-batches")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
    planner = Planner(cfg)
    image_token = cfg.image_token_index
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    members: dict[str, list[int]] = {g: [] for g in GROUPS}
    for i, s in enumerate(samples):
        if s.media_from is not None:
            j = s.media_from
            if not 0 <= j < len(samples) or j == i:
                raise ValueError(f"sample {i}: media_from={j} is not another sample of the batch")
            if samples[j].media is None or samples[j].media_from is not None:
                raise ValueError(
                    f"sample {i}: media_from={j} names a sample without a visual input of its own"
                )
        elif s.media is not None:
            members[s.media.kind].append(i)
    frames = {
        g: max(samples[i].media.pixels.shape[0] for i in idx) for g, idx in members.items() if idx
    }
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"group {g!r} is not one of {GROUPS}")
        if g not in frames:
            if not num_frames or g not in num_frames:
                raise ValueError(f"an empty {g} group needs its frames in num_frames")
            frames[g] = int(num_frames[g])
    if num_frames:
        for g, n in num_frames.items():
            if g in frames and frames[g] > n:
                raise ValueError(f"{g} group: an item has {frames[g]} frames/views > {n}")
            if g in frames:
                frames[g] = n
    # slot of every item: micro-batch (row % k) m takes slots m, m + k, m + 2k, ...
    caps, slot_of = {}, {}
    for g, idx in members.items():
        if not idx and g not in groups:
            continue
        used = [0] * k
        for i in idx:
            m = i % k
            slot_of[i] = m + k * used[m]
            used[m] += 1
        need = max(max(used), 1)
        want = (capacity or {}).get(g) or k * (1 << (need - 1).bit_length())
        if want % k or want // k < need:
            raise ValueError(
                f"{len(idx)} {g} items ({need} in one of {k} micro-batches) do not fit "
                f"capacity {want} (a multiple of {k} with room for {need} per micro-batch)"
            )
        caps[g] = want

    # pool offsets (within one micro-batch's pool) of every group's items, and of the newline
    offsets, start = {}, 0
    for g in GROUPS:
        if g in caps:
            t, h, w = planner.item_grid(g, frames[g])
            offsets[g] = (start, t * h * w)
            start += (caps[g] // k) * t * h * w
    newline_row = start

    seqs = []
    for i, s in enumerate(samples):
        ids = np.asarray(s.input_ids)
        labels = np.full(ids.shape, IGNORE_INDEX) if s.labels is None else np.asarray(s.labels)
        slots = np.flatnonzero(ids == image_token)
        pieces_ids, pieces_vis, pieces_lab = [], [], []
        owner = i if s.media_from is None else s.media_from  # whose item fills the slots
        media = samples[owner].media
        if media is None:
            if len(slots):
                raise ValueError(f"sample {i} has {len(slots)} image tokens but no visual input")
            layouts = []
        else:
            g = media.kind
            layouts = planner.local_layout(media, frames[g])
            if len(slots) != len(layouts):
                raise ValueError(
                    f"sample {i} ({g}) has {len(slots)} image tokens in its prompt, its visual "
                    f"input needs {len(layouts)} (one per video / image / image of a set)"
                )
            base, per = offsets[g]
            if owner % k != i % k:
                raise ValueError(
                    f"sample {i} shares the visual input of sample {owner}, which lands in "
                    f"another of the {k} micro-batches"
                )
            row0 = base + (slot_of[owner] // k) * per
        prev = 0
        for slot, local in zip(slots, layouts, strict=True):
            pieces_ids.append(ids[prev:slot])
            pieces_vis.append(np.full(slot - prev, -1))
            pieces_lab.append(labels[prev:slot])
            rows = np.where(local == NEWLINE, newline_row, row0 + local)
            pieces_ids.append(np.full(len(rows), pad_id))
            pieces_vis.append(rows)
            pieces_lab.append(np.full(len(rows), IGNORE_INDEX))
            prev = slot + 1
        pieces_ids.append(ids[prev:])
        pieces_vis.append(np.full(len(ids) - prev, -1))
        pieces_lab.append(labels[prev:])
        seqs.append(tuple(np.concatenate(p) for p in (pieces_ids, pieces_vis, pieces_lab)))

    longest = max(len(q[0]) for q in seqs)
    length = pick_bucket(longest, buckets) if buckets else longest
    b = len(samples)
    out = {k: np.full((b, length), fill, np.int32) for k, fill in _padding(pad_id).items()}
    for i, (ids, vis, lab) in enumerate(seqs):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        out["input_ids"][i, sl] = ids
        out["visual_index"][i, sl] = vis
        out["attention_mask"][i, sl] = 1
        out["labels"][i, sl] = lab
    out["positions"] = np.maximum(np.cumsum(out["attention_mask"], axis=1) - 1, 0).astype(np.int32)
    if all(s.labels is None for s in samples):
        del out["labels"]

    lc = clip_length or max((len(s.clip_ids) for s in samples if s.clip_ids is not None), default=1)
    for g in GROUPS:
        if g not in caps:
            continue
        idx = members[g]
        size = cfg.vision.image_size
        shape = samples[idx[0]].media.pixels.shape[1:] if idx else (size, size, 3)
        px = np.zeros((caps[g], frames[g], *shape), np.float32)
        real = np.zeros((caps[g], frames[g]), bool)
        for i in idx:
            p = samples[i].media.pixels
            px[slot_of[i], : p.shape[0]] = p
            real[slot_of[i], : p.shape[0]] = True
        out[f"{g}_pixels"] = px
        mask_key = {"video": "video_frames", "image": "image_views", "multi": "multi_frames"}[g]
        out[mask_key] = real
        cid = np.zeros((caps[g], lc), np.int32)
        cm = np.zeros((caps[g], lc), np.int32)
        for i in idx:
            j = slot_of[i]
            s = samples[i]
            if s.clip_ids is None:
                continue
            n = min(len(s.clip_ids), lc)
            cid[j, :n] = s.clip_ids[:n]
            cm[j, :n] = np.ones(n) if s.clip_mask is None else s.clip_mask[:n]
        out[f"{g}_clip_ids"] = cid
        out[f"{g}_clip_mask"] = cm
    if "image" in caps:
        sizes = np.zeros((caps["image"], 2), np.int32)
        for i in members["image"]:
            media = samples[i].media
            sizes[slot_of[i]] = media.image_size or media.pixels.shape[1:3]
        out["image_sizes"] = sizes
    return out


def pad_length(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded batch lengthened to ``length`` tokens (new positions unattended, unlabelled,
    no visual token; ``positions`` repeat the last one). Multi-host training pads every host's
    batch to the longest host's length so all hosts feed one global array."""
    have = batch["input_ids"].shape[-1]
    if length == have:
        return batch
    if length < have:
        raise ValueError(f"cannot shorten a batch of length {have} to {length}")
    if (batch["attention_mask"][:, 0] == 0).any():
        raise ValueError("pad_length needs a right-padded batch (padding_side='right')")
    out = dict(batch)
    extra = length - have
    tails = {k: np.full(extra, fill) for k, fill in _padding(pad_id).items()}
    for k, v in batch.items():
        if k in tails:
            tail = np.broadcast_to(tails[k].astype(v.dtype), (v.shape[0], extra))
        elif k == "positions":
            tail = np.repeat(v[:, -1:], extra, axis=1)
        else:
            continue
        out[k] = np.concatenate([v, tail], axis=1)
    return out


TARGET_POSITIONS = "target_positions"
"""Batch key of ``target_positions``' output: the train step's loss then applies the LM head at
those positions only (``train.losses.gathered_token_logps``)."""


def _supervised_next(labels: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``bool[B, L-1]``: ``labels[:, l+1]`` supervised and both ``l``, ``l+1`` attended."""
    am = np.asarray(attention_mask) != 0
    return (np.asarray(labels)[:, 1:] != IGNORE_INDEX) & am[:, 1:] & am[:, :-1]


def count_targets(labels: np.ndarray, attention_mask: np.ndarray) -> int:
    """The most supervised next-token targets of one row (what ``target_positions`` lists)."""
    return int(_supervised_next(labels, attention_mask).sum(axis=1).max(initial=0))


def target_positions(
    labels: np.ndarray, attention_mask: np.ndarray, multiple: int = 16, count: int = 0
) -> np.ndarray:
    """``int32[B, K]``: per row, the positions ``l`` whose next token is a target (``labels[l+1]``
    supervised and both ``l``, ``l+1`` attended), in order, padded with -1.

    ``K`` is static for the step: ``count`` if given (it must hold every row's targets), else
    the longest row's count rounded up to a multiple of ``multiple``, at most ``L - 1``. Multi-
    host training must pass one ``count`` for all hosts (every host feeds the same shapes).
    """
    sup = _supervised_next(labels, attention_mask)
    n = int(sup.sum(axis=1).max(initial=0))
    if count:
        if n > count:
            raise ValueError(f"a row has {n} supervised targets, more than count={count}")
        k = int(count)
    else:
        m = max(int(multiple), 1)
        k = min(max(-(-n // m) * m, 1), sup.shape[1])
    out = np.full((sup.shape[0], k), -1, np.int32)
    for i, row in enumerate(sup):
        idx = np.flatnonzero(row)
        out[i, : len(idx)] = idx
    return out


def globalize_visual_index(
    batch: dict[str, np.ndarray],
    cfg: Any,
    process_index: int,
    process_count: int,
    micro_batches: int = 1,
) -> dict[str, np.ndarray]:
    """Shift one host's ``visual_index`` into the pool of the *global* batch.

    With several processes, ``jax.make_array_from_process_local_data`` concatenates the hosts'
    rows and group items in process order, so the model's pool (per micro-batch: each group's
    items of every host, group after group, then ``image_newline``) is ``process_count`` times
    larger than a host's own. A local pool row ``base_g + item * n_g + t`` of group ``g``
    becomes ``process_count * base_g + (process_index * cap_g / k + item) * n_g + t``, the
    newline row ``process_count * local_pool``. Every host must produce the same shapes (same
    groups, capacities and bucket), which ``make_array_from_process_local_data`` needs anyway.
    """
    if process_count == 1:
        return batch
    k = int(micro_batches)
    planner = Planner(cfg)
    spans = []  # (local start, local end, global start, items per micro-batch, tokens per item)
    start = 0
    for g in GROUPS:
        key = f"{g}_pixels"
        if key not in batch:
            continue
        cap, frames = batch[key].shape[:2]
        n = int(np.prod(planner.item_grid(g, frames)))
        per = cap // k
        spans.append((start, start + per * n, process_count * start, per, n))
        start += per * n
    vis = np.asarray(batch["visual_index"])
    out = vis.copy()
    for lo, hi, glo, per, n in spans:
        sel = (vis >= lo) & (vis < hi)
        rel = vis[sel] - lo
        out[sel] = glo + (process_index * per + rel // n) * n + rel % n
    out[vis == start] = process_count * start  # image_newline
    return {**batch, "visual_index": out.astype(np.int32)}
