"""The grain input pipeline: annotations -> decoded, tokenized samples -> static-shape batches.

Stages (``Pipeline.dataset()``)::

    MapDataset.source(_Order)           k -> (epoch, position, source, index) of this host's shard
      .map(_Preprocess)                 decode media, template + labels, CLIP prompt, length check
      .to_iter_dataset(ReadOptions)     a few threads per process
      .mp_prefetch(num_workers)         worker processes (spawn), each a strided slice
      _BatchIterDataset                 skip bad samples, count them, collate.collate -> batch
      ThreadPrefetchIterDataset         overlap collation with the training step

Design choices:

- **Order.** Each epoch is a deterministic function of (seed, epoch): every source contributes
  ``floor(weight * size)`` samples plus one more with probability ``frac(weight * size)``, then
  the epoch is shuffled. Host ``p`` of ``P`` takes positions ``p, p + P, ...`` of each epoch
  (training: each epoch cut to a multiple of P so all hosts stay in step; evaluation: padded
  with invalid rows up to a multiple of P). The per-sample frame-sampling seed is
  ``[seed, epoch, position]``, so a sample is decoded identically whatever the worker count
  and after a resume.
- **Skipping happens after** ``mp_prefetch``. A bad sample becomes a small "skip" record in the
  worker; the main process counts it per reason, logs a warning naming the file, and keeps
  filling the batch from the next samples (training) or keeps it as an invalid row
  (evaluation). Because the workers emit exactly one record per index and grain interleaves
  them round-robin, the batches are identical for any ``num_workers`` (grain warns that
  filtering *before* ``mp_prefetch`` breaks this), and the counts are part of the iterator
  state.
- **Static shapes: each batch is padded to the smallest bucket that fits its longest sample**
  (no grouping by length). Grouping would need a buffer of decoded samples per bucket, whose
  pixels cannot go into a checkpoint, so exact resume would have to replay them; padding keeps
  batches as consecutive runs of the shuffled order, makes the state a few integers, and costs
  little here because a video's merged length is dominated by its fixed number of visual tokens
  (1,024 of ~1,100 for the 7B recipe). Distinct shapes: at most ``len(buckets)`` per set of
  media groups present (``group_capacity='batch'`` pads every present group to the batch size).
- **State.** ``get_state()`` of the returned iterator is a small JSON-able dict (grain's
  per-worker positions, the skip counts, the batch count); ``set_state`` resumes with exactly the
  batches the uninterrupted iterator would have produced.

A batch is the dict of :func:`ppllava_jax.data.collate.collate` (numpy), plus
``valid: bool[B]`` and ``meta``, a Python dict kept out of the jitted step (pop it first)::

    meta = {"ids": ["train.json:17", ...],  # "<source name>:<index>", "" for padding rows
            "source": int32[B], "index": int32[B],  (-1 for padding rows)
            "epoch": int32[B], "position": int32[B],
            "status": ["ok" | "skip" | "pad", ...],
            "skipped": {"missing_media": 1, "bad_media": 2, ...}}  # cumulative, incl. loading

DPO (``data.dpo = True``): preference samples in the annotation format whose *last* QA turn
carries a chosen and a rejected answer (earlier turns are ordinary context)::

    {"video": "v.mp4", "QA": [{"q": "What happens?", "a": "A dog runs.",       # chosen
                               "rejected": "A cat sleeps."}]}
    {"video": "v.mp4", "QA": [{"q": "What happens?", "chosen": "A dog runs.",  # same
                               "rejected": "A cat sleeps."}]}

A sample without a non-blank ``rejected`` answer on its last turn, or with identical chosen and
rejected answers, is a ``bad_annotation`` (skipped and counted at load time). Each sample is
decoded once and gives two encodings with the same prompt and media: labels on the chosen
answer and on the rejected one. The CLIP prompt is the conversation *without* the preferred
answer (earlier turns and the last question), so the visual tokens, shared by both, do not see
either answer. ``data.batch_size`` counts pairs: a batch has ``2 * batch_size`` rows, chosen rows
``0..B-1`` then rejected rows ``B..2B-1``, row ``i + B`` the rejected twin of row ``i``
(``meta['dpo_role']`` says which). The twins share the visual input: row ``i + B`` is collated
with ``collate.Sample.media_from = i``, so its ``visual_index`` rows equal row ``i``'s and each
pair is one item of its media group (the vision tower and the projector run once per pair).
Skipping works on whole pairs (one record per pair), so pairs stay together; ``valid`` and
every ``meta`` list have ``2 * batch_size`` entries. Not available with ``array_record``.

Skip reasons: ``missing_media`` (file not found), ``bad_media`` (unreadable, truncated,
empty), ``empty_qa`` (no or empty QA turns), ``bad_annotation`` (other malformed sample),
``too_long`` (merged length > ``max_length``), ``bad_sample`` (another DataError, e.g. a
wrong number of ``<image>`` placeholders), ``unexpected_error`` (any other exception while
preparing a sample; the traceback is logged).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import collate as col
from ppllava_jax.data import image as img
from ppllava_jax.data import templates as tpl
from ppllava_jax.data import video as vid
from ppllava_jax.data.errors import AnnotationError, DataError, MediaError, SampleTooLongError

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing_media",
    "bad_media",
    "empty_qa",
    "bad_annotation",
    "too_long",
    "bad_sample",
    "unexpected_error",
)
GROUP_OF_MEDIA = {"video": "video", "image": "image", "multi-image": "multi"}


# --------------------------------------------------------------------------------------
# Config


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` section of a training / evaluation config, with every field documented."""
    c = ml_collections.ConfigDict()
    # Annotation files of the mixture: dicts with path, data_root, media_type, weight, name
    # (see annotations.AnnotationSource), or [path, data_root, media_type, weight] lists.
    c.sources = []
    # A preprocessed split written by tfds_builder.write_split (a directory); when set, it
    # replaces `sources` (frames, tokens and CLIP ids are read back instead of recomputed).
    c.array_record = ""
    c.template = "plain_v1"  # conversation template: plain_v1 | vicuna_v1 | plain_qwen
    c.tokenizer = ""  # directory of the LLM tokenizer (tokenizers.load_llm_tokenizer)
    c.clip_tokenizer = ""  # directory of the CLIP tokenizer of the prompt encoder
    c.num_frames = 32  # T, frames sampled per video
    c.frame_sampling = ""  # rand | middle; "" = rand when training, middle in evaluation
    c.image_size = 336  # tower input size S (must equal model vision.image_size)
    # any-resolution grids (height, width) for single images (must equal the model's)
    c.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    c.max_images = 8  # N, images per multi-image sample (static); more -> skipped (bad_sample)
    c.clip_max_length = 248  # CLIP prompt length (77 without the context extension)
    # longest merged sequence (text + visual tokens); longer -> skipped (or raised), never cut (the
    # original cuts nothing either: its labels are padded with -100 to 3000 entries)
    c.max_length = 2048
    c.buckets = [512, 1024, 2048]  # allowed padded lengths L; max(buckets) >= max_length
    c.padding_side = "right"  # right (training, scoring) | left (generation)
    # k micro-batches per batch (train.grad_accum_steps, set by train.py): the batch is laid out
    # so that rows j, j+k, ... with their visual inputs form a self-contained micro-batch
    c.micro_batches = 1
    c.group_capacity = "batch"  # batch: each present media group padded to the batch size
    #                             (one shape per bucket); pow2: rounded up to a power of 2
    # Identical shapes in every batch (what multi-host training needs: all hosts feed one global
    # array per step): fixed_groups are present in every batch, with empty items when a batch
    # has none (e.g. ["video"] or ["video", "image"]); fixed_length pads to the largest bucket.
    c.fixed_groups = ()
    c.fixed_length = False
    c.batch_size = 8  # per host (per JAX process)
    c.seed = 0  # shuffling and frame sampling
    c.shuffle = True  # training only; evaluation is always in order
    c.num_epochs = 0  # training: 0 = repeat forever; evaluation always reads one epoch
    c.drop_remainder = True  # training with num_epochs > 0: drop the last partial batch
    c.num_workers = 0  # grain worker processes (0: decode in the main process)
    c.read_threads = 1  # decoding threads per process
    c.worker_buffer = 2  # samples buffered per worker process
    c.prefetch_batches = 2  # collated batches prepared ahead in a thread (0: none)
    c.on_error = "skip"  # skip (count + warn) | raise
    c.max_consecutive_skips = 1000  # raise if this many samples in a row are bad
    c.training = True  # CLIP prompt = whole conversation (train) or the question (eval)
    # conversation: as `training` says (the original recipe: the conversation, answers included,
    # when training: with text_encoding='original' the original's process_qa text, role strings,
    # <image>\n, </s> and the system instruction included); question: always the first
    # question. A model whose projector and text tower train from scratch learns to read the
    # answer out of a conversation prompt (the pooling weights depend on it), which is absent
    # at evaluation: the demo uses "question".
    c.clip_prompt = "conversation"
    # Training samples: original = the authors' Interleave_sft_dataset (plain_v1 / vicuna_v1:
    # the text split at 'ASSISTANT: ', each piece tokenized alone, its label rule; with the
    # legacy tokenizer an unsupervised '▁' follows every 'ASSISTANT: '; templates.
    # encode_training_sample); offsets = the whole text tokenized with character offsets, exactly
    # the answers and their end tokens supervised (the demo; DPO pairs, plain_qwen and
    # evaluation always use it).
    c.text_encoding = "original"
    # Frame folders (a video given as a directory of images): name = sorted file names (the
    # original's raw-frame reader: frame_10 before frame_2); natural = numbers compared as numbers
    c.frame_folder_order = "name"
    c.generation_prompt = False  # eval: end the prompt where the model answers (no labels)
    c.answer_prefix = ""  # generation prompt: text after ASSISTANT: (e.g. "Best option:(")
    # Llama pre-tokenization of data.tokenizer (tokenizers.load_llm_tokenizer), for every sample
    # (training samples, template prompts, exact evaluation prompts): True legacy (a '▁' after
    # each special token written in the text: Vicuna / LLaVA-NeXT as released, the 7B configs),
    # False non-legacy, None as the tokenizer file says.
    c.tokenizer_legacy = None
    c.shard_index = -1  # this host's shard; -1 = jax.process_index()
    c.shard_count = -1  # number of shards; -1 = jax.process_count()
    # Preference pairs for DPO (train.mode='dpo'): the last QA turn holds a chosen answer ("a"
    # or "chosen") and a "rejected" one; batches of 2 x batch_size rows (chosen, then rejected
    # twins) sharing each pair's decoded media (module docstring).
    c.dpo = False
    return c


