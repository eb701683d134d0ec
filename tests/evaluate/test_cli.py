"""``evaluate/cli.py`` (what eval.py runs): the benchmark a name and flags give, the
``--tokenizer_legacy`` spellings, and how ``main`` hands flags, a training config and the
checkpoint's ``inference.json`` defaults to ``load_setup`` and ``runner.run``."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ml_collections
import pytest

from ppllava_jax.evaluate import cli, model_setup, openqa, runner, videomme
from ppllava_jax.evaluate.model_setup import FROM_CHECKPOINT
from ppllava_jax.evaluate.mvbench import MVBench
from ppllava_jax.evaluate.synthetic import Synthetic

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """Stands in for a benchmark class: keeps what it was built with."""

    def __init__(self, *args, **kw):
        self.args, self.kw = args, kw


@pytest.fixture
def recorded(monkeypatch):
    """Video-MME, open QA and VCGBench read their question files when built: recorders here."""
    for module, name in ((videomme, "VideoMME"), (openqa, "OpenQA"), (openqa, "VCGBench")):
        monkeypatch.setattr(module, name, type(name, (Recorder,), {}))


def test_every_benchmark_name_makes_its_benchmark(tmp_path, recorded):
    data = str(tmp_path)
    made = {name: cli.make_benchmark(name, data) for name in cli.BENCHMARKS}
    assert [type(b).__name__ for b in made.values()] == [
        "MVBench", "VideoMME", "OpenQA", "VCGBench", "Synthetic"
    ]  # fmt: skip
    assert isinstance(made["mvbench"], MVBench) and isinstance(made["synthetic"], Synthetic)
    # frames by default: 32 (MVBench, open QA, VCGBench), 8 (synthetic), Video-MME by duration
    assert made["mvbench"].num_frames == 32 and made["synthetic"].num_frames == 8
    assert made["mvbench"].root == data and made["synthetic"].root == data
    assert made["synthetic"].split == "eval" and made["mvbench"].system_llm is False
    assert made["videomme"].args == (data, 0, 64)
    assert made["videomme"].kw == dict(video_dir="", subtitle_dir="", subtitles=False, qwen=False)
    assert made["openqa"].args == (data, 32)
    assert made["openqa"].kw == dict(video_dir="", dataset="", qwen=False)
    assert made["vcgbench"].args == (data, 32)
    assert made["vcgbench"].kw == dict(
        video_dir="", system_vcg=False, legacy_consistency_labels=False, qwen=False
    )
    assert made["mvbench"].family == "vicuna"


def test_the_model_family_reaches_every_exact_benchmark(tmp_path, recorded):
    d = str(tmp_path)
    assert cli.make_benchmark("mvbench", d, qwen=True).family == "qwen"
    for name in ("videomme", "openqa", "vcgbench"):
        assert cli.make_benchmark(name, d, qwen=True).kw["qwen"] is True


def test_benchmark_flags_reach_the_benchmark(tmp_path, recorded):
    d = str(tmp_path)
    mv = cli.make_benchmark("mvbench", d, num_frames=16, mvbench_system=True)
    assert (mv.num_frames, mv.system_llm) == (16, True)
    vm = cli.make_benchmark(
        "videomme", d, num_frames=8, num_frames_long=48, video_dir="/v", subtitle_dir="/s",
        use_subtitles=True,
    )  # fmt: skip
    assert vm.args == (d, 8, 48) and vm.kw == dict(
        video_dir="/v", subtitle_dir="/s", subtitles=True, qwen=False
    )
    # --subtitles is an alias of --use_subtitles
    assert cli.make_benchmark("videomme", d, subtitles=True).kw["subtitles"] is True
    syn = cli.make_benchmark("synthetic", d, num_frames=4, split="train", mvbench_system=True)
    assert (syn.num_frames, syn.split) == (4, "train")  # flags of other benchmarks ignored
    qa = cli.make_benchmark("openqa", d, num_frames=16, qa_dataset="msrvtt", video_dir="/clips")
    assert qa.args == (d, 16) and qa.kw == dict(video_dir="/clips", dataset="msrvtt", qwen=False)
    vcg = cli.make_benchmark("vcgbench", d, vcg_system=True, vcg_legacy_labels=True)
    assert vcg.kw == dict(video_dir="", system_vcg=True, legacy_consistency_labels=True, qwen=False)
    # a negative frame count is the original's per-video 32 / 64 (get_index), kept as given
    assert cli.make_benchmark("mvbench", d, num_frames=-1).num_frames == -1


def test_unknown_benchmark_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'.*mvbench"):
        cli.make_benchmark("mmbench", str(tmp_path))


@pytest.mark.parametrize(
    "value, want",
    [
        ("checkpoint", FROM_CHECKPOINT),
        ("", FROM_CHECKPOINT),
        ("true", True),
        ("Legacy", True),
        ("1", True),
        ("false", False),
        ("non-legacy", False),
        ("file", None),
        ("none", None),
        (True, True),
        (False, False),
        (None, None),
    ],
)
def test_tokenizer_legacy_spellings(value, want):
    got = cli.parse_legacy(value)
    assert got == want and type(got) is type(want)


def test_tokenizer_legacy_typo_is_refused():
    with pytest.raises(ValueError, match="--tokenizer_legacy='ture'"):
        cli.parse_legacy("ture")


@pytest.fixture
def calls(monkeypatch):
    """``cli.main`` with ``load_setup`` and ``runner.run`` recorded instead of run."""
    seen: dict = {}

    def load_setup(checkpoint, **kw):
        seen["setup"] = dict(checkpoint=checkpoint, **kw)
        cfg = SimpleNamespace(qwen=seen.get("qwen", False))  # the checkpoint's model config
        return SimpleNamespace(defaults={"num_frames": 6}, checkpoint=checkpoint, cfg=cfg)

    def run(bench, setup, out, **kw):
        seen["run"] = dict(bench=bench, setup=setup, out=out, **kw)
        return {"summary": {"accuracy": 1.0}}

    monkeypatch.setattr(cli, "load_setup", load_setup)
    monkeypatch.setattr(runner, "run", run)
    monkeypatch.setattr("ppllava_jax.sharding.maybe_initialize_distributed", lambda: None)
    return seen


def test_main_hands_the_flags_on(calls, tmp_path):
    res = cli.main(
        checkpoint="ck", benchmark="mvbench", data=str(tmp_path), out="o.json", batch_size=4,
        max_new_tokens=9, num_workers=2, save_attention="att", max_attention=3, no_progress=True,
        fresh=True, tokenizer="tk", clip_tokenizer="ctk", template="vicuna_v1", mesh="fsdp=2",
        dtype="bfloat16", tokenizer_legacy="false", num_frames=12,
    )  # fmt: skip
    assert res == {"summary": {"accuracy": 1.0}}
    assert calls["setup"] == dict(
        checkpoint="ck", tokenizer="tk", clip_tokenizer="ctk", template="vicuna_v1",
        mesh="fsdp=2", dtype="bfloat16", tokenizer_legacy=False,
    )  # fmt: skip
    r = calls["run"]
    assert isinstance(r["bench"], MVBench) and r["bench"].num_frames == 12
    assert (r["out"], r["batch_size"], r["max_new_tokens"], r["num_workers"]) == ("o.json", 4, 9, 2)
    assert (r["save_attention"], r["max_attention"]) == ("att", 3)
    assert r["progress"] is False and r["fresh"] is True


@pytest.mark.parametrize("qwen", [False, True])
def test_main_takes_the_family_from_the_checkpoint(calls, tmp_path, qwen):
    calls["qwen"] = qwen
    cli.main(checkpoint="ck", benchmark="mvbench", data=str(tmp_path), out="o.json")
    assert calls["run"]["bench"].family == ("qwen" if qwen else "vicuna")


def test_main_defaults(calls, tmp_path):
    cli.main(checkpoint="ck", benchmark="synthetic", data=str(tmp_path), out="o.json")
    assert calls["setup"]["tokenizer_legacy"] == FROM_CHECKPOINT
    assert calls["setup"]["mesh"] is None and calls["setup"]["template"] == ""
    r = calls["run"]
    # synthetic: the frames the checkpoint was trained with (inference.json)
    assert isinstance(r["bench"], Synthetic) and r["bench"].num_frames == 6
    assert (r["batch_size"], r["max_new_tokens"], r["max_attention"]) == (0, None, 16)
    assert r["progress"] is True and r["fresh"] is False


def test_main_takes_defaults_from_a_training_config(calls, tmp_path):
    config = ml_collections.ConfigDict(
        {"data": {"template": "plain_v1", "num_frames": 10}, "mesh": {"data": 2, "fsdp": 1}}
    )
    cli.main(checkpoint="ck", benchmark="synthetic", data=str(tmp_path), out="o", config=config)
    assert calls["setup"]["template"] == "plain_v1"
    assert calls["setup"]["mesh"] == {"data": 2, "fsdp": 1}
    assert calls["run"]["bench"].num_frames == 10  # the config's frames beat inference.json's
    # flags beat the config; the config's frames count only for the synthetic benchmark
    cli.main(
        checkpoint="ck", benchmark="mvbench", data=str(tmp_path), out="o", config=config,
        template="vicuna_v1", mesh="fsdp=-1",
    )  # fmt: skip
    assert calls["setup"]["template"] == "vicuna_v1" and calls["setup"]["mesh"] == "fsdp=-1"
    assert calls["run"]["bench"].num_frames == 32


def test_main_loads_through_model_setup():
    assert cli.load_setup is model_setup.load_setup


def test_eval_py_refuses_an_unknown_benchmark_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "eval.py", "--checkpoint", "x", "--benchmark", "mmbench", "--data", "d",
         "--out", "o.json"],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "mmbench" in proc.stderr and "Traceback" not in proc.stderr
