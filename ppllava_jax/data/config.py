"""The ``data`` section of a config: its fields (every one documented), the settings that
follow from the model, and the checks that fail before any decoding or compilation.

Settings the model fixes are not data fields: the tower input size S is
``model.vision.image_size`` and the any-resolution grids are ``model.image_grid_pinpoints``
(:func:`tower_size`, :func:`grid_pinpoints`); a data config that still sets them is an error
naming the model field.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import templates as tpl
from ppllava_jax.data.collate import Planner
from ppllava_jax.data.frame_index import SAMPLING_MODES
from ppllava_jax.data.video import FOLDER_ORDERS
from ppllava_jax.layout import GROUPS

# former data fields that the model now fixes: field -> the model field it comes from
FROM_MODEL = {
    "image_size": "model.vision.image_size",
    "image_grid_pinpoints": "model.image_grid_pinpoints",
}


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
    # honour an annotation's start/end (or bound) when training; the original never passes
    # them to its readers in training, so off (evaluation always honours them)
    c.training_bounds = False
    # N, images per multi-image sample (static). The original keeps up to 32 and samples more
    # down to 32 (sorted paths, its frame rule: `frame_sampling`, a random subset in training)
    c.max_images = 32
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
    # <image>\n, </s> and the system instruction included); question: always the last
    # question (the one the chat pools the video for when it is asked). A model whose
    # projector and text tower train from scratch learns to read the answer out of a
    # conversation prompt (the pooling weights depend on it), which is absent
    # at evaluation: the demo uses "question".
    c.clip_prompt = "conversation"
    # Training samples: original = the authors' Interleave_sft_dataset (plain_v1 / vicuna_v1 /
    # plain_qwen: the text split at the assistant role, each piece tokenized alone, its label
    # rule, the CLIP / SigLIP prompt the whole rendered conversation; with the legacy Llama
    # tokenizer an unsupervised '▁' follows every 'ASSISTANT: '; original_text.
    # encode_training_sample); offsets = the whole text tokenized with character offsets, exactly
    # the answers and their end tokens supervised (the demos and evaluation always use it; DPO
    # pairs with vicuna_v1 and 'original' are the original's train_dpo.py samples, data/dpo.py).
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


def resolve_config(config: ml_collections.ConfigDict | Mapping) -> ml_collections.ConfigDict:
    """:func:`default_config` updated with ``config`` (a ConfigDict or a mapping); a field the
    defaults lack is a ValueError naming it (with the known fields, or the model field that now
    holds its value)."""
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    check_fields(given)
    cfg = default_config()
    cfg.update(given)
    return cfg


def check_fields(given: Mapping | ml_collections.ConfigDict) -> None:
    """ValueError for a field of ``given`` that is no data field (see :func:`resolve_config`)."""
    for field, source in FROM_MODEL.items():
        if field in given:
            raise ValueError(
                f"data.{field} is no longer a data setting: it comes from the model "
                f"({source}); remove data.{field} from the config"
            )
    known = set(default_config().keys())
    unknown = sorted(set(given.keys()) - known)
    if unknown:
        raise ValueError(f"unknown data config fields {unknown}; known fields: {sorted(known)}")


def tower_size(model_cfg: Any) -> int:
    """S, the vision tower's input size (``model.vision.image_size``)."""
    return int(model_cfg.vision.image_size)


def grid_pinpoints(model_cfg: Any) -> list[tuple[int, int]]:
    """Any-resolution grids (height, width) of single images: ``model.image_grid_pinpoints``."""
    return [(int(h), int(w)) for h, w in model_cfg.image_grid_pinpoints]


