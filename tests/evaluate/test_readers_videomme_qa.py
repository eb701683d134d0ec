"""The Video-MME, open-ended QA and VCGBench readers end to end on small directories laid out
like the real datasets (parquet + mp4 + srt, QA json + videos / frame folders, VCGBench json +
videos), written here with PyAV and Pillow; then eval.py's path (``cli.main``) on them with a
tiny random checkpoint, writing the results and the judge files. Expected texts and indices
are written out by hand from the original's rules (see the module docstrings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import video as vid
from ppllava_jax.evaluate import cli
from ppllava_jax.evaluate.openqa import OpenQA, VCGBench
from ppllava_jax.evaluate.videomme import SYSTEM, VideoMME, parse_srt, select_subtitles
from tests.evaluate.tiny import make_tiny_checkpoint

FONT = '<font color="white" size=".72c">{}</font>'
QA_PRE = (
    "The input consists of a sequence of key frames from a video. Answer the question "
    "concisely first and followed by significant events, characters, or objects that appear "
    "throughout the frames. Question:"
)


def _clip(path, frames: int, fps: float = 8.0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    write = rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8)
    vid.write_video(path, write, fps=fps)


def _videomme(root) -> None:
    """Video-MME's release layout: 2 videos (40 and 24 frames at 8 fps), one .srt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    (root / "subtitle").mkdir()
    (root / "videomme").mkdir()
    _clip(root / "data" / "vidS.mp4", 40)
    _clip(root / "data" / "vidM.mp4", 24, seed=1)
    blocks = [
        ("00:00:00,000", "00:00:01,000", FONT.format("first")),  # frames [0, 8): 4
        ("00:00:01,200", "00:00:01,700", FONT.format("never")),  # [9, 13): none read
        ("00:00:01,500", "00:00:03,500", "no markup"),  # [12, 28): read, no <font>
        ("00:00:03,000", "00:00:05,000", FONT.format("second")),  # [24, 40): 24, 33
    ]
    srt = "".join(f"{i + 1}\n{a} --> {b}\n{t}\n\n" for i, (a, b, t) in enumerate(blocks))
    (root / "subtitle" / "vidS.srt").write_text(srt)
    common = {"domain": "Knowledge", "sub_category": "Astronomy", "url": "u"}
    rows = [
        {"video_id": "001", "duration": "short", "videoID": "vidS", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "Who talks?",
         "options": ["A. a man", "B. a woman", "C. a dog", "D. nobody"], "answer": "B"},
        {"video_id": "002", "duration": "medium", "videoID": "vidM", "question_id": "002-1",
         "task_type": "OCR Problems", "question": "What's written?",
         "options": ["A. it's", "B. no", "C. yes", "D. maybe"], "answer": "A"},
        {"video_id": "001", "duration": "short", "videoID": "vidS", "question_id": "001-2",
         "task_type": "Counting Problem", "question": "Where?",
         "options": ["A. here", "B. there", "C. home", "D. work"], "answer": "D"},
    ]  # fmt: skip
    table = pa.Table.from_pylist([{**r, **common} for r in rows])
    pq.write_table(table, root / "videomme" / "test-00000-of-00001.parquet")


