"""Weighted 3D pooling: ``pooling.weighted_pool3d`` (jitted JAX) vs the same operation written
with ``torch.Tensor.unfold`` in PyTorch, on the 7B shapes.

    python benchmarks/pooling_op.py            # x [1, 32, 24, 24, 4096], kernel = stride (2, 3, 3)
    python benchmarks/pooling_op.py --quick    # x [1, 32, 24, 24, 1024]
    python benchmarks/pooling_op.py --smoke    # x [1, 4, 6, 6, 64]

The operation (SPEC section 3.5, the projector's pooling step): features ``x float32[N, T, H, W,
C]`` (the 7B model: 32 frames x 24 x 24 patches x 4096 LLM channels after the projector MLP) and
weights ``w float32[N, T, H, W]`` (the prompt-guided attention); in each (2, 3, 3) window
``p = softmax(w[window] / 0.01)`` and the output is ``sum(p * x[window])``: ``[1, 16, 8, 8, 4096]``
= 1,024 tokens.

PyTorch reference (written here, eager, float32, ``torch.get_num_threads()`` threads or CUDA):
``x.unfold`` over T, H, W gives the windows as a view ``[N, T', H', W', C, kt, kh, kw]``,
``w.unfold`` the weight windows; softmax over each flattened window of ``w / temperature``; an
``einsum`` forms the weighted sum. The two results are compared once (``max_abs_diff``;
``allclose`` at rtol 1e-4 / atol 1e-5 asserted as a sanity check, not a timing test). Timings:
median of ``--repeats`` calls after warm-up, the two sides alternating; JAX's compile time apart.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    "full": dict(shape=(1, 32, 24, 24, 4096), rep=10),
    "quick": dict(shape=(1, 32, 24, 24, 1024), rep=5),
    "smoke": dict(shape=(1, 4, 6, 6, 64), rep=2),
}
KERNEL = (2, 3, 3)
TEMPERATURE = 0.01


def torch_weighted_pool3d(x, w, kernel, stride, temperature: float):
    """``x [N, T, H, W, C]``, ``w [N, T, H, W]`` -> ``[N, T', H', W', C]`` with unfold."""
    import torch

    (kt, kh, kw), (st, sh, sw) = kernel, stride
    xw = x.unfold(1, kt, st).unfold(2, kh, sh).unfold(3, kw, sw)  # [N, T', H', W', C, kt, kh, kw]
    ww = w.unfold(1, kt, st).unfold(2, kh, sh).unfold(3, kw, sw)  # [N, T', H', W', kt, kh, kw]
    p = torch.softmax(ww.flatten(-3) / temperature, dim=-1)  # [N, T', H', W', k]
    return torch.einsum("nabck,nabcdk->nabcd", p, xw.flatten(-3))


def main() -> int:
    ap = common.base_parser(__doc__)
    args, size, s, repeats = common.parse_size(ap, SIZES)
    jax = common.setup_jax()
    import numpy as np
    import torch

    from ppllava_jax.models.pooling import weighted_pool3d

    shape = s["shape"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    # weights 0..0.05: logits 0..5 after / 0.01, so the window softmax is far from uniform
    w = rng.random(shape[:4], dtype=np.float32) * 0.05
    xj, wj = jax.device_put(x), jax.device_put(w)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # PyTorch on the GPU when there is one
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    xt, wt = torch.from_numpy(x).to(dev), torch.from_numpy(w).to(dev)

    fj = jax.jit(lambda a, b: weighted_pool3d(a, b, KERNEL, KERNEL, TEMPERATURE))
    t0 = time.perf_counter()
    compiled = fj.lower(xj, wj).compile()
    compile_s = time.perf_counter() - t0

    with torch.no_grad():
        ref = torch_weighted_pool3d(xt, wt, KERNEL, KERNEL, TEMPERATURE).cpu().numpy()
    out = np.asarray(compiled(xj, wj))
    max_abs = float(np.max(np.abs(out - ref)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)  # sanity, once

    for _ in range(max(args.warmup, 0)):
        common.block(compiled(xj, wj))
        with torch.no_grad():
            torch_weighted_pool3d(xt, wt, KERNEL, KERNEL, TEMPERATURE)
    tj, tt = [], []
    for _ in range(repeats):
        a = time.perf_counter()
        common.block(compiled(xj, wj))
        b = time.perf_counter()
        with torch.no_grad():
            torch_weighted_pool3d(xt, wt, KERNEL, KERNEL, TEMPERATURE)
        sync()
        c = time.perf_counter()
        tj.append(b - a)
        tt.append(c - b)
    sj, st = common.summary(tj), common.summary(tt)
    info = dict(
        size=size,
        x_shape=list(shape),
        kernel=list(KERNEL),
        out_shape=list(out.shape),
        tokens=int(np.prod(out.shape[1:4])),
        dtype="float32",
        bytes_in=int(x.nbytes + w.nbytes),
    )
    common.emit("pooling_op", side="jax", **info, **sj, compile_s=round(compile_s, 3))
    common.emit("pooling_op", side="torch_unfold", torch_device=dev, **info, **st)
    common.emit(
        "pooling_op_ratio",
        **info,
        jax_s=sj["median_s"],
        torch_s=st["median_s"],
        torch_over_jax=round(st["median_s"] / sj["median_s"], 3),
        max_abs_diff=max_abs,
        allclose=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
