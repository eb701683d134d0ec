"""The journeys users take after the demo, through the command lines as they type them, on tiny
stand-ins of the released start points (both families):

    convert_torch_weights.py --source LLAVA --clip CLIP --output start     (the start point)
    train.py --config configs/<7B SFT recipe> --config.init_from=start ...  (1 process)
    python -m ppllava_jax.launch --processes 2 ... -- python train.py ...  (2 processes)
    train.py --config configs/ppllava_vicuna7b_dpo.py --config.init_from=sft/final ...
    convert_torch_weights.py --to_torch --source dpo/final --output hf
    eval.py --checkpoint dpo/final --benchmark synthetic ...
    python -m ppllava_jax.chat --checkpoint dpo/final --video V

Each recipe keeps its own trainable set, loss normalisation, template and text encoding; only
sizes are shrunk by ``--config.K=V`` overrides (frames, lengths, batch, steps), and the data is
the synthetic set with its tokenizers, whose vocabularies the stand-ins are built with.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from ppllava_jax.data import synthetic
from tests.journey_helpers import (
    dpo_pairs,
    qwen_start_sources,
    run_command,
    vicuna_start_sources,
)

pytestmark = pytest.mark.slow

FAMILIES = {
    "vicuna": ("configs/ppllava_vicuna7b_videoonly.py", vicuna_start_sources),
    "qwen": ("configs/ppllava_qwen7b_videoonly.py", qwen_start_sources),
}
STEPS = 2
BATCH = 8  # rows per step: one per simulated device (tests/conftest.py)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("journey_data")
    info = synthetic.generate(out, num_train=16, num_eval=4, frames=8, size=32)
    return out, info


def shrunk(data_dir: Path, source: Path, tokenizer: Path, frames: int = 4) -> list[str]:
    """The overrides that shrink a 7B recipe to the tiny start point and the synthetic set."""
    sources = json.dumps([{"path": str(source), "data_root": str(data_dir)}])
    return [
        f"--config.data.sources={sources}",
        f"--config.data.tokenizer={tokenizer}",
        f"--config.data.clip_tokenizer={data_dir / 'clip_tokenizer'}",
        f"--config.data.num_frames={frames}",
        "--config.data.clip_max_length=32",
        "--config.data.max_length=128",
        "--config.data.buckets=[128]",
        f"--config.data.batch_size={BATCH}",
        "--config.data.num_workers=0",
        f"--config.train.total_steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.loss_chunk_size=64",
        "--config.checkpoint.save_every=1",
        "--config.checkpoint.async_save=False",
        "--config.optimizer.warmup_ratio=0.5",
    ]


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tokenizer_of(family: str, data_dir: Path) -> tuple[Path, int, int]:
    """(LLM tokenizer directory, vocabulary, <image> id) of the family's synthetic tokenizer."""
    if family == "vicuna":
        info = json.loads((data_dir / "dataset_info.json").read_text())
        return data_dir / "tokenizer", info["vocab_size"], info["image_token_id"]
    from configs import demo_qwen
    from ppllava_jax.data.qwen_tokenizer import ensure_qwen_tokenizer

    tok = Path(ensure_qwen_tokenizer(data_dir, demo_qwen.QWEN_VOCAB))
    vocab = demo_qwen.QWEN_VOCAB + 5
    return tok, vocab, demo_qwen.QWEN_VOCAB + 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_finetune_export_evaluate_chat(family, data, tmp_path):
    data_dir, info = data
    recipe, build_sources = FAMILIES[family]
    tok, vocab, image_token = tokenizer_of(family, data_dir)
    llava, clip = build_sources(tmp_path, vocab, image_token, info["clip_vocab_size"])

    # the start point, as README "Converting checkpoints" builds it
    start = tmp_path / "start"
    run_command(
        ["convert_torch_weights.py", "--source", str(llava), "--clip", str(clip), "--output",
         str(start), "--btadapter_depth=1"]
    )  # fmt: skip

    # SFT from the start point with the recipe's own trainables and loss normalisation
    sft = tmp_path / "sft"
    train_sft = ["train.py", "--config", recipe, "--workdir", str(sft),
                 f"--config.init_from={start}",
                 *shrunk(data_dir, data_dir / "train.json", tok)]  # fmt: skip
    out = run_command(train_sft)
    assert f"from {start}" in out, out[-3000:]
    first = losses(sft)
    assert sorted(first) == [1, 2] and all(math.isfinite(v) for v in first.values())
    # a random LLM head over the vocabulary: about log(vocab) at the start
    assert abs(first[1] - math.log(vocab)) < 1.0, first
    final = sft / "final"
    assert (final / "inference.json").exists() and (final / "tokenizer").is_dir()

    # the same run on 2 processes of 4 devices (python -m ppllava_jax.launch), 4 rows each: the
    # same global batches, so the same losses
    two = tmp_path / "sft_2proc"
    run_command(["-m", "ppllava_jax.launch", "--processes", "2", "--devices-per-process", "4",
                 "--", sys.executable, "train.py", "--config", recipe, "--workdir", str(two),
                 f"--config.init_from={start}",
                 *shrunk(data_dir, data_dir / "train.json", tok),
                 f"--config.data.batch_size={BATCH // 2}"])  # fmt: skip
    got = losses(two)
    assert sorted(got) == [1, 2] and got[1] == pytest.approx(first[1], rel=1e-5), (got, first)
    assert got[2] == pytest.approx(first[2], rel=1e-4), (got, first)

    # again from its training checkpoint step 1: the warm-up's first learning rate is 0, so that
    # step holds the start point's parameters, and the same first batch gives the same loss (the
    # same schedule: the step compiled by the first run is read from the compilation cache)
    again = tmp_path / "sft_from_step"
    run_command(["train.py", "--config", recipe, "--workdir", str(again),
                 f"--config.init_from={sft / 'checkpoints' / '1'}",
                 *shrunk(data_dir, data_dir / "train.json", tok)])  # fmt: skip
    assert losses(again)[1] == pytest.approx(first[1], rel=1e-6)

    result = final
    if family == "vicuna":  # the original's DPO (train_dpo.py) is Vicuna's
        dpo = tmp_path / "dpo"
        run_command(["train.py", "--config", "configs/ppllava_vicuna7b_dpo.py",
                     "--workdir", str(dpo), f"--config.init_from={final}",
                     *shrunk(data_dir, dpo_pairs(data_dir), tok),
                     "--config.train.grad_accum_steps=1",
                     f"--config.data.batch_size={BATCH // 2}"])  # fmt: skip
        d = losses(dpo)
        # DPO starts at its reference: -log(sigmoid(0)) = log 2
        assert d[1] == pytest.approx(math.log(2), abs=1e-3), d
        result = dpo / "final"

    # back to the original's PyTorch layout, and that layout converts to the same parameters
    hf = tmp_path / "hf"
    run_command(["convert_torch_weights.py", "--to_torch", "--source", str(result),
                 "--output", str(hf)])  # fmt: skip
    back = tmp_path / "back"
    run_command(["convert_torch_weights.py", "--source", str(hf), "--output", str(back)])
    from ppllava_jax.convert.api import load_checkpoint

    _, _, p1 = load_checkpoint(result)
    _, _, p2 = load_checkpoint(back)
    import jax

    for (k, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(p1), jax.tree_util.tree_leaves_with_path(p2)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))

    # evaluated and chatted with, each reading the checkpoint's own template and frames
    res = tmp_path / "results.json"
    run_command(["eval.py", f"--checkpoint={result}", "--benchmark=synthetic",
                 f"--data={data_dir}", f"--out={res}", "--batch_size=8",
                 "--max_new_tokens=3", "--no_progress"])  # fmt: skip
    summary = json.loads(res.read_text())["summary"]
    assert summary["num_questions"] == info["splits"]["eval"], summary
    chat = run_command(
        ["-m", "ppllava_jax.chat", f"--checkpoint={result}",
         f"--video={data_dir / 'videos' / 'eval_00000.mp4'}", "--max_new_tokens=3"],
        stdin="What colour is the square?\nAnd which colour appears last?\n/quit\n",
    )  # fmt: skip
    assert chat.count("ASSISTANT: ") == 2 and "error" not in chat, chat