def test_videomme_reader(tmp_path):
    _videomme(tmp_path)
    bench = VideoMME(str(tmp_path), num_frames=4, subtitles=True)
    qs = bench.questions()
    assert [q.qid for q in qs] == ["001-1", "001-2", "002-1"]  # grouped by video, as the original
    q = qs[0]
    opts = "['A. a man' 'B. a woman' 'C. a dog' 'D. nobody']"
    assert q.clip_text == f"Who talks?\n{opts}"
    assert q.prompt_text == (
        "USER: <image>\nThis video's subtitles are listed below: first second \n"
        f"{SYSTEM}\nWho talks?\n{opts} ASSISTANT: The best answer is:"
    )
    assert q.answer == "B" and q.info["duration"] == "short" and q.info["subtitle_order"] == [0, 3]
    clip = vid.load_frames_by_rule(q.video, q.frames)  # 39 / 4 = 9.75 per segment
    assert clip.indices.tolist() == [4, 14, 24, 33] and clip.frames.shape == (4, 32, 32, 3)
    m = qs[2]  # no .srt: the prompt without subtitles; options with ' in double quotes
    assert m.prompt_text == (
        f"USER: <image>\n{SYSTEM}\nWhat's written?\n"
        """["A. it's" 'B. no' 'C. yes' 'D. maybe'] ASSISTANT: The best answer is:"""
    )
    assert vid.load_frames_by_rule(m.video, m.frames).indices.tolist() == [2, 8, 14, 19]
    # subtitles off (the default); --num_frames 0: 32 frames short, 64 medium
    plain = VideoMME(str(tmp_path / "videomme" / "test-00000-of-00001.parquet")).questions()
    assert plain[0].prompt_text == f"USER: <image>\n{SYSTEM}\nWho talks?\n{opts} ASSISTANT: " + (
        "The best answer is:"
    )
    assert [p.frames.num_segments for p in plain] == [32, 32, 64]
    assert plain[0].video == str(tmp_path / "data" / "vidS.mp4")


def test_subtitle_rules():
    # CPython's set order: subtitles hit in the order 3, 9 come out as [9, 3] (the fixture
    # README's example); the end frame is exclusive
    frames = [(10 * i, 10 * i + 10, FONT.format(f"s{i}")) for i in range(10)]
    assert select_subtitles(frames, [35, 95]) == ("s9 s3", [9, 3])
    assert select_subtitles(frames, [5, 15]) == ("s0 s1", [0, 1])
    assert select_subtitles(frames, [100]) == ("", [])
    srt = (
        "1\n00:00:01,000 --> 00:00:02,000\none\nline\n\n"
        "2\n00:00:03,000 --> 00:00:04,000\n\n"  # two lines: dropped
        "3\n00:00:01,000 --> 00:00:02,000\nagain\n"  # same times: first place, last text
    )
    assert parse_srt(srt) == [(1.0, 2.0, "again ")]  # the last line is empty: " ".join keeps it
    assert parse_srt("1\n00:00:01,500 --> 01:00:00,250\na b") == [(1.5, 3600.25, "a b")]
    with pytest.raises(ValueError, match="x.srt"):
        parse_srt("1\n00:00:01 --> 00:00:02\nx\n", "x.srt")


def _qa_dirs(root) -> None:
    """MSVD (avi), MSRVTT (video_id) and ActivityNet (test_q/test_a + frame folders)."""
    (root / "MSVD" / "YouTubeClips").mkdir(parents=True)
    (root / "MSVD" / "MSVD-QA").mkdir()
    _clip(root / "MSVD" / "YouTubeClips" / "clipA.avi", 20, fps=10.0)
    (root / "MSVD" / "MSVD-QA" / "new_test_qa.json").write_text(
        json.dumps(
            [
                {
                    "video_name": "clipA.avi",
                    "question": "what is a woman slicing?",
                    "answer": "onion",
                    "question_id": "msvd_1",
                }
            ]
        )
    )
    (root / "MSRVTT" / "video").mkdir(parents=True)
    _clip(root / "MSRVTT" / "video" / "7.mp4", 16)
    (root / "MSRVTT" / "test_qa.json").write_text(
        json.dumps([{"video_id": 7, "question": "who sings?", "answer": "man", "id": 9031}])
    )
    anet = root / "ActivityNet"
    (anet / "activitynet_frames" / "v_abc").mkdir(parents=True)
    for i in range(1, 11):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(
            anet / "activitynet_frames" / "v_abc" / f"{i:06d}.jpg"
        )
    (anet / "test_q.json").write_text(
        json.dumps(
            [{"video_name": "abc", "question": "what is he doing?", "question_id": "v_abc_1"}]
        )
    )
    (anet / "test_a.json").write_text(
        json.dumps([{"answer": "drumming", "type": 2, "question_id": "v_abc_1"}])
    )


