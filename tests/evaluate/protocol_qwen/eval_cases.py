"""The Qwen family's evaluation protocols against the original's drivers run with the Qwen switch
on (the fixture ``reference_protocols_qwen``, ``PPLLAVA_QWEN_PROTOCOLS_DIR``).

Every ``mvbench``, ``videomme``, ``qa``, ``vcgbench`` (both runs) and ``scoring`` case goes
through the project's own code: the benchmark readers (``family='qwen'``, as ``eval.py`` picks it
from a Qwen checkpoint) on directories laid out like the datasets, the frame rules, the
tokenizer as ``eval.py`` loads it, the benchmarks' records, saved files and summaries, and the
evaluation pipeline's exact decode. Texts, ids, frame indices, decoded texts, predictions,
judge records and verdicts must be equal. Only I/O is faked, as in the fixture: a video is its
(frame count, fps) pair; frame folders are real files.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata

import numpy as np
import pytest

from ppllava_jax.data import video as vid
from ppllava_jax.data.frame_index import frame_rule_indices, segment_indices
from ppllava_jax.evaluate import mvbench, scoring
from ppllava_jax.evaluate.conversation import QWEN, decoded_text, reply_after
from ppllava_jax.evaluate.openqa import OpenQA, VCGBench
from ppllava_jax.evaluate.videomme import VideoMME
from tests.evaluate.protocol.videomme_qa_cases import (
    TASK_FILE,
    _write_qa,
    _write_vcg,
    _write_videomme,
)
from tests.evaluate.protocol_qwen.fixture import case_ids, eval_tokenizer, protocols

P = protocols()
MV, VM, QA, VCG, SC = (P[k] for k in ("mvbench", "videomme", "qa", "vcgbench", "scoring"))


@pytest.fixture
def qwen_videos(monkeypatch):
    """``{path: (frames, fps)}``: videos read by the project's reader, the container replaced
    by its frame count and fps (frames carry their index)."""
    videos: dict[str, tuple[int, float]] = {}
    monkeypatch.setattr(vid, "video_info", lambda path: videos[os.fspath(path)])
    monkeypatch.setattr(
        vid,
        "_decode_selected",
        lambda path, wanted, fps: {
            int(i): np.full((2, 2, 3), int(i) % 256, np.uint8) for i in wanted
        },
    )
    return videos


@pytest.fixture(scope="module")
def qwen_image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "frame.jpg"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    return path


def _decoded(prompt_ids: list[int], generated_ids: list[int]) -> str:
    """What the runner decodes: prompt ids + generated ids, special tokens skipped."""
    return eval_tokenizer().decode(list(prompt_ids) + list(generated_ids), skip_special_tokens=True)


def _check_prompt(q, expect: dict) -> None:
    assert q.prompt_text == expect["prompt_text"]
    assert q.clip_text == expect["clip_text"]
    for legacy in (True, False):  # --tokenizer_legacy does not touch a byte-level BPE
        assert eval_tokenizer(legacy)(q.prompt_text).input_ids == expect["input_ids"]


def _check_decoded(q, expect: dict) -> str:
    """The decoded text the runner gives ``record``: prompt ids + generated ids, special
    tokens skipped, as the original's."""
    decoded = _decoded(expect["input_ids"], expect["generated_ids"])
    assert decoded == expect["decoded_text"]
    return decoded


def _answers(q, expect: dict) -> tuple[str, list[str]]:
    """(the reply as the runner decodes it, the decoded texts to record it with): the token
    decoding and, where it rebuilds the same text (byte-level BPE; no NFC change), ``""``
    (``conversation.decoded_text`` of the prompt text and the reply)."""
    reply = eval_tokenizer().decode(expect["generated_ids"], skip_special_tokens=True)
    decoded = _check_decoded(q, expect)
    rebuilt = decoded_text(q.prompt_text, reply, QWEN) == decoded
    if unicodedata.normalize("NFC", q.prompt_text) == q.prompt_text:
        assert rebuilt
    return reply, [decoded, ""] if rebuilt else [decoded]


