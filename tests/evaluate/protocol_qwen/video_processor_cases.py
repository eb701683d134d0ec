"""Qwen video pixels exactly as the original's ``LlavaOnevisionVidProcessor`` (the
``video_processor`` section of the Qwen protocol fixture and its ``pixel_values.npz``).

Every case's input frames go through the project's own functions (``data.image.tower_frames``
for the Qwen family, then ``normalize`` with the family's mean / std): pixel values to 1e-6 (the
fixture is channels-first ``(T, 1, 3, S, S)``, the project channels-last ``(T, S, S, 3)``), the
geometry of each frame (resized, padded, pad rows / columns, stretched), the pad value. Then the
same frames written as a lossless video (PyAV, FFV1) go through the training pipeline of a Qwen
config, through the evaluation's pipeline (``evaluate.runner``) and through the chat's frame
reading: the model's pixels are the fixture's (frames of different sizes: as a multi-image
sample). Sizes and cases all come from the fixture.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import image as img
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data import video as vid
from ppllava_jax.data.frame_index import FrameRule
from ppllava_jax.data.tokenizers import train_clip_tokenizer
from ppllava_jax.models.config import PPLLaVAConfig, ppllava_qwen7b_config
from tests.evaluate.protocol_qwen.fixture import case_ids, pixel_arrays, protocols, tokenizer_dir

VP = protocols()["video_processor"]
VP_PARAMS = VP["params"]
VP_CASES = VP["cases"]
ATOL = 1e-6


def _size() -> int:
    """S: the processor's square output size (``size`` of the loaded processor)."""
    size = VP_PARAMS["loaded"]["size"]
    assert int(size["height"]) == int(size["width"]), size
    return int(size["height"])


def _frames(case: dict) -> list[np.ndarray]:
    """The case's input frames, uint8[H, W, 3] each: ``{id}/frames_uint8`` (T same-size frames)
    or ``{id}/frame{i}_uint8`` (one per frame)."""
    arrays, cid = pixel_arrays(), case["id"]
    if f"{cid}/frames_uint8" in arrays:
        return list(arrays[f"{cid}/frames_uint8"])
    pattern = re.compile(re.escape(cid) + r"/frame(\d+)_uint8$")
    found = {int(m.group(1)): arrays[k] for k in arrays if (m := pattern.match(k))}
    assert sorted(found) == list(range(len(found))) and found, (cid, sorted(found))
    return [found[i] for i in range(len(found))]


def _expected(case: dict) -> np.ndarray:
    """float32[T, S, S, 3]: the fixture's ``(T, 1, 3, S, S)`` (one view per frame) channels-last."""
    ref = pixel_arrays()[f"{case['id']}/pixel_values"]
    assert ref.ndim == 5 and ref.shape[1] == 1 and ref.shape[2] == 3, ref.shape
    return ref[:, 0].transpose(0, 2, 3, 1)


def _qwen_pixels(frames) -> np.ndarray:
    """The project's Qwen pixels: the family's frame rule, then its mean / std."""
    return img.normalize(img.tower_frames(frames, _size(), qwen=True), *img.pixel_stats(True))


def _padded(case: dict) -> bool:
    return any(f["pad_rows"] or f["pad_cols"] for f in case["per_frame"])


