"""Qwen training samples and frame sampling exactly as the original (``training`` of the Qwen
protocol fixture): every ``training.samples`` case through the training pipeline's sample
encoder with a Qwen2 + SigLIP model config and the fixture's Qwen2 tokenizer (the rendered
``plain_qwen`` text, input_ids and labels exactly, the text given to the SigLIP tokenizer and
the strategies its arguments give, the frames, images or numbered files read, the samples the
original skips); every ``training.frame_sampling`` case through the frame sampler and, on a
folder of ``vlen`` numbered frames annotated with ``total_frames``, through the decoder.

The media are written here under the recorded relative paths (tiny mp4 videos, PNG images,
frame folders; image k is coloured by k); nothing is specific to the public cases.
"""

import json
import os

import numpy as np
import pytest

from ppllava_jax.data import frame_index as fidx
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data.errors import DataError
from ppllava_jax.data.numbered_frames import FILE_PATTERN, FIRST_NUMBER
from ppllava_jax.data.tokenizers import train_clip_tokenizer
from tests.data.helpers import tiny_qwen_model
from tests.evaluate.protocol.training_cases import (
    RecordingTokenizer,
    _annotation,
    _check_rand_draws,
    _frames_read,
    _write_mp4,
    _write_png,
)
from tests.evaluate.protocol_qwen.fixture import case_ids, protocols, tokenizer_dir

_TRAINING = protocols()["training"]
_SAMPLES = _TRAINING["samples"]
_SAMPLING = _TRAINING["frame_sampling"]
_TEMPLATE = _TRAINING["protocol"]["template"]
_ROLL = 300  # seeds of the rand checks


def _model():
    special = protocols()["tokenizer"]["special_ids"]
    pad = protocols()["tokenizer"]["pad_token"]
    return tiny_qwen_model(int(special["<image>"]), pad_token_id=int(special[pad]))


@pytest.fixture(scope="module")
def qwen_training_prompt_tokenizer(tmp_path_factory):
    """A stand-in for SigLIP's tokenizer (no SigLIP vocabulary offline): the text and the
    arguments it receives are what is compared."""
    d = tmp_path_factory.mktemp("siglip_standin")
    texts = [s.get("clip_text", "") for s in _SAMPLES] + ["a video of a person", "user assistant"]
    train_clip_tokenizer(texts * 3, d, num_merges=64)
    return str(d)


# ------------------------------------------------------------------ media coding the index


def _number(name: str) -> int:
    return int(os.path.splitext(os.path.basename(name))[0])


# ------------------------------------------------------------------ training samples


def _effective_frames(case: dict, n_files: int | None) -> int:
    """The original's frame count: ``num_frames_arg`` (-1: 8 for decord, min(n, 32) for
    rawframe, where n is ``total_frames`` when given)."""
    reader = case.get("media_reader") or {}
    arg = int(reader.get("num_frames_arg", (case.get("dataset_cfg") or {}).get("num_frames", -1)))
    if arg != -1:
        return arg
    if reader.get("reader", "decord") == "rawframe" and n_files:
        return min(n_files, 32)
    return 8


def _write_media(tmp: str, case: dict) -> dict:
    """Writes the case's media under its relative paths; returns what the checks need."""
    ann = case["annotation"]
    reader = case.get("media_reader") or {}
    missing = {os.path.basename(f) for f in case.get("missing_files") or []}
    images = ann.get("multi-image", ann.get("image"))  # the original reads ann[media_type]
    if isinstance(images, list):  # multi-image: image k (of the annotation's list) has colour k
        for k, rel in enumerate(images):
            if os.path.basename(rel) not in missing:
                _write_png(os.path.join(tmp, rel), k)
        return {"kind": "multi", "paths": list(images)}
    if isinstance(images, str):
        if os.path.basename(images) not in missing:
            _write_png(os.path.join(tmp, images), 0, size=(20, 30))
        return {"kind": "image"}
    rel = ann["video"]
    if "total_frames" in ann:  # numbered files: file number k has colour k - FIRST_NUMBER
        total = int(ann["total_frames"])
        names = {os.path.basename(f) for f in reader.get("files_read", [])}
        names |= {FILE_PATTERN.format(k + FIRST_NUMBER) for k in range(total)}
        for name in sorted(names - missing):
            _write_png(os.path.join(tmp, rel, name), _number(name) - FIRST_NUMBER)
        return {"kind": "numbered", "total": total}
    if reader.get("reader") == "rawframe":  # a listed frame folder: the files the original read
        names = sorted({os.path.basename(f) for f in reader.get("files_read", [])} - missing)
        for k, name in enumerate(names):
            _write_png(os.path.join(tmp, rel, name), k)
        return {"kind": "folder", "names": names}
    n = 3 * _effective_frames(case, None)
    if os.path.basename(rel) not in missing:
        _write_mp4(os.path.join(tmp, rel), n)
    return {"kind": "video", "vlen": n}


