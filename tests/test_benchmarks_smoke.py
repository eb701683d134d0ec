"""Smoke test of benchmarks/: each script runs once in its smallest setting (``--smoke``, or the
smallest arguments of the scripts without it) as a subprocess; every stdout line must be a JSON
object (with the expected keys, for the ``--smoke`` scripts). No speed is checked (the figures
of a smoke run mean nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"cpu", "cores", "load_1_5_15"}

# script -> {bench name: keys every line of that bench must have}
EXPECTED = {
    "accelerator": {  # no accelerator_error: every part runs (on the CPU: the xla kernels)
        "accelerator_start": {"parts", "dtype"},
        "accelerator_probe": {"attention_impl", "shapes"},
        "matmul": {"n", "median_s", "flops_per_s"},
        "accelerator_step": {"step_s", "flops_step", "fraction_of_matmul", "mfu", "first_losses"},
        "accelerator_generate": {"pooling", "batch", "answer_s", "decode_tokens_per_s"},
        "accelerator_answer_ratio": {"answer_s", "none_over_ppllava"},
        "accelerator_done": {"seconds"},
    },
    "train_step": {
        "train_step": {
            "side",
            "setting",
            "step_s",
            "forward_s",
            "first_step_s",
            "loss_first_step",
            "seq_len",
        },
        "train_step_ratio": {
            "jax_step_s",
            "torch_step_s",
            "torch_over_jax",
            "jax_forward_s",
            "torch_forward_s",
            "torch_over_jax_forward",
            "jax_compile_s",
            "load_s",
            "loss_jax",
            "loss_torch",
            "same_loss",
            "loss_second_step_abs_diff",
        },
    },
    "utilisation": {
        "matmul": {"n", "median_s", "flops_per_s"},
        "utilisation": {
            "step_s",
            "compile_s",
            "flops_model",
            "flops_xla_unscanned",
            "achieved_flops_per_s",
            "matmul_flops_per_s",
            "fraction_of_matmul",
            "peak_flops_per_s",
            "mfu",
        },
    },
    "compression": {
        "compression": {"pooling", "visual_tokens", "answer_s", "prompt_len", "compile_generate_s"},
        "compression_ratio": {"answer_s", "visual_tokens", "none_over_ppllava", "avp_over_ppllava"},
    },
    "pooling_op": {
        "pooling_op": {"side", "x_shape", "median_s"},
        "pooling_op_ratio": {"jax_s", "torch_s", "torch_over_jax", "max_abs_diff", "allclose"},
    },
    "decode": {
        "decode": {"batch", "layers", "prefill_s", "generate_s", "decode_tokens_per_s"},
    },
    "data": {
        "data": {"num_workers", "samples_per_s", "first_batch_s", "samples"},
    },
    "profile_step": {
        "profile_step": {"step_s", "compile_s", "op_s_per_step", "parts_s", "parts_share"},
        "profile_step_top_ops": {"top_ops"},
    },
}


def _env() -> dict:
    env = dict(os.environ)
    # one CPU device, as a user runs the scripts (conftest asks for 8 simulated ones)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


# extra runs of a script: (script, arguments besides --smoke)
VARIANTS = [(script, ()) for script in sorted(EXPECTED)] + [
    ("train_step", ("--setting", "llava_next")),  # the LLaVA-NeXT comparison (default: PPLLaVA)
    ("train_step", ("--layers", "scanned")),  # the JAX layers stacked (default: per layer)
]


@pytest.mark.parametrize(
    ("script", "extra"), VARIANTS, ids=[" ".join((s, *e)) for s, e in VARIANTS]
)
def test_benchmark_script_prints_json(script, extra):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke", *extra],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, proc.stderr[-4000:]
    seen = set()
    for ln in lines:
        rec = json.loads(ln)  # every line is one JSON object
        assert isinstance(rec, dict), ln
        bench = rec.get("bench")
        assert bench in EXPECTED[script], ln
        missing = EXPECTED[script][bench] - set(rec)
        assert not missing, f"{bench} lacks {sorted(missing)}: {ln}"
        assert MACHINE <= set(rec["machine"]), ln
        seen.add(bench)
    assert seen == set(EXPECTED[script]), seen
    if script == "train_step":
        ratio = next(json.loads(ln) for ln in lines if '"train_step_ratio"' in ln)
        assert ratio["same_loss"], ratio  # both sides computed the same model
        # ... and made the same first update (gradients, clipping, AdamW)
        assert ratio["loss_second_step_abs_diff"] <= 1e-3 * max(1.0, ratio["loss_torch"]), ratio
        opts = dict(zip(extra[::2], extra[1::2]))
        assert ratio["setting"] == opts.get("--setting", "ppllava"), ratio
        assert ratio["layers"] == opts.get("--layers", "per_layer"), ratio
    if script == "pooling_op":
        ratio = next(json.loads(ln) for ln in lines if '"pooling_op_ratio"' in ln)
        assert ratio["allclose"] and ratio["max_abs_diff"] < 1e-4, ratio


# scripts without --smoke (their own output format): the smallest arguments, each line JSON
# (attention_loss.py is left out: its four compiles of the demo step take minutes on 2 cores)
SMALLEST = {
    "compile_time": ["--quick", "--depths", "2", "--repeat", "1"],
}


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_other_benchmark_scripts_run(script):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SMALLEST[script]],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and all(isinstance(r, dict) for r in lines), proc.stdout[-2000:]
    assert lines[-1]["bench"] == "compile_time_summary", lines[-1]