def _check_frames(q, expect: dict) -> None:
    clip = vid.load_frames_by_rule(q.video, q.frames)
    assert clip.indices.tolist() == expect["frame_indices"]
    if "frame_files" in expect:
        assert list(clip.files) == expect["frame_files"]


def test_the_family_picks_the_drivers_templates():
    assert (QWEN.plain, QWEN.videoqa) == (
        MV["protocol"]["selected"]["template"],
        QA["protocol"]["runs"][0]["selected"]["template"],
    )
    assert {r["selected"]["template"] for r in VM["protocol"]["runs"]} == {QWEN.plain}
    assert (QWEN.plain, QWEN.vcg_system) == (
        VCG["run"]["selected"]["template"],
        VCG["run_system_vcg"]["selected"]["template"],
    )
    assert (mvbench.QUESTION_PROMPT, mvbench.ANSWER_PROMPT, mvbench.RETURN_PROMPT) == tuple(
        MV["protocol"][k] for k in ("question_prompt", "answer_prompt", "return_prompt")
    )


# --------------------------------------------------------------------------------------
# MVBench


def _mv_question(
    case: dict, system_llm: bool = False, root: str = "VIDEO_ROOT", num_segments: int = 0
):
    return mvbench.question_of(
        case["task_type"],
        case["annotation"],
        root,
        qid=case["id"],
        num_segments=num_segments or int(MV["protocol"]["num_segments"]),
        system_llm=system_llm,
        family=True,
    )


def _mv_media(root, case: dict, videos: dict, image_file) -> None:
    """The case's video (its frame count and fps) or frame folder (real files) under root."""
    path = root / case["annotation"]["video"]
    if case["data_type"] == "frame":
        path.mkdir(parents=True)
        for name in range(1, int(case["frames_in_folder"]) + 1):
            os.link(image_file, path / f"{name:0>5}.jpg")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(path, "wb").close()
        videos[os.fspath(path)] = (case["video"]["num_frames"], case["video"]["fps"])


@pytest.mark.parametrize("case", MV["cases"], ids=case_ids(MV["cases"]))
def test_mvbench_case(case):
    _, _, data_type, bound_used = mvbench.TASKS[case["task_type"]]
    assert (data_type, bound_used) == (case["data_type"], case["bound_used"])
    q = _mv_question(case)
    _check_prompt(q, case)
    assert q.answer == case["gt"]
    if case["data_type"] == "frame":
        assert q.frames.folder_fps == case["frame_folder_fps"]
        idx, files = frame_rule_indices(q.frames, case["frames_in_folder"], folder=True)
        assert list(files) == case["frame_files"]
    else:
        idx, _ = frame_rule_indices(q.frames, case["video"]["num_frames"], case["video"]["fps"])
    assert idx.tolist() == case["frame_indices"]
    bench = mvbench.MVBench("unused", qwen=True)
    reply, decodings = _answers(q, case)
    for decoded in decodings:  # the runner's decoding, or the texts'
        rec = bench.record(q, reply, decoded=decoded)
        assert (rec["pred"], rec["gt"]) == (case["pred"], case["gt"])
        assert rec["verdict_original"] == case["verdict"]


def test_mvbench_system_llm_variant():
    v = MV["variant_system_llm_true"]
    (case,) = [c for c in MV["cases"] if c["id"] == v["id"].split("#")[0]]
    _check_prompt(_mv_question(case, system_llm=True), v)


def test_mvbench_save_results_acc_dict():
    bench = mvbench.MVBench("unused", qwen=True)
    qs = [_mv_question(c) for c in MV["cases"]]
    recs = [
        bench.record(q, c["reply"], decoded=_check_decoded(q, c)) for q, c in zip(qs, MV["cases"])
    ]
    assert bench.summarize(recs, qs)["acc_dict"] == MV["save_results_acc_dict"]


