"""One SFT step (forward + backward + AdamW update) of the same model here and in PyTorch.

    python benchmarks/train_step.py            # vision 12 x 384, LLM 8 x 512, 8 frames of 112 px
    python benchmarks/train_step.py --quick    # vision 4 x 192, LLM 4 x 256, 8 frames of 56 px
    python benchmarks/train_step.py --smoke    # tiny (smoke test)

The model is transformers' ``LlavaNextForConditionalGeneration`` (CLIP vision tower, LLaVA MLP
projector, LLaMA decoder), built at random with ``torch.manual_seed(0)``, saved, and converted to
this project with ``ppllava_jax.convert`` (family ``llava_next``: ``btadapter=False``,
``pooling='none'``). So both sides hold the *same weights*; ``pooling='none'`` (every patch token
of every frame) is the only pooling both can compute — transformers' LLaVA-NeXT has no
average pooling over frames (``avp`` would give T times fewer tokens than LLaVA-NeXT's).

Input (identical numbers on both sides): ``--batch`` videos of ``--frames`` frames.
- PyTorch: the frames are ``--batch x --frames`` single-view images: ``pixel_values``
  ``[B*T, 3, S, S]`` (4-D), ``image_sizes`` all ``(S, S)``; transformers' any-resolution rule
  (``image_size_to_num_patches``, always >= 2 views: base + crops) is patched to 1 view per image,
  so each frame gives ``P = (S/14)^2`` patch tokens followed by one ``image_newline``; the prompt
  holds ``T * (P + 1)`` image tokens per video.
- JAX: one ``video`` item per row (``video_pixels [B, T, S, S, 3]``) whose merge layout
  (``visual_index``) puts the ``image_newline`` pool row after every frame's ``P`` tokens: the
  same merged sequence, ``L = T * (P + 1) + text`` tokens, the answer (last ``text - 8`` tokens)
  supervised.
The first step's loss of both sides is printed (``loss_jax``, ``loss_torch``): equal up to
float32 rounding when the two compute the same thing.

Step: mean next-token cross entropy; every parameter trained; global-norm clipping at 1.0;
AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay). JAX: ``train.step.make_train_step``
+ ``train.optimizer.make_optimizer``, ``jax.jit`` with the state donated, lowered and compiled
ahead of time (``compile_s``, reported apart; no persistent compilation cache). PyTorch: eager,
``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW.step()``, ``zero_grad``;
``torch.get_num_threads()`` threads (``--torch-threads``), on CUDA when available. Both
float32. After ``--warmup`` steps each, the timed steps alternate JAX, PyTorch, JAX, ... so both
see the same machine load; medians reported. PyTorch's OpenMP threads suffer badly when other
processes hold the cores (steps 10x slower were seen with a training run beside it), so read the
ratio together with the load average printed with it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    # vision layers x width, LLM layers x width, image px, frames, text tokens, vocab
    "full": dict(vl=12, vw=384, ll=8, lw=512, img=112, frames=8, text=64, vocab=8192, rep=5),
    "quick": dict(vl=4, vw=192, ll=4, lw=256, img=56, frames=8, text=32, vocab=4096, rep=3),
    "smoke": dict(vl=2, vw=64, ll=2, lw=64, img=28, frames=2, text=16, vocab=256, rep=1),
}


def torch_llava_next(s: dict, batch: int):
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    lw = s["lw"]
    cfg = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=s["img"],
            patch_size=14,
            hidden_size=s["vw"],
            intermediate_size=4 * s["vw"],
            num_hidden_layers=s["vl"],
            num_attention_heads=max(s["vw"] // 64, 1),
            hidden_act="quick_gelu",
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=lw,
            intermediate_size=int(round(lw * 8 / 3 / 64)) * 64,
            num_hidden_layers=s["ll"],
            num_attention_heads=max(lw // 64, 1),
            num_key_value_heads=max(lw // 64, 1),
            vocab_size=s["vocab"],
            max_position_embeddings=4096,
            pad_token_id=0,
            tie_word_embeddings=False,
        ),
        image_grid_pinpoints=[[s["img"], s["img"]]],
        image_token_index=s["vocab"] - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(cfg)


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--batch", type=int, default=1, help="videos per step")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args, size, s, repeats = common.parse_size(ap, SIZES)
    jax = common.setup_jax()
    import numpy as np
    import torch
    import transformers.models.llava_next.modeling_llava_next as hf_llava

    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # PyTorch on the GPU when there is one
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    # -- the same weights on both sides
    model_t = torch_llava_next(s, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        model_t.save_pretrained(Path(tmp) / "hf")
        convert_checkpoint(Path(tmp) / "hf", Path(tmp) / "ckpt")
        family, cfg, params = load_checkpoint(Path(tmp) / "ckpt")
    assert family == "llava_next" and cfg.pooling == "none" and not cfg.btadapter
    params = jax.tree.map(jax.numpy.asarray, params)

    # -- the same inputs
    frames = s["frames"]
    batch = common.video_sft_batch(
        cfg, batch=args.batch, frames=frames, text_len=s["text"], newline_per_frame=True
    )
    ids_t = batch["input_ids"].astype(np.int64)
    ids_t[batch["visual_index"] >= 0] = cfg.image_token_index
    px = batch["video_pixels"].reshape(-1, *batch["video_pixels"].shape[2:])
    inputs_t = dict(
        input_ids=torch.tensor(ids_t),
        attention_mask=torch.tensor(batch["attention_mask"].astype(np.int64)),
        pixel_values=torch.tensor(px.transpose(0, 3, 1, 2).copy()),
        image_sizes=torch.tensor([[s["img"], s["img"]]] * px.shape[0]),
        labels=torch.tensor(batch["labels"].astype(np.int64)),
    )
    inputs_t = {k: v.to(dev) for k, v in inputs_t.items()}
    # one view per frame (transformers' rule counts base + >= 1 crop for any image size)
    hf_llava.image_size_to_num_patches = lambda *a, **k: 1

    # -- JAX: compile ahead of time, then run
    init_state, step = common.sft_step(cfg, lr=1e-5)
    state = init_state(params)
    jbatch = jax.tree.map(jax.numpy.asarray, batch)
    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    lowered = step.lower(state, jbatch, rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    holder = {"state": state}

    def jax_step():
        holder["state"], m = compiled(holder["state"], jbatch, rng)
        return m

    # -- PyTorch
    model_t.to(dev).train()
    opt = torch.optim.AdamW(
        model_t.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )

    def torch_step():
        out = model_t(**inputs_t)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model_t.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return out.loss.detach()

    t3 = time.perf_counter()
    loss_j = float(jax_step()["loss"])  # first step: the initial weights on both sides
    t4 = time.perf_counter()
    loss_t = float(torch_step().cpu())
    t5 = time.perf_counter()
    for _ in range(max(args.warmup - 1, 0)):
        common.block(jax_step())
        torch_step()
    tj, tt = [], []
    for _ in range(repeats):
        a = time.perf_counter()
        common.block(jax_step())
        b = time.perf_counter()
        torch_step()
        c = time.perf_counter()
        tj.append(b - a)
        tt.append(c - b)
    sj, st = common.summary(tj), common.summary(tt)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    p = cfg.vision.num_patches
    shape = dict(
        size=size,
        batch=args.batch,
        frames=frames,
        image_size=s["img"],
        visual_tokens_per_video=frames * (p + 1),
        seq_len=int(batch["input_ids"].shape[1]),
        vision=f"{s['vl']}x{s['vw']}",
        llm=f"{s['ll']}x{s['lw']}",
        vocab=s["vocab"],
        params=n_params,
        dtype="float32",
    )
    common.emit(
        "train_step",
        side="jax",
        **shape,
        step_s=sj["median_s"],
        **{f"step_{k}": v for k, v in sj.items() if k != "median_s"},
        lower_s=round(t1 - t0, 3),
        compile_s=round(t2 - t1, 3),
        first_step_s=round(t4 - t3, 3),
        loss_first_step=loss_j,
    )
    common.emit(
        "train_step",
        side="torch",
        torch_device=dev,
        **shape,
        step_s=st["median_s"],
        **{f"step_{k}": v for k, v in st.items() if k != "median_s"},
        first_step_s=round(t5 - t4, 3),
        loss_first_step=loss_t,
    )
    common.emit(
        "train_step_ratio",
        **shape,
        jax_step_s=sj["median_s"],
        torch_step_s=st["median_s"],
        torch_over_jax=round(st["median_s"] / sj["median_s"], 3),
        jax_compile_s=round(t2 - t0, 3),
        loss_jax=loss_j,
        loss_torch=loss_t,
        loss_abs_diff=abs(loss_j - loss_t),
        same_loss=bool(abs(loss_j - loss_t) <= 1e-3 * max(1.0, abs(loss_t))),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