def _get(cfg: Any, name: str):
    return cfg[name] if isinstance(cfg, Mapping) or hasattr(cfg, "keys") else getattr(cfg, name)


def validate_config(cfg: ml_collections.ConfigDict, model_cfg: Any) -> None:
    """Fail before any decoding or compilation, saying what to change (ValueError)."""
    known = set(default_config().keys())
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ValueError(f"unknown data config fields {unknown}; known fields: {sorted(known)}")

    def bad(field: str, msg: str):
        raise ValueError(f"data.{field}: {msg}")

    if not cfg.sources and not cfg.array_record:
        bad("sources", "no annotation files given (or set data.array_record)")
    k = int(cfg.get("micro_batches", 1))
    if k < 1 or int(cfg.batch_size) % k:
        bad(
            "batch_size",
            f"{cfg.batch_size} does not split into {k} micro-batches (train.grad_accum_steps); "
            "use a batch size divisible by it",
        )
    if cfg.get("clip_prompt", "conversation") not in ("conversation", "question"):
        bad("clip_prompt", f"{cfg.clip_prompt!r}; use 'conversation' or 'question'")
    if cfg.on_error not in ann.ON_ERROR:
        bad("on_error", f"{cfg.on_error!r} is not one of {ann.ON_ERROR}")
    if cfg.get("text_encoding", "original") not in ("original", "offsets"):
        bad("text_encoding", f"{cfg.text_encoding!r}; use 'original' or 'offsets'")
    if cfg.get("frame_folder_order", "name") not in vid.FOLDER_ORDERS:
        bad("frame_folder_order", f"{cfg.frame_folder_order!r}; use one of {vid.FOLDER_ORDERS}")
    if cfg.get("tokenizer_legacy") not in (True, False, None):
        bad("tokenizer_legacy", f"{cfg.tokenizer_legacy!r}; use True, False or None")
    if cfg.padding_side not in ("left", "right"):
        bad("padding_side", f"{cfg.padding_side!r}; use 'left' or 'right'")
    if cfg.frame_sampling not in ("",) + vid.SAMPLING_MODES:
        bad("frame_sampling", f"{cfg.frame_sampling!r}; use '', 'rand' or 'middle'")
    if cfg.group_capacity not in ("batch", "pow2"):
        bad("group_capacity", f"{cfg.group_capacity!r}; use 'batch' or 'pow2'")
    unknown_groups = [g for g in cfg.fixed_groups if g not in col.GROUPS]
    if unknown_groups or len(set(cfg.fixed_groups)) != len(list(cfg.fixed_groups)):
        bad("fixed_groups", f"{list(cfg.fixed_groups)}; use distinct ones of {list(col.GROUPS)}")
    tpl.get_template(cfg.template)
    for f in ("batch_size", "num_frames", "image_size", "clip_max_length", "max_length"):
        if int(cfg[f]) <= 0:
            bad(f, f"must be positive, got {cfg[f]}")
    for f in ("num_workers", "read_threads", "worker_buffer", "prefetch_batches", "num_epochs"):
        if int(cfg[f]) < 0:
            bad(f, f"must be >= 0, got {cfg[f]}")
    buckets = list(cfg.buckets)
    if not buckets or any(int(b) <= 0 for b in buckets):
        bad("buckets", f"need positive lengths, got {buckets}")
    if cfg.max_length > max(buckets):
        bad(
            "max_length",
            f"{cfg.max_length} exceeds the largest bucket {max(buckets)}; add a bucket >= "
            f"{cfg.max_length} to data.buckets or lower data.max_length",
        )
    tower = model_cfg.vision.image_size
    if cfg.image_size != tower:
        bad("image_size", f"{cfg.image_size} differs from the model's vision.image_size {tower}")
    pins = [tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints]
    if any(h % tower or w % tower for h, w in pins):
        bad("image_grid_pinpoints", f"{pins}: every size must be a multiple of {tower}")
    model_pins = getattr(model_cfg, "image_grid_pinpoints", None)
    if model_pins is not None and [tuple(p) for p in model_pins] != pins:
        bad("image_grid_pinpoints", f"{pins} differ from the model's {list(model_pins)}")
    planner = col.Planner(model_cfg)
    for kind, n in (("video", cfg.num_frames), ("multi", cfg.max_images)):
        try:
            t, h, w = planner.item_grid(kind, int(n))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model pooling config unusable for {kind}: {e}") from e
        if min(t, h, w) <= 0:
            field = "num_frames" if kind == "video" else "max_images"
            bad(
                field,
                f"{n} {kind} frames give an empty pooled grid {(t, h, w)}: the pooling kernel "
                f"is larger than the input; raise data.{field} or shrink the pooling kernel",
            )
    if cfg.shard_count > 0 and not 0 <= cfg.shard_index < cfg.shard_count:
        bad("shard_index", f"{cfg.shard_index} not in [0, {cfg.shard_count})")
    if cfg.dpo and cfg.array_record:
        bad("dpo", "preference pairs are read from annotation files; unset data.array_record")
    if cfg.dpo and cfg.generation_prompt:
        bad("dpo", "preference pairs need answers; unset data.generation_prompt")


