"""Shared helpers of the benchmark scripts: timing, JSON lines, machine facts, model configs,
hand-built batches, the analytic FLOP count and the jitted SFT train step.

Every script prints one JSON object per line (``emit``); each line carries ``bench``, the
measurement's fields and ``machine`` (CPU model, cores, load average at that moment, backend,
device kind, library versions). Timings are medians over repeats after warm-up and are never
compared against a threshold: the development machine has 2 cores shared with other jobs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- set-up


def setup_jax(compilation_cache: bool = False) -> Any:
    """Import JAX for a benchmark: the persistent compilation cache off (compile times are
    real), float32 matmuls at full precision. Returns the ``jax`` module."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    jax.config.update("jax_enable_compilation_cache", compilation_cache)
    return jax


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """Where the figure comes from (the load average is read now: call per measurement)."""
    out: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_1_5_15": load_avg(),
        "python": platform.python_version(),
    }
    if "jax" in sys.modules:
        import jax

        d = jax.devices()[0]
        out.update(
            jax=jax.__version__,
            backend=d.platform,
            device_kind=str(getattr(d, "device_kind", "")),
            devices=jax.device_count(),
        )
    if "torch" in sys.modules:
        import torch

        out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return out


def emit(bench: str, **fields: Any) -> dict[str, Any]:
    """Print one JSON line ``{"bench": ..., **fields, "machine": {...}}`` and return it."""
    rec = {"bench": bench, **fields, "machine": machine()}
    print(json.dumps(rec, default=_json_default), flush=True)
    return rec


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def script_parser(doc: str):
    """The parser of a benchmark script in the commands' style (``ppllava_jax.command_line``:
    ``--help`` shows ``doc`` with its example commands)."""
    from ppllava_jax.command_line import argument_parser

    return argument_parser(doc, f"python benchmarks/{os.path.basename(sys.argv[0])}")


