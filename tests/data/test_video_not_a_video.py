"""Files that are no video are refused by the shared loader (issue 22, item 2), before decoding:
FFmpeg's tty demuxer "decodes" a text file as ANSI art, frame after frame, and a still image
decodes as a one-frame video."""

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import video as V
from ppllava_jax.data.errors import MediaError
from ppllava_jax.data.frame_index import FrameRule, sample_indices
from ppllava_jax.data.skips import skip_reason


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 100)
    return str(path)


def test_text_file_is_refused_naming_it(text_file):
    for read in (
        lambda p: V.load_video(p, 4),
        lambda p: V.load_frames_by_rule(p, FrameRule(4)),
        V.video_info,
    ):
        with pytest.raises(MediaError) as e:
            read(text_file)
        msg = str(e.value)
        assert e.value.path == text_file and msg.startswith(text_file + ": ")
        assert "not a video but a text file" in msg and "'tty'" in msg and "\n" not in msg
        assert skip_reason(e.value) == "bad_media"  # skipped and counted as unreadable media


def test_still_image_is_refused(tmp_path):
    path = str(tmp_path / "frame.mp4")  # a PNG under a video's name
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, format="PNG")
    with pytest.raises(MediaError, match=r"frame\.mp4: not a video but a still image \(png\)"):
        V.load_video(path, 4)


def test_real_video_still_reads(tmp_path):
    path = str(tmp_path / "clip.mp4")
    frames = np.zeros((6, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(6)[:, None, None] * 40
    V.write_video(path, frames, fps=6)
    assert V.video_info(path) == (6, 6.0)
    clip = V.load_video(path, 3)
    assert (
        clip.frames.shape == (3, 32, 32, 3)
        and clip.indices.tolist() == sample_indices(6, 3).tolist()
    )
    assert V.load_frames_by_rule(path, FrameRule(3)).frames.shape == (3, 32, 32, 3)


def test_chat_refuses_a_text_file(text_file):
    from ppllava_jax.chat import load_clip

    with pytest.raises(MediaError, match="not a video but a text file"):
        load_clip(text_file, 4)