def max_views(image_size: int, pinpoints: Sequence[Sequence[int]]) -> int:
    """Most any-resolution views of one image: the base view + the largest grid."""
    return 1 + max((int(h) // image_size) * (int(w) // image_size) for h, w in pinpoints)


def skip_reason(err: BaseException) -> str:
    """The counting key of a skipped sample (see module docstring)."""
    if isinstance(err, MediaError):
        return "missing_media" if "not found" in err.reason else "bad_media"
    if isinstance(err, SampleTooLongError):
        return "too_long"
    if isinstance(err, AnnotationError):
        r = err.reason
        if "QA" in r and ("non-empty" in r or "is empty" in r):
            return "empty_qa"
        return "bad_annotation"
    if isinstance(err, DataError):
        return "bad_sample"
    return "unexpected_error"


def _no_samples_message(sources: Sequence[ann.AnnotationSource], counter: ann.SkipCounter) -> str:
    """Why a mixture has no valid sample at all (every file empty or every sample rejected)."""
    files = ", ".join(s.path for s in sources)
    if not counter.total:
        return f"data.sources: the annotation files hold no samples ({files}); add data"
    by = getattr(counter, "by_reason", None) or counter.by_kind
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
    first = "\n  ".join(counter.messages[:3])
    return (
        f"data.sources: no valid sample: all {counter.total} samples of {files} were rejected "
        f"when loading ({reasons}); the first:\n  {first}\nfix the annotations (format: "
        "ppllava_jax/data/annotations.py)"
    )


class _LoadCounter(ann.SkipCounter):
    """SkipCounter that also counts by pipeline reason."""

    def __init__(self):
        super().__init__()
        self.by_reason: dict[str, int] = {}

    def add(self, err: Exception) -> None:
        super().add(err)
        r = skip_reason(err)
        self.by_reason[r] = self.by_reason.get(r, 0) + 1


# --------------------------------------------------------------------------------------
# DPO annotations


def parse_dpo_sample(
    raw: Any, source: str, index: int, data_root: str = "", media_type: str | None = None
) -> ann.Sample:
    """A preference sample (module docstring): ``annotations.parse_sample`` with the last
    turn's chosen answer as its ``a`` and the rejected answer in ``extra["rejected"]``."""
    rejected = None
    qa = raw.get("QA") if isinstance(raw, Mapping) else None
    if isinstance(qa, list) and qa and isinstance(qa[-1], Mapping):
        last = dict(qa[-1])
        if "chosen" in last:
            if "a" in last and last["a"] != last["chosen"]:
                raise AnnotationError(source, index, "the last turn has both 'a' and 'chosen'")
            last["a"] = last.pop("chosen")
        rejected = last.pop("rejected", None)
        raw = dict(raw, QA=[*qa[:-1], last])
    sample = ann.parse_sample(raw, source, index, data_root, media_type)
    if not isinstance(rejected, str) or not rejected.strip():
        raise AnnotationError(
            source, index, "DPO sample: the last turn has no 'rejected' answer (a non-blank string)"
        )
    if rejected.strip() == sample.turns[-1].a.strip():
        raise AnnotationError(source, index, "DPO sample: chosen and rejected answers are equal")
    return dataclasses.replace(sample, extra={**sample.extra, "rejected": rejected})


def load_dpo_annotation_file(
    path: str,
    data_root: str = "",
    media_type: str | None = None,
    on_error: str = "skip",
    skipped: ann.SkipCounter | None = None,
) -> list[ann.Sample]:
    """``annotations.load_annotation_file`` for preference samples (:func:`parse_dpo_sample`)."""
    return ann.load_annotation_file(
        path, data_root, media_type, on_error, skipped, parse=parse_dpo_sample
    )


# --------------------------------------------------------------------------------------
# Exact evaluation samples

EVAL_PROMPT, EVAL_CLIP, EVAL_FRAMES = "eval_prompt_text", "eval_clip_text", "eval_frame_rule"


def eval_sample(
    video: str,
    prompt_text: str,
    clip_text: str,
    frame_rule: vid.FrameRule,
    *,
    source: str = "eval",
    index: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> ann.Sample:
    """An evaluation sample given exactly (no template): the full prompt text (no BOS),
    the CLIP text and the frame rule, fed to ``Pipeline(..., samples=[[...]])``. ``extra``
    (e.g. the question id) is kept in ``Sample.extra``."""
    ex = {**(extra or {}), EVAL_PROMPT: prompt_text, EVAL_CLIP: clip_text, EVAL_FRAMES: frame_rule}
    return ann.Sample("video", (video,), (), None, frame_rule.bound, source, index, ex)


# --------------------------------------------------------------------------------------
# Order of one host's shard over epochs


class _Order:
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

    def resharded(self, shard_index: int, shard_count: int) -> _Order:
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


# --------------------------------------------------------------------------------------
# Per-sample preprocessing (runs in the workers)


def _resize_frames(frames, size: int) -> np.ndarray:
    """uint8 frames (array or list of differently sized images) -> uint8[T, S, S, 3]."""
    return np.stack([img._resize(np.asarray(f, np.uint8), size, size) for f in frames])


def anyres_views_uint8(
    image: np.ndarray, size: int, pinpoints: Sequence[Sequence[int]]
) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 views of :func:`image.preprocess_anyres` before normalization.

    ``image.normalize(views)`` equals ``preprocess_anyres(...).pixel_values``. Returns
    (uint8[1 + rows * cols, S, S, 3], original (height, width)).
    """
    image = np.asarray(image, np.uint8)
    oh, ow = image.shape[:2]
    th, tw = img.select_best_resolution((oh, ow), pinpoints)
    nh, nw = img._fit_size((oh, ow), (th, tw))
    resized = img._resize(image, nh, nw)
    py, ry = divmod(th - nh, 2)
    px, rx = divmod(tw - nw, 2)
    padded = np.pad(resized, ((py, py + ry), (px, px + rx), (0, 0)))
    rows, cols = th // size, tw // size
    crops = (
        padded.reshape(rows, size, cols, size, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(-1, size, size, 3)
    )
    base = img._resize(image, size, size)[None]
    return np.concatenate([base, crops], axis=0), (int(oh), int(ow))


def merged_length(planner: col.Planner, input_ids: np.ndarray, media, frames: dict) -> int:
    """Tokens of the sample once every image token is replaced by its visual tokens."""
    n = len(input_ids)
    if media is None:
        return n
    layouts = planner.local_layout(media, frames[media.kind])
    return n - len(layouts) + sum(len(x) for x in layouts)


class _Preprocess:
    """annotation item -> record (a dict of numpy arrays and scalars; pytree-friendly).

    Records: ``status`` ok | skip | pad, ``epoch``, ``position``, ``source``, ``index``;
    ok: ``input_ids``, ``labels`` (int32[S]), ``clip_ids``, ``clip_mask`` (int32[Lc]),
    ``kind`` ('' for text), ``pixels`` (uint8 stage A, float32 after :meth:`finalize`),
    ``image_size`` (int32[2], images), ``length`` (merged); skip: ``reason``, ``message``,
    ``path``.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, model_cfg: Any, samples=None):
        self.samples = samples  # list (per source) of lists of annotations.Sample
        self.model_cfg = model_cfg
        self.template = cfg.template
        self.tokenizer_dir = cfg.tokenizer
        self.clip_tokenizer_dir = cfg.clip_tokenizer
        self.num_frames = int(cfg.num_frames)
        self.training = bool(cfg.training)
        self.clip_prompt = str(cfg.clip_prompt)
        self.sampling = cfg.frame_sampling or ("rand" if cfg.training else "middle")
        self.size = int(cfg.image_size)
        self.pinpoints = [tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints]
        self.max_images = int(cfg.max_images)
        self.clip_max_length = int(cfg.clip_max_length)
        self.max_length = int(cfg.max_length)
        self.seed = int(cfg.seed)
        self.generation_prompt = bool(cfg.generation_prompt) and not cfg.training
        self.answer_prefix = cfg.answer_prefix or None
        self.dpo = bool(cfg.get("dpo", False))
        self.tokenizer_legacy = cfg.get("tokenizer_legacy", None)
        # the original's training samples (tpl.encode_training_sample) where they apply
        self.original_text = (
            cfg.get("text_encoding", "original") == "original"
            and self.training
            and not self.dpo
            and tpl.get_template(cfg.template).name in tpl.ORIGINAL_TEMPLATES
        )
        self.frame_folder_order = cfg.get("frame_folder_order", "name")
        self.frames = {
            "video": self.num_frames,
            "image": max_views(self.size, self.pinpoints),
            "multi": self.max_images,
        }
        self._tok = self._clip_tok = self._planner = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tok"] = d["_clip_tok"] = d["_planner"] = None  # reloaded lazily in each worker
        return d

    @property
    def tokenizer(self):
        """The LLM tokenizer (``load_llm_tokenizer`` with ``data.tokenizer_legacy``)."""
        if self._tok is None:
            from ppllava_jax.data.tokenizers import load_llm_tokenizer

            self._tok = load_llm_tokenizer(self.tokenizer_dir, legacy=self.tokenizer_legacy)
        return self._tok

    @property
    def clip_tokenizer(self):
        if self._clip_tok is None:
            from transformers import AutoTokenizer

            self._clip_tok = AutoTokenizer.from_pretrained(self.clip_tokenizer_dir)
        return self._clip_tok

    def encode_prompt(self, text: str, training: bool) -> tuple[np.ndarray, np.ndarray]:
        """The prompt encoder's ids and mask: CLIP's (padded, masked), or for the Qwen family
        (``model_cfg.qwen``) SigLIP's (no mask; unpadded in training, padded in evaluation)."""
        if getattr(self.model_cfg, "qwen", False):
            return tpl.encode_siglip_prompt(
                self.clip_tokenizer, text, self.clip_max_length, training=training
            )
        return tpl.encode_clip_prompt(self.clip_tokenizer, text, self.clip_max_length)

    @property
    def planner(self) -> col.Planner:
        if self._planner is None:
            self._planner = col.Planner(self.model_cfg)
        return self._planner

    # -- stage A: decode + tokenize (uint8 pixels); what tfds_builder stores
    def decode(self, sample: ann.Sample, epoch: int, position: int) -> dict:
        if EVAL_PROMPT in sample.extra:
            return self.decode_exact(sample)
        turns = list(sample.turns)
        if self.generation_prompt:
            turns[-1] = tpl.Turn(turns[-1].q, None)
        if self.original_text:  # ids, labels and CLIP text of the original's training sample
            enc = tpl.encode_training_sample(
                self.tokenizer,
                turns,
                self.template,
                self.model_cfg.image_token_index,
                num_images=sample.num_images,
                system=sample.system,
            )
        else:
            enc = tpl.encode_conversation(
                self.tokenizer,
                turns,
                self.template,
                self.model_cfg.image_token_index,
                num_images=sample.num_images,
                system=sample.system,
                training=self.training,
                answer_prefix=self.answer_prefix if self.generation_prompt else None,
            )
        clip_text = enc.clip_text
        if self.clip_prompt == "question":
            clip_text = tpl.clip_text_of(turns, False)
        elif self.dpo:  # the CLIP prompt without the preferred answer (shared by both twins)
            clip_text = tpl.clip_text_of([*turns[:-1], tpl.Turn(turns[-1].q, None)], True)
        clip_ids, clip_mask = self.encode_prompt(clip_text, self.training)
        rec = {
            "input_ids": enc.input_ids.astype(np.int32),
            "labels": enc.labels.astype(np.int32),
            "clip_ids": clip_ids,
            "clip_mask": clip_mask,
            "kind": "",
        }
        if self.dpo:
            rej = tpl.encode_conversation(
                self.tokenizer,
                [*turns[:-1], tpl.Turn(turns[-1].q, sample.extra["rejected"])],
                self.template,
                self.model_cfg.image_token_index,
                num_images=sample.num_images,
                system=sample.system,
                training=self.training,
            )
            rec["rejected_input_ids"] = rej.input_ids.astype(np.int32)
            rec["rejected_labels"] = rej.labels.astype(np.int32)
        mt = sample.media_type
        if mt == "video":
            rng = np.random.default_rng([self.seed, epoch, position])
            clip = vid.load_video(
                sample.media[0],
                self.num_frames,
                self.sampling,
                rng=rng,
                bound=sample.bound,
                folder_order=self.frame_folder_order,
            )
            rec["pixels"] = _resize_frames(clip.frames, self.size)
            rec["kind"] = "video"
        elif mt == "image":
            views, hw = anyres_views_uint8(
                img.load_image(sample.media[0]), self.size, self.pinpoints
            )
            rec["pixels"], rec["image_size"], rec["kind"] = views, np.asarray(hw, np.int32), "image"
        elif mt == "multi-image":
            if len(sample.media) > self.max_images:
                raise DataError(
                    f"{sample.source} [sample {sample.index}]: {len(sample.media)} images > "
                    f"data.max_images={self.max_images}",
                    path=sample.source,
                )
            # sorted as the original's raw-frame reader sorts the path list before reading
            paths = sorted(sample.media)
            rec["pixels"] = _resize_frames([img.load_image(p) for p in paths], self.size)
            rec["kind"] = "multi"
        n = self.length_of(rec)
        if n > self.max_length:
            where = sample.media[0] if sample.media else f"{sample.source} [{sample.index}]"
            raise SampleTooLongError(n, self.max_length, path=where)
        rec["length"] = np.int32(n)
        return rec

    def decode_exact(self, sample: ann.Sample) -> dict:
        """An exact evaluation sample (:func:`eval_sample`): ``tok(prompt_text).input_ids``
        (BOS added by the tokenizer), the CLIP ids of the given CLIP text, and exactly the
        frames of its ``video.FrameRule``. The record also holds ``frame_indices``
        (int64[T]) and, for frame folders, ``frame_files``."""
        ex = sample.extra
        ids = np.asarray(self.tokenizer(ex[EVAL_PROMPT]).input_ids, np.int32)
        n_img = int((ids == self.model_cfg.image_token_index).sum())
        if n_img != 1:
            raise DataError(
                f"{sample.source} [{ex.get('qid', sample.index)}]: the prompt encodes to "
                f"{n_img} image tokens (id {self.model_cfg.image_token_index}), expected 1: "
                "check that the tokenizer has <image> and the prompt holds it once",
                path=sample.source,
            )
        clip_ids, clip_mask = self.encode_prompt(ex[EVAL_CLIP], False)
        rule = ex[EVAL_FRAMES]
        if int(rule.num_segments) != self.num_frames:
            raise DataError(
                f"{sample.source} [{ex.get('qid', sample.index)}]: frame rule of "
                f"{rule.num_segments} frames in a pipeline of data.num_frames={self.num_frames}",
                path=sample.source,
            )
        clip = vid.load_frames_by_rule(sample.media[0], rule)
        rec = {
            "input_ids": ids,
            "labels": np.full(len(ids), tpl.IGNORE_INDEX, np.int32),
            "clip_ids": clip_ids,
            "clip_mask": clip_mask,
            "kind": "video",
            "pixels": _resize_frames(clip.frames, self.size),
            "frame_indices": np.asarray(clip.indices, np.int64),
        }
        if clip.files:
            rec["frame_files"] = list(clip.files)
        n = self.length_of(rec)
        if n > self.max_length:
            raise SampleTooLongError(n, self.max_length, path=sample.media[0])
        rec["length"] = np.int32(n)
        return rec

    def length_of(self, rec: dict) -> int:
        """Merged length (DPO: of the longer twin)."""
        media = _media(rec)
        n = merged_length(self.planner, rec["input_ids"], media, self.frames)
        if "rejected_input_ids" in rec:
            n = max(n, merged_length(self.planner, rec["rejected_input_ids"], media, self.frames))
        return n

    # -- stage B: normalize (the vision tower's own mean / std)
    def finalize(self, rec: dict) -> dict:
        if "pixels" in rec and rec["pixels"].dtype == np.uint8:
            mean, std = img.pixel_stats(bool(getattr(self.model_cfg, "qwen", False)))
            rec = dict(rec, pixels=img.normalize(rec["pixels"], mean, std))
        return rec

    def __call__(self, item: dict) -> dict:
        out = {k: item[k] for k in ("epoch", "position", "source", "index")}
        if item["pad"]:
            return dict(out, status="pad")
        sample = self.samples[item["source"]][item["index"]]
        try:
            rec = self.finalize(self.decode(sample, item["epoch"], item["position"]))
        except Exception as e:  # noqa: BLE001 - bad input must not end a run; counted
            where = sample.media[0] if sample.media else sample.source
            # sample_index: the annotation's own index in its file (index: its position among
            # the file's valid samples), what warnings name
            return dict(out, sample_index=int(sample.index), **_skip_record(e, where))
        return dict(out, status="ok", **rec)


def _skip_record(e: BaseException, default_path: str) -> dict:
    reason = skip_reason(e)
    msg = f"{type(e).__name__}: {e}"
    if reason == "unexpected_error":
        msg += "\n" + "".join(traceback.format_exception(e))
    return {
        "status": "skip",
        "reason": reason,
        "message": msg,
        "path": getattr(e, "path", None) or default_path,
    }


def _media(rec: dict) -> col.Media | None:
    if not rec.get("kind"):
        return None
    size = rec.get("image_size")
    return col.Media(
        rec["kind"], rec["pixels"], None if size is None else tuple(int(x) for x in size)
    )


# --------------------------------------------------------------------------------------
# Skipping + collation (main process)


class _BatchSpec:
    """Everything the batching iterator needs (picklable, small)."""

    def __init__(self, cfg, model_cfg, frames, source_names, initial_skips):
        self.model_cfg = model_cfg
        self.batch_size = int(cfg.batch_size)
        self.buckets = sorted(int(b) for b in cfg.buckets)
        self.padding_side = cfg.padding_side
        self.clip_length = int(cfg.clip_max_length)
        self.frames = dict(frames)
        self.group_capacity = cfg.group_capacity
        self.fixed_groups = tuple(cfg.fixed_groups)
        if cfg.fixed_length:
            self.buckets = self.buckets[-1:]
        self.micro_batches = int(cfg.micro_batches)
        self.training = bool(cfg.training)
        self.drop_remainder = bool(cfg.drop_remainder) if cfg.training else False
        self.raise_errors = cfg.on_error == "raise"
        self.max_consecutive_skips = int(cfg.max_consecutive_skips)
        self.source_names = list(source_names)
        self.initial_skips = dict(initial_skips)
        self.image_size = int(cfg.image_size)
        self.dpo = bool(cfg.get("dpo", False))


class _BatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: _BatchSpec, sink: dict | None = None):
        super().__init__(parent)
        self._spec = spec
        self._sink = sink  # main-process view of the latest counts (Pipeline.skipped_counts)

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self._spec, self._sink)

    def __str__(self) -> str:
        return f"_BatchIterDataset(batch_size={self._spec.batch_size})"