def _pipeline(tmp, annotation: dict, num_frames: int, **kw) -> pl.Pipeline:
    path = os.path.join(tmp, "train.json")
    with open(path, "w") as f:
        json.dump([annotation], f)
    cfg = dict(
        sources=[dict(path=path, data_root=str(tmp))],
        template=_TEMPLATE,
        tokenizer=tokenizer_dir(),
        num_frames=num_frames,
        max_length=8192,
        buckets=[8192],
        batch_size=1,
        prefetch_batches=0,
        training=True,
        on_error="raise",
    )
    cfg.update(kw)
    return pl.Pipeline(cfg, _model())


def _strategies(tok, kw: dict) -> dict:
    """What transformers derives from a call's padding / truncation / max_length arguments
    (``PreTrainedTokenizerBase._get_padding_truncation_strategies``, the fixture's
    ``clip_tokenizer_effective``)."""
    args = {k: kw[k] for k in ("padding", "truncation", "max_length") if k in kw}
    padding, truncation, max_length, _ = tok._get_padding_truncation_strategies(**args)
    return {"padding": padding.value, "truncation": truncation.value, "max_length": max_length}


def _expected_files(case: dict) -> list[str]:
    """The files the original read successfully, in the order it read them (a missing file's
    failed attempt left out)."""
    missing = {os.path.basename(f) for f in case.get("missing_files") or []}
    files = [os.path.basename(f) for f in case["media_reader"].get("files_read", [])]
    return [f for f in files if f not in missing]


def _check_numbered(case: dict, got: list[int], frames: int, total: int) -> None:
    """``got``: per frame, the number of the file read minus FIRST_NUMBER. Deterministic cases:
    the file of each distinct frame index (in the order first read) is the one the original
    read for it (``files_read`` without the failed attempts), and every frame shows it."""
    reader = case["media_reader"]
    assert len(got) == frames
    if reader.get("deterministic", "frame_indices" in reader):
        indices = [int(i) for i in reader["frame_indices"]]
        first = {i: j for j, i in reversed(list(enumerate(indices)))}
        order = list(dict.fromkeys(indices))
        read = [FILE_PATTERN.format(got[first[i]] + FIRST_NUMBER) for i in order]
        assert read == _expected_files(case)
        by_index = dict(zip(order, read))
        names = [FILE_PATTERN.format(k + FIRST_NUMBER) for k in got]
        assert names == [by_index[i] for i in indices]
    else:  # one file per sampled frame: its own number or, missing, the next one's
        assert all(0 <= k <= total for k in got), got


@pytest.mark.parametrize("case", _SAMPLES, ids=case_ids(_SAMPLES))
def test_qwen_training_sample(case, tmp_path, qwen_training_prompt_tokenizer):
    media = _write_media(str(tmp_path), case)
    n_files = media.get("total") or len(media.get("names", media.get("paths", []))) or None
    frames = _effective_frames(case, n_files)
    kw = case.get("clip_tokenizer_kwargs") or _TRAINING.get("clip_tokenizer_kwargs")
    clip_kw = dict(clip_tokenizer=qwen_training_prompt_tokenizer)
    if kw and "max_length" in kw:
        clip_kw["clip_max_length"] = int(kw["max_length"])
    if "skipped" in case:  # the original skips the sample: the project refuses it too
        with pytest.raises(DataError) as err:
            pipe = _pipeline(tmp_path, _annotation(case), frames, **clip_kw)
            pipe.preprocess.decode(pipe.samples[0][0], 0, 0)
        missing = [os.path.basename(f) for f in case.get("missing_files") or []]
        assert not missing or any(m in str(err.value) for m in missing), str(err.value)
        return
    pipe = _pipeline(tmp_path, _annotation(case), frames, **clip_kw)
    rec_tok = RecordingTokenizer(pipe.preprocess.clip_tokenizer)
    pipe.preprocess._clip_tok = rec_tok
    sample = pipe.samples[0][0]
    rec = pipe.preprocess.decode(sample, 0, 0)

    # the rendered plain_qwen conversation, its ids and labels (no BOS: the text is llm_text)
    kept = len(rec["pixels"]) if rec["kind"] == "multi" else None  # images kept
    enc = pipe.preprocess.encode_text(sample, list(sample.turns), original=True, num_images=kept)
    assert enc.text == case["llm_text"] and enc.clip_text == case["clip_text"]
    assert rec["input_ids"].tolist() == case["input_ids"]
    assert rec["labels"].tolist() == case["labels"]
    # the SigLIP call: the whole conversation; its arguments give the original's strategies
    (text, got_kw), *more = rec_tok.calls
    assert not more and text == case["clip_text"]
    assert {k: got_kw.get(k) for k in kw} == kw and got_kw.get("add_special_tokens", True)
    effective = case.get("clip_tokenizer_effective")
    if effective:
        assert _strategies(rec_tok.tok, got_kw) == effective
    # the ids the original's own call (its keyword arguments) gives with the same tokenizer
    assert rec["clip_ids"].tolist() == list(rec_tok.tok(case["clip_text"], **kw)["input_ids"])
    assert (rec["clip_mask"] == 1).all()  # no mask in the original: every position is real

    reader = case.get("media_reader") or {}
    if media["kind"] == "multi":  # the original's (sorted) order; beyond 32 images a subset
        order = _frames_read(rec, 8)
        read = [media["paths"][k] for k in order]
        assert rec["kind"] == "multi" and read == sorted(read) and len(set(read)) == len(read)
        assert len(read) == len(reader.get("frame_indices", media["paths"]))
        if reader.get("deterministic", True) and "files_read" in reader:
            want = _expected_files(case)
            assert len(read) == len(want)
            assert all(w == os.path.basename(r) for w, r in zip(want, read))
    elif media["kind"] == "numbered":
        assert rec["kind"] == "video"
        _check_numbered(case, _frames_read(rec, 8), frames, media["total"])
    elif media["kind"] == "folder":
        got = _frames_read(rec, 8)
        assert len(got) == frames
        if reader.get("deterministic", "frame_indices" in reader):
            assert got == [int(i) for i in reader["frame_indices"]]
            names = list(dict.fromkeys(media["names"][i] for i in got))
            assert names == _expected_files(case)
    elif media["kind"] == "video":
        got = _frames_read(rec, 16)
        assert rec["kind"] == "video" and len(got) == frames
        ranges = fidx.segment_ranges(frames, media["vlen"])
        assert all(lo <= i < hi for i, (lo, hi) in zip(got, ranges)), got
    else:
        assert rec["kind"] == "image" and rec["image_size"].tolist() == [20, 30]


