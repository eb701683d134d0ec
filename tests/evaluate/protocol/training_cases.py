"""Training samples and frame sampling exactly as the original (``training`` of the protocol
fixture): every ``training.samples`` case through the pipeline's sample encoder (input_ids and
labels with the legacy and the non-legacy tokenizer, the text given to the CLIP tokenizer and
its arguments, the frames or images read), every ``training.frame_sampling`` case through the
frame sampler the decoder calls (and, for ``rand``/``middle``, through the decoder itself on a
frame folder whose images encode their index).

The media are written here under the recorded relative paths (tiny mp4 videos, PNG images and
frame folders); nothing is specific to the public cases.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import frame_index as fidx
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data import video as vid
from ppllava_jax.data.tokenizers import train_clip_tokenizer
from ppllava_jax.models.config import PPLLaVAConfig
from tests.data.frame_rules import check_fallback_draws, check_segment_draws
from tests.data.helpers import tiny_model
from tests.evaluate.protocol.fixture import case_ids, ids_key, protocols, tokenizer_dir

TRAINING = protocols()["training"]
SAMPLES = TRAINING["samples"]
SAMPLING = TRAINING["frame_sampling"]
TEMPLATE = TRAINING["protocol"].get("template", "plain_v1")
ROLL = 300  # seeds of the rand checks


def _model() -> PPLLaVAConfig:
    return tiny_model(int(protocols()["tokenizer"]["image_token"]["id"]), pad_token_id=0)


class RecordingTokenizer:
    """Wraps a CLIP tokenizer and records each text and keyword arguments it is called with
    (the fixture records the same at the original's call)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, text, **kw):
        self.calls.append((text, kw))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    texts = [s["clip_text"] for s in SAMPLES] + ["a video of a person", "USER: ASSISTANT:"]
    train_clip_tokenizer(texts * 3, d, num_merges=64)
    return str(d)


# ------------------------------------------------------------------ media coding the index


def _colour(k: int, step: int) -> tuple[int, int, int]:
    per = 256 // step
    return (step * (k % per) + step // 2, step * (k // per) + step // 2, 128)


def _index(pixel: np.ndarray, step: int) -> int:
    per = 256 // step
    return int(pixel[0]) // step + per * (int(pixel[1]) // step)


def _write_png(path: str, k: int, size=(12, 10)) -> None:
    """An image of colour k (PNG content whatever the name: readers detect the format)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), _colour(k, 8), np.uint8)).save(path, "PNG")


def _write_mp4(path: str, n: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = np.stack([np.full((16, 16, 3), _colour(k, 16), np.uint8) for k in range(n)])
    vid.write_video(path, frames, fps=8.0)


def _frames_read(rec: dict, step: int) -> list[int]:
    px = rec["pixels"]
    return [_index(px[t, px.shape[1] // 2, px.shape[2] // 2], step) for t in range(len(px))]


def _pipeline(tmp, annotation: dict, num_frames: int, legacy=True, **kw) -> pl.Pipeline:
    path = os.path.join(tmp, "train.json")
    with open(path, "w") as f:
        json.dump([annotation], f)
    cfg = dict(
        sources=[dict(path=path, data_root=str(tmp))],
        template=TEMPLATE,
        tokenizer=tokenizer_dir(),
        tokenizer_legacy=legacy,
        num_frames=num_frames,
        max_images=max(32, num_frames),  # the original keeps up to 32 images
        max_length=8192,
        buckets=[8192],
        batch_size=1,
        prefetch_batches=0,
        training=True,
        on_error="raise",
    )
    cfg.update(kw)
    return pl.Pipeline(cfg, _model())


# ------------------------------------------------------------------ training samples


def _effective_frames(case: dict, n_files: int | None) -> int:
    """The original's frame count: ``num_frames_arg`` (-1: 8 for decord, min(n, 32) for
    rawframe, where the multi-image path always passes -1)."""
    reader = case.get("media_reader") or {}
    arg = int(reader.get("num_frames_arg", (case.get("dataset_cfg") or {}).get("num_frames", -1)))
    if arg != -1:
        return arg
    if reader.get("reader", "decord") == "rawframe" and n_files:
        return min(n_files, 32)
    return 8


def _write_media(tmp, case: dict) -> dict:
    """Writes the case's media under its relative paths; returns what the checks need."""
    ann = case["annotation"]
    reader = case.get("media_reader") or {}
    images = ann.get("multi-image", ann.get("image"))  # the original reads ann[media_type]
    if isinstance(images, list):  # multi-image: image k has colour k
        for k, rel in enumerate(images):
            _write_png(os.path.join(tmp, rel), k)
        return {"kind": "multi", "paths": list(images)}
    if "image" in ann:
        _write_png(os.path.join(tmp, ann["image"]), 0, size=(20, 30))
        return {"kind": "image"}
    rel = ann["video"]
    if reader.get("reader") == "rawframe":  # a frame folder: the files the original read
        names = sorted({os.path.basename(f) for f in reader.get("files_read", [])})
        for k, name in enumerate(names):
            _write_png(os.path.join(tmp, rel, name), k)
        return {"kind": "folder", "names": names}
    n = 3 * _effective_frames(case, None)
    _write_mp4(os.path.join(tmp, rel), n)
    return {"kind": "video", "vlen": n}


def _annotation(case: dict) -> dict:
    # read_anno merges the dataset's options (and its media_type) into each annotation
    out = dict(case["annotation"], **(case.get("dataset_cfg") or {}))
    if case.get("media_type"):
        out["media_type"] = case["media_type"]
    return out


def _recorded(recorded: str, rel: str) -> bool:
    return recorded == rel or recorded.endswith("/" + rel)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
@pytest.mark.parametrize("case", SAMPLES, ids=case_ids(SAMPLES))
def test_training_sample(case, legacy, tmp_path, clip_dir):
    media = _write_media(str(tmp_path), case)
    n_files = len(media.get("names", media.get("paths", []))) or None
    frames = _effective_frames(case, n_files)
    kw = case.get("clip_tokenizer_kwargs") or protocols()["meta"]["clip_tokenizer_kwargs"]
    pipe = _pipeline(
        tmp_path,
        _annotation(case),
        frames,
        legacy,
        clip_tokenizer=clip_dir,
        clip_max_length=int(kw["max_length"]),
    )
    rec_tok = RecordingTokenizer(pipe.preprocess.clip_tokenizer)
    pipe.preprocess._clip_tok = rec_tok
    rec = pipe.preprocess.decode(pipe.samples[0][0], 0, 0)

    assert rec["input_ids"].tolist() == case[ids_key(legacy)]
    assert rec["labels"].tolist() == case[ids_key(legacy, "labels")]
    (text, got_kw), *more = rec_tok.calls
    assert not more and text == case["clip_text"]
    assert {k: got_kw.get(k) for k in kw} == kw and got_kw.get("add_special_tokens", True)
    assert rec["clip_ids"].shape == (int(kw["max_length"]),)

    reader = case.get("media_reader") or {}
    if media["kind"] == "multi":  # the original's (sorted) order; beyond 32 images a subset
        order = _frames_read(rec, 8)
        read = [media["paths"][k] for k in order]
        assert rec["kind"] == "multi" and read == sorted(read) and len(set(read)) == len(read)
        n_read = len(reader.get("frame_indices", media["paths"]))
        assert len(read) == n_read
        if reader.get("deterministic", True) and "files_read" in reader:
            assert len(read) == len(reader["files_read"])
            assert all(_recorded(r, p) for r, p in zip(reader["files_read"], read))
    elif media["kind"] == "folder":
        got = _frames_read(rec, 8)
        assert len(got) == frames
        if reader.get("deterministic", "frame_indices" in reader):
            assert got == [int(i) for i in reader["frame_indices"]]
            names = [media["names"][i] for i in got]
            files = [os.path.basename(f) for f in reader.get("files_read", [])]
            assert names[: len(files)] == files or sorted(set(names)) == sorted(set(files))
    elif media["kind"] == "video":
        got = _frames_read(rec, 16)
        assert rec["kind"] == "video" and len(got) == frames
        ranges = fidx.segment_ranges(frames, media["vlen"])
        assert all(lo <= i < hi for i, (lo, hi) in zip(got, ranges)), got
    else:
        assert rec["kind"] == "image" and rec["image_size"].tolist() == [20, 30]


# ------------------------------------------------------------------ frame sampling


def _check_rand_draws(case: dict, draws: np.ndarray) -> None:
    """Draws (int[seeds, T]) follow the rule the fixture records for the case."""
    t, vlen = int(case["num_frames"]), int(case["vlen"])
    acc = min(t, vlen)
    assert draws.shape[1] == t
    assert (draws[:, acc:] == draws[:, acc - 1 : acc]).all()  # padded with the last index
    body = draws[:, :acc]
    if "segment_ranges" in case:  # one uniform draw per segment, never a segment's last frame
        assert len(case["segment_ranges"]) == acc
        check_segment_draws(body, case["segment_ranges"])
    else:  # the fallback: a sorted random subset of acc distinct frames, uniform over them
        check_fallback_draws(body, vlen)


@pytest.mark.parametrize("case", SAMPLING, ids=case_ids(SAMPLING))
def test_frame_sampling(case):
    t, vlen, mode = int(case["num_frames"]), int(case["vlen"]), case["sample"]
    if mode == "rand":
        ranges = fidx.segment_ranges(t, vlen)
        if "segment_ranges" in case:
            assert ranges == [tuple(r) for r in case["segment_ranges"]]
            assert all(hi > lo for lo, hi in ranges)
        else:  # the original tries segments until the first empty one, then falls back
            tried = [tuple(r) for r in case["segment_ranges_tried"]]
            first_empty = next(k for k, (lo, hi) in enumerate(ranges) if hi <= lo)
            assert ranges[: first_empty + 1] == tried
        draws = np.stack([fidx.sample_indices(vlen, t, "rand", rng=s) for s in range(ROLL)])
        _check_rand_draws(case, draws)
        again = fidx.sample_indices(vlen, t, "rand", rng=np.random.default_rng(7))
        np.testing.assert_array_equal(again, fidx.sample_indices(vlen, t, "rand", rng=7))
    else:
        kw = dict(input_fps=case.get("input_fps", 1), max_num_frames=case.get("max_num_frames", -1))
        got = fidx.frame_indices(t, vlen, mode, fix_start=case.get("fix_start"), **kw)
        assert got.tolist() == case["frame_indices"]
        if mode == "middle" and case.get("fix_start") is None:
            assert fidx.sample_indices(vlen, t, "middle").tolist() == case["frame_indices"]


PIPELINE_SAMPLING = [
    c for c in SAMPLING if c["sample"] in fidx.SAMPLING_MODES and c.get("fix_start") is None
]


@pytest.mark.parametrize("case", PIPELINE_SAMPLING, ids=case_ids(PIPELINE_SAMPLING))
def test_frame_sampling_through_the_decoder(case, tmp_path, clip_dir):
    """A frame folder of ``vlen`` images, each coloured by its index, decoded by the training
    pipeline: the frames it reads follow the case (``middle`` exactly, ``rand`` in the ranges)."""
    t, vlen, mode = int(case["num_frames"]), int(case["vlen"]), case["sample"]
    for k in range(vlen):
        _write_png(str(tmp_path / "clip" / f"{k:06d}.png"), k, size=(4, 4))
    ann = {"video": "clip", "QA": [{"q": "What happens?", "a": "Something."}]}
    pipe = _pipeline(tmp_path, ann, t, clip_tokenizer=clip_dir, frame_sampling=mode)
    positions = range(ROLL // 30 if mode == "rand" else 1)
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
