"""MVBench protocol and answer scoring against the original's outputs (``reference_protocols``).

Every ``mvbench`` case, ``frame_index_cases`` entry, the ``system_llm`` variant, the
``save_results`` acc_dict and every ``scoring.mvbench`` / ``scoring.videomme`` entry of the
fixture (``PPLLAVA_PROTOCOLS_DIR``) goes through the project's own functions: the MVBench
question builder the reader uses, the frame-rule indices the video reader uses, the LLM
tokenizer loader, the benchmark's ``record`` / ``summarize`` and ``evaluate.scoring``. Then an
end-to-end run: a small MVBench directory (json/, mp4 videos, a tvqa frame folder) read by
the reader and decoded by the data pipeline's evaluation branch, frames identified by their
pixel values.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from ppllava_jax.data.frame_index import FrameRule, eval_num_segments, frame_rule_indices
from ppllava_jax.evaluate import mvbench, scoring
from ppllava_jax.evaluate.conversation import reply_after
from tests.evaluate.protocol.fixture import (
    case_ids,
    ids_key,
    llm_tokenizer,
    protocols,
    tokenizer_dir,
)

P = protocols()
MV = P["mvbench"]
CASES = MV["cases"]
SC = P["scoring"]


def _question(case: dict, system_llm: bool = False):
    return mvbench.question_of(
        case["task_type"],
        case["annotation"],
        "VIDEO_ROOT",
        qid=case["id"],
        num_segments=int(MV["protocol"]["num_segments"]),
        system_llm=system_llm,
    )


def _decoded(prompt_ids: list[int], generated_ids: list[int]) -> str:
    # what the driver decodes: prompt + generation, special tokens skipped
    return llm_tokenizer(True).decode(
        list(prompt_ids) + list(generated_ids), skip_special_tokens=True
    )


# --------------------------------------------------------------------------------------
# MVBench cases


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_mvbench_task_table(case):
    _, _, data_type, bound_used = mvbench.TASKS[case["task_type"]]
    assert (data_type, bound_used) == (case["data_type"], case["bound_used"])


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_mvbench_prompt_clip_gt(case):
    q = _question(case)
    assert q.prompt_text == case["prompt_text"]
    assert q.clip_text == case["clip_text"]
    assert q.answer == case["gt"]
    assert q.video == os.path.join("VIDEO_ROOT", case["annotation"]["video"])


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "nonlegacy"])
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_mvbench_input_ids(case, legacy):
    q = _question(case)
    assert llm_tokenizer(legacy)(q.prompt_text).input_ids == case[ids_key(legacy)]


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_mvbench_frames(case):
    rule = _question(case).frames
    if case["data_type"] == "frame":
        assert rule.folder_fps == case["frame_folder_fps"]
        idx, files = frame_rule_indices(rule, case["frames_in_folder"], folder=True)
        assert list(files) == case["frame_files"]
    else:
        idx, files = frame_rule_indices(rule, case["video"]["num_frames"], case["video"]["fps"])
        assert files == ()
    assert idx.tolist() == case["frame_indices"]


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_mvbench_pred_and_verdict(case):
    q = _question(case)
    decoded = _decoded(case["input_ids"], case["generated_ids"])
    rec = mvbench.MVBench("unused").record(q, case["reply"], decoded=decoded)
    assert rec["pred"] == case["pred"]
    assert rec["gt"] == case["gt"]
    assert rec["verdict_original"] == case["verdict"]
    assert rec["verdict_strict"] in ("correct", "wrong")
    # without the token decoding (rebuilt from the texts): same pred
    assert mvbench.MVBench("unused").record(q, case["reply"])["pred"] == case["pred"]


def test_mvbench_system_llm_variant():
    v = MV["variant_system_llm_true"]
    (case,) = [c for c in CASES if c["id"] == v["id"].split("#")[0]]
    q = _question(case, system_llm=True)
    assert q.prompt_text == v["prompt_text"]
    assert q.clip_text == case["clip_text"]  # the system text never reaches CLIP
    for legacy in (True, False):
        assert llm_tokenizer(legacy)(q.prompt_text).input_ids == v[ids_key(legacy)]


def test_mvbench_save_results_acc_dict():
    bench = mvbench.MVBench("unused")
    qs = [_question(c) for c in CASES]
    recs = [
        bench.record(q, c["reply"], decoded=_decoded(c["input_ids"], c["generated_ids"]))
        for q, c in zip(qs, CASES)
    ]
    summary = bench.summarize(recs, qs)
    assert summary["acc_dict"] == MV["save_results_acc_dict"]
    # the original's accuracy, as a fraction, equals its Total Acc
    assert summary["accuracy_original"] * 100 == pytest.approx(
        MV["save_results_acc_dict"]["Total Acc"], abs=1e-9
    )
    assert summary["answered"] == len(CASES) and summary["num_missing"] == 0


FRAME_CASES = MV["frame_index_cases"]


@pytest.mark.parametrize("case", FRAME_CASES, ids=case_ids(FRAME_CASES))
def test_frame_index_cases(case):
    folder = case["kind"] == "frame"
    n = int(case["num_frames"])
    fps = float(case.get("fps", mvbench.FRAME_FOLDER_FPS))
    bound = tuple(case["bound"]) if case.get("bound") is not None else None
    max_frame = n if folder else n - 1
    t = eval_num_segments(
        int(case["num_segments"]), max_frame, fps, bound, case.get("assigned_frame", 16)
    )
    rule = FrameRule(t, bound, folder_fps=fps)
    idx, files = frame_rule_indices(rule, n, fps, folder=folder)
    assert idx.tolist() == case["frame_indices"]
    if folder and "frame_files" in case:
        assert list(files) == case["frame_files"]


# --------------------------------------------------------------------------------------
# Scoring


MV_PIPE = SC["mvbench"]["pipeline"]


@pytest.mark.parametrize("entry", MV_PIPE, ids=[str(i) for i in range(len(MV_PIPE))])
def test_scoring_mvbench_pipeline(entry):
    item = SC["mvbench"]["item"]
    pred = mvbench.pred_of(_decoded(item["prompt_ids"], entry["generated_ids"]))
    assert pred == entry["pred"]
    assert scoring.mvbench_verdict(pred, item["gt"]) == entry["verdict"]
    question, gt = mvbench.qa_template(
        {"question": _strip_question(item["question_text"]), **_cands(item)}
    )
    assert (question, gt) == (item["question_text"], item["gt"])


def _strip_question(text: str) -> str:
    return text[len("Question: ") : text.index("\nOptions:\n")]


def _cands(item: dict) -> dict:
    return {"candidates": item["candidates"], "answer": item["answer"]}


MV_CHECK = SC["mvbench"]["check_ans"]


@pytest.mark.parametrize("entry", MV_CHECK, ids=[str(i) for i in range(len(MV_CHECK))])
def test_scoring_mvbench_check_ans(entry):
    assert scoring.mvbench_verdict(entry["pred"], entry["gt"]) == entry["verdict"]


VM_PIPE = SC["videomme"]["pipeline"]


@pytest.mark.parametrize("entry", VM_PIPE, ids=[str(i) for i in range(len(VM_PIPE))])
def test_scoring_videomme_pipeline(entry):
    item = SC["videomme"]["item"]
    decoded = _decoded(item["prompt_ids"], entry["generated_ids"])
    response = reply_after(decoded, "The best answer is:")
    assert response == entry["response"]
    assert scoring.videomme_extract(response) == entry["extraction"]
    assert scoring.videomme_verdict(response, item["answer"]) == entry["verdict"]


VM_DIRECT = SC["videomme"]["direct"]


@pytest.mark.parametrize("entry", VM_DIRECT, ids=[str(i) for i in range(len(VM_DIRECT))])
def test_scoring_videomme_direct(entry):
    assert scoring.videomme_extract(entry["response"]) == entry["extraction"]
    assert scoring.videomme_verdict(entry["response"], entry["gt"]) == entry["verdict"]


def test_scoring_quirks_and_strict_twins():
    gt = "(B) Put down the cup."
    # the original: an empty reply is correct, a lower-case letter too, text alone is wrong
    assert scoring.mvbench_verdict("(", gt) == "correct"
    assert scoring.mvbench_verdict_strict("(", gt) == "wrong"
    assert scoring.mvbench_verdict_strict("(b) put down", gt) == "correct"
    assert scoring.mvbench_verdict_strict("((B) Put down", gt) == "correct"
    assert scoring.mvbench_verdict_strict("(Based on the video, B", gt) == "wrong"
    assert scoring.mvbench_verdict_strict("(A", gt) == "wrong"
    # empty answer text: the original raises IndexError
    assert scoring.mvbench_verdict("(A", "(A) ") == "error:IndexError"
    _, gt_missing = mvbench.qa_template({"question": "q", "candidates": ["x"], "answer": "y"})
    assert gt_missing == "(@) y"
    assert scoring.mvbench_verdict_strict("(A", gt_missing) == "error:BadReference"
    # Video-MME: unparsable is excluded by the original, wrong when strict
    assert scoring.videomme_verdict("c", "C") == "excluded"
    assert scoring.videomme_verdict_strict("c", "C") == "wrong"
    assert scoring.videomme_verdict_strict("", "A") == "wrong"
    assert scoring.videomme_verdict("Best option: C", "C") == "wrong"  # the B of Best
    assert scoring.videomme_verdict_strict("Best option: C", "C") == "correct"
    assert scoring.videomme_verdict_strict("The best option is (D).", "D") == "correct"
    assert scoring.videomme_verdict_strict("A or B", "A") == "wrong"
    assert scoring.videomme_verdict(None, "A") == "error:AttributeError"
    s = scoring.two_verdict_summary(
        [
            {"verdict_original": "correct", "verdict_strict": "correct", "g": "x"},
            {"verdict_original": "excluded", "verdict_strict": "wrong", "g": "x"},
            {"verdict_original": "wrong", "verdict_strict": "wrong", "g": "y"},
        ],
        "g",
    )
    assert (s["accuracy_original"], s["counted_original"], s["excluded_original"]) == (0.5, 2, 1)
    assert (s["accuracy_strict"], s["counted_strict"]) == (1 / 3, 3)
    assert s["by_g"]["x"]["accuracy_original"] == 1.0


# --------------------------------------------------------------------------------------
# End to end: reader -> pipeline evaluation decode


def _write_mvbench(root):
    """json/ + video/ of three tasks: a bounded video task, an unbounded one (a video shorter
    than 32 frames) and the tvqa frame folder task. Frame k has pixel value 6 * k (videos)
    or 10 * k (folder files, numbered from 1)."""
    from PIL import Image

    from ppllava_jax.data.video import write_video

    def video(path, n, fps):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frames = np.stack([np.full((32, 32, 3), 6 * k, np.uint8) for k in range(n)])
        write_video(path, frames, fps=fps)

    video(os.path.join(root, "video/star/Charades_v1_480/AB12.mp4"), 40, 10.0)
    video(os.path.join(root, "video/perception/videos/count1.mp4"), 20, 5.0)
    folder = os.path.join(root, "video/tvqa/frames_fps3_hq/ep1")
    os.makedirs(folder)
    for k in range(1, 25):
        Image.fromarray(np.full((32, 32, 3), 10 * k, np.uint8)).save(
            os.path.join(folder, f"{k:05d}.jpg"), quality=100
        )
    items = {
        "action_sequence.json": [
            {"video": "AB12.mp4", "question": "What did the person do first?",
             "candidates": ["Sat down.", "Opened the door."], "answer": "Opened the door.",
             "start": 0.5, "end": 3.3},
        ],
        "action_count.json": [
            {"video": "count1.mp4", "question": "How many times?",
             "candidates": ["3", "2", "4"], "answer": "4"},
        ],
        "episodic_reasoning.json": [
            {"video": "ep1", "question": "Why?", "candidates": ["x", "y", "z"],
             "answer": "z", "start": 1.0, "end": 6.5},
        ],
    }  # fmt: skip
    os.makedirs(os.path.join(root, "json"))
    for name, rows in items.items():
        with open(os.path.join(root, "json", name), "w") as f:
            json.dump(rows, f)


def test_mvbench_end_to_end_pipeline(tmp_path):
    from ppllava_jax.data import pipeline as pl
    from ppllava_jax.data.frame_index import segment_indices
    from ppllava_jax.data.tokenizers import train_clip_tokenizer
    from ppllava_jax.evaluate.runner import pipeline_sample
    from tests.evaluate.tiny import tiny_config

    root = str(tmp_path / "MVBench")
    _write_mvbench(root)
    qs = mvbench.MVBench(root).questions()
    assert [q.qid for q in qs] == ["action_sequence:0", "action_count:0", "episodic_reasoning:0"]
    # the texts, written out here independently of the builder
    assert qs[0].clip_text == (
        "Question: What did the person do first?\nOptions:\n(A) Sat down.\n(B) Opened the door."
    )
    assert qs[0].prompt_text == (
        f"USER: <image>\n{qs[0].clip_text}\nOnly give the best option. ASSISTANT: Best option:("
    )
    assert [q.answer for q in qs] == ["(B) Opened the door.", "(C) 4", "(C) z"]

    ctok_dir = str(tmp_path / "clip_tok")
    ctok = train_clip_tokenizer([q.clip_text for q in qs] * 4, ctok_dir, num_merges=64)
    model_cfg = dataclasses.replace(
        tiny_config(32001, 32000, len(ctok)), max_T=32
    )  # the fixture's Vicuna tokenizer: <image> = 32000
    expected = {
        # bound (0.5, 3.3) s at 10 fps over 40 frames; whole 20-frame video at 5 fps; folder
        # of 24 files at 3 fps from 1, bound (1, 6.5) s
        qs[0].qid: segment_indices(39, 10.0, 32, (0.5, 3.3), 0),
        qs[1].qid: segment_indices(19, 5.0, 32, None, 0),
        qs[2].qid: segment_indices(24, 3.0, 32, (1.0, 6.5), 1),
    }
    # a video shorter than 32 frames: repeats spread evenly, its last frame never read
    assert expected[qs[1].qid].tolist() == [
        0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7, 8, 8, 9,
        10, 10, 11, 11, 12, 12, 13, 14, 14, 15, 15, 16, 17, 17, 18, 18,
    ]  # fmt: skip
    for legacy in (True, False):
        data = dict(
            sources=[dict(path="mvbench", media_type="video", name="mvbench")],
            tokenizer=tokenizer_dir(),
            clip_tokenizer=ctok_dir,
            tokenizer_legacy=legacy,
            num_frames=32,
            clip_max_length=77,
            max_length=512,
            buckets=[512],
            padding_side="left",
            batch_size=1,
            training=False,
            generation_prompt=True,
            shuffle=False,
            max_images=1,
        )
        pipe = pl.Pipeline(
            data, model_cfg, samples=[[pipeline_sample(q, "mvbench", i) for i, q in enumerate(qs)]]
        )
        tok = llm_tokenizer(legacy)
        for i, q in enumerate(qs):
            rec = pipe.preprocess.decode(pipe.sample(0, i), 0, i)
            assert rec["input_ids"].tolist() == tok(q.prompt_text).input_ids
            want_clip = ctok(q.clip_text, max_length=77, padding="max_length", truncation=True)
            assert rec["clip_ids"].tolist() == want_clip["input_ids"]
            assert rec["frame_indices"].tolist() == expected[q.qid].tolist()
            level = rec["pixels"].reshape(32, -1).mean(axis=1)
            if q.qid.startswith("episodic"):
                assert rec["frame_files"] == [f"{k:05d}.jpg" for k in expected[q.qid]]
                np.testing.assert_allclose(level, 10 * expected[q.qid], atol=2.5)
            else:
                np.testing.assert_allclose(level, 6 * expected[q.qid], atol=2.5)
        if legacy:  # the legacy tokenizer differs after <image>
            assert rec["input_ids"].tolist() != llm_tokenizer(False)(q.prompt_text).input_ids
        # the batches the runner iterates: every question valid, in order
        batches = list(pipe.iterator())
        assert [b["meta"]["status"][0] for b in batches] == ["ok"] * 3
        pipe.close()
