"""The original's frame rules (data/frame_index.py): training sampling and evaluation indices."""

import numpy as np
import pytest

from ppllava_jax.data import frame_index as F
from tests.data.frame_rules import check_fallback_draws, check_segment_draws


def test_sample_indices_middle_and_short():
    np.testing.assert_array_equal(F.sample_indices(16, 8, "middle"), np.arange(0, 16, 2))
    np.testing.assert_array_equal(F.sample_indices(40, 4, "middle"), [4, 14, 24, 34])
    np.testing.assert_array_equal(F.sample_indices(3, 6, "middle"), [0, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(F.sample_indices(100, 2, "middle", first=10, last=19), [12, 17])


def test_rand_reproducible_and_inside_segments():
    a = F.sample_indices(100, 8, "rand", rng=3)
    b = F.sample_indices(100, 8, "rand", rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    # the rule (bounds, a segment's last frame never drawn, uniform within a tolerance), on
    # narrow and wide segments; the fallback (a 1-frame segment) a uniform sorted subset
    for t, n in ((8, 100), (8, 1000), (32, 300)):
        draws = np.stack([F.sample_indices(n, t, "rand", rng=s) for s in range(200)])
        check_segment_draws(draws, F.segment_ranges(t, n))
    for t, n in ((32, 33), (32, 40), (8, 12)):
        check_fallback_draws(
            np.stack([F.sample_indices(n, t, "rand", rng=s) for s in range(200)]), n
        )
    short = F.sample_indices(3, 5, "rand", rng=0)
    np.testing.assert_array_equal(short, [0, 1, 2, 2, 2])


def test_bound_to_range_clamps_and_keeps_one_frame():
    assert F.bound_to_range(100, 10.0, None) == (0, 99)
    assert F.bound_to_range(100, 10.0, (1.0, 2.5)) == (10, 25)
    assert F.bound_to_range(100, 10.0, (-5.0, 50.0)) == (0, 99)
    assert F.bound_to_range(100, 10.0, (20.0, 30.0)) == (99, 99)  # past the end: last frame
    with pytest.raises(ValueError):
        F.bound_to_range(0, 10.0, None)


def test_segment_ranges_never_reach_a_segments_last_frame():
    assert F.segment_ranges(4, 20) == [(0, 4), (5, 9), (10, 14), (15, 19)]
    assert F.segment_ranges(4, 3) == [(0, 0), (1, 1), (2, 2)]  # empty: the fallback applies


def test_frame_indices_fix_start_and_fps_modes():
    np.testing.assert_array_equal(F.frame_indices(4, 20, "middle", fix_start=1), [1, 6, 11, 16])
    # fps0.5 over 10 s at 2 fps: one frame every 2 s from the middle of the first interval
    np.testing.assert_array_equal(
        F.frame_indices(0, 20, "fps0.5", input_fps=2.0), [2, 6, 10, 14, 18]
    )
    short = F.frame_indices(0, 20, "fps0.5", input_fps=2.0, max_num_frames=3)
    np.testing.assert_array_equal(short, [2, 6, 10])
    with pytest.raises(ValueError, match="unknown sampling mode"):
        F.frame_indices(4, 20, "uniform")
    with pytest.raises(ValueError, match="unknown sampling mode"):
        F.sample_indices(20, 4, "fps1")


def test_segment_indices_is_the_original_get_index():
    # 40 frames (max_frame 39) at 10 fps: segments of 9.75, int(4.875 + round(9.75 i))
    np.testing.assert_array_equal(F.segment_indices(39, 10.0, 4), [4, 14, 24, 33])
    # bound 1..2 s: frames 10..20, segments of 2.5: int(10 + 1.25 + round(2.5 i)), half to even
    np.testing.assert_array_equal(F.segment_indices(39, 10.0, 4, (1.0, 2.0)), [11, 13, 16, 19])
    # shorter than T: repeats spread evenly
    np.testing.assert_array_equal(F.segment_indices(2, 1.0, 4), [0, 0, 1, 2])
    # num_segments 0: the driver's assigned_frame; < 0: 32 frames for up to 32 s per |n|, else 64
    assert len(F.segment_indices(10, 1.0, 0, assigned_frame=8)) == 8
    assert len(F.segment_indices(320, 10.0, -1)) == 32  # 32.0 s
    assert len(F.segment_indices(321, 10.0, -1)) == 64  # 32.1 s
    assert len(F.segment_indices(321, 10.0, -2)) == 32  # 16.05 s per |n|
    assert len(F.segment_indices(9000, 30.0, -1, bound=(10.0, 40.0))) == 32  # the bound's 30 s


def test_frame_rule_indices_files_and_folders():
    rule = F.FrameRule(3, folder_fps=3.0, file_pattern="{:0>5}.jpg")
    idx, files = F.frame_rule_indices(rule, 9, folder=True)  # a folder of 9 files from 1
    np.testing.assert_array_equal(idx, F.segment_indices(9, 3.0, 3, None, 1))
    assert files == tuple(f"{i:05d}.jpg" for i in idx) and idx.min() >= 1
    vidx, vfiles = F.frame_rule_indices(F.FrameRule(3), 10, fps=5.0)
    np.testing.assert_array_equal(vidx, F.segment_indices(9, 5.0, 3))
    assert vfiles == ()
    with pytest.raises(ValueError, match="fps"):
        F.frame_rule_indices(F.FrameRule(3), 10)