@pytest.mark.parametrize("case", MV["frame_index_cases"], ids=case_ids(MV["frame_index_cases"]))
def test_frame_index_cases(case):
    """``get_index`` for every driver count: positive, 0 (``assigned_frame``), negative."""
    folder = case["kind"] == "frame"
    n, fps = int(case["num_frames"]), float(case.get("fps", mvbench.FRAME_FOLDER_FPS))
    bound = tuple(case["bound"]) if case.get("bound") is not None else None
    idx = segment_indices(
        n if folder else n - 1,
        fps,
        int(case["num_segments"]),
        bound,
        1 if folder else 0,
        assigned_frame=int(case.get("assigned_frame", 16)),
    )
    assert idx.tolist() == case["frame_indices"]


def _negative_count_for(length: float, t: int) -> int | None:
    """A negative driver count whose 32/64 rule (at most 32 s per |n|: 32) gives ``t`` frames
    for a clip of ``length`` seconds, or None when none does."""
    if t == 32:
        return -max(1, math.ceil(length / 32))
    return -1 if t == 64 and length > 32 else None


@pytest.mark.parametrize("case", MV["cases"], ids=case_ids(MV["cases"]))
def test_mvbench_negative_frame_count(case, tmp_path, qwen_videos, qwen_image_file):
    """A negative ``--num_frames``: 32 or 64 frames by the clip's length (the bound's, else the
    video's or folder's), read by the reader from the media."""
    a = case["annotation"]
    if case["bound_used"]:
        length = a["end"] - a["start"]
    elif case["data_type"] == "frame":
        length = case["frames_in_folder"] / case["frame_folder_fps"]
    else:
        length = (case["video"]["num_frames"] - 1) / case["video"]["fps"]
    n = _negative_count_for(length, len(case["frame_indices"]))
    if n is None:
        pytest.skip("no negative count gives this case's frame count")
    _mv_media(tmp_path, case, qwen_videos, qwen_image_file)
    q = _mv_question(case, root=str(tmp_path), num_segments=n)
    _check_frames(q, case)


# --------------------------------------------------------------------------------------
# Video-MME


def _videomme(root, case: dict, videos: dict, num_frames: int | None = None) -> VideoMME:
    _write_videomme(root, [case], videos)
    nf = case["num_frames_arg"] if num_frames is None else num_frames
    return VideoMME(str(root), num_frames=nf, subtitles=case["use_subtitles"], qwen=True)


@pytest.mark.parametrize("case", VM["cases"], ids=case_ids(VM["cases"]))
def test_videomme_case(case, tmp_path, qwen_videos):
    bench = _videomme(tmp_path, case, qwen_videos)
    (q,) = bench.questions()
    _check_prompt(q, case)
    _check_frames(q, case)
    joined, order = bench.video_subtitles(case["videoID"], q.frames.num_segments)
    assert joined == case["subtitles_joined"]
    if "subtitle_order" in case:
        assert order == case["subtitle_order"]
    reply, decodings = _answers(q, case)
    for decoded in decodings:
        rec = bench.record(q, reply, decoded=decoded)
        assert (rec["response"], rec["extraction"]) == (case["response"], case["extraction"])
        assert rec["verdict_original"] == case["verdict"]


@pytest.mark.parametrize("case", VM["cases"], ids=case_ids(VM["cases"]))
def test_videomme_negative_frame_count(case, tmp_path, qwen_videos):
    """A negative ``--num_frames``: 32 or 64 frames by the video's length (``get_index``)."""
    length = (case["video"]["num_frames"] - 1) / case["video"]["fps"]
    n = _negative_count_for(length, len(case["frame_indices"]))
    if n is None:
        pytest.skip("no negative count gives this case's frame count")
    (q,) = _videomme(tmp_path, case, qwen_videos, num_frames=n).questions()
    _check_frames(q, case)
    assert q.prompt_text == case["prompt_text"]  # subtitles of the same frames


