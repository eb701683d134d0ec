"""Frame folders with ``total_frames`` (data/numbered_frames.py) and the training pipeline's
reading switches: ``total_frames``, ``start``/``end`` ignored in training unless
``data.training_bounds``."""

import os

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import annotations as ann
from ppllava_jax.data import frame_index as F
from ppllava_jax.data import numbered_frames as N
from ppllava_jax.data.config import resolve_config
from ppllava_jax.data.errors import AnnotationError, MediaError
from ppllava_jax.data.preprocess import Preprocess
from tests.data.helpers import data_cfg, tiny_model


def _folder(path, numbers, names=None) -> str:
    """A folder of 8x8 images; the image of file number k (``'{:0>6}.jpg'``) has red = k."""
    os.makedirs(path, exist_ok=True)
    for k in numbers:
        name = (names or N.FILE_PATTERN).format(k)
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(os.path.join(path, name), "PNG")
    return str(path)


def test_numbered_files_from_one_and_the_next_for_a_missing_one(tmp_path):
    missing = (6, 14, 17, 18)  # frame 16 (files 17 and 18) is not among the 8 read
    folder = _folder(tmp_path / "f", [k for k in range(1, 22) if k not in missing])
    clip = N.load_numbered_frames(folder, 20, 8, "middle")
    idx = F.frame_indices(8, 20, "middle")
    np.testing.assert_array_equal(clip.indices, idx)
    read = clip.frames[:, 0, 0, 0].tolist()
    # frame i is file i + 1; a missing file is replaced by the next number's
    want = [i + 1 if i + 1 not in missing else i + 2 for i in idx.tolist()]
    assert want != (idx + 1).tolist()
    assert read == want and list(clip.files) == [N.FILE_PATTERN.format(k) for k in want]
    assert clip.num_frames == 20
    name, tried = N.frame_file(folder, 5)
    assert (name, tried) == ("000007.jpg", ("000006.jpg", "000007.jpg"))
    with pytest.raises(MediaError, match="neither 000017.jpg nor its replacement 000018.jpg"):
        N.frame_file(folder, 16)
    # 32 of 20 frames: the original's rand falls back to all 20 frames, then repeats the last
    clip = N.load_numbered_frames(_folder(tmp_path / "g", range(1, 21)), 20, 32, "rand", rng=0)
    assert clip.frames[:, 0, 0, 0].tolist() == list(range(1, 21)) + [20] * 12
    with pytest.raises(MediaError, match="frame folder not found"):
        N.load_numbered_frames(tmp_path / "none", 20, 8)


@pytest.mark.parametrize("value", [0, -3, 2.5, "20", True])
def test_total_frames_must_be_a_positive_whole_number(value):
    with pytest.raises(AnnotationError, match="total_frames"):
        ann.parse_sample(
            {"video": "v", "total_frames": value, "QA": [{"q": "q", "a": "a"}]}, "f", 0
        )
    with pytest.raises(AnnotationError, match="not to a image sample"):
        ann.parse_sample(
            {"image": "i.png", "total_frames": 3, "QA": [{"q": "q", "a": "a"}]}, "f", 0
        )


def _pre(data, **kw) -> Preprocess:
    out, info = data
    cfg = resolve_config(data_cfg(out, **dict(text_encoding="offsets", **kw)))
    return Preprocess(cfg, tiny_model(info["image_token_id"]))


def _sample(root, **fields) -> ann.Sample:
    return ann.parse_sample(dict(QA=[{"q": "What?", "a": "That."}], **fields), "f", 0, str(root))


def test_pipeline_reads_total_frames_folders_and_lists_the_others(data, tmp_path):
    pre = _pre(data, frame_sampling="middle")
    _folder(tmp_path / "num", range(1, 13))
    rec = pre.decode(_sample(tmp_path, video="num", total_frames=12), 0, 0)
    assert rec["pixels"][:, 16, 16, 0].tolist() == (F.frame_indices(4, 12, "middle") + 1).tolist()
    # without total_frames: the sorted listing from index 0 (files need no numbering)
    _folder(tmp_path / "list", range(40, 52), "frame_{}.png")
    rec = pre.decode(_sample(tmp_path, video="list"), 0, 0)
    names = sorted(f"frame_{k}.png" for k in range(40, 52))
    want = [int(names[i][6:8]) for i in F.frame_indices(4, 12, "middle")]
    assert rec["pixels"][:, 16, 16, 0].tolist() == want


def test_training_ignores_start_and_end_unless_asked(data, tmp_path):
    _folder(tmp_path / "v", range(1, 41))  # 40 frames at the folder's 1 fps
    s = _sample(tmp_path, video="v", total_frames=40, start=10.0, end=19.0)
    whole = (F.frame_indices(4, 40, "middle") + 1).tolist()
    bounded = (F.sample_indices(40, 4, "middle", first=10, last=19) + 1).tolist()
    assert whole != bounded
    got = lambda pre: pre.decode(s, 0, 0)["pixels"][:, 16, 16, 0].tolist()  # noqa: E731
    assert got(_pre(data, frame_sampling="middle")) == whole  # the original: no bound
    assert got(_pre(data, frame_sampling="middle", training_bounds=True)) == bounded
    assert got(_pre(data, training=False)) == bounded  # evaluation honours the bound
