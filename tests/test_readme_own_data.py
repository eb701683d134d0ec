"""README "Fine-tune on your own videos" as a user follows it: the example annotation files it
shows in full, its ``train.py`` and ``eval.py`` commands run as written (``bash -c``, from a
directory laid out as the section says: ``my_videos/`` with the example files and generated
media, ``ckpt/ppllava`` a tiny converted model carrying its tokenizers), with only sizes for
the tiny model and the 2-core CPU appended; and the errors a user met before: a missing
tokenizer setting, and the demo's synthetic scoring after training on one's own data."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data.video import write_video
from tests.evaluate.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Fine-tune on your own videos"
EXAMPLE = ROOT / "examples" / "my_videos"

# appended to the README's commands: sizes of tests/evaluate/tiny.py's model (max_T 16, 77 CLIP
# positions, 32-pixel tower) and of a CPU run on 8 simulated devices
TRAIN_SIZES = [
    "--config.train.total_steps=2",
    "--config.data.batch_size=8",
    "--config.data.num_frames=4",
    "--config.data.max_images=2",
    "--config.data.clip_max_length=77",
    "--config.data.max_length=256",
    "--config.data.buckets=256",
    "--config.data.num_workers=0",
    "--config.model.dtype=float32",
    "--config.model.remat_policy=none",
    "--config.checkpoint.async_save=False",
]
EVAL_SIZES = ["--num_frames=4", "--max_new_tokens=4", "--batch_size=8"]


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    return text[start : end if end > 0 else len(text)]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), re.S)


def _commands() -> list[str]:
    """The shell commands of the section's bash blocks (continuation lines joined)."""
    cmds = []
    for block in _blocks("bash"):
        cur = ""
        for line in block.splitlines():
            cur += line + "\n"
            if not line.rstrip().endswith("\\"):
                if cur.strip():
                    cmds.append(cur.strip())
                cur = ""
    return cmds


def _media_paths(samples: list[dict]) -> tuple[set[str], set[str]]:
    videos, images = set(), set()
    for s in samples:
        if "video" in s:
            videos.add(s["video"])
        img = s.get("image", [])
        images.update([img] if isinstance(img, str) else img)
    return videos, images


def _lay_out(root: Path) -> None:
    """``root`` as the section's user has it: ``my_videos/`` (the example files and media under
    their names), ``ckpt/ppllava`` (a tiny converted model with ``tokenizer/`` and
    ``clip_tokenizer/``), and the repository's commands and configs."""
    media = root / "my_videos"
    media.mkdir()
    samples = []
    for name in ("train.json", "heldout.json"):
        shutil.copy(EXAMPLE / name, media / name)
        samples += json.loads((EXAMPLE / name).read_text())
    videos, images = _media_paths(samples)
    rng = np.random.default_rng(0)
    for k, v in enumerate(sorted(videos)):
        (media / v).parent.mkdir(parents=True, exist_ok=True)
        # a bright square moving over a plain background, 24 frames
        frames = np.full((24, 48, 48, 3), 40 * k, np.uint8)
        for t in range(24):
            frames[t, 12:28, t : t + 16] = (250, 200, 30)
        write_video(str(media / v), frames, fps=8)
    for i in sorted(images):
        (media / i).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(media / i)
    make_tiny_checkpoint(str(root / "ckpt" / "ppllava"), str(root / "tokenizer_data"))
    for name in ("train.py", "eval.py", "configs"):
        (root / name).symlink_to(ROOT / name)


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` through bash in ``cwd``, ``python`` being this interpreter."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
    return subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_example_files_are_shown_in_full():
    shown = [json.loads(b) for b in _blocks("json")]
    assert shown == [json.loads((EXAMPLE / n).read_text()) for n in ("train.json", "heldout.json")]
    train = shown[0]
    kinds = [("video" in s, type(s.get("image")).__name__, len(s["QA"])) for s in train]
    assert (True, "NoneType", 1) in kinds and (False, "str", 1) in kinds  # a video, an image
    assert (False, "list", 1) in kinds and any(n > 1 for _, _, n in kinds)  # images, 2 turns


def test_own_videos_train_and_evaluate_as_the_readme_says(tmp_path):
    _lay_out(tmp_path)
    commands = _commands()
    assert [c.split()[:2] for c in commands] == [["python", "train.py"], ["python", "eval.py"]]
    train_cmd, eval_cmd = commands

    # without the tokenizer setting: one line naming it and where the tokenizers come from
    no_tok = "\n".join(x for x in train_cmd.splitlines() if "data.tokenizer=" not in x)
    res = _run(no_tok, tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: data.tokenizer is not set: set --config.data.tokenizer=")
    for where in ("llava-v1.6-vicuna-7b-hf", "ckpt/ppllava/tokenizer", "runs/demo/data/tokenizer"):
        assert where in err[-1]
    assert "Traceback" not in res.stderr

    res = _run(train_cmd + " " + " ".join(TRAIN_SIZES), tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    work = tmp_path / "runs" / "my_videos"
    assert "finished at step 2" in out
    # every kind of sample was read: the step was compiled with all three media groups
    compiled = next(x for x in out.splitlines() if "compiled the step for" in x)
    for group in ("video_pixels", "image_pixels", "multi_pixels"):
        assert f"'{group}'" in compiled, compiled
    metrics = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and metrics[-1]["data/skipped"] == 0
    # nothing synthetic made or scored
    assert "demo dataset" not in out and not list(work.glob("results_*.json"))
    assert (work / "final" / "tokenizer").is_dir() and (work / "final" / "clip_tokenizer").is_dir()

    res = _run(eval_cmd + " " + " ".join(EVAL_SIZES), tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    held = json.loads((EXAMPLE / "heldout.json").read_text())
    preds = json.loads((work / "heldout_pred.json").read_text())
    assert [(p["id"], p["question"], p["answer"]) for p in preds] == [
        (h["id"], h["question"], h["answer"]) for h in held
    ]
    summary = json.loads((work / "heldout.json").read_text())["summary"]
    assert summary["num_questions"] == len(held) and summary["num_missing"] == 0


def test_missing_clip_tokenizer_is_named():
    import ml_collections

    from ppllava_jax.train.checks import check_tokenizer_dirs

    cfg = ml_collections.ConfigDict({"data": {"tokenizer": str(ROOT), "clip_tokenizer": ""}})
    with pytest.raises(ValueError, match=r"^data.clip_tokenizer is not set: .*runs/demo/data/"):
        check_tokenizer_dirs(cfg)
    cfg.data.clip_tokenizer = str(ROOT / "nowhere")
    with pytest.raises(ValueError, match=r"clip_tokenizer=.*nowhere: no such directory; set "):
        check_tokenizer_dirs(cfg)


def test_demo_config_on_own_data_scores_nothing_synthetic(tmp_path):
    """A demo config with ``data.sources`` of one's own makes no synthetic set, so nothing
    synthetic is scored after training (it was: ``eval.json not found``); on the synthetic set
    (``prepare_data`` points ``data`` and ``synthetic.dir`` at it) both splits are."""
    from configs import demo
    from ppllava_jax.train import run

    own = demo.get_config()
    own.data.sources = [dict(path=str(EXAMPLE / "train.json"), data_root=str(tmp_path))]
    assert run.scored_splits(own) == []
    syn = demo.get_config()
    syn.synthetic.dir = str(tmp_path / "data")
    syn.data.sources = [dict(path=str(tmp_path / "data" / "train.json"))]
    assert [key for _, key in run.scored_splits(syn)][0] == "eval"