def test_videomme_one_parquet_per_setting(tmp_path, qwen_videos):
    """Each setting's cases in one parquet: the original's results file, named after the
    setting, and the summary saying which setting it holds."""
    groups: dict[tuple, list[dict]] = {}
    for c in VM["cases"]:
        groups.setdefault((c["use_subtitles"], c["num_frames_arg"]), []).append(c)
    names = set()
    for k, ((subs, nf), cases) in enumerate(groups.items()):
        root = tmp_path / f"g{k}"
        _write_videomme(root, cases, qwen_videos)
        bench = VideoMME(str(root), num_frames=nf, subtitles=subs, qwen=True)
        qs = {q.qid: q for q in bench.questions()}
        order = list(dict.fromkeys(c["videoID"] for c in cases))
        want = sorted(cases, key=lambda c: order.index(c["videoID"]))
        recs = [
            bench.record(
                qs[c["id"].split("/")[0]], c["reply"], _check_decoded(qs[c["id"].split("/")[0]], c)
            )
            for c in want
        ]
        path = bench.write_outputs(recs, str(tmp_path / "res.json"))["videomme_results_file"]
        names.add(os.path.basename(path))
        assert ("with_subtitles" if subs else "without_subtitles") in os.path.basename(path)
        with open(path) as f:
            saved = json.load(f)
        flat = [q for v in saved for q in v["questions"]]
        assert [q["response"] for q in flat] == [c["response"] for c in want]
        s = bench.summarize(recs, list(qs.values()))
        assert s["use_subtitles"] is subs and s["setting"].startswith("with" if subs else "without")
        verdicts = [c["verdict"] for c in want]
        assert s["correct_original"] == verdicts.count("correct")
        assert s["excluded_original"] == verdicts.count("excluded")
    assert len(names) == len({subs for subs, _ in groups})  # one file name per setting


# --------------------------------------------------------------------------------------
# Open-ended QA


def _qa(root, case: dict, videos: dict, image_file) -> OpenQA:
    b = _write_qa(root, case, videos, image_file)
    return OpenQA(b.q_path, video_dir=b.video_dir, dataset=b.dataset, qwen=True)


@pytest.mark.parametrize("case", QA["cases"], ids=case_ids(QA["cases"]))
def test_qa_case(case, tmp_path, qwen_videos, qwen_image_file):
    bench = _qa(tmp_path, case, qwen_videos, qwen_image_file)
    (q,) = bench.questions()
    _check_prompt(q, case)
    _check_frames(q, case)
    reply, decodings = _answers(q, case)
    for decoded in decodings:
        rec = bench.record(q, reply, decoded=decoded)
        assert list(rec["judge"].items()) == list(case["judge_record"].items())
    with open(bench.write_outputs([rec], str(tmp_path / "qa.json"))["predictions_file"]) as f:
        assert json.load(f) == [case["judge_record"]]


# --------------------------------------------------------------------------------------
# VCGBench: without --system_vcg (plain_qwen) and with it (conv_vcg_qwen)

RUNS = [(False, "cases", "saved_files"), (True, "cases_system_vcg", "saved_files_system_vcg")]
VCG_ALL = [(s, c) for s, key, _ in RUNS for c in VCG[key]]


def _vcg_records(bench: VCGBench, cases: list[dict]) -> list[dict]:
    qs = bench.questions()
    prompts = [p for c in cases for p in c["prompts"]]
    assert len(qs) == len(prompts)
    return [bench.record(q, p["reply"], decoded=_check_decoded(q, p)) for q, p in zip(qs, prompts)]


