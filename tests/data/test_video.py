"""Video decoding and frame sampling: PyAV files, GIFs, frame folders, errors."""

import os

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import frame_index as F
from ppllava_jax.data import video as V
from ppllava_jax.data.errors import MediaError


def painted(n, size=32):
    """Frames whose colour encodes their index (robust to lossy coding)."""
    f = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        f[i] = ((i * 37) % 256, (i * 91 + 40) % 256, (i // 7) * 20 % 256)
    return f


def index_of(frame, reference):
    d = np.abs(reference.reshape(len(reference), -1, 3).mean(1) - frame.reshape(-1, 3).mean(0))
    return int(np.argmin(d.sum(1)))


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    frames = painted(40)
    path = str(tmp_path_factory.mktemp("v") / "clip.mp4")
    V.write_video(path, frames, fps=10)
    return path, frames


def test_mp4_frame_order(mp4):
    path, frames = mp4
    assert V.video_info(path) == (40, 10.0)
    clip = V.load_video(path, 8, "middle")
    assert clip.frames.shape == (8, 32, 32, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.indices, F.sample_indices(40, 8, "middle"))
    assert [index_of(f, frames) for f in clip.frames] == clip.indices.tolist()
    np.testing.assert_allclose(clip.timestamps, clip.indices / 10.0)
    assert np.abs(clip.frames.astype(int) - frames[clip.indices]).max() <= 8
    r = V.load_video(path, 8, "rand", rng=5)
    np.testing.assert_array_equal(r.indices, F.sample_indices(40, 8, "rand", rng=5))
    assert [index_of(f, frames) for f in r.frames] == r.indices.tolist()


def test_bound_and_short_video(mp4, tmp_path):
    path, frames = mp4
    clip = V.load_video(path, 4, "middle", bound=(1.0, 2.0))  # frames 10..20
    assert clip.indices.min() >= 10 and clip.indices.max() <= 20
    assert [index_of(f, frames) for f in clip.frames] == clip.indices.tolist()
    short = str(tmp_path / "short.mp4")
    V.write_video(short, frames[:3], fps=10)
    c = V.load_video(short, 6)
    np.testing.assert_array_equal(c.indices, [0, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(c.frames[5], c.frames[2])


def test_long_video_seeks(tmp_path):
    frames = painted(2 * V.SEEK_GAP_FRAMES + 100, size=16)
    path = str(tmp_path / "long.mp4")
    V.write_video(path, frames, fps=25)
    clip = V.load_video(path, 3, "middle")
    np.testing.assert_array_equal(clip.indices, F.sample_indices(len(frames), 3, "middle"))
    assert [index_of(f, frames) for f in clip.frames] == clip.indices.tolist()


@pytest.mark.parametrize("ext", [".webm", ".avi"])
def test_other_containers(tmp_path, ext):
    frames = painted(12)
    path = str(tmp_path / f"c{ext}")
    V.write_video(path, frames, fps=6)
    clip = V.load_video(path, 4)
    np.testing.assert_array_equal(clip.indices, [1, 4, 7, 10])  # segment middles of 12
    assert [index_of(f, frames) for f in clip.frames] == clip.indices.tolist()


def test_gif_and_frame_folder(tmp_path):
    frames = painted(10)
    gif = str(tmp_path / "a.gif")
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(gif, save_all=True, append_images=ims[1:], duration=100, loop=0)
    clip = V.load_video(gif, 5)
    assert clip.fps == 10.0 and clip.num_frames == 10
    assert [index_of(f, frames) for f in clip.frames] == clip.indices.tolist()
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):  # natural order: frame_2 before frame_10
        Image.fromarray(f).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("ignored")
    clip = V.load_video(str(folder), 4, fps=2.0)
    np.testing.assert_array_equal(clip.frames, frames[clip.indices])
    np.testing.assert_allclose(clip.timestamps, clip.indices / 2.0)
    assert clip.files == tuple(f"frame_{i + 1}.png" for i in clip.indices)
    # name order (the original's raw-frame reader): frame_10 sorts before frame_2
    named = V.load_video(str(folder), 10, fps=2.0, folder_order="name")
    assert named.files[:3] == ("frame_1.png", "frame_10.png", "frame_2.png")
    np.testing.assert_array_equal(named.frames[1], frames[9])


def test_frames_by_rule_from_file_gif_and_folder(mp4, tmp_path):
    path, frames = mp4
    rule = F.FrameRule(4, bound=(1.0, 3.0))
    clip = V.load_frames_by_rule(path, rule)
    want, _ = F.frame_rule_indices(rule, 40, 10.0)
    np.testing.assert_array_equal(clip.indices, want)
    assert [index_of(f, frames) for f in clip.frames] == want.tolist()
    gif = str(tmp_path / "a.gif")
    ims = [Image.fromarray(f) for f in frames[:30]]
    ims[0].save(gif, save_all=True, append_images=ims[1:], duration=100, loop=0)
    g = V.load_frames_by_rule(gif, F.FrameRule(3))  # GIFs are read at 25 fps (the original)
    assert g.fps == 25.0
    np.testing.assert_array_equal(g.indices, F.frame_rule_indices(F.FrameRule(3), 30, 25.0)[0])
    folder = tmp_path / "rule_frames"
    folder.mkdir()
    for i in range(1, 13):  # files numbered from 1, MVBench's pattern
        Image.fromarray(frames[i]).save(folder / f"{i:05d}.jpg", quality=100)
    f = V.load_frames_by_rule(str(folder), F.FrameRule(4, folder_fps=3.0))
    assert f.files == tuple(f"{i:05d}.jpg" for i in f.indices) and f.indices.min() >= 1
    assert [index_of(x, frames) for x in f.frames] == f.indices.tolist()
    (folder / "00001.jpg").unlink()
    (folder / "extra.txt").write_text("12 entries again")
    with pytest.raises(MediaError, match="00001.jpg"):
        V.load_frames_by_rule(str(folder), F.FrameRule(12, folder_fps=3.0))


def test_errors_name_the_file(mp4, tmp_path):
    path, _ = mp4
    data = open(path, "rb").read()
    cases = {
        "missing.mp4": None,
        "truncated.mp4": data[: len(data) // 2],
        "head_only.mp4": data[:200],
        "garbage.mp4": os.urandom(3000),
        "empty.mp4": b"",
        "bad.gif": b"GIF89a" + os.urandom(50),
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(MediaError) as e:
            V.load_video(str(p), 4)
        assert str(p) in str(e.value) and e.value.path == str(p)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(MediaError, match="no images"):
        V.load_video(str(empty_dir), 4)
