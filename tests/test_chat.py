"""The chat command driven through a pipe: two turns, context kept, /reset, EOF."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluate.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return make_tiny_checkpoint(str(root / "ckpt"), str(root / "data")), root


def test_chat_through_a_pipe(ckpt):
    ckpt_dir, root = ckpt
    video = str(root / "data" / "videos" / "eval_00000.mp4")
    att = root / "att"
    q1, q2, q3 = "What colour is the square?", "Which way does it move?", "Is it big?"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "ppllava_jax.chat", "--checkpoint", ckpt_dir, "--video", video,
         "--num_frames", "8", "--max_new_tokens", "5", "--show_prompt",
         "--mesh", "data=1,fsdp=1,tensor=1", "--save-attention", str(att)],
        input=f"{q1}\n\n{q2}\n/reset\n{q3}\n",
        capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each prompt as the chat printed it (its repr: one line whatever the text holds)
    prompts = [
        ast.literal_eval(x[len("[prompt] ") :])
        for x in proc.stderr.splitlines()
        if x.startswith("[prompt] ")
    ]
    assert len(prompts) == 3, proc.stderr[-3000:]
    assert proc.stdout.count("ASSISTANT: ") == 3, proc.stdout
    # the first answer as streamed: between the first and second "ASSISTANT: "
    answer1 = proc.stdout.split("ASSISTANT: ")[1].rstrip("\n")
    assert prompts[0] == f"<s>USER: <image>\n{q1} ASSISTANT:"
    # the second prompt carries the first turn, question and the answer as streamed (stripped;
    # "..." for an empty one), then the new question
    a1 = answer1.strip() or "..."
    assert prompts[1] == f"<s>USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"
    # after /reset the history is gone
    assert prompts[2] == f"<s>USER: <image>\n{q3} ASSISTANT:"
    assert "[conversation reset]" in proc.stderr
    assert sorted(os.listdir(att)) == ["turn_00", "turn_01", "turn_02"]
    assert len([p for p in os.listdir(att / "turn_01") if p.endswith(".png")]) == 8


def test_frames_and_answer_length_follow_the_checkpoint():
    """--num_frames / --max_new_tokens 0 (the defaults): the checkpoint's inference.json (at
    most 200 tokens), else 32 frames and 200 tokens; given flags win. The web demo shares it."""
    from ppllava_jax import chat, demo

    a = chat.parse_args(["--checkpoint", "ck", "--video", "v.mp4"])
    assert chat.generation_defaults(a, {}) == (32, 200)
    assert chat.generation_defaults(a, {"num_frames": 8, "max_new_tokens": 16}) == (8, 16)
    assert chat.generation_defaults(a, {"max_new_tokens": 500}) == (32, 200)
    a = chat.parse_args(["--checkpoint", "ck", "--video", "v.mp4", "--num_frames", "4",
                         "--max_new_tokens", "300"])  # fmt: skip
    assert chat.generation_defaults(a, {"num_frames": 8, "max_new_tokens": 16}) == (4, 300)
    d = demo.parse_args(["--checkpoint", "ck", "--max_new_tokens", "7"])
    assert chat.generation_defaults(d, {"num_frames": 8}) == (8, 7)