@pytest.mark.parametrize(
    "system_vcg,case", VCG_ALL, ids=[f"system_vcg={s}:{c['id']}" for s, c in VCG_ALL]
)
def test_vcgbench_case(system_vcg, case, tmp_path, qwen_videos):
    _write_vcg(tmp_path, [case], qwen_videos)
    bench = VCGBench(
        str(tmp_path), system_vcg=system_vcg, legacy_consistency_labels=True, qwen=True
    )
    qs = bench.questions()
    assert len(qs) == len(case["prompts"])
    for q, p in zip(qs, case["prompts"]):
        _check_prompt(q, p)
        _check_frames(q, p)
        reply, decodings = _answers(q, p)
        assert len({bench.record(q, reply, decoded=d)["pred"] for d in decodings}) == 1
    (row,) = [r for rows in bench.saved_files(_vcg_records(bench, [case])).values() for r in rows]
    assert list(row.items()) == list(case["judge_record"].items())


@pytest.mark.parametrize("system_vcg,key,saved", RUNS, ids=["plain_qwen", "conv_vcg_qwen"])
def test_vcgbench_saved_files(system_vcg, key, saved, tmp_path, qwen_videos):
    """All cases of a run in one dataset: the three files as the original's ``save_results``."""
    _write_vcg(tmp_path, VCG[key], qwen_videos)
    order = {t: i for i, t in enumerate(TASK_FILE)}
    cases = sorted(VCG[key], key=lambda c: order[c["task_type"]])  # the original reads by task
    bench = VCGBench(
        str(tmp_path), system_vcg=system_vcg, legacy_consistency_labels=True, qwen=True
    )
    files = bench.write_outputs(_vcg_records(bench, cases), str(tmp_path / "vcg.json"))
    for name, rows in VCG[saved].items():
        with open(files[f"{name}_file"]) as f:
            assert [list(r.items()) for r in json.load(f)] == [list(r.items()) for r in rows], name


# --------------------------------------------------------------------------------------
# Scoring


MV_PIPE, VM_PIPE = SC["mvbench"]["pipeline"], SC["videomme"]["pipeline"]


@pytest.mark.parametrize("entry", MV_PIPE, ids=[str(i) for i in range(len(MV_PIPE))])
def test_scoring_mvbench_pipeline(entry):
    decoded = _decoded(SC["mvbench"]["item"]["prompt_ids"], entry["generated_ids"])
    assert decoded == entry["decoded_text"]
    pred = mvbench.pred_of(decoded)
    assert pred == entry["pred"]
    assert scoring.mvbench_verdict(pred, SC["mvbench"]["item"]["gt"]) == entry["verdict"]


@pytest.mark.parametrize(
    "entry", SC["mvbench"]["check_ans"], ids=case_ids(SC["mvbench"]["check_ans"])
)
def test_scoring_mvbench_check_ans(entry):
    assert scoring.mvbench_verdict(entry["pred"], entry["gt"]) == entry["verdict"]


@pytest.mark.parametrize("entry", VM_PIPE, ids=[str(i) for i in range(len(VM_PIPE))])
def test_scoring_videomme_pipeline(entry):
    item = SC["videomme"]["item"]
    decoded = _decoded(item["prompt_ids"], entry["generated_ids"])
    assert decoded == entry["decoded_text"]
    response = reply_after(decoded, VM["protocol"]["answer_prompt"])
    assert response == entry["response"]
    assert scoring.videomme_extract(response) == entry["extraction"]
    assert scoring.videomme_verdict(response, item["answer"]) == entry["verdict"]


@pytest.mark.parametrize("entry", SC["videomme"]["direct"], ids=case_ids(SC["videomme"]["direct"]))
def test_scoring_videomme_direct(entry):
    assert scoring.videomme_extract(entry["response"]) == entry["extraction"]
    assert scoring.videomme_verdict(entry["response"], entry["gt"]) == entry["verdict"]


# --------------------------------------------------------------------------------------
# The evaluation pipeline's exact decode (what eval.py feeds a Qwen model)