def test_processor_settings_are_the_projects():
    """The loaded processor does what ``tower_frames`` + ``normalize`` implement: bicubic,
    x / 255, the SigLIP mean / std (the family's ``pixel_stats``), black padding."""
    p = VP_PARAMS["loaded"]
    assert p["do_resize"] and p["do_rescale"] and p["do_normalize"] and p["do_pad"]
    assert int(p["resample"]) == int(Image.Resampling.BICUBIC)
    assert float(p["rescale_factor"]) == pytest.approx(1 / 255, rel=1e-12)
    mean, std = img.pixel_stats(True)
    np.testing.assert_allclose(p["image_mean"], mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(p["image_std"], std, rtol=0, atol=1e-7)
    assert int(VP_PARAMS["pad_value_uint8"]) == 0
    black = img.normalize(np.zeros((1, 1, 3), np.uint8), mean, std)
    np.testing.assert_allclose(black, VP_PARAMS["pad_value_normalized"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", VP_CASES, ids=case_ids(VP_CASES))
def test_video_processor_pixel_values(case):
    frames = _frames(case)
    assert [list(f.shape[:2]) for f in frames] == [list(hw) for hw in case["frames_hw"]]
    ours = _qwen_pixels(frames)
    expected = _expected(case)
    assert list(case["pixel_values"]["shape"]) == list(
        pixel_arrays()[f"{case['id']}/pixel_values"].shape
    )
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", VP_CASES, ids=case_ids(VP_CASES))
def test_video_processor_geometry(case):
    """resized_hw, padded_hw, the pad on each side and the stretch of an odd difference."""
    frames = _frames(case)
    assert len(frames) == len(case["per_frame"])
    for frame, want in zip(frames, case["per_frame"]):
        assert list(frame.shape[:2]) == list(want["input_hw"])
        g = img.fit_pad_geometry(frame.shape[:2], _size())
        assert list(g.resized_hw) == list(want["resized_hw"])
        assert list(g.padded_hw) == list(want["padded_hw"])
        assert (g.pad_rows, g.pad_cols) == (want["pad_rows"], want["pad_cols"])
        assert g.stretched == bool(want["stretched_to_384"])


@pytest.mark.parametrize("case", VP_CASES, ids=case_ids(VP_CASES))
def test_video_processor_pad_value(case):
    """A padded frame's corner is the recorded pad value (black after normalisation)."""
    if case.get("pad_value_normalized") is None or not _padded(case):
        pytest.skip("no padded frame in this case")
    ours = _qwen_pixels(_frames(case))
    for t, f in enumerate(case["per_frame"]):
        if f["pad_rows"] or f["pad_cols"]:
            np.testing.assert_allclose(ours[t, 0, 0], case["pad_value_normalized"], atol=ATOL)
            np.testing.assert_allclose(ours[t, -1, -1], case["pad_value_normalized"], atol=ATOL)


@pytest.mark.parametrize("case", VP_CASES, ids=case_ids(VP_CASES))
def test_video_processor_cases_tell_the_rules_apart(case):
    """The comparison above fails on a stretched frame and on a one-sided pad (so it pins the
    rule, not only the shapes)."""
    if not _padded(case):
        pytest.skip("no padded frame in this case")
    size, stats, expected = _size(), img.pixel_stats(True), _expected(case)
    stretched = img.normalize(img.resize_frames(_frames(case), size), *stats)
    one_sided = []
    for frame in _frames(case):
        g = img.fit_pad_geometry(frame.shape[:2], size)
        r = img.resize(frame, *g.resized_hw)
        pad = ((0, size - r.shape[0]), (0, size - r.shape[1]), (0, 0))
        one_sided.append(np.pad(r, pad))
    one_sided = img.normalize(np.stack(one_sided), *stats)
    for wrong in (stretched, one_sided):
        assert np.abs(wrong - expected).max() > 100 * ATOL


# ------------------------------------------------------------------ the pipelines


SAME_SIZE = [c for c in VP_CASES if f"{c['id']}/frames_uint8" in pixel_arrays()]
MIXED_SIZE = [c for c in VP_CASES if c not in SAME_SIZE]


def _qwen_model() -> PPLLaVAConfig:
    """The 7B Qwen config (one LLM layer; nothing is built) with the fixture's tower size and
    ``<image>`` id, pooling each frame to one token (the time kernel fits one frame)."""
    cfg = ppllava_qwen7b_config(llm_layers=1)
    size, patch = _size(), cfg.vision.patch_size
    grid = size // patch
    tok = protocols()["tokenizer"]
    ids = tok["special_ids"]
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, image_size=size),
        frame_shape=(grid, grid),
        pooling_kernel=(1, grid, grid),
        pooling_stride=(1, grid, grid),
        image_token_index=int(ids["<image>"]),
        pad_token_id=int(ids[tok["pad_token"]]),
    )


@pytest.fixture(scope="module")
def qwen_clip_dir(tmp_path_factory) -> str:
    """A small SigLIP-side tokenizer (the SigLIP ids are not what these tests check)."""
    d = tmp_path_factory.mktemp("siglip_tok")
    train_clip_tokenizer(["what is shown in the video", "a ramp and a checker"] * 4, d, 16)
    return str(d)


def _write_lossless(path: str, frames: np.ndarray) -> None:
    """The frames as an FFV1 video: decoding gives them back exactly."""
    vid.write_video(path, frames, fps=4.0, codec="ffv1", pix_fmt="bgr0")
    np.testing.assert_array_equal(vid.load_video(path, len(frames)).frames, frames)


def _video_pixels(pipe: pl.Pipeline) -> np.ndarray:
    """float32[T, S, S, 3]: the first batch's video (skips raise: on_error=raise)."""
    try:
        batch, _ = pl.split_meta(next(iter(pipe.iterator())))
    finally:
        pipe.close()
    return np.asarray(batch["video_pixels"][0])


def _training_data(tmp_path, clip_dir: str, frames: int, length: int, **extra) -> dict:
    """A Qwen training data section over ``tmp_path/train.json``: one row, one bucket."""
    return dict(
        sources=[dict(path=str(tmp_path / "train.json"), data_root=str(tmp_path))],
        template="plain_qwen",
        tokenizer=tokenizer_dir(),
        clip_tokenizer=clip_dir,
        num_frames=frames,
        max_length=length,
        buckets=[length],
        batch_size=1,
        prefetch_batches=0,
        training=True,
        on_error="raise",
        **extra,
    )


@pytest.mark.parametrize("case", SAME_SIZE, ids=case_ids(SAME_SIZE))
def test_training_pipeline_pixels(case, tmp_path, qwen_clip_dir):
    """A Qwen config's training pipeline (decode, normalise, collate) on the case's frames
    written as a video: every frame read once, pixels the fixture's."""
    frames = np.stack(_frames(case))
    _write_lossless(str(tmp_path / "clip.mkv"), frames)
    qa = [{"q": "What is shown in the video?", "a": "A ramp."}]
    with open(tmp_path / "train.json", "w") as f:
        json.dump([{"video": "clip.mkv", "QA": qa}], f)
    cfg = _training_data(tmp_path, qwen_clip_dir, len(frames), 256)
    got = _video_pixels(pl.Pipeline(cfg, _qwen_model()))
    np.testing.assert_allclose(got, _expected(case), rtol=0, atol=ATOL)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "template"])