# ------------------------------------------------------------------ frame sampling


@pytest.mark.parametrize("case", _SAMPLING, ids=case_ids(_SAMPLING))
def test_qwen_training_frame_sampling(case):
    t, vlen, mode = int(case["num_frames"]), int(case["vlen"]), case["sample"]
    if mode == "rand":
        ranges = fidx.segment_ranges(t, vlen)
        if "segment_ranges" in case:
            assert ranges == [tuple(r) for r in case["segment_ranges"]]
        else:  # the original tries segments until the first empty one, then falls back
            tried = [tuple(r) for r in case["segment_ranges_tried"]]
            first_empty = next(k for k, (lo, hi) in enumerate(ranges) if hi <= lo)
            assert ranges[: first_empty + 1] == tried
        draws = np.stack([fidx.sample_indices(vlen, t, "rand", rng=s) for s in range(_ROLL)])
        _check_rand_draws(case, draws)
    else:
        kw = dict(input_fps=case.get("input_fps", 1), max_num_frames=case.get("max_num_frames", -1))
        got = fidx.frame_indices(t, vlen, mode, fix_start=case.get("fix_start"), **kw)
        assert got.tolist() == case["frame_indices"]


_DECODER_SAMPLING = [
    c for c in _SAMPLING if c["sample"] in fidx.SAMPLING_MODES and c.get("fix_start") is None
]


@pytest.mark.parametrize("case", _DECODER_SAMPLING, ids=case_ids(_DECODER_SAMPLING))
def test_qwen_training_frame_sampling_through_numbered_folders(
    case, tmp_path, qwen_training_prompt_tokenizer
):
    """A folder of ``vlen`` numbered frames annotated with ``total_frames`` (as LLaVA-Hound's
    are), decoded by the training pipeline: the frames read follow the case (``middle``
    exactly, ``rand`` inside its segments or, in the fallback, a sorted subset)."""
    t, vlen, mode = int(case["num_frames"]), int(case["vlen"]), case["sample"]
    for k in range(vlen):
        _write_png(str(tmp_path / "clip" / FILE_PATTERN.format(k + FIRST_NUMBER)), k, size=(4, 4))
    ann = {"video": "clip", "total_frames": vlen, "QA": [{"q": "What happens?", "a": "This."}]}
    pipe = _pipeline(
        tmp_path,
        ann,
        t,
        clip_tokenizer=qwen_training_prompt_tokenizer,
        frame_sampling=mode,
        clip_max_length=int(_TRAINING["samples"][0]["clip_tokenizer_kwargs"]["max_length"]),
    )
    positions = range(_ROLL // 30 if mode == "rand" else 1)
    draws = np.array(
        [_frames_read(pipe.preprocess.decode(pipe.samples[0][0], 0, p), 8) for p in positions]
    )
    if mode == "middle":
        assert draws[0].tolist() == case["frame_indices"]
    elif "segment_ranges" in case:
        for k, (lo, hi) in enumerate(case["segment_ranges"]):
            assert ((draws[:, k] >= lo) & (draws[:, k] < hi)).all()
    else:
        acc = min(t, vlen)
        assert (np.diff(draws[:, :acc], axis=1) > 0).all()
        assert (draws[:, acc:] == draws[:, acc - 1 : acc]).all()
