"""Video-MME, open-ended QA and VCGBench protocols against the original's (the fixture
``reference_protocols``, ``PPLLAVA_PROTOCOLS_DIR``): every ``videomme``, ``qa`` and ``vcgbench``
case of the file goes through the project's readers (``VideoMME``, ``OpenQA``, ``VCGBench``)
on a directory laid out like the real dataset, written from the case; the texts, token ids
(legacy and non-legacy), frame indices / files, subtitles, responses, verdicts, judge records
and saved files must be equal. As in the fixture, only I/O is faked: a video is its (frame
count, fps) pair and decodes to frames carrying their index; frame folders are real files.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ppllava_jax.data import video as vid
from ppllava_jax.evaluate.openqa import OpenQA, VCGBench
from ppllava_jax.evaluate.videomme import VideoMME
from tests.evaluate.protocol.fixture import case_ids, ids_key, llm_tokenizer, protocols

VM_CASES = protocols()["videomme"]["cases"]
QA_CASES = protocols()["qa"]["cases"]
VCG = protocols()["vcgbench"]
VCG_CASES = VCG["cases"]


@pytest.fixture
def fake_videos(monkeypatch):
    """``{path: (frames, fps)}``: videos read through the project's own frame reader
    (``load_frames_by_rule``), with the container replaced by its frame count and fps."""
    videos: dict[str, tuple[int, float]] = {}

    def info(path):
        return videos[os.fspath(path)]

    def decode(path, wanted, fps):
        return {int(i): np.full((2, 2, 3), int(i) % 256, np.uint8) for i in wanted}

    monkeypatch.setattr(vid, "video_info", info)
    monkeypatch.setattr(vid, "_decode_selected", decode)
    return videos


def _add_video(videos: dict, path, spec: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    videos[os.fspath(path)] = (int(spec["num_frames"]), float(spec["fps"]))


def _decoded(prompt: dict) -> str:
    """What the original decodes: prompt ids + generated ids, special tokens skipped."""
    tok = llm_tokenizer(True)
    return tok.decode(prompt["input_ids"] + prompt["generated_ids"], skip_special_tokens=True)


def _check_prompt(q, expect: dict) -> None:
    assert q.prompt_text == expect["prompt_text"]
    assert q.clip_text == expect["clip_text"]
    for legacy in (True, False):
        got = llm_tokenizer(legacy)(q.prompt_text).input_ids
        assert got == expect[ids_key(legacy)], f"legacy={legacy}"


def _check_frames(q, expect: dict) -> None:
    clip = vid.load_frames_by_rule(q.video, q.frames)
    assert clip.indices.tolist() == expect["frame_indices"]
    if "frame_files" in expect:
        assert list(clip.files) == expect["frame_files"]


# --------------------------------------------------------------------------------------
# Video-MME


def _write_videomme(root, cases: list[dict], videos: dict) -> None:
    """``root/videomme/test-00000-of-00001.parquet`` (the release's columns),
    ``root/data/<videoID>.mp4``, ``root/subtitle/<videoID>.srt``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, c in enumerate(cases):
        rows.append(
            {
                "video_id": f"{i:03d}",
                "duration": c["duration"],
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "url": f"https://www.youtube.com/watch?v={c['videoID']}",
                "videoID": c["videoID"],
                "question_id": c["id"].split("/")[0],
                "task_type": "Counting Problem",
                "question": c["question"],
                "options": list(c["options"]),
                "answer": c["answer"],
            }
        )
        _add_video(videos, root / "data" / f"{c['videoID']}.mp4", c["video"])
        if c.get("srt") is not None:
            (root / "subtitle").mkdir(exist_ok=True)
            with open(root / "subtitle" / f"{c['videoID']}.srt", "w", encoding="utf-8") as f:
                f.write(c["srt"])
    (root / "videomme").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")


@pytest.mark.parametrize("case", VM_CASES, ids=case_ids(VM_CASES))
def test_videomme_case(case, tmp_path, fake_videos):
    _write_videomme(tmp_path, [case], fake_videos)
    bench = VideoMME(
        str(tmp_path), num_frames=case["num_frames_arg"], subtitles=case["use_subtitles"]
    )
    (q,) = bench.questions()
    _check_prompt(q, case)
    _check_frames(q, case)
    joined, order = bench.video_subtitles(case["videoID"], q.frames.num_segments)
    assert joined == case["subtitles_joined"]
    if "subtitle_order" in case:
        assert order == case["subtitle_order"]
    assert q.info["subtitles"] == bool(case["subtitles_joined"])
    for decoded in (_decoded(case), ""):  # the runner's decoded text, or rebuilt from the reply
        rec = bench.record(q, case["reply"], decoded=decoded)
        assert rec["response"] == case["response"]
        assert rec["extraction"] == case["extraction"]
        assert rec["verdict_original"] == case["verdict"]


def test_videomme_one_parquet_all_cases(tmp_path, fake_videos):
    """All cases of one setting in one parquet: questions in the original's order (grouped by
    video), the original's results file layout and the summary's denominator."""
    groups: dict[tuple, list[dict]] = {}
    for c in VM_CASES:
        groups.setdefault((c["use_subtitles"], c["num_frames_arg"]), []).append(c)
    for k, ((subs, nf), cases) in enumerate(groups.items()):
        root = tmp_path / f"g{k}"
        _write_videomme(root, cases, fake_videos)
        bench = VideoMME(str(root), num_frames=nf, subtitles=subs)
        qs = {q.qid: q for q in bench.questions()}
        order = list(dict.fromkeys(c["videoID"] for c in cases))
        want = sorted(cases, key=lambda c: order.index(c["videoID"]))
        assert list(qs) == [c["id"].split("/")[0] for c in want]
        recs = [bench.record(qs[c["id"].split("/")[0]], c["reply"], _decoded(c)) for c in want]
        files = bench.write_outputs(recs, str(root / "res.json"))
        with open(files["videomme_results_file"]) as f:
            saved = json.load(f)
        assert [v["video_id"] for v in saved] == order
        flat = [q for v in saved for q in v["questions"]]
        assert [q["response"] for q in flat] == [c["response"] for c in want]
        assert list(flat[0]) == ["question_id", "task_type", "question", "options", "answer"] + [
            "response"
        ]
        s = bench.summarize(recs, list(qs.values()))
        verdicts = [c["verdict"] for c in want]
        assert s["counted_original"] == sum(v in ("correct", "wrong") for v in verdicts)
        assert s["correct_original"] == verdicts.count("correct")
        assert s["excluded_original"] == verdicts.count("excluded")
        assert s["counted_strict"] == len(want)


# --------------------------------------------------------------------------------------
# Open-ended QA


def _write_qa(root, case: dict, videos: dict, image_file) -> OpenQA:
    """The case as its dataset is laid out: MSVD ``MSVD-QA/new_test_qa.json`` +
    ``YouTubeClips/<name>.avi``, MSRVTT ``test_qa.json`` (``video_id``) + ``video/<id>.mp4``,
    ActivityNet ``test_q.json`` + ``test_a.json`` + ``activitynet_frames/v_<name>/000001.jpg``."""
    judge = case["judge_record"]
    ds = case["dataset"].lower()
    if "frames_in_folder" in case:  # ActivityNet: frame folders
        name = "vid_" + str(judge["id"]).replace("/", "_")
        folder = root / "activitynet_frames" / f"v_{name}"
        folder.mkdir(parents=True)
        for i in range(1, int(case["frames_in_folder"]) + 1):
            os.link(image_file, folder / f"{i:0>6}.jpg")
        (root / "test_q.json").write_text(
            json.dumps(
                [{"video_name": name, "question": judge["question"], "question_id": judge["id"]}]
            )
        )
        (root / "test_a.json").write_text(
            json.dumps([{"answer": judge["answer"], "type": 2, "question_id": judge["id"]}])
        )
        assert float(case.get("frame_folder_fps", 3)) == 3.0  # the reader's fixed rate
        return OpenQA(str(root / "test_q.json"), dataset=ds or "activitynet")
    if ds == "msrvtt":
        row = {"video_id": f"video{judge['id']}", "question": judge["question"]}
        row.update(answer=judge["answer"], id=judge["id"])
        _add_video(videos, root / "video" / f"video{judge['id']}.mp4", case["video"])
        (root / "test_qa.json").write_text(json.dumps([row]))
        return OpenQA(str(root / "test_qa.json"), dataset="msrvtt")
    row = {"video_name": f"{judge['id']}.avi", "question": judge["question"]}
    row.update(answer=judge["answer"], question_id=judge["id"])
    _add_video(videos, root / "YouTubeClips" / f"{judge['id']}.avi", case["video"])
    (root / "MSVD-QA").mkdir()
    (root / "MSVD-QA" / "new_test_qa.json").write_text(json.dumps([row]))
    return OpenQA(
        str(root / "MSVD-QA" / "new_test_qa.json"),
        video_dir=str(root / "YouTubeClips"),
        dataset="msvd",
    )


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "frame.jpg"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", QA_CASES, ids=case_ids(QA_CASES))
def test_qa_case(case, tmp_path, fake_videos, image_file):
    bench = _write_qa(tmp_path, case, fake_videos, image_file)
    (q,) = bench.questions()
    assert q.answer == str(case["answer"])
    _check_prompt(q, case)
    _check_frames(q, case)
    for decoded in (_decoded(case), ""):
        rec = bench.record(q, case["reply"], decoded=decoded)
        assert list(rec["judge"].items()) == list(case["judge_record"].items())
    files = bench.write_outputs([rec], str(tmp_path / "qa.json"))
    with open(files["predictions_file"]) as f:
        assert json.load(f) == [case["judge_record"]]


# --------------------------------------------------------------------------------------
# VCGBench

TASK_FILE = {"generic_qa": "generic", "temporal_qa": "temporal", "consistency_qa": "consistency"}


def _vcg_row(case: dict) -> dict:
    a, j = case["annotation"], case["judge_record"]
    if case["task_type"] == "consistency_qa":
        return {"Q1": a["q1"], "Q2": a["q2"], "A": a["answer"], "video_name": j["video_name"]}
    return {"Q": a["question"], "A": a["answer"], "video_name": j["video_name"]}


def _write_vcg(root, cases: list[dict], videos: dict) -> None:
    """``root/Benchmarking_QA/{generic,temporal,consistency}_qa.json`` +
    ``root/Test_Videos/<video_name>.mp4``."""
    (root / "Benchmarking_QA").mkdir(parents=True)
    rows: dict[str, list] = {}
    for c in cases:
        rows.setdefault(TASK_FILE[c["task_type"]], []).append(_vcg_row(c))
        _add_video(
            videos, root / "Test_Videos" / f"{c['judge_record']['video_name']}.mp4", c["video"]
        )
    for task, rs in rows.items():
        (root / "Benchmarking_QA" / f"{task}_qa.json").write_text(json.dumps(rs))


def _vcg_records(bench: VCGBench, cases: list[dict]) -> list[dict]:
    qs = bench.questions()
    prompts = [p for c in cases for p in c["prompts"]]
    assert len(qs) == len(prompts)
    return [bench.record(q, p["reply"], decoded=_decoded(p)) for q, p in zip(qs, prompts)]


def _swap(rec: dict) -> dict:
    return {**rec, "Q1": rec["Q2"], "Q2": rec["Q1"]} if "Q1" in rec else rec


@pytest.mark.parametrize("case", VCG_CASES, ids=case_ids(VCG_CASES))
def test_vcgbench_case(case, tmp_path, fake_videos):
    _write_vcg(tmp_path, [case], fake_videos)
    bench = VCGBench(str(tmp_path))
    qs = bench.questions()
    assert len(qs) == len(case["prompts"])
    for q, p in zip(qs, case["prompts"]):
        _check_prompt(q, p)
        _check_frames(q, p)
        assert (
            bench.record(q, p["reply"])["pred"] == bench.record(q, p["reply"], _decoded(p))["pred"]
        )
    recs = _vcg_records(bench, [case])
    (row,) = [r for rows in bench.saved_files(recs).values() for r in rows]
    # the project labels consistency questions correctly; the original swaps them
    assert list(row.items()) == list(_swap(case["judge_record"]).items())
    legacy = VCGBench(str(tmp_path), legacy_consistency_labels=True)
    (row,) = [r for rows in legacy.saved_files(_vcg_records(legacy, [case])).values() for r in rows]
    assert list(row.items()) == list(case["judge_record"].items())


def test_vcgbench_saved_files(tmp_path, fake_videos):
    """All cases in one dataset: the three files exactly as the original's ``save_results``
    (legacy labels), and with the labels corrected by default."""
    _write_vcg(tmp_path, VCG_CASES, fake_videos)
    want = VCG["saved_files"]
    order = {t: i for i, t in enumerate(TASK_FILE)}
    cases = sorted(VCG_CASES, key=lambda c: order[c["task_type"]])  # the original reads by task
    legacy = VCGBench(str(tmp_path), legacy_consistency_labels=True)
    files = legacy.write_outputs(_vcg_records(legacy, cases), str(tmp_path / "vcg.json"))
    for name, rows in want.items():
        with open(files[f"{name}_file"]) as f:
            got = json.load(f)
        assert [list(r.items()) for r in got] == [list(r.items()) for r in rows], name
    fixed = VCGBench(str(tmp_path))
    got = fixed.saved_files(_vcg_records(fixed, cases))
    assert got == {k: [_swap(r) for r in rows] for k, rows in want.items()}


def test_vcgbench_system_variant(tmp_path, fake_videos):
    """``variant_system_vcg``: the ``conv_vcg_v1`` prompt of the case whose question it asks."""
    variant = VCG["variant_system_vcg"]
    matches = [
        c for c in VCG_CASES if f"\n{c['prompts'][0]['clip_text']} " in variant["prompt_text"]
    ]
    assert matches, "no case asks the question of variant_system_vcg"
    case = matches[0]
    _write_vcg(tmp_path, [case], fake_videos)
    q = VCGBench(str(tmp_path), system_vcg=True).questions()[0]
    assert q.prompt_text == variant["prompt_text"]
    for legacy in (True, False):
        assert llm_tokenizer(legacy)(q.prompt_text).input_ids == variant[ids_key(legacy)]


# --------------------------------------------------------------------------------------
# The pipeline's exact evaluation decode (what eval.py feeds the model)

ALL = [("videomme", c) for c in VM_CASES] + [("qa", c) for c in QA_CASES]
ALL += [("vcgbench", c) for c in VCG_CASES]


def _questions(kind: str, case: dict, root, videos: dict, image_file) -> list[tuple]:
    """(question, expected prompt record) of a case, read by its benchmark's reader."""
    if kind == "videomme":
        _write_videomme(root, [case], videos)
        nf, subs = case["num_frames_arg"], case["use_subtitles"]
        return [(q, case) for q in VideoMME(str(root), num_frames=nf, subtitles=subs).questions()]
    if kind == "qa":
        return [(q, case) for q in _write_qa(root, case, videos, image_file).questions()]
    _write_vcg(root, [case], videos)
    return list(zip(VCGBench(str(root)).questions(), case["prompts"]))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """``get(legacy, num_frames, a sample)``: the evaluation pipeline eval.py builds (a model
    config with the fixture tokenizer's vocabulary, ``<image>`` = 32000, and a small CLIP
    tokenizer: the CLIP ids are not pinned by the fixture), one per setting."""
    import dataclasses

    from ppllava_jax.data import pipeline as pl
    from ppllava_jax.data.tokenizers import train_clip_tokenizer
    from tests.evaluate.protocol.fixture import tokenizer_dir
    from tests.evaluate.tiny import tiny_config

    texts = [c["question"] for c in VM_CASES + QA_CASES] * 4
    clip_dir = tmp_path_factory.mktemp("clip_tok")
    ctok = train_clip_tokenizer(texts, clip_dir, num_merges=32)
    tok = llm_tokenizer(True)
    cfg = tiny_config(len(tok), tok.convert_tokens_to_ids("<image>"), len(ctok))
    cfg = dataclasses.replace(cfg, max_T=64)
    made: dict[tuple, pl.Pipeline] = {}

    def get(legacy: bool, num_frames: int, sample) -> pl.Pipeline:
        if (legacy, num_frames) not in made:
            data = dict(
                sources=[dict(path="eval", media_type="video", name="eval")],
                tokenizer=tokenizer_dir(),
                clip_tokenizer=str(clip_dir),
                tokenizer_legacy=legacy,
                num_frames=num_frames,
                max_length=8192,
                buckets=[8192],
                training=False,
                generation_prompt=True,
                padding_side="left",
                batch_size=1,
                shuffle=False,
                num_epochs=1,
                max_images=1,
            )
            made[(legacy, num_frames)] = pl.Pipeline(data, cfg, samples=[[sample]])
        return made[(legacy, num_frames)]

    return get


@pytest.mark.parametrize("kind,case", ALL, ids=[f"{k}:{c['id']}" for k, c in ALL])
def test_pipeline_decodes_exactly(kind, case, tmp_path, fake_videos, image_file, pipelines):
    """The ids, frame indices and frame files the evaluation pipeline feeds the model."""
    from ppllava_jax.data import pipeline as pl

    for q, expect in _questions(kind, case, tmp_path, fake_videos, image_file):
        sample = pl.eval_sample(q.video, q.prompt_text, q.clip_text, q.frames, extra={"qid": q.qid})
        for legacy in (True, False):
            pipe = pipelines(legacy, q.frames.num_segments, sample)
            rec = pipe.preprocess.decode(sample, 0, 0)
            assert rec["input_ids"].tolist() == expect[ids_key(legacy)], f"legacy={legacy}"
            assert rec["frame_indices"].tolist() == expect["frame_indices"]
            assert rec.get("frame_files", expect.get("frame_files")) == expect.get("frame_files")
