"""train/metrics.py: throughput and MFU arithmetic, the peak table, the logged window, the
writer's files (metrics.jsonl, TensorBoard events, the cut-back on resume) and the console line."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.train import metrics as m


def test_throughput_and_mfu_arithmetic():
    got = m.throughput(steps=4, seconds=2.0, tokens=1000, samples=8, flops_per_step=3e12, peak=1e13)
    assert got["step_time"] == 0.5
    assert got["tokens_per_sec"] == 500.0 and got["samples_per_sec"] == 4.0
    assert got["flops_per_step"] == 3e12
    assert got["flops_per_sec_per_device"] == 6e12  # 3e12 FLOPs every 0.5 s
    assert got["mfu"] == pytest.approx(0.6)  # of a 1e13 FLOP/s chip
    # unknown peak (CPU): FLOP/s but no MFU; unknown FLOPs: neither
    assert (
        m.throughput(steps=1, seconds=1, tokens=1, samples=1, flops_per_step=5.0, peak=None)["mfu"]
        is None
    )
    none = m.throughput(steps=1, seconds=1, tokens=1, samples=1, flops_per_step=None, peak=1e12)
    assert none["flops_per_sec_per_device"] is None and none["mfu"] is None


def test_peak_flops_by_device_kind():
    dev = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
    assert m.peak_flops_per_device(dev("gpu", "NVIDIA H100 80GB HBM3")) == 989e12
    assert m.peak_flops_per_device(dev("gpu", "NVIDIA H100 PCIe")) == 756e12  # before "h100"
    assert m.peak_flops_per_device(dev("tpu", "TPU v5 lite")) == 197e12
    assert m.peak_flops_per_device(dev("tpu", "TPU v5")) == 459e12
    assert m.peak_flops_per_device(dev("gpu", "Some Future GPU")) is None
    assert m.peak_flops_per_device(dev("cpu", "cpu")) is None


def test_compiled_flops_reads_cost_analysis():
    prog = lambda ca: types.SimpleNamespace(cost_analysis=lambda: ca)
    assert m.compiled_flops(prog({"flops": 12.0})) == 12.0
    assert m.compiled_flops(prog([{"flops": 7.0}])) == 7.0  # older jax: one dict per device
    assert m.compiled_flops(prog({"flops": 0.0})) is None
    assert m.compiled_flops(prog({})) is None

    def broken():
        raise RuntimeError("no cost model")

    assert m.compiled_flops(types.SimpleNamespace(cost_analysis=broken)) is None


def test_log_window_means_sums_and_excludes_compile_time():
    w = m.LogWindow()
    for loss, lr in ((1.0, 0.1), (3.0, 0.2)):
        w.add(
            {
                "loss": jnp.float32(loss),
                "lr": jnp.float32(lr),
                "num_tokens": jnp.int32(10),
                "num_samples": jnp.int32(2),
                "num_input_tokens": jnp.int32(50),
                "num_pairs": jnp.int32(1),
            }
        )
    w.exclude(-1.0)  # as if the window had started a second earlier
    rec = w.record(flops_per_step=None, peak=None)
    assert rec["loss"] == 2.0 and rec["lr"] == pytest.approx(0.2)  # mean; the last lr
    assert (rec["num_tokens"], rec["num_samples"], rec["num_input_tokens"]) == (20, 4, 100)
    assert "num_pairs" not in rec  # other counts are not averaged into the record
    assert rec["step_time"] >= 0.5 and rec["tokens_per_sec"] <= 100.0
    assert w.metrics == []  # a new window


def test_format_progress_line():
    rec = {"step": 100, "loss": 2.3456, "lr": 2e-5, "step_time": 0.5, "tokens_per_sec": 1234.4}
    line = m.format_progress(rec, total_steps=400, elapsed=52.4)
    assert line.startswith("step 100/400 | loss 2.3456 | lr 2.00e-05")
    assert "1,234 tok/s" in line and "0.500 s/step" in line
    assert "elapsed 0:00:52" in line
    assert line.endswith("ETA 0:02:30")  # 300 steps left at 0.5 s
    assert m.format_progress({"step": 3, "eval/accuracy": 0.75}) == "step 3 | eval accuracy 0.750"
    assert m.format_duration(3725.4) == "1:02:05"


def test_writer_files_and_cut_back(tmp_path, capsys):
    w = m.MetricsWriter(str(tmp_path), total_steps=4, start_step=0)
    for step in (1, 2, 3):
        w.write(step, {"loss": np.float32(1.0 / step), "vec": np.arange(2)})
    w.write(3, {"accuracy": 0.5}, prefix="eval/")
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 3]
    assert lines[1]["loss"] == 0.5 and lines[0]["vec"] == [0, 1]
    assert lines[3]["eval/accuracy"] == 0.5 and "loss" not in lines[3]
    assert list((tmp_path / "tensorboard").iterdir())  # an events file
    out = capsys.readouterr().out
    assert "step 2/4 | loss 0.5000" in out

    # a run resumed from the checkpoint of step 1 logs steps 2.. again: the old ones go
    w = m.MetricsWriter(str(tmp_path), total_steps=4, start_step=1)
    w.write(2, {"loss": 0.25})
    w.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert "3 records after step 1 cut" in capsys.readouterr().out
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss"')  # a line cut short by a kill
    assert m.cut_back(str(tmp_path / "metrics.jsonl"), 2) == 1
    assert m.cut_back(str(tmp_path / "metrics.jsonl"), 0) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert m.cut_back(str(tmp_path / "missing.jsonl"), 0) == 0
