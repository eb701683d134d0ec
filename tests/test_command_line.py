"""The shared command-line style (``ppllava_jax/command_line.py``, issue 13): every command's
``--help`` shows its example commands and exits 0, flags take dashes or underscores, a mistake
on the command line is one ``error: ... (see PROG --help)`` line with exit status 2. Messages a
person can act on (issue 13, item 7): unknown config fields with the known ones, list-valued
config fields from the command line, the chat's missing video (before the model loads) and
too-long question, data with no valid sample, warnings naming the annotation's own index."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from ppllava_jax import chat, command_line
from ppllava_jax.data import annotations as ann
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data.errors import DataError
from ppllava_jax.evaluate import model_setup
from tests.evaluate.tiny import FRAMES, make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    ckpt = make_tiny_checkpoint(str(root / "ckpt"), str(root / "data"))
    return root, ckpt, model_setup.load_setup(ckpt, mesh="data=1,fsdp=1,tensor=1")


# each command and an example command line its --help must show
COMMANDS = {
    "train.py": (["train.py"], "python train.py --config configs/demo.py --workdir runs/demo"),
    "eval.py": (["eval.py"], "python eval.py --checkpoint DIR --benchmark mvbench"),
    "convert": (["convert_torch_weights.py"], "python convert_torch_weights.py --source "),
    "chat": (["-m", "ppllava_jax.chat"], "python -m ppllava_jax.chat --checkpoint DIR --video"),
    "demo": (["-m", "ppllava_jax.demo"], "python -m ppllava_jax.demo --checkpoint runs/demo/final"),
    "launch": (["-m", "ppllava_jax.launch"], "python -m ppllava_jax.launch --processes 4"),
    "judge": (["-m", "ppllava_jax.judge"], "python -m ppllava_jax.judge --input "),
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_examples_and_a_mistake_is_one_line(name):
    args, example = COMMANDS[name]
    res = _run([*args, "--help"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert example in res.stdout, res.stdout[:3000]
    res = _run([*args, "--no-such-flag=1"])  # (and the required flags missing)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert line.endswith(" --help)") and "(see " in line, res.stderr


def test_flag_spellings_and_parser_style(capsys):
    known = ["save_attention", "to-torch", "num_frames"]
    argv = [
        "--save-attention=a",
        "--to_torch",
        "--num-frames",
        "8",
        "--other-x",
        "--",
        "--to_torch",
    ]
    assert command_line.flag_spellings(argv, known) == [
        "--save_attention=a",
        "--to-torch",
        "--num_frames",
        "8",
        "--other-x",
        "--",
        "--to_torch",
    ]
    p = command_line.argument_parser("Summary.\n\n    prog --a 1\n", "prog")
    p.add_argument("--max_new_tokens", type=int, default=200, help="answer length")
    p.add_argument("--need", required=True, help="a required flag")
    assert p.parse_args(["--need", "x", "--max-new-tokens", "3"]).max_new_tokens == 3
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prog --need NEED [flags]\n\nSummary.\n\n    prog --a 1\n")
    assert "answer length (default: 200)" in out and "a required flag\n" in out
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--need", "x", "--max_new_tokens", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --max_new_tokens: invalid int value: 'many' (see prog --help)\n"


def test_unknown_config_field_lists_known_ones(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path),
         "--config.train.totl_steps=5", "--config.nosuch.x=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 2
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    err = res.stderr
    assert "error: --config.train.totl_steps: unknown config field train.totl_steps" in err
    assert "did you mean train.total_steps?" in err
    assert "the fields of train: " in err and "log_every" in err and "grad_accum_steps" in err
    assert "error: --config.nosuch.x: unknown config field nosuch" in err
    assert "the fields of the config: " in err and "optimizer" in err


def _parse(monkeypatch, *overrides):
    argv = ["prog", f"--config={ROOT / 'configs' / 'demo.py'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
    fv(argv)
    return fv.config


def test_list_fields_overridable_on_the_command_line(monkeypatch):
    command_line.allow_list_overrides()  # what train.py and eval.py do
    cfg = _parse(
        monkeypatch,
        "--config.data.buckets=[32, 64]",
        '--config.data.sources=[{"path": "a.json", "data_root": "media", "weight": 0.5, '
        '"media_type": null}, {"path": "b.json"}]',
        "--config.model.image_grid_pinpoints=((48, 96), (96, 48))",
    )
    assert list(cfg.data.buckets) == [32, 64]
    srcs = [ann.AnnotationSource.from_config(s) for s in cfg.data.sources]
    assert srcs == [
        ann.AnnotationSource("a.json", "media", None, 0.5),
        ann.AnnotationSource("b.json"),
    ]
    assert [list(p) for p in cfg.model.image_grid_pinpoints] == [[48, 96], [96, 48]]
    # a Python tuple / comma-separated values, and one bare path
    cfg = _parse(
        monkeypatch, "--config.data.buckets=128,256", "--config.data.sources=/data/train.json"
    )
    assert list(cfg.data.buckets) == [128, 256]
    assert list(cfg.data.sources) == ["/data/train.json"]


def test_report_user_errors_prints_one_line_and_exits(monkeypatch, capsys):
    def bad(kind):
        raise kind("no such file: x.json")

    monkeypatch.delenv("PPLLAVA_TRACEBACK", raising=False)
    for kind in (FileNotFoundError, ValueError, DataError):
        with pytest.raises(SystemExit) as e:
            command_line.report_user_errors(bad, kind)
        assert e.value.code == 1
        assert capsys.readouterr().err == "error: no such file: x.json\n"
    assert command_line.report_user_errors(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):  # a bug, not a user's mistake: the traceback stays
        command_line.report_user_errors(bad, KeyError)
    monkeypatch.setenv("PPLLAVA_TRACEBACK", "1")
    with pytest.raises(ValueError):
        command_line.report_user_errors(bad, ValueError)


def test_list_parser_forms():
    parse = command_line.ListParser().parse
    assert parse("[1, 2]") == [1, 2] and parse("(1, 2)") == [1, 2] and parse("1,2") == [1, 2]
    assert parse('[{"path": "a.json"}]') == [{"path": "a.json"}]
    assert parse("a.json") == ["a.json"] and parse("7") == [7] and parse((3,)) == [3]


def test_unknown_field_message_paths():
    cfg = {"train": {"total_steps": 1, "log_every": 2}, "model": {"vision": 3}}
    assert command_line.unknown_field_message(cfg, "train.total_steps") is None
    msg = command_line.unknown_field_message(cfg, "train.totl_steps")
    assert "did you mean train.total_steps?" in msg and "log_every, total_steps" in msg
    msg = command_line.unknown_field_message(cfg, "model.vision.size")
    assert msg.startswith("--config.model.vision.size: model.vision is a int, not a section")


def test_chat_missing_video_before_the_model_loads(tiny, monkeypatch, capsys):
    _, ckpt, _ = tiny

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the video was checked")

    monkeypatch.setattr(model_setup, "load_setup", no_load)
    monkeypatch.delenv("PPLLAVA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        chat.main(["--checkpoint", ckpt, "--video", "/no/such/clip.mp4", "--num_frames", "8"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: /no/such/clip.mp4: not found (--video)" in err


def test_chat_question_longer_than_the_context(tiny):
    root, _, setup = tiny
    video = str(root / "data" / "videos" / "eval_00000.mp4")
    c = chat.Chat(setup, video, num_frames=FRAMES, max_new_tokens=8)
    question = "What colour is the square? " * 100  # ~600 tokens > 512 positions
    with pytest.raises(chat.QuestionTooLongError) as e:
        list(c.ask(question))
    msg = str(e.value)
    assert "too long for this model" in msg and "512 positions" in msg
    assert "Ask a shorter question" in msg and "--max_new_tokens" in msg
    assert "data.max_length" not in msg and "data.buckets" not in msg  # no training advice
    assert c.history == []


def _data_cfg(root, path, **kw):
    c = dict(
        sources=[dict(path=str(path), data_root=str(root / "data"))],
        tokenizer=str(root / "data" / "tokenizer"),
        clip_tokenizer=str(root / "data" / "clip_tokenizer"),
        num_frames=FRAMES,
        clip_max_length=77,
        max_length=128,
        buckets=[128],
        batch_size=1,
        prefetch_batches=0,
        num_epochs=1,
        text_encoding="offsets",
    )
    c.update(kw)
    return c


def _annotations(root):
    return json.loads((root / "data" / "train.json").read_text())


def test_no_valid_sample_says_why(tiny, tmp_path):
    root, _, setup = tiny
    bad = [dict(a, QA=[]) for a in _annotations(root)[:3]]
    path = tmp_path / "all_bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError) as e:
        pl.Pipeline(_data_cfg(root, path), setup.cfg)
    msg = str(e.value)
    assert "hosts nothing" not in msg
    assert "no valid sample" in msg and "all 3 samples" in msg and str(path) in msg
    assert "empty_qa 3" in msg and f"{path} [sample 0]" in msg


def test_epoch_of_unreadable_media_says_so(tiny, tmp_path):
    root, _, setup = tiny
    anns = [dict(a, video=f"missing_{i}.mp4") for i, a in enumerate(_annotations(root)[:3])]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(anns))
    for epochs in (1, 0):  # one epoch, and repeating forever (which never ended before)
        p = pl.Pipeline(_data_cfg(root, path, num_epochs=epochs), setup.cfg)
        try:
            with pytest.raises(DataError, match=r"epoch 0 has no valid sample: all 3 samples"):
                next(p.iterator())
        finally:
            p.close()


def test_skip_warning_names_the_annotations_own_index(tiny, tmp_path, caplog):
    root, _, setup = tiny
    a = _annotations(root)[:3]
    # index 0 is rejected when loading, so the missing video (index 1) is the first valid one
    anns = [dict(a[0], QA=[]), dict(a[1], video="missing.mp4"), a[2]]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(anns))
    p = pl.Pipeline(_data_cfg(root, path), setup.cfg)
    try:
        with caplog.at_level(logging.WARNING):
            batches = list(p.iterator())
    finally:
        p.close()
    assert len(batches) == 1
    skips = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert any(f"{path} [sample 0]" in m and "QA" in m for m in skips)  # at loading
    assert any("mixed.json:1 (missing_media)" in m for m in skips), skips  # while reading
