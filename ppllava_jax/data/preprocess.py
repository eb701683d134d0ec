"""Per-sample preprocessing: an annotation -> a record of numpy arrays (runs in the workers).

Stage A (:meth:`Preprocess.decode`, what the ArrayRecord builder stores): the conversation
templated and tokenized with its labels, the CLIP (or SigLIP) prompt, the media decoded and
resized to the tower size as uint8, the merged length checked against ``data.max_length``.
Stage B (:meth:`Preprocess.finalize`): pixels normalized with the vision tower's mean / std.
A sample that fails becomes a skip record (:func:`ppllava_jax.data.skips.skip_record`).

The per-sample frame-sampling seed is ``[seed, epoch, position]``, so a sample is decoded
identically whatever the worker count and after a resume.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import dpo, numbered_frames, original_text
from ppllava_jax.data import frame_index as fidx
from ppllava_jax.data import image as img
from ppllava_jax.data import templates as tpl
from ppllava_jax.data import video as vid
from ppllava_jax.data.collate import Media, Planner
from ppllava_jax.data.config import frames_per_group, grid_pinpoints, tower_size
from ppllava_jax.data.errors import DataError, SampleTooLongError
from ppllava_jax.data.skips import skip_record
from ppllava_jax.layout import IGNORE_INDEX


def merged_length(planner: Planner, input_ids: np.ndarray, media, frames: dict) -> int:
    """Tokens of the sample once every image token is replaced by its visual tokens."""
    n = len(input_ids)
    if media is None:
        return n
    layouts = planner.local_layout(media, frames[media.kind])
    return n - len(layouts) + sum(len(x) for x in layouts)


class Preprocess:
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
        self.size = tower_size(model_cfg)
        # the family picks the video processor (img.tower_frames): Qwen fits and pads
        self.qwen = bool(getattr(model_cfg, "qwen", False))
        self.pinpoints = grid_pinpoints(model_cfg)
        self.max_images = int(cfg.max_images)
        # training reads whole videos unless data.training_bounds (the original's readers get
        # no bound in training); evaluation honours a sample's bound
        self.use_bounds = not self.training or bool(cfg.get("training_bounds", False))
        self.clip_max_length = int(cfg.clip_max_length)
        self.max_length = int(cfg.max_length)
        self.seed = int(cfg.seed)
        self.generation_prompt = bool(cfg.generation_prompt) and not cfg.training
        self.answer_prefix = cfg.answer_prefix or None
        self.dpo = bool(cfg.get("dpo", False))
        self.tokenizer_legacy = cfg.get("tokenizer_legacy", None)
        # the original's training samples (original_text.encode_training_sample) where they apply
        self.original_encoding = (
            cfg.get("text_encoding", "original") == "original"
            and self.training
            and not self.dpo
            and tpl.get_template(cfg.template).name in original_text.ORIGINAL_TEMPLATES
        )
        # preference pairs as the original's train_dpo.py builds them (data/dpo.py)
        self.original_dpo = (
            self.dpo
            and cfg.get("text_encoding", "original") == "original"
            and tpl.get_template(cfg.template).name == "vicuna_v1"
        )
        self.frame_folder_order = cfg.get("frame_folder_order", "name")
        self.frames = frames_per_group(cfg, model_cfg)
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
    def planner(self) -> Planner:
        if self._planner is None:
            self._planner = Planner(self.model_cfg)
        return self._planner

    def encode_text(
        self,
        sample: ann.Sample,
        turns,
        original: bool = False,
        answer_prefix: str | None = None,
        num_images: int | None = None,
    ) -> tpl.Encoded:
        """``turns`` of ``sample`` tokenized with their labels: the original's training sample
        (``original_text.encode_training_sample``) or ``templates.encode_conversation``;
        ``num_images`` (default ``sample.num_images``): the visual inputs kept."""
        args = (self.tokenizer, turns, self.template, self.model_cfg.image_token_index)
        n = sample.num_images if num_images is None else num_images
        kw = dict(num_images=n, system=sample.system)
        if self.original_dpo:
            return dpo.encode_preference_text(
                self.tokenizer, turns, args[3], **kw, legacy=self.tokenizer_legacy
            )
        if original:
            return original_text.encode_training_sample(*args, **kw)
        return tpl.encode_conversation(
            *args, **kw, training=self.training, answer_prefix=answer_prefix
        )

    # -- stage A: decode + tokenize (uint8 pixels); what tfds_builder stores
    def decode(self, sample: ann.Sample, epoch: int, position: int) -> dict:
        if ann.EVAL_PROMPT in sample.extra:
            return self.decode_exact(sample)
        turns = list(sample.turns)
        if self.generation_prompt:
            turns[-1] = tpl.Turn(turns[-1].q, None)
        rng = np.random.default_rng([self.seed, epoch, position])
        kept = self.multi_image_paths(sample, rng) if sample.media_type == "multi-image" else []
        n_img = len(kept) if kept else None
        if self.original_encoding:  # ids, labels and CLIP text of the original's training sample
            enc = self.encode_text(sample, turns, original=True, num_images=n_img)
        else:
            prefix = self.answer_prefix if self.generation_prompt else None
            enc = self.encode_text(sample, turns, answer_prefix=prefix, num_images=n_img)
        clip_text = enc.clip_text
        if self.clip_prompt == "question":
            clip_text = tpl.clip_text_of(turns, False)
        elif self.dpo and not self.original_dpo:  # the CLIP prompt without the preferred
            # answer, shared by both twins (data/dpo.py's encoding gives the original's)
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
            rejected = [*turns[:-1], tpl.Turn(turns[-1].q, sample.extra["rejected"])]
            rej = self.encode_text(sample, rejected, num_images=n_img)
            rec["rejected_input_ids"] = rej.input_ids.astype(np.int32)
            rec["rejected_labels"] = rej.labels.astype(np.int32)
        mt = sample.media_type
        if mt == "video":
            clip = self.load_video(sample, rng)
            rec["pixels"] = img.tower_frames(clip.frames, self.size, self.qwen)
            rec["kind"] = "video"
        elif mt == "image":
            views, _, hw = img.anyres_views_uint8(
                img.load_image(sample.media[0]), self.size, self.pinpoints
            )
            rec["pixels"], rec["image_size"], rec["kind"] = views, np.asarray(hw, np.int32), "image"
        elif mt == "multi-image":
            images = [img.load_image(p) for p in kept]
            rec["pixels"] = img.tower_frames(images, self.size, self.qwen)
            rec["kind"] = "multi"
        n = self.length_of(rec)
        if n > self.max_length:
            where = sample.media[0] if sample.media else f"{sample.source} [{sample.index}]"
            raise SampleTooLongError(n, self.max_length, path=where)
        rec["length"] = np.int32(n)
        return rec

    def load_video(self, sample: ann.Sample, rng: np.random.Generator) -> vid.Clip:
        """T sampled frames of a video sample: a frame folder with ``total_frames`` as the
        original reads one (``numbered_frames``), else ``video.load_video``."""
        bound = sample.bound if self.use_bounds else None
        path = sample.media[0]
        total = sample.extra.get("total_frames")
        if total is not None and os.path.isdir(path):
            return numbered_frames.load_numbered_frames(
                path, total, self.num_frames, self.sampling, rng=rng, bound=bound
            )
        return vid.load_video(
            path,
            self.num_frames,
            self.sampling,
            rng=rng,
            bound=bound,
            folder_order=self.frame_folder_order,
        )

    def multi_image_paths(self, sample: ann.Sample, rng: np.random.Generator) -> list[str]:
        """The images a multi-image sample keeps: its paths sorted (as the original's raw-frame
        reader sorts them), all of them up to ``data.max_images`` (the original: 32), beyond
        that ``max_images`` picked by the frame rule (``frame_index.frame_indices``, in training
        a random subset as the original's ``get_frame_indices(32, n, 'rand')``)."""
        paths = sorted(sample.media)
        if len(paths) <= self.max_images:
            return paths
        keep = fidx.frame_indices(self.max_images, len(paths), self.sampling, rng)
        return [paths[int(i)] for i in keep]

    def decode_exact(self, sample: ann.Sample) -> dict:
        """An exact evaluation sample (:func:`annotations.eval_sample`):
        ``tok(prompt_text).input_ids`` (BOS added by the tokenizer), the CLIP ids of the given
        CLIP text, and exactly the frames of its ``frame_index.FrameRule``. The record also
        holds ``frame_indices`` (int64[T]) and, for frame folders, ``frame_files``."""
        ex = sample.extra
        ids = np.asarray(self.tokenizer(ex[ann.EVAL_PROMPT]).input_ids, np.int32)
        n_img = int((ids == self.model_cfg.image_token_index).sum())
        if n_img != 1:
            raise DataError(
                f"{sample.source} [{ex.get('qid', sample.index)}]: the prompt encodes to "
                f"{n_img} image tokens (id {self.model_cfg.image_token_index}), expected 1: "
                "check that the tokenizer has <image> and the prompt holds it once",
                path=sample.source,
            )
        clip_ids, clip_mask = self.encode_prompt(ex[ann.EVAL_CLIP], False)
        rule = ex[ann.EVAL_FRAMES]
        if int(rule.num_segments) != self.num_frames:
            raise DataError(
                f"{sample.source} [{ex.get('qid', sample.index)}]: frame rule of "
                f"{rule.num_segments} frames in a pipeline of data.num_frames={self.num_frames}",
                path=sample.source,
            )
        clip = vid.load_frames_by_rule(sample.media[0], rule)
        rec = {
            "input_ids": ids,
            "labels": np.full(len(ids), IGNORE_INDEX, np.int32),
            "clip_ids": clip_ids,
            "clip_mask": clip_mask,
            "kind": "video",
            "pixels": img.tower_frames(clip.frames, self.size, self.qwen),
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
        media = media_of(rec)
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
            return dict(out, sample_index=int(sample.index), **skip_record(e, where))
        return dict(out, status="ok", **rec)


def media_of(rec: dict) -> Media | None:
    """The visual input of an ok record (None for text): collate's ``Media``."""
    if not rec.get("kind"):
        return None
    size = rec.get("image_size")
    return Media(rec["kind"], rec["pixels"], None if size is None else tuple(int(x) for x in size))