@pytest.mark.parametrize("case", SAME_SIZE, ids=case_ids(SAME_SIZE))
def test_evaluation_pipeline_pixels(case, exact, tmp_path, qwen_clip_dir):
    """The evaluation's pipeline (``evaluate.runner``: its data settings and samples) for an
    exact question (a benchmark's frame rule) and a template one: the fixture's pixels of the
    frames read."""
    from ppllava_jax.evaluate import runner
    from ppllava_jax.evaluate.common import Question

    frames = np.stack(_frames(case))
    path = str(tmp_path / "clip.mkv")
    _write_lossless(path, frames)
    t = len(frames)
    question = "What is shown in the video?"
    if exact:
        prompt = f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
        q = Question("q0", path, prompt_text=prompt, clip_text=question, frames=FrameRule(t))
    else:
        q = Question("q0", path, prompt=question, num_frames=t)
    setup = types.SimpleNamespace(
        cfg=_qwen_model(),
        template="plain_qwen",
        tokenizer_legacy=None,
        tokenizer_dir=tokenizer_dir(),
        clip_tokenizer_dir=qwen_clip_dir,
    )
    data = runner.pipeline_config(
        setup, "eval", "eval", num_frames=t, answer_prefix="", batch_size=1, max_new_tokens=8
    )
    data["on_error"] = "raise"
    sample = runner.pipeline_sample(q, "eval", 0)
    pipe = pl.Pipeline(data, setup.cfg, samples=[[sample]])
    read = pipe.preprocess.decode(sample, 0, 0)
    indices = read.get("frame_indices", vid.load_video(path, t).indices)
    got = _video_pixels(pipe)
    np.testing.assert_allclose(got, _expected(case)[np.asarray(indices)], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", SAME_SIZE, ids=case_ids(SAME_SIZE))
def test_chat_pixels(case, tmp_path):
    """The terminal chat and the web demo (``chat.load_clip`` + ``chat.video_pixels``) on the
    case's frames written as a video, with a Qwen checkpoint's config: the fixture's pixels."""
    from ppllava_jax import chat

    frames = np.stack(_frames(case))
    path = str(tmp_path / "clip.mkv")
    _write_lossless(path, frames)
    clip = chat.load_clip(path, len(frames))
    _, pixels = chat.video_pixels(_qwen_model(), clip.frames)
    np.testing.assert_allclose(pixels, _expected(case)[clip.indices], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", MIXED_SIZE, ids=case_ids(MIXED_SIZE))
def test_training_multi_image_pixels(case, tmp_path, qwen_clip_dir):
    """Frames of different sizes as a Qwen multi-image sample (the original sends those
    through the same video processor): PNG files, read in sorted order."""
    frames = _frames(case)
    names = [f"{i:03d}.png" for i in range(len(frames))]
    for name, frame in zip(names, frames):
        Image.fromarray(frame).save(tmp_path / name)
    qa = [{"q": "What differs between the pictures?", "a": "The ramps."}]
    with open(tmp_path / "train.json", "w") as f:
        json.dump([{"image": names, "QA": qa}], f)
    cfg = _training_data(tmp_path, qwen_clip_dir, len(frames), 8192, max_images=len(frames))
    pipe = pl.Pipeline(cfg, _qwen_model())
    rec = pipe.preprocess.finalize(pipe.preprocess.decode(pipe.samples[0][0], 0, 0))
    pipe.close()
    assert rec["kind"] == "multi"
    np.testing.assert_allclose(rec["pixels"], _expected(case), rtol=0, atol=ATOL)
