"""Per-sample preprocessing (data/preprocess.py): one annotation -> one record."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import frame_index as F
from ppllava_jax.data import image as img
from ppllava_jax.data import templates as tpl
from ppllava_jax.data import video as vid
from ppllava_jax.data.config import resolve_config
from ppllava_jax.data.errors import DataError, SampleTooLongError
from ppllava_jax.data.frame_index import FrameRule
from ppllava_jax.data.preprocess import Preprocess
from ppllava_jax.layout import IGNORE_INDEX
from tests.data.helpers import data_cfg, tiny_model


def _pre(data, **kw):
    out, info = data
    cfg = resolve_config(data_cfg(out, **dict(dict(text_encoding="offsets"), **kw)))
    samples = ann.load_annotation_file(os.path.join(out, "train.json"), out)
    return Preprocess(cfg, tiny_model(info["image_token_id"]), [samples]), samples


def test_video_record(data):
    pre, samples = _pre(data)
    s = samples[0]
    rec = pre.decode(s, epoch=0, position=5)
    ids, labels = rec["input_ids"], rec["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    assert int((ids == pre.model_cfg.image_token_index).sum()) == 1
    sup = labels != IGNORE_INDEX
    assert pre.tokenizer.decode(ids[sup]).strip() == s.turns[0].a + pre.tokenizer.eos_token
    assert rec["kind"] == "video" and rec["pixels"].shape == (4, 32, 32, 3)
    assert rec["pixels"].dtype == np.uint8
    # training frames: 'rand' seeded by [seed, epoch, position]
    rng = np.random.default_rng([1, 0, 5])
    want = vid.load_video(s.media[0], 4, "rand", rng=rng, folder_order="name")
    np.testing.assert_array_equal(rec["pixels"], img.resize_frames(want.frames, 32))
    again = pre.decode(s, epoch=0, position=5)
    np.testing.assert_array_equal(again["pixels"], rec["pixels"])
    # merged length: the text with its image token replaced by (4/2) x 2 x 2 = 8 visual tokens
    assert rec["length"] == len(ids) - 1 + 8
    assert rec["clip_ids"].shape == rec["clip_mask"].shape == (32,)
    # stage B: the CLIP tower's normalization
    fin = pre.finalize(rec)
    np.testing.assert_allclose(fin["pixels"], img.normalize(rec["pixels"]))


def test_evaluation_prompt_and_clip_question(data):
    pre, samples = _pre(data, training=False, generation_prompt=True, answer_prefix="Best:(")
    s = samples[1]
    rec = pre.decode(s, 0, 0)
    assert (rec["labels"] == IGNORE_INDEX).all()
    text = pre.tokenizer.decode(rec["input_ids"])
    assert text.endswith("ASSISTANT: Best:(")  # the answer is left for the model
    # evaluation: the CLIP prompt is the question alone (training: the whole conversation)
    want_ids, _ = pre.encode_prompt(tpl.clip_text_of(s.turns, False), False)
    np.testing.assert_array_equal(rec["clip_ids"], want_ids)
    mid = vid.load_video(s.media[0], 4, "middle")
    np.testing.assert_array_equal(rec["pixels"], img.resize_frames(mid.frames, 32))


def test_items_pad_skip_and_too_long(data, tmp_path):
    pre, samples = _pre(data)
    item = dict(epoch=2, position=7, source=0, index=3, pad=False)
    ok = pre(item)
    assert ok["status"] == "ok" and ok["pixels"].dtype == np.float32
    assert {k: ok[k] for k in ("epoch", "position", "source", "index")} == {
        "epoch": 2,
        "position": 7,
        "source": 0,
        "index": 3,
    }
    assert pre(dict(item, pad=True)) == dict(epoch=2, position=7, source=0, index=3, status="pad")
    pre.samples = [
        [
            ann.parse_sample(
                {"video": str(tmp_path / "gone.mp4"), "QA": [{"q": "q", "a": "a"}]}, "f.json", 9
            )
        ]
    ]
    skip = pre(dict(item, index=0))
    assert skip["status"] == "skip" and skip["reason"] == "missing_media"
    assert skip["path"].endswith("gone.mp4") and skip["sample_index"] == 9
    short, samples = _pre(data, max_length=12)
    with pytest.raises(SampleTooLongError, match="exceed max_length=12"):
        short.decode(samples[0], 0, 0)


def test_images_and_multi_images(data, tmp_path):
    pre, _ = _pre(data, max_images=2)
    rng = np.random.default_rng(0)
    for name, hw in {"wide.png": (20, 50), "sq.png": (40, 40), "c.png": (8, 8)}.items():
        Image.fromarray(rng.integers(0, 255, (*hw, 3), np.uint8)).save(tmp_path / name)
    one = ann.parse_sample(
        {"image": "wide.png", "QA": [{"q": "q?", "a": "a"}]}, "f", 0, str(tmp_path)
    )
    rec = pre.decode(one, 0, 0)
    views, grid, hw = img.anyres_views_uint8(
        img.load_image(tmp_path / "wide.png"), 32, pre.pinpoints
    )
    np.testing.assert_array_equal(rec["pixels"], views)
    assert rec["kind"] == "image" and rec["image_size"].tolist() == [20, 50] and grid == (1, 2)
    two = ann.parse_sample(
        {"image": ["sq.png", "wide.png"], "QA": [{"q": "q?", "a": "a"}]}, "f", 1, str(tmp_path)
    )
    rec = pre.decode(two, 0, 0)
    assert rec["kind"] == "multi" and rec["pixels"].shape == (2, 32, 32, 3)
    assert int((rec["input_ids"] == pre.model_cfg.image_token_index).sum()) == 2
    # more than data.max_images: sorted, then max_images of them by the frame rule (a random
    # subset in training, seeded by [seed, epoch, position]; the segments' middles in evaluation)
    # and one image token each; the original's own key ("multi-image", ann[media_type]) as well
    names = ["sq.png", "wide.png", "c.png"]
    loaded = {n: img.load_image(tmp_path / n) for n in names}
    for key in ("image", "multi-image"):
        three = ann.parse_sample({key: names, "QA": [{"q": "q?", "a": "a"}]}, "f", 2, str(tmp_path))
        assert three.media_type == "multi-image"
        for training, mode in ((True, "rand"), (False, "middle")):
            pre3, _ = _pre(data, max_images=2, training=training)
            picked = set()
            for position in range(12):
                rec = pre3.decode(three, 0, position)
                rng = np.random.default_rng([1, 0, position])
                keep = F.frame_indices(2, 3, mode, rng)
                assert len(set(keep.tolist())) == 2 and (np.diff(keep) > 0).all()
                want = [loaded[sorted(names)[i]] for i in keep]
                np.testing.assert_array_equal(rec["pixels"], img.resize_frames(want, 32))
                assert int((rec["input_ids"] == pre.model_cfg.image_token_index).sum()) == 2
                picked.add(tuple(keep.tolist()))
            assert len(picked) > 1 if training else picked == {(0, 1)}


def test_multi_image_keeps_32_by_default(data, tmp_path):
    """The default data.max_images is the original's 32: 32 images are all read, in sorted
    order; a question holding fewer <image> placeholders than kept images is a DataError."""
    pre, _ = _pre(data, max_length=512, buckets=[512])
    assert pre.max_images == 32
    names = [f"im{k}.png" for k in range(32)]
    for k, n in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 4 * k, np.uint8)).save(tmp_path / n)
    s = ann.parse_sample(
        {"multi-image": names[::-1], "QA": [{"q": "q?", "a": "a"}]}, "f", 0, str(tmp_path)
    )
    rec = pre.decode(s, 0, 0)
    assert rec["pixels"].shape[0] == 32
    np.testing.assert_array_equal(
        rec["pixels"][:, 0, 0, 0], [4 * int(n[2:-4]) for n in sorted(names)]
    )
    bad = ann.parse_sample(
        {"multi-image": names, "QA": [{"q": "<image> <image> q?", "a": "a"}]}, "f", 1, str(tmp_path)
    )
    with pytest.raises(DataError, match="2 <image> placeholders but the sample has 32"):
        pre.decode(bad, 0, 0)


def test_exact_evaluation_sample(data):
    pre, samples = _pre(data, training=False)
    video = samples[0].media[0]
    rule = FrameRule(4)
    prompt = "USER: <image>\nWhich colour? ASSISTANT:"
    s = ann.eval_sample(video, prompt, "Which colour?", rule, extra={"qid": "q1"})
    rec = pre.decode(s, 0, 0)
    assert rec["input_ids"].tolist() == pre.tokenizer(prompt).input_ids
    clip = vid.load_frames_by_rule(video, rule)
    np.testing.assert_array_equal(rec["frame_indices"], clip.indices)
    np.testing.assert_array_equal(rec["pixels"], img.resize_frames(clip.frames, 32))
    bad = ann.eval_sample(video, prompt, "q", FrameRule(8), extra={"qid": "q2"})
    with pytest.raises(DataError, match="frame rule of 8 frames .* data.num_frames=4"):
        pre.decode(bad, 0, 0)
    none = ann.eval_sample(video, "no image here", "q", rule, extra={"qid": "q3"})
    with pytest.raises(DataError, match=r"\[q3\].*0 image tokens"):
        pre.decode(none, 0, 0)


def test_picklable_without_tokenizers(data):
    import pickle

    pre, samples = _pre(data)
    pre.decode(samples[0], 0, 0)  # loads the tokenizers
    back = pickle.loads(pickle.dumps(pre))
    assert back._tok is None and back._clip_tok is None
    np.testing.assert_array_equal(
        back.decode(samples[0], 0, 0)["input_ids"], pre.decode(samples[0], 0, 0)["input_ids"]
    )
    assert json.dumps(back.frames) == json.dumps(pre.frames)
