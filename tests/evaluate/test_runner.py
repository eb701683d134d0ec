"""eval.py's machinery on a tiny random model: resumption, benchmark loaders, judge files,
attention heatmaps. Accuracy values are irrelevant (random weights)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data import synthetic
from ppllava_jax.data.video import write_video
from ppllava_jax.evaluate import answers, heatmap, runner
from ppllava_jax.evaluate.common import Question
from ppllava_jax.evaluate.model_setup import load_setup, video_buckets
from ppllava_jax.evaluate.mvbench import MVBench
from ppllava_jax.evaluate.synthetic import Synthetic
from tests.evaluate.tiny import make_tiny_checkpoint

MESH = "data=2,fsdp=1,tensor=1"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    ckpt = make_tiny_checkpoint(str(root / "ckpt"), str(root / "data"))
    setup = load_setup(ckpt, mesh=MESH)
    return root, setup


def _clip(path, frames=16, fps=8.0, seed=0):
    rng = np.random.default_rng(seed)
    write_video(path, rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8), fps=fps)


def test_resume_no_duplicates_same_accuracy(env):
    root, setup = env
    bench = Synthetic(str(root / "data"), num_frames=8)
    full = runner.run(bench, setup, str(root / "full" / "res.json"), batch_size=2, progress=False)
    out = str(root / "resumed" / "res.json")
    att = str(root / "att")
    part = runner.run(
        bench, setup, out, batch_size=2, max_new_answers=3, progress=False,
        save_attention=att, max_attention=1,
    )  # fmt: skip
    assert part is None
    with open(answers.answers_path(out)) as f:
        first = [json.loads(x)["id"] for x in f]
    assert len(first) == 4  # stopped after the second batch of 2
    # a kill in the middle of a write leaves half a line: it is ignored
    with open(answers.answers_path(out), "a") as f:
        f.write('{"id": "eval:7", "predic')
    res = runner.run(bench, setup, out, batch_size=2, progress=False)
    with open(answers.answers_path(out)) as f:
        ids = [json.loads(x)["id"] for x in f if x.strip().endswith("}")]
    assert len(ids) == len(set(ids)) == 8
    assert ids[:4] == first
    assert [r["id"] for r in res["records"]] == [f"eval:{i}" for i in range(8)]
    assert res["summary"]["accuracy"] == full["summary"]["accuracy"]
    assert res["summary"]["num_questions"] == 8 and res["summary"]["num_missing"] == 0
    assert set(res["summary"]["by_qtype"]) == set(synthetic.DEFAULT_QTYPES)
    assert [r["pred_letter"] for r in res["records"]] == [r["pred_letter"] for r in full["records"]]
    with open(out) as f:
        assert json.load(f)["summary"] == res["summary"]
    # attention: one picture for the one question asked (max_attention=1): its 8 frames in a
    # 2 x 4 grid, the question and the answer given in its text chunks
    assert os.listdir(att) == ["eval_0.png"]
    im = Image.open(os.path.join(att, "eval_0.png"))
    assert im.size == (round((4 * heatmap.CELL + heatmap.COLORBAR) * heatmap.DPI), im.size[1])
    assert im.size[1] > 2 * heatmap.CELL * heatmap.DPI
    q0 = bench.questions()[0]
    assert im.text["Id"] == "eval:0" and im.text["Question"] == q0.prompt
    assert im.text["Answer"] == res["records"][0]["prediction"]
    # a rerun of a finished evaluation asks nothing and gives the same result
    again = runner.run(bench, setup, out, batch_size=2, progress=False)
    assert again["summary"] == res["summary"]


def test_mvbench_layout(env, tmp_path):
    root, setup = env
    charades = tmp_path / "video/star/Charades_v1_480"
    charades.mkdir(parents=True)
    _clip(str(charades / "AB12.mp4"), seed=1)
    _clip(str(charades / "CD34.mp4"), seed=2)
    frames = tmp_path / "video/tvqa/frames_fps3_hq/ep1"
    frames.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(frames / f"{i:05d}.jpg")
    (tmp_path / "json").mkdir()
    seq = [
        {"video": "AB12.mp4", "question": "What did the person do first?",
         "candidates": ["Sat down.", "Opened the door.", "Took a cup."],
         "answer": "Opened the door.", "start": 0.5, "end": 1.5},
        {"video": "CD34.mp4", "question": "What happened next?",
         "candidates": ["Nothing.", "Ran."], "answer": "Ran.", "start": 0.0, "end": 2.0},
    ]  # fmt: skip
    epi = [
        {"video": "ep1", "question": "Why?", "candidates": ["x", "y", "z", "w"],
         "answer": "z", "start": 1.0, "end": 3.0},
    ]  # fmt: skip
    (tmp_path / "json/action_sequence.json").write_text(json.dumps(seq))
    (tmp_path / "json/episodic_reasoning.json").write_text(json.dumps(epi))
    bench = MVBench(str(tmp_path), num_frames=8)
    qs = bench.questions()
    assert [q.qid for q in qs] == ["action_sequence:0", "action_sequence:1", "episodic_reasoning:0"]
    q0 = qs[0]
    question = (
        "Question: What did the person do first?\nOptions:\n(A) Sat down.\n"
        "(B) Opened the door.\n(C) Took a cup."
    )
    assert q0.clip_text == question
    assert q0.prompt_text == (
        f"USER: <image>\n{question}\nOnly give the best option. ASSISTANT: Best option:("
    )
    assert q0.answer == "(B) Opened the door." and q0.frames.bound == (0.5, 1.5)
    assert q0.info["task_type"] == "Action Sequence"
    assert qs[2].answer == "(C) z" and qs[2].frames.bound == (1.0, 3.0)  # seconds
    assert (qs[2].frames.folder_fps, qs[2].frames.first_idx) == (3.0, 1)
    res = runner.run(
        bench, setup, str(tmp_path / "mv.json"), batch_size=2, max_new_tokens=4, progress=False
    )
    s = res["summary"]
    assert s["answered"] == 3 and s["num_missing"] == 0
    assert set(s["by_task_type"]) == {"Action Sequence", "Episodic Reasoning"}
    assert s["by_task_type"]["Action Sequence"]["answered"] == 2
    assert {"accuracy_original", "accuracy_strict", "acc_dict"} <= set(s)
    r = res["records"][0]
    assert r["pred"].startswith("(") and r["gt"] == "(B) Opened the door."
    assert r["verdict_original"] in ("correct", "wrong") and "verdict_strict" in r


def test_tokenizer_setting_follows_the_checkpoint(env):
    """Evaluation tokenizes as training did: ``inference.json``'s ``tokenizer_legacy`` (written
    by train.py's export) is the default; none recorded (a converted release) means legacy; an
    explicit setting wins."""
    import json
    import os

    root, setup = env
    ckpt = setup.checkpoint
    assert setup.tokenizer_legacy is True  # the tiny checkpoint records none
    inf = os.path.join(ckpt, "inference.json")
    saved = open(inf).read() if os.path.exists(inf) else None
    try:
        with open(inf, "w") as f:
            json.dump({"tokenizer_legacy": None}, f)
        assert load_setup(ckpt, mesh=MESH).tokenizer_legacy is None
        assert load_setup(ckpt, mesh=MESH, tokenizer_legacy=False).tokenizer_legacy is False
    finally:
        if saved is None:
            os.remove(inf)
        else:
            with open(inf, "w") as f:
                f.write(saved)


def test_questions_are_checked_before_anything_runs():
    def q(qid, frames=8):
        return Question(qid=qid, video="v.mp4", prompt="Which?", num_frames=frames)

    runner.check_questions("toy", [q("a"), q("b", 16)], max_T=16)
    with pytest.raises(ValueError, match="toy: question id 'a' appears twice"):
        runner.check_questions("toy", [q("a"), q("b"), q("a")], max_T=16)
    with pytest.raises(ValueError, match="32 frames > the model's max_T=16"):
        runner.check_questions("toy", [q("a", 32)], max_T=16)


def test_pipeline_config_of_a_question_group(env):
    _, setup = env
    data = runner.pipeline_config(
        setup, "toy:default:8", "toy", num_frames=8, answer_prefix="Best option:(",
        batch_size=4, max_new_tokens=16, num_workers=2,
    )  # fmt: skip
    buckets = video_buckets(setup.cfg, 8, 16)
    assert data["sources"] == [dict(path="toy:default:8", media_type="video", name="toy")]
    assert data["buckets"] == buckets and data["max_length"] == max(buckets)
    assert (data["num_frames"], data["batch_size"], data["num_workers"]) == (8, 4, 2)
    assert (data["tokenizer"], data["clip_tokenizer"]) == (
        setup.tokenizer_dir,
        setup.clip_tokenizer_dir,
    )
    assert data["answer_prefix"] == "Best option:(" and data["template"] == setup.template
    assert data["padding_side"] == "left" and data["frame_sampling"] == "middle"
    assert data["training"] is False and data["shuffle"] is False and data["num_epochs"] == 1