class _BatchIterator(grain.DatasetIterator):
    """Consumes records, counts and drops (train) or masks (eval) bad ones, collates."""

    def __init__(self, parent: grain.DatasetIterator, spec: _BatchSpec, sink: dict | None):
        super().__init__(parent)
        self._spec = spec
        self._skipped = dict(spec.initial_skips)
        self._batches = 0
        self._sink = sink
        # training: the epoch being read, whether it was read from its start, its ok samples,
        # its skipped ones by reason and the last (an epoch without any usable sample: error)
        self._ep: int | None = None
        self._ep_full = True
        self._ep_ok = 0
        self._ep_bad: dict[str, int] = {}
        self._ep_last: dict | None = None
        self._publish()

    def _track(self, rec: dict) -> None:
        e = int(rec.get("epoch", -1))
        if e < 0:
            return
        if self._ep is None:
            self._ep = e
        elif e != self._ep:
            self._check_epoch()
            self._ep, self._ep_full, self._ep_ok, self._ep_bad = e, True, 0, {}
        if rec["status"] == "ok":
            self._ep_ok += 1
        elif rec["status"] == "skip":
            self._ep_bad[rec["reason"]] = self._ep_bad.get(rec["reason"], 0) + 1
            self._ep_last = rec

    def _check_epoch(self) -> None:
        """A whole epoch (read from its start) of skipped samples: nothing can be trained on."""
        if not (self._ep_full and self._ep_ok == 0 and self._ep_bad and self._ep_last):
            return
        last = self._ep_last
        name = self._spec.source_names[last["source"]] if last["source"] >= 0 else "?"
        raise DataError(
            f"epoch {self._ep} has no valid sample: all {sum(self._ep_bad.values())} samples read "
            f"by this host were skipped ({', '.join(f'{k} {v}' for k, v in self._ep_bad.items())}"
            f"); the last, {name}:{last.get('sample_index', last['index'])}, file {last['path']}: "
            f"{last['message']}. Check the media paths (data_root of data.sources) and files",
            path=last["path"],
        )

    def _publish(self):
        if self._sink is not None:
            self._sink.clear()
            self._sink.update(self._skipped)

    def _count(self, rec: dict) -> None:
        s = self._spec
        if s.raise_errors:
            raise DataError(f"bad sample ({rec['reason']}): {rec['message']}", path=rec["path"])
        self._skipped[rec["reason"]] = self._skipped.get(rec["reason"], 0) + 1
        name = s.source_names[rec["source"]] if rec["source"] >= 0 else "?"
        log.warning(
            "skipping sample %s:%d (%s), file %s: %s",
            name,
            rec.get("sample_index", rec["index"]),
            rec["reason"],
            rec["path"],
            rec["message"],
        )
        self._publish()

    def __next__(self) -> dict:
        s = self._spec
        rows: list[dict] = []
        consecutive = 0
        while len(rows) < s.batch_size:
            try:
                rec = next(self._parent)
            except StopIteration:
                if s.training:
                    self._check_epoch()
                break
            if s.training:
                self._track(rec)
            if rec["status"] == "skip":
                self._count(rec)
                consecutive += 1
                if consecutive >= s.max_consecutive_skips:
                    raise DataError(
                        f"{consecutive} bad samples in a row (last: {rec['path']}: "
                        f"{rec['message']}); check the data or data.max_consecutive_skips"
                    )
                if not s.training:
                    rows.append(rec)
                continue
            consecutive = 0
            if rec["status"] == "pad" and s.training:
                continue
            rows.append(rec)
        if not rows or (len(rows) < s.batch_size and s.drop_remainder):
            raise StopIteration
        while len(rows) < s.batch_size:
            rows.append({"status": "pad", "epoch": -1, "position": -1, "source": -1, "index": -1})
        batch = self._collate(rows)
        self._batches += 1
        return batch

    def _dummy(self, rows: list[dict]) -> dict:
        for r in rows:
            if r["status"] == "ok":
                return r
        s = self._spec
        size, t = s.image_size, s.frames["video"]
        ids = np.array([s.model_cfg.image_token_index], np.int32)
        clip = np.zeros(s.clip_length, np.int32)
        return {
            "input_ids": ids,
            "labels": np.full(1, tpl.IGNORE_INDEX, np.int32),
            "rejected_input_ids": ids,
            "rejected_labels": np.full(1, tpl.IGNORE_INDEX, np.int32),
            "clip_ids": clip,
            "clip_mask": np.eye(1, s.clip_length, dtype=np.int32)[0],
            "kind": "video",
            "pixels": np.zeros((t, size, size, 3), np.float32),
        }

    def _collate(self, rows: list[dict]) -> dict:
        s = self._spec
        dummy = self._dummy(rows)
        samples = []
        for r in rows:
            src = r if r["status"] == "ok" else dummy
            samples.append(
                col.Sample(
                    input_ids=src["input_ids"],
                    labels=src["labels"],
                    media=_media(src),
                    clip_ids=src["clip_ids"],
                    clip_mask=src["clip_mask"],
                )
            )
        if s.dpo:  # rejected twins after the chosen rows, reusing their visual input
            for i, r in enumerate(rows):
                src = r if r["status"] == "ok" else dummy
                samples.append(
                    col.Sample(
                        input_ids=src["rejected_input_ids"],
                        labels=src["rejected_labels"],
                        media_from=None if samples[i].media is None else i,
                    )
                )
            rows = rows + rows
        caps = None
        if s.group_capacity == "batch":
            caps = {g: s.batch_size for g in col.GROUPS}
        batch = col.collate(
            samples,
            s.model_cfg,
            buckets=s.buckets,
            padding_side=s.padding_side,
            capacity=caps,
            num_frames=s.frames,
            clip_length=s.clip_length,
            micro_batches=s.micro_batches,
            groups=s.fixed_groups,
        )
        batch["valid"] = np.array([r["status"] == "ok" for r in rows])

        def ids(r):
            if r["source"] < 0 or r["status"] == "pad":
                return ""
            return f"{s.source_names[r['source']]}:{r['index']}"

        batch["meta"] = {
            "ids": [ids(r) for r in rows],
            "source": np.array([r["source"] for r in rows], np.int32),
            "index": np.array([r["index"] for r in rows], np.int32),
            "epoch": np.array([r["epoch"] for r in rows], np.int32),
            "position": np.array([r["position"] for r in rows], np.int32),
            "status": [r["status"] for r in rows],
            "skipped": dict(self._skipped),
        }
        if s.dpo:
            n = len(rows) // 2
            batch["meta"]["dpo_role"] = ["chosen"] * n + ["rejected"] * n
        return batch

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            "skipped": dict(self._skipped),
            "batches": self._batches,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = dict(state["skipped"])
        self._batches = int(state["batches"])
        self._ep, self._ep_full = None, False  # resumed inside an epoch: not checked whole
        self._publish()

    def __str__(self) -> str:
        return "_BatchIterator"