def test_qa_readers(tmp_path):
    _qa_dirs(tmp_path)
    msvd = tmp_path / "MSVD"
    bench = OpenQA(str(msvd / "MSVD-QA" / "new_test_qa.json"), 4, str(msvd / "YouTubeClips"))
    (q,) = bench.questions()
    assert q.prompt_text == (
        f"USER: <image>\n{QA_PRE} what is a woman slicing? ASSISTANT: Answer: In the video,"
    )
    assert q.clip_text == "what is a woman slicing?" and q.qid == "msvd_1"
    # 20 frames: max_frame 19, 19 / 4 = 4.75 per segment (np.round(9.5) = 10)
    assert vid.load_frames_by_rule(q.video, q.frames).indices.tolist() == [2, 7, 12, 16]
    (r,) = OpenQA(str(tmp_path / "MSRVTT" / "test_qa.json"), dataset="msrvtt").questions()
    assert r.video == str(tmp_path / "MSRVTT" / "video" / "7.mp4") and r.qid == "9031"
    (a,) = OpenQA(str(tmp_path / "ActivityNet"), num_frames=4).questions()
    assert a.answer == "drumming" and a.clip_text == "what is he doing?"
    clip = vid.load_frames_by_rule(a.video, a.frames)  # 10 files from 1 at 3 fps: 9 / 4
    assert list(clip.files) == ["000002.jpg", "000004.jpg", "000006.jpg", "000009.jpg"]
    assert np.abs(clip.frames[:, 0, 0, 0].astype(int) - [40, 80, 120, 180]).max() <= 2
    rec = OpenQA(str(tmp_path / "MSRVTT" / "test_qa.json"), dataset="msrvtt").record(
        r, "a man. Answer: In the video, again"
    )
    assert list(rec["judge"].items()) == [
        ("pred", "a man."), ("answer", "man"), ("question", "who sings?"), ("id", 9031)
    ]  # fmt: skip


def _vcg_dir(root) -> None:
    (root / "Benchmarking_QA").mkdir(parents=True)
    (root / "Test_Videos").mkdir()
    _clip(root / "Test_Videos" / "v_one.mp4", 16)
    _clip(root / "Test_Videos" / "v_two.mkv", 16, seed=2)
    qa = root / "Benchmarking_QA"
    (qa / "generic_qa.json").write_text(
        json.dumps([{"Q": "What happens?", "A": "A clip.", "video_name": "v_one"}])
    )
    (qa / "temporal_qa.json").write_text(
        json.dumps([{"Q": "What comes first?", "A": "Red.", "video_name": "v_two"}])
    )
    (qa / "consistency_qa.json").write_text(
        json.dumps([{"Q1": "Colour?", "Q2": "Which colour?", "A": "Red.", "video_name": "v_one"}])
    )


def test_vcgbench_reader(tmp_path):
    _vcg_dir(tmp_path)
    bench = VCGBench(str(tmp_path), num_frames=4)
    qs = bench.questions()
    assert [q.qid for q in qs] == [
        "generic:0:Q", "temporal:0:Q", "consistency:0:Q1", "consistency:0:Q2"
    ]  # fmt: skip
    assert qs[0].prompt_text == "USER: <image>\nWhat happens? ASSISTANT: "
    assert qs[3].prompt_text == "USER: <image>\nWhich colour? ASSISTANT: "
    assert qs[1].video == str(tmp_path / "Test_Videos" / "v_two.mkv")
    assert vid.load_frames_by_rule(qs[1].video, qs[1].frames).indices.tolist() == [1, 5, 9, 12]
    recs = [bench.record(q, f"answer {i}. ASSISTANT: more") for i, q in enumerate(qs)]
    files = bench.saved_files(recs)
    assert files["consist"] == [
        {"pred1": "answer 2.", "pred2": "answer 3.", "video_name": "v_one", "A": "Red.",
         "Q1": "Colour?", "Q2": "Which colour?"}
    ]  # fmt: skip
    legacy = VCGBench(str(tmp_path), num_frames=4, legacy_consistency_labels=True)
    row = legacy.saved_files(recs)["consist"][0]
    assert (row["Q1"], row["Q2"]) == ("Which colour?", "Colour?")
    assert files["general"] == [
        {"pred": "answer 0.", "A": "A clip.", "Q": "What happens?", "video_name": "v_one"}
    ]
    system = VCGBench(str(tmp_path), num_frames=4, system_vcg=True).questions()[0]
    assert system.prompt_text.startswith("You are Video-ChatGPT") and system.prompt_text.endswith(
        " USER: <image>\nWhat happens? ASSISTANT: "
    )