PIPE_ALL = [("videomme", c) for c in VM["cases"]] + [("qa", c) for c in QA["cases"]]
PIPE_ALL += [("vcgbench", c) for c in VCG["cases"]] + [("mvbench", c) for c in MV["cases"]]


def _pipe_questions(kind: str, case: dict, root, videos: dict, image_file) -> list[tuple]:
    if kind == "videomme":
        return [(q, case) for q in _videomme(root, case, videos).questions()]
    if kind == "qa":
        return [(q, case) for q in _qa(root, case, videos, image_file).questions()]
    if kind == "mvbench":
        _mv_media(root, case, videos, image_file)
        return [(_mv_question(case, root=str(root)), case)]
    _write_vcg(root, [case], videos)
    return list(zip(VCGBench(str(root), qwen=True).questions(), case["prompts"]))


@pytest.fixture(scope="module")
def qwen_pipeline(tmp_path_factory):
    """``get(num_frames, sample)``: the pipeline eval.py's runner builds
    (``runner.pipeline_config``) for the 7B PPLLaVA-Qwen config and the fixture's tokenizer;
    the SigLIP vocabulary is not in the fixture, so a small CLIP-style tokenizer stands in (its
    ids are compared with its own call under the fixture's arguments)."""
    from types import SimpleNamespace

    from ppllava_jax.data import pipeline as pl
    from ppllava_jax.data.tokenizers import train_clip_tokenizer
    from ppllava_jax.evaluate.runner import pipeline_config
    from ppllava_jax.models.config import ppllava_qwen7b_config
    from tests.evaluate.protocol_qwen.fixture import tokenizer_dir

    texts = [c["question"] for c in VM["cases"] + QA["cases"]] * 4
    clip_dir = tmp_path_factory.mktemp("clip_tok")
    ctok = train_clip_tokenizer(texts, clip_dir, num_merges=32)
    cfg = ppllava_qwen7b_config()
    setup = SimpleNamespace(
        cfg=cfg,
        template="plain_qwen",
        tokenizer_legacy=True,
        tokenizer_dir=tokenizer_dir(),
        clip_tokenizer_dir=str(clip_dir),
    )
    made: dict = {}

    def get(num_frames: int, sample):
        if num_frames not in made:
            data = pipeline_config(
                setup,
                "eval",
                "eval",
                num_frames=num_frames,
                answer_prefix="",
                batch_size=1,
                max_new_tokens=200,
            )
            made[num_frames] = pl.Pipeline(data, cfg, samples=[[sample]])
        return made[num_frames], ctok, cfg

    return get


@pytest.mark.parametrize("kind,case", PIPE_ALL, ids=[f"{k}:{c['id']}" for k, c in PIPE_ALL])
def test_pipeline_decodes_exactly(
    kind, case, tmp_path, qwen_videos, qwen_image_file, qwen_pipeline
):
    """The ids, CLIP ids (padded to the fixture's length, no mask), frames the model is fed;
    generation stops at the fixture's end token."""
    from ppllava_jax.data import pipeline as pl

    kwargs = P["meta"]["clip_tokenizer_kwargs"]
    for q, expect in _pipe_questions(kind, case, tmp_path, qwen_videos, qwen_image_file):
        sample = pl.eval_sample(q.video, q.prompt_text, q.clip_text, q.frames, extra={"qid": q.qid})
        pipe, ctok, cfg = qwen_pipeline(q.frames.num_segments, sample)
        rec = pipe.preprocess.decode(sample, 0, 0)
        assert rec["input_ids"].tolist() == expect["input_ids"]
        assert rec["frame_indices"].tolist() == expect["frame_indices"]
        assert rec["clip_ids"].tolist() == ctok(q.clip_text, **kwargs)["input_ids"]
        assert len(rec["clip_ids"]) == kwargs["max_length"] and rec["clip_mask"].all()
        assert cfg.llm.eos_token_id == eval_tokenizer().convert_tokens_to_ids(
            P["tokenizer"]["eos_token"]
        )
