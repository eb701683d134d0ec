"""Training metrics: ``workdir/metrics.jsonl``, TensorBoard events, a console line, MFU.

MFU = (FLOPs of one step per device, from the compiled step's ``cost_analysis()``) /
(step time) / (the chip's peak dense bf16 FLOP/s). ``cost_analysis`` reports the
per-device program of an SPMD step, and XLA counts the body of a ``while`` loop (a
``lax.scan``) once: ``step_flops`` multiplies by the number of micro-batches; a model with
scanned layers is still under-counted by its layer count — pass ``flops_per_step``
to the trainer (e.g. an analytic count) in that case.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# Peak dense bf16 FLOP/s per chip (per device as JAX sees it), from the vendors' data sheets.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),  # per chip (one JAX device = one megacore chip)
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
)


def peak_flops_per_device(device: Any = None) -> float | None:
    """Peak bf16 dense FLOP/s of ``device`` (default: the first one); None if unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled (``jit(...).lower(...).compile()``) program, per device."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost model
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    f = float(ca["flops"])
    return f if f > 0 else None


def _scalar(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    a = np.asarray(v)
    if a.size == 1:
        x = a.reshape(()).item()
        return x
    return a.tolist()


def cut_back(path: str, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` at ``path`` after ``step`` (a run resumed from the
    checkpoint of ``step`` logs them again), and a line cut short by a kill mid-write; the file
    is replaced atomically. Returns how many lines were dropped (0 if there is no file)."""
    if not os.path.exists(path):
        return 0

    def kept(line: str) -> bool:
        try:
            return int(json.loads(line).get("step", 0)) <= step
        except (ValueError, AttributeError):
            return False

    with open(path) as f:
        lines = [x for x in f.read().splitlines() if x.strip()]
    keep = [x for x in lines if kept(x)]
    if len(keep) < len(lines):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(x + "\n" for x in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsWriter:
    """Writes one JSON line per logging step (and TensorBoard scalars), prints a progress line.

    Only process 0 writes files and prints (others are no-ops).

    Args:
      workdir: ``workdir/metrics.jsonl`` (appended to) and ``workdir/tensorboard``.
      total_steps: the run's length, for ``step N/total`` and the ETA on the console.
      start_step: the step the run starts from (0, or the checkpoint it resumes): records
        after it are cut from ``metrics.jsonl`` and hidden in TensorBoard (they are logged
        again). None: keep everything (a writer that only adds, e.g. evaluation results).
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        console: bool = True,
        total_steps: int | None = None,
        start_step: int | None = None,
    ):
        self.workdir = workdir
        self.active = jax.process_index() == 0
        self.console = console
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self._tb = None
        self._file = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if start_step is not None:
                dropped = cut_back(path, start_step)
                if dropped and console:
                    print(f"[train] metrics.jsonl: {dropped} records after step {start_step} cut")
            self._file = open(path, "a")  # noqa: SIM115
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    purge = None if start_step is None else start_step + 1
                    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=purge)
                except ImportError:  # pragma: no cover
                    print("[train] tensorboardX not installed: no TensorBoard events")

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.workdir, "tensorboard")

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> dict:
        """Write ``metrics`` (scalars; arrays are fetched) for ``step``; returns the record."""
        rec = {"step": int(step), "time": time.time()}
        rec.update({prefix + k: _scalar(v) for k, v in metrics.items()})
        if not self.active:
            return rec
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                # a NaN (a diverged run, stopped by divergence.py) is in metrics.jsonl and on
                # the console; TensorBoard would only warn about it
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self.console:
            elapsed = time.perf_counter() - self.started
            print(format_progress(rec, self.total_steps, elapsed), flush=True)
        return rec

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def format_duration(seconds: float) -> str:
    """``3725.2 -> '1:02:05'`` (hours:minutes:seconds, rounded to the second)."""
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_progress(
    rec: Mapping[str, Any], total_steps: int | None = None, elapsed: float | None = None
) -> str:
    """One console line.

    ``step 100/400 | loss 2.34 | lr 2.0e-05 | 1,234 tok/s | 3.20 samples/s | 0.512 s/step |
    MFU 41% | elapsed 0:00:52 | ETA 0:02:34``; the ETA is the remaining steps at this
    record's ``step_time``.
    """

    def f(key, fmt):
        v = rec.get(key)
        return None if v is None else fmt.format(v)

    step = rec["step"]
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("eval/loss", "eval loss", "{:.4f}"),
        ("eval/accuracy", "eval accuracy", "{:.3f}"),
        ("lr", "lr", "{:.2e}"),
        ("grad_norm", "gnorm", "{:.3f}"),
        ("tokens_per_sec", None, "{:,.0f} tok/s"),
        ("samples_per_sec", None, "{:.2f} samples/s"),
        ("step_time", None, "{:.3f} s/step"),
    ):
        s = f(key, fmt)
        if s is not None:
            parts.append(f"{label} {s}" if label else s)
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    elif rec.get("flops_per_sec_per_device") is not None:
        parts.append(f"{rec['flops_per_sec_per_device'] / 1e9:.2f} GFLOP/s/device")
    if elapsed is not None:
        parts.append(f"elapsed {format_duration(elapsed)}")
    if total_steps and rec.get("step_time") is not None:
        parts.append(f"ETA {format_duration(max(total_steps - step, 0) * rec['step_time'])}")
    return " | ".join(parts)


class LogWindow:
    """The steps since the last log line: their metrics (device scalars, fetched only when
    logged) and the wall time they took, compile time excluded (``exclude``)."""

    COUNTS = ("num_tokens", "num_samples", "num_input_tokens")  # summed, not averaged

    def __init__(self) -> None:
        self.metrics: list[Mapping[str, Any]] = []
        self.start = time.perf_counter()

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.metrics.append(metrics)

    def exclude(self, seconds: float) -> None:
        """Do not count ``seconds`` (spent compiling or evaluating) as step time."""
        self.start += seconds

    def record(self, flops_per_step: float | None, peak: float | None) -> dict[str, Any]:
        """The logged record of the window, then a new window starts: the mean of each metric
        (``lr`` the last step's), the sums of the counts, and ``throughput``."""
        got = jax.device_get(self.metrics)
        seconds = time.perf_counter() - self.start
        rec = {k: float(np.mean([m[k] for m in got])) for k in got[-1] if not k.startswith("num_")}
        rec["lr"] = float(got[-1].get("lr", np.nan))
        for k in self.COUNTS:
            rec[k] = int(sum(int(m[k]) for m in got))
        rec.update(
            throughput(
                steps=len(got),
                seconds=seconds,
                tokens=rec["num_input_tokens"],
                samples=rec["num_samples"],
                flops_per_step=flops_per_step,
                peak=peak,
            )
        )
        self.metrics, self.start = [], time.perf_counter()
        return rec


def throughput(
    *,
    steps: int,
    seconds: float,
    tokens: float,
    samples: float,
    flops_per_step: float | None,
    peak: float | None,
) -> dict[str, float | None]:
    """Speed metrics over a logging window of ``steps`` steps taking ``seconds``."""
    seconds = max(seconds, 1e-9)
    step_time = seconds / max(steps, 1)
    out: dict[str, float | None] = {
        "step_time": step_time,
        "tokens_per_sec": tokens / seconds,
        "samples_per_sec": samples / seconds,
        "flops_per_step": flops_per_step,
        "flops_per_sec_per_device": None,
        "mfu": None,
    }
    if flops_per_step:
        out["flops_per_sec_per_device"] = flops_per_step / step_time
        if peak:
            out["mfu"] = flops_per_step / step_time / peak
    return out