def max_views(image_size: int, pinpoints: Sequence[Sequence[int]]) -> int:
    """Most any-resolution views of one image: the base view + the largest grid."""
    return 1 + max((int(h) // image_size) * (int(w) // image_size) for h, w in pinpoints)


def frames_per_group(cfg: ml_collections.ConfigDict, model_cfg: Any) -> dict[str, int]:
    """Frames / views per item of each media group: ``data.num_frames`` per video, the most
    any-resolution views of an image, ``data.max_images`` per multi-image sample."""
    return {
        "video": int(cfg.num_frames),
        "image": max_views(tower_size(model_cfg), grid_pinpoints(model_cfg)),
        "multi": int(cfg.max_images),
    }


def validate_config(cfg: ml_collections.ConfigDict, model_cfg: Any) -> None:
    """Fail before any decoding or compilation, saying what to change (ValueError).

    ``cfg``: a resolved data config (:func:`resolve_config`); ``model_cfg``: the PPLLaVA config
    whose tower size, pinpoints and pooling the data must fit."""
    check_fields(cfg)

    def bad(field: str, msg: str):
        raise ValueError(f"data.{field}: {msg}")

    if not cfg.sources and not cfg.array_record:
        bad(
            "sources",
            'no annotation files given: set --config.data.sources=\'[{"path": FILE, '
            '"data_root": MEDIA_DIR}]\' (the format: examples/my_videos/train.json, README '
            "'Fine-tune on your own videos'), or data.array_record",
        )
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
    if cfg.get("frame_folder_order", "name") not in FOLDER_ORDERS:
        bad("frame_folder_order", f"{cfg.frame_folder_order!r}; use one of {FOLDER_ORDERS}")
    if cfg.get("tokenizer_legacy") not in (True, False, None):
        bad("tokenizer_legacy", f"{cfg.tokenizer_legacy!r}; use True, False or None")
    if cfg.padding_side not in ("left", "right"):
        bad("padding_side", f"{cfg.padding_side!r}; use 'left' or 'right'")
    if cfg.frame_sampling not in ("",) + SAMPLING_MODES:
        bad("frame_sampling", f"{cfg.frame_sampling!r}; use '', 'rand' or 'middle'")
    if cfg.group_capacity not in ("batch", "pow2"):
        bad("group_capacity", f"{cfg.group_capacity!r}; use 'batch' or 'pow2'")
    unknown_groups = [g for g in cfg.fixed_groups if g not in GROUPS]
    if unknown_groups or len(set(cfg.fixed_groups)) != len(list(cfg.fixed_groups)):
        bad("fixed_groups", f"{list(cfg.fixed_groups)}; use distinct ones of {list(GROUPS)}")
    tpl.get_template(cfg.template)
    for f in ("batch_size", "num_frames", "clip_max_length", "max_length"):
        if int(cfg[f]) <= 0:
            bad(f, f"must be positive, got {cfg[f]}")
    for f in ("num_workers", "read_threads", "worker_buffer", "prefetch_batches", "num_epochs"):
        if int(cfg[f]) < 0:
            bad(f, f"must be >= 0, got {cfg[f]}")
    buckets = list(cfg.buckets) if isinstance(cfg.buckets, (list, tuple)) else [cfg.buckets]
    whole = [b for b in buckets if isinstance(b, numbers.Integral) and not isinstance(b, bool)]
    if not buckets or len(whole) < len(buckets) or min(whole) <= 0:
        bad(
            "buckets",
            f"{buckets}: give positive whole token lengths, e.g. "
            "--config.data.buckets='[512, 1024, 2048]'",
        )
    if cfg.max_length > max(buckets):
        bad(
            "max_length",
            f"{cfg.max_length} exceeds the largest bucket {max(buckets)}; add a bucket >= "
            f"{cfg.max_length} to data.buckets or lower data.max_length",
        )
    tower, pins = tower_size(model_cfg), grid_pinpoints(model_cfg)
    if any(h % tower or w % tower for h, w in pins):
        raise ValueError(
            f"model.image_grid_pinpoints {pins}: every size must be a multiple of the tower "
            f"size model.vision.image_size={tower}"
        )
    planner = Planner(model_cfg)
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