# --------------------------------------------------------------------------------------
# Public entry point


def _ensure_flags_parsed() -> None:
    """grain's worker start reads absl flags; outside an absl app (tests, notebooks) they are
    unparsed, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _source_name(src: ann.AnnotationSource) -> str:
    return src.name or os.path.basename(src.path)


class Pipeline:
    """The data pipeline of one host.

    Args:
      config: the ``data`` ConfigDict (see :func:`default_config`; missing fields take the
        defaults, unknown fields are an error).
      model_config: the PPLLaVA config (any object with ``vision.image_size``,
        ``vision.patch_size``, ``pooling``, ``pooling_kernel``, ``pooling_stride``,
        ``image_pooling_kernel``, ``image_pooling_stride``, ``pllava_pooling_shape``,
        ``image_grid_pinpoints``, ``image_token_index``, ``pad_token_id``).

    samples: optional, one list of ``annotations.Sample`` per ``data.sources`` entry, used
      instead of reading the sources' files (evaluation feeds its questions in memory, e.g.
      :func:`eval_sample`; the sources then only name them).

    Use ``it = pipeline.iterator()``; ``next(it)`` gives a batch (module docstring);
    ``it.get_state()`` / ``it.set_state(state)`` checkpoint and resume it; close it with
    ``it.close()`` when workers are used (``pipeline.close()`` closes all).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict | Mapping,
        model_config: Any,
        samples: Sequence[Sequence[ann.Sample]] | None = None,
    ):
        cfg = default_config()
        given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        unknown = sorted(set(given) - set(cfg.keys()))
        if unknown:
            raise ValueError(
                f"unknown data config fields {unknown}; known fields: {sorted(cfg.keys())}"
            )
        cfg.update(given)
        validate_config(cfg, model_config)
        if cfg.shard_count < 0:
            import jax

            cfg.shard_index, cfg.shard_count = jax.process_index(), jax.process_count()
        self.config = cfg
        self.model_config = model_config
        self._iterators: list = []
        self._skipped: dict[str, int] = {}
        self.preprocess = _Preprocess(cfg, model_config)
        if cfg.array_record:
            from ppllava_jax.data import tfds_builder

            self.record_source = tfds_builder.RecordSource(cfg.array_record)
            self.record_source.check(cfg)
            self.sources = [ann.AnnotationSource(path=cfg.array_record, name="array_record")]
            self.samples = None
            sizes, weights = [len(self.record_source)], [1.0]
            self.load_skipped: dict[str, int] = dict(self.record_source.info.get("skipped", {}))
        else:
            self.record_source = None
            self.sources = [
                s if isinstance(s, ann.AnnotationSource) else ann.AnnotationSource.from_config(s)
                for s in cfg.sources
            ]
            counter = _LoadCounter()
            load = load_dpo_annotation_file if cfg.dpo else ann.load_annotation_file
            if samples is not None:  # given in memory (evaluation), one list per source
                if len(samples) != len(self.sources):
                    raise ValueError(
                        f"{len(samples)} sample lists for {len(self.sources)} data.sources"
                    )
                self.samples = [list(x) for x in samples]
            else:
                self.samples = [
                    load(s.path, s.data_root, s.media_type, cfg.on_error, counter)
                    for s in self.sources
                ]
            self.load_skipped = dict(counter.by_reason)
            sizes, weights = [len(x) for x in self.samples], [s.weight for s in self.sources]
            self.preprocess.samples = self.samples
            if samples is None and not any(n for n in sizes):
                raise DataError(_no_samples_message(self.sources, counter))
        self.order = _Order(
            sizes,
            weights,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            training=cfg.training,
            num_epochs=cfg.num_epochs,
            shard_index=cfg.shard_index,
            shard_count=cfg.shard_count,
        )

    # -- sizes
    @property
    def samples_per_epoch(self) -> int:
        """Samples this host reads in epoch 0 (including eval padding rows)."""
        return self.order.shard_length(0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch of this host if no sample is skipped (eval: exact)."""
        n, b = self.samples_per_epoch, self.config.batch_size
        return n // b if self.config.training else -(-n // b)

    def sample(self, source: int, index: int) -> ann.Sample:
        """The annotation behind ``meta['source'][i], meta['index'][i]`` (e.g. eval answers)."""
        if self.samples is None:
            raise ValueError("samples of an array_record split are not kept; read its info")
        return self.samples[source][index]

    def skipped_counts(self) -> dict[str, int]:
        """Latest cumulative skip counts by reason, as seen by the most recent iterator (it
        runs ``prefetch_batches`` ahead of the consumer; ``batch['meta']['skipped']`` is the
        exact count up to that batch)."""
        return dict(self._skipped)

    # -- grain graph
    def dataset(self) -> grain.IterDataset:
        cfg = self.config
        ds = grain.MapDataset.source(self.order)
        if self.record_source is not None:
            from ppllava_jax.data import tfds_builder

            ds = ds.map(tfds_builder.RecordMap(self.record_source, self.preprocess))
        else:
            ds = ds.map(self.preprocess)
        threads = max(1, int(cfg.read_threads))
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        )
        if cfg.num_workers > 0:
            _ensure_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=int(cfg.num_workers), per_worker_buffer_size=int(cfg.worker_buffer)
                )
            )
        names = [_source_name(s) for s in self.sources]
        spec = _BatchSpec(cfg, self.model_config, self.preprocess.frames, names, self.load_skipped)
        ds = _BatchIterDataset(ds, spec, self._skipped)
        if cfg.prefetch_batches > 0:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=int(cfg.prefetch_batches)
            )
        return ds

    def iterator(self, state: dict | None = None) -> grain.DatasetIterator:
        """A fresh iterator (optionally restored from ``state``)."""
        it = self.dataset().__iter__()
        if state is not None:
            it.set_state(copy.deepcopy(state))
        self._iterators.append(it)
        return it

    def reshard_state(self, states: Sequence[dict], shard_index: int, shard_count: int) -> dict:
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
            k = _consumed(st["parent"])
            e, off = self.order.resharded(p, old_n).locate(k)
            pos = (e, off * old_n + p)
            cursor = pos if cursor is None else min(cursor, pos)
        epoch, pos = cursor or (0, 0)
        new = self.order.resharded(shard_index, shard_count)
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
            "parent": _with_consumed(states[0]["parent"], k),
            "skipped": skipped,
            "batches": int(states[0].get("batches", 0)),
        }

    def close(self) -> None:
        for it in self._iterators:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._iterators.clear()


def _consumed(state: dict) -> int:
    """Samples of its shard a grain iterator (``get_state()``) has consumed."""
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state and not state.get("future_states"):
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    raise ValueError(f"cannot read the position of a data iterator state {state!r}")


def _with_consumed(state: dict, k: int) -> dict:
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


def make_pipeline(
    config: ml_collections.ConfigDict | Mapping, model_config: Any, **overrides
) -> Pipeline:
    """``Pipeline`` with config fields overridden by keyword (e.g. ``training=False``)."""
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    given.update(overrides)
    return Pipeline(given, model_config)


def split_meta(batch: dict) -> tuple[dict, dict]:
    """(arrays for the jitted step, meta) — ``meta`` removed from a shallow copy."""
    batch = dict(batch)
    return batch, batch.pop("meta", {})


__all__ = [
    "Pipeline",
    "SKIP_REASONS",
    "anyres_views_uint8",
    "default_config",
    "eval_sample",
    "load_dpo_annotation_file",
    "make_pipeline",
    "max_views",
    "merged_length",
    "parse_dpo_sample",
    "skip_reason",
    "split_meta",
    "validate_config",
]
