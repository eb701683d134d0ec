"""Journey: a tiny model's open-QA answers (``eval.py --benchmark openqa`` on the README's own
videos example, as tests/test_readme_own_data.py runs it) judged end to end by ``python -m
ppllava_jax.judge`` against a local scripted chat server: the original's QA prompt around each
answer the model gave, its printed summary, and a rerun that asks nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ppllava_jax.data.video import write_video
from tests.evaluate.tiny import make_tiny_checkpoint
from tests.judge.chat_server import ChatServer, ok, user_text
from tests.judge.original import original_prompts, original_qa_summary

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "examples" / "my_videos" / "heldout.json"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_open_qa_answers_judged_end_to_end(tmp_path):
    media = tmp_path / "my_videos"
    media.mkdir()
    shutil.copy(HELDOUT, media / "heldout.json")
    held = json.loads(HELDOUT.read_text())
    for k, v in enumerate(sorted({h["video"] for h in held})):
        (media / v).parent.mkdir(parents=True, exist_ok=True)
        frames = np.full((16, 48, 48, 3), 40 * k, np.uint8)
        for t in range(16):
            frames[t, 12:28, t : t + 16] = (250, 200, 30)
        write_video(str(media / v), frames, fps=8)
    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "tokenizer_data"))
    out = tmp_path / "runs" / "heldout.json"
    res = _run(
        ["eval.py", "--checkpoint", ckpt, "--benchmark", "openqa", "--data",
         str(media / "heldout.json"), "--video_dir", str(media), "--out", str(out),
         "--num_frames=4", "--max_new_tokens=4", "--batch_size=8"],
        ROOT,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    preds = json.loads((tmp_path / "runs" / "heldout_pred.json").read_text())
    assert [p["id"] for p in preds] == [h["id"] for h in held]

    verdicts = ["{'pred': 'yes', 'score': 4}", "{'pred': 'no', 'score': 1}"]
    by_question = {h["question"]: verdicts[i % 2] for i, h in enumerate(held)}

    def script(body, n):
        text = user_text(body)
        (q,) = [q for q in by_question if f"Question: {q}\n" in text]
        return ok(by_question[q])

    judge = ["-m", "ppllava_jax.judge", "--input", str(out), "--model", "local-judge",
             "--api_key_env="]  # fmt: skip
    with ChatServer(script) as server:
        res = _run([*judge, "--base_url", server.url], tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        sent = [b["messages"] for _, b in server.requests]
    want = []
    for p in preds:  # the model's own answers inside the original's prompt
        system, user = original_prompts(p["question"], p["answer"], p["pred"])["qa"]
        want.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
    assert sorted(map(json.dumps, sent)) == sorted(map(json.dumps, want))
    judged = tmp_path / "runs" / "heldout_judge"
    results = json.loads((judged / "results.json").read_text())
    combined = json.loads((judged / "qa.json").read_text())
    assert results["complete"] and list(combined) == [f"{p['id']}_0" for p in preds]
    printed = original_qa_summary(combined)
    assert results["criteria"]["qa"]["printed"] == printed
    lines = res.stdout.splitlines()
    assert lines[lines.index("All evaluation completed!") + 1 :][: len(printed)] == printed

    with ChatServer(script) as server:  # a rerun asks nothing and prints the same
        again = _run([*judge, "--base_url", server.url], tmp_path)
        assert again.returncode == 0 and server.requests == []
    assert [x for x in again.stdout.splitlines() if x in printed] == printed