# --------------------------------------------------------------------------------------
# eval.py's path with a tiny checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyckpt")
    return make_tiny_checkpoint(str(root / "ckpt"), str(root / "data"))


def _eval(ckpt, benchmark, data, out, **kw):
    return cli.main(
        checkpoint=ckpt, benchmark=benchmark, data=str(data), out=str(out),
        mesh="data=2,fsdp=1,tensor=1", batch_size=2, max_new_tokens=3, no_progress=True,
        num_frames=4, **kw,
    )  # fmt: skip


def test_eval_videomme(ckpt, tmp_path):
    _videomme(tmp_path)
    res = _eval(ckpt, "videomme", tmp_path, tmp_path / "out" / "vm.json", use_subtitles=True)
    s = res["summary"]
    assert s["answered"] == 3 and s["num_missing"] == 0
    assert set(s["by_duration"]) == {"short", "medium"}
    assert s["counted_strict"] == 3
    assert s["counted_original"] + s["excluded_original"] == 3
    rec = res["records"][0]
    assert rec["verdict_original"] in ("correct", "wrong", "excluded")
    with open(s["videomme_results_file"]) as f:
        saved = json.load(f)
    assert [v["video_id"] for v in saved] == ["vidS", "vidM"]
    assert [q["question_id"] for q in saved[0]["questions"]] == ["001-1", "001-2"]
    # the setting is named in the summary and the original-layout file's name
    assert s["use_subtitles"] is True and s["setting"].startswith("with subtitles")
    assert s["videomme_results_file"].endswith("vm_videomme_results_with_subtitles.json")
    # the other setting into the same --out is refused, naming the setting
    from ppllava_jax.evaluate.answers import AnswersMismatchError

    with pytest.raises(AnswersMismatchError, match="subtitles"):
        _eval(ckpt, "videomme", tmp_path, tmp_path / "out" / "vm.json")
    res = _eval(ckpt, "videomme", tmp_path, tmp_path / "nosub.json")
    assert res["summary"]["videomme_results_file"].endswith("_without_subtitles.json")


def test_eval_openqa_and_vcgbench(ckpt, tmp_path):
    _qa_dirs(tmp_path)
    res = _eval(ckpt, "openqa", tmp_path / "ActivityNet" / "test_q.json", tmp_path / "anet.json")
    with open(res["summary"]["predictions_file"]) as f:
        (judge,) = json.load(f)
    assert list(judge) == ["pred", "answer", "question", "id"]
    assert judge["id"] == "v_abc_1" and judge["answer"] == "drumming"
    _vcg_dir(tmp_path / "vcg")
    res = _eval(ckpt, "vcgbench", tmp_path / "vcg", tmp_path / "vcg.json")
    s = res["summary"]
    assert s["answered"] == 4
    with open(s["consist_file"]) as f:
        (row,) = json.load(f)
    assert list(row) == ["pred1", "pred2", "video_name", "A", "Q1", "Q2"]
    assert (row["Q1"], row["Q2"]) == ("Colour?", "Which colour?")
    with open(s["general_file"]) as f:
        assert json.load(f)[0]["Q"] == "What happens?"