def base_parser(doc: str):
    """``script_parser`` with ``--quick`` (short run, < 5 min on 2 cores), ``--smoke`` (the
    smallest setting, for the smoke test: seconds), ``--repeats`` and ``--warmup``."""
    p = script_parser(doc)
    p.add_argument("--quick", action="store_true", help="a short run (smaller shapes)")
    p.add_argument("--smoke", action="store_true", help="the smallest setting (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    return p


def size_of(args: Any) -> str:
    return "smoke" if args.smoke else ("quick" if args.quick else "full")


def parse_size(ap: Any, sizes: dict[str, dict]) -> tuple[Any, str, dict, int | None]:
    """``ap.parse_args()``, the size it asks for (full | quick | smoke), that size's setting in
    ``sizes`` and the timed repeats (``--repeats``, else the setting's ``rep``)."""
    args = ap.parse_args()
    size = size_of(args)
    setting = sizes[size]
    return args, size, setting, args.repeats or setting.get("rep")


def setting_config(s: dict, size: str, **kw: Any) -> Any:
    """``ppllava_config`` of a benchmark setting (``vl``/``vw``, ``ll``/``lw``, ``img``; a
    256-token vocabulary and a 64-wide text tower in the smoke setting); ``kw`` as there."""
    smoke = size == "smoke"
    return ppllava_config(
        vision_layers=s["vl"],
        vision_width=s["vw"],
        llm_layers=s["ll"],
        llm_width=s["lw"],
        image_size=s["img"],
        vocab_size=256 if smoke else 8192,
        text_width=64 if smoke else 128,
        **kw,
    )


def model_shape(s: dict) -> dict[str, Any]:
    """The model of a benchmark setting as its JSON lines name it (``img``: image size,
    ``vl``/``vw``: vision layers/width, ``ll``/``lw``: LLM layers/width)."""
    return dict(
        image_size=s["img"],
        vision=f"{s['vl']}x{s['vw']}+btadapter2",
        llm=f"{s['ll']}x{s['lw']}",
    )


# ----------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
    """Wait for JAX arrays in ``x`` (no-op for anything else)."""
    if "jax" in sys.modules:
        import jax

        return jax.block_until_ready(x)
    return x


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` (blocked on its result) after ``warmup`` calls."""
    for _ in range(max(warmup, 0)):
        block(fn())
    out = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        block(fn())
        out.append(time.perf_counter() - t0)
    return out


def summary(times: Sequence[float]) -> dict[str, float]:
    """``median_s`` (the figure), ``min_s``, ``max_s``, ``repeats``."""
    return {
        "median_s": round(statistics.median(times), 6),
        "min_s": round(min(times), 6),
        "max_s": round(max(times), 6),
        "repeats": len(times),
    }


# ----------------------------------------------------------------------------- configs


def ppllava_config(
    *,
    vision_layers: int,
    vision_width: int,
    llm_layers: int,
    llm_width: int,
    image_size: int,
    patch_size: int = 14,
    vocab_size: int = 8192,
    pooling: str = "ppllava",
    btadapter: bool = True,
    btadapter_depth: int = 2,
    kernel: tuple[int, int, int] = (2, 3, 3),
    text_layers: int = 2,
    text_width: int = 128,
    clip_positions: int = 77,
    max_positions: int = 8192,
    dtype: str = "float32",
    scan_layers: bool = True,
    remat_policy: str = "none",
) -> Any:
    """A PPLLaVA config of the given sizes (heads of width 64, MLPs 4x / ~2.7x wide)."""
    from ppllava_jax.models.config import (
        CLIPTextConfig,
        CLIPVisionConfig,
        LlamaConfig,
        PPLLaVAConfig,
    )

    heads = lambda w: max(w // 64, 1)  # noqa: E731
    grid = image_size // patch_size
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads(vision_width),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=text_width,
    )
    text = CLIPTextConfig(
        vocab_size=1024,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=heads(text_width),
        max_position_embeddings=clip_positions,
        projection_dim=text_width,
        eos_token_id=2,
    )
    llm = LlamaConfig(
        vocab_size=vocab_size,
        **llm_width_fields(llm_width),
        num_hidden_layers=llm_layers,
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    img_kernel = (1, *kernel[1:])
    return PPLLaVAConfig(
        vision=vision,
        clip_text=text,
        llm=llm,
        image_token_index=vocab_size - 1,
        frame_shape=(grid, grid),
        pooling=pooling,
        pooling_kernel=kernel,
        pooling_stride=kernel,
        image_pooling_kernel=img_kernel,
        image_pooling_stride=img_kernel,
        image_grid_pinpoints=((image_size, 2 * image_size), (2 * image_size, image_size)),
        btadapter=btadapter,
        btadapter_depth=min(btadapter_depth, vision_layers),
        max_T=64,
        extend_clip=False,
        dtype=dtype,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
    )


def llm_width_fields(width: int) -> dict[str, int]:
    """The ``LlamaConfig`` fields of a ``width``-wide decoder in the benchmarks: heads of 64,
    as many key/value heads, an MLP of ~8/3 x the width (a multiple of 64)."""
    heads = max(width // 64, 1)
    return dict(
        hidden_size=width,
        intermediate_size=int(round(width * 8 / 3 / 64)) * 64,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )


def demo_model_config() -> Any:
    """The model section of ``configs/demo.py`` as a ``PPLLaVAConfig``."""
    import importlib.util

    from ppllava_jax.convert.ppllava_config import ppllava_config_from_dict

    spec = importlib.util.spec_from_file_location("_demo_config", ROOT / "configs/demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return ppllava_config_from_dict(mod.get_config().model.to_dict()), mod.get_config()


# ----------------------------------------------------------------------------- batches


def video_sft_batch(
    cfg: Any,
    *,
    batch: int,
    frames: int,
    text_len: int,
    clip_len: int = 16,
    clip_real: int = 0,
    newline_per_frame: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """A right-padded SFT batch of ``batch`` videos in ``data.collate`` format (numpy).

    Each row: ``[bos, 7 prompt tokens, <visual tokens>, text_len - 8 answer tokens]``, the answer
    supervised, no padding. The visual tokens are the item's projector output in (t, row, col)
    order; with ``newline_per_frame`` the ``image_newline`` row follows every frame's ``h * w``
    tokens (the layout transformers' LLaVA-NeXT gives one single-view image per frame; pooling
    'none' only). The CLIP prompts: ``clip_len`` random ids, or with ``clip_real`` > 0 that
    many real tokens ending in the CLIP vocabulary's largest id (end-of-text) and padded to
    ``clip_len`` with it, mask 0 (as CLIP's tokenizer pads to 248). Returns the arrays with
    ``labels``.
    """
    import numpy as np

    from ppllava_jax.data.collate import Planner

    t, h, w = Planner(cfg).item_grid("video", frames)
    per_item = t * h * w
    newline_row = batch * per_item
    vis = []
    for b in range(batch):
        rows = b * per_item + np.arange(per_item)
        if newline_per_frame:
            rows = np.concatenate(
                [np.append(r, newline_row) for r in rows.reshape(t, h * w)]
            ).astype(np.int64)
        vis.append(rows)
    n_vis = len(vis[0])
    prompt = 8
    length = n_vis + text_len
    rng = np.random.default_rng(seed)
    v = cfg.llm.vocab_size
    ids = rng.integers(3, v - 1, size=(batch, length)).astype(np.int32)
    ids[:, 0] = cfg.llm.bos_token_id
    visual_index = np.full((batch, length), -1, np.int32)
    for b in range(batch):
        visual_index[b, prompt : prompt + n_vis] = vis[b]
    ids[:, prompt : prompt + n_vis] = cfg.pad_token_id
    labels = np.full((batch, length), -100, np.int32)
    labels[:, prompt + n_vis :] = ids[:, prompt + n_vis :]
    s = cfg.vision.image_size
    out = {
        "input_ids": ids,
        "visual_index": visual_index,
        "attention_mask": np.ones((batch, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        "labels": labels,
        "video_pixels": rng.standard_normal((batch, frames, s, s, 3)).astype(np.float32),
        "video_frames": np.ones((batch, frames), bool),
    }
    if cfg.pooling == "ppllava":
        clip = rng.integers(3, 1000, size=(batch, clip_len)).astype(np.int32)
        mask = np.ones((batch, clip_len), np.int32)
        if 0 < clip_real < clip_len:
            clip[:, clip_real - 1 :] = cfg.clip_text.vocab_size - 1
            mask[:, clip_real:] = 0
        out["video_clip_ids"], out["video_clip_mask"] = clip, mask
    return out


# ----------------------------------------------------------------------------- FLOPs


def generate_run(model: Any, params: Any, batch: dict, sc: Any, *, prefill: bool = True) -> dict:
    """Compile ``generate`` (and, with ``prefill``, the prompt's prefill alone) for one left-padded
    batch, check one call makes ``sc.max_new_tokens`` tokens per row, and return the entry
    ``time_generate_runs`` times: ``gen``/``pre`` callables, ``info`` (prompt length, compile
    seconds) and empty ``tg``/``tp`` lists."""
    import jax
    import numpy as np

    from ppllava_jax.generate import generate

    def prefill_fn(p, b):
        rows, lp = b["attention_mask"].shape
        cache = model.apply({"params": p}, rows, lp + sc.max_new_tokens, method="init_cache")
        return model.apply({"params": p}, b, cache, method="prefill")[0]

    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    gen_c = jax.jit(lambda p, b, r: generate(model, p, b, sc, r)).lower(params, batch, rng)
    gen_c = gen_c.compile()
    t1 = time.perf_counter()
    pre_c = jax.jit(prefill_fn).lower(params, batch).compile() if prefill else None
    t2 = time.perf_counter()
    out = gen_c(params, batch, rng)
    assert (np.asarray(out["lengths"]) == sc.max_new_tokens).all()
    return dict(
        gen=lambda: gen_c(params, batch, rng)["tokens"],
        pre=(lambda: pre_c(params, batch)) if pre_c else (lambda: None),
        info=dict(
            prompt_len=int(batch["attention_mask"].shape[1]),
            compile_generate_s=round(t1 - t0, 3),
            compile_prefill_s=round(t2 - t1, 3),
        ),
        tg=[],
        tp=[],
    )


def time_generate_runs(runs: dict, warmup: int, repeats: int) -> None:
    """Time each run's ``gen()`` (whole generation) and ``pre()`` (prefill only), interleaving
    the runs so drift on a shared machine hits them alike; appends seconds to ``tg`` / ``tp``."""
    for r in runs.values():
        for _ in range(max(warmup, 0)):
            block(r["gen"]())
            block(r["pre"]())
    for _ in range(repeats):
        for r in runs.values():
            r["tg"] += time_calls(r["gen"], 1, warmup=0)
            r["tp"] += time_calls(r["pre"], 1, warmup=0)


# ----------------------------------------------------------------------------- train step


def sft_apply_fn(cfg: Any, *, deterministic: bool = False) -> Callable[..., dict]:
    """The trainer's ``apply_fn`` (``train.program.make_apply``) for ``PPLLaVA(cfg)``: the batch
    without ``labels``, dropout / drop-path keyed by ``rng`` in training unless
    ``deterministic`` (then training runs exactly the inference forward); extra keywords
    (``return_logits``) passed on."""
    from ppllava_jax.models.ppllava import PPLLaVA
    from ppllava_jax.train.program import make_apply

    return make_apply(PPLLaVA(cfg), deterministic)


def sft_config(lr: float = 1e-5, trainable: str = "all", **train: Any) -> Any:
    """The ``optimizer`` and ``train`` sections of the benchmarks' SFT step: AdamW, constant
    ``lr``, no weight decay, global-norm clipping at 1.0 over the ``trainable`` parameters (a
    preset of ``train.optimizer``: ``all``, ``ppllava_sft``, ...), 1000 steps, one micro-batch;
    ``train`` sets further ``train`` fields (``loss_chunk_size``, ``logits_at_targets_only``)."""
    from ppllava_jax.train.optimizer import default_optimizer_config
    from ppllava_jax.train.trainer import default_config

    config = default_config()
    opt = config.optimizer = default_optimizer_config()
    opt.lr = lr
    opt.schedule = "constant"
    opt.warmup_steps = 0
    opt.trainable = trainable
    opt.weight_decay = 0.0
    opt.grad_clip_norm = 1.0
    config.train.update(dict(total_steps=1000, grad_accum_steps=1, **train))
    return config


def sft_program(cfg: Any, config: Any, *, deterministic: bool = False) -> Any:
    """``(setup, compiled_step)``: the trainer's set-up (optimizer, trainable split; one device)
    and ``CompiledStep`` (``train.program.make_apply`` of ``PPLLaVA(cfg)``) for ``config``
    (``sft_config``)."""
    from ppllava_jax.train.compiled_step import CompiledStep
    from ppllava_jax.train.optimizer import make_optimizer, trainable_predicate
    from ppllava_jax.train.start import Setup

    tx, schedule = make_optimizer(config.optimizer, int(config.train.total_steps))
    setup = Setup("sft", tx, schedule, trainable_predicate(config.optimizer), None)
    step = CompiledStep(sft_apply_fn(cfg, deterministic=deterministic), config, setup, None, print)
    return setup, step


def sft_step(cfg: Any, *, lr: float = 1e-5, trainable: str = "all", deterministic: bool = False):
    """``(init_state, step_fn)`` for SFT of the ``trainable`` parameters with the trainer's
    optimizer and step (``sft_config``, ``sft_program``; ``deterministic``: see
    ``sft_apply_fn``).

    ``init_state(params) -> TrainState`` (traceable: ``jax.eval_shape`` gives an abstract state);
    ``step_fn``: the trainer's jitted step (state donated), called as
    ``step_fn(state, batch, rng) -> (state, metrics)``.
    """
    setup, step = sft_program(cfg, sft_config(lr, trainable), deterministic=deterministic)
    return setup.create, step.jitted


def sft_step_flops(cfg: Any, state: Any, batch: dict, frames: int) -> tuple[float, dict]:
    """Model FLOPs of one SFT step of ``state`` (its trainable set) on a ``video_sft_batch``
    (one video of ``frames`` frames per row; the loss's LM head at the batch's
    ``target_positions`` when it has them) and the forward's FLOPs by part (``flops``)."""
    import numpy as np

    from ppllava_jax import flops
    from ppllava_jax.data.collate import TARGET_POSITIONS
    from ppllava_jax.train.optimizer import param_paths

    rows, length = batch["input_ids"].shape
    clip_len = int(batch["video_clip_ids"].shape[1]) if "video_clip_ids" in batch else 0
    fwd = flops.forward_flops(cfg, rows, length, [(rows, frames, False)], clip_len)
    mult = flops.part_multipliers(param_paths(state.params))
    k = int(np.shape(batch[TARGET_POSITIONS])[1]) if TARGET_POSITIONS in batch else length
    step = sum(fwd[n] * mult[n] for n, _ in flops.PARTS if n != "lm_head")
    return float(step + fwd["lm_head"] * k / length * mult["lm_head"]), fwd


def random_params(cfg: Any, seed: int = 0) -> Any:
    import flax.linen as nn
    import jax

    from ppllava_jax.models.ppllava import init_params

    return nn.unbox(jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(seed)))


def matmul_flops_per_s(n: int, repeats: int, dtype: str = "float32") -> dict[str, Any]:
    """FLOP/s of a jitted ``[n, n] @ [n, n]`` matmul on the default device (median of
    ``repeats`` after one warm-up; 2 n^3 FLOPs per product)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    block(f(a, b))
    times = time_calls(lambda: f(a, b), repeats, warmup=1)
    s = summary(times)
    return {"n": n, "dtype": dtype, **s, "flops_per_s": 2 * n**3 / s["median_s"]}
