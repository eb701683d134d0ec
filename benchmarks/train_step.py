"""One SFT step (forward + backward + clipping + AdamW) and the forward alone, of the same model
with the same weights here (JAX) and in eager PyTorch, timed alternately in one run.

    python benchmarks/train_step.py            # the small PPLLaVA setting (issue 15)
    python benchmarks/train_step.py --quick    # a smaller PPLLaVA
    python benchmarks/train_step.py --smoke    # tiny (smoke test)
    python benchmarks/train_step.py --setting llava_next [--quick|--smoke]

Setting ``ppllava`` (the default): the whole PPLLaVA — CLIP vision tower with the BT-Adapter, the
CLIP text tower of the prompt, prompt-guided 3-D pooling, the LLaVA MLP, LLaMA. The PyTorch side is
``benchmarks/torch_ppllava.py`` (transformers' ``CLIPVisionModel`` / ``CLIPTextModel`` /
``LlamaForCausalLM`` plus the BT-Adapter and the pooling, organised as the authors' code: a Python
loop over the samples; checked against the authors' outputs by ``tests/test_torch_ppllava.py``),
built at random with ``torch.manual_seed(0)``, saved in the authors' checkpoint layout
(``model.safetensors`` + ``config.json`` + ``clip/config.json``) and converted with
``ppllava_jax.convert`` (family ``ppllava``). Default size ("small", the issue's): CLIP vision 12 x
384 at 168 px with a depth-2 BT-Adapter, CLIP text 4 x 256 over 248 positions (a 40-token prompt
padded to 248 as CLIP's tokenizer does: PyTorch runs all 248 as the authors' code does, the JAX
batch is cut to 64 on the host as ``train.py`` cuts it), LLaMA 8 x 512 with vocabulary 32,064, 2
videos x 8 frames, pooling (2,3,3) -> 64 visual tokens, 63 text tokens; the SFT trainable set
(``ppllava_sft``: the vision trunk, the CLIP text tower and ``logit_scale`` frozen) on both sides.
Drop-path is off on both sides (its random masks cannot be shared between the frameworks; every
other op is deterministic), so the first step's losses must agree. ``--torch-lean``: the PyTorch
side runs the CLIP and adapter layers only up to the feature layer, as the JAX side does (the
authors' code runs them all); ``--torch-checkpoint``: it recomputes the adapter layers in the
backward, as the authors' training does.

Setting ``llava_next``: transformers' ``LlavaNextForConditionalGeneration`` (CLIP vision,
``vision_feature_layer=-2``, LLaVA MLP, LLaMA), every parameter trained, converted with family
``llava_next`` (= PPLLaVA with ``btadapter=False``, ``pooling='none'``, the only pooling both can
compute). PyTorch gets the B x T frames as single-view images (transformers' any-resolution rule is
patched to 1 view), so each frame is P patch tokens + 1 ``image_newline``; our side gets
``video_pixels [B,T,S,S,3]`` with a merge layout putting the newline after every frame: the same
merged sequence.

The JAX model's repeated layers (``--layers``, the runtime field ``scan_layers``): ``per_layer``
(default; the converted checkpoint unstacked, ``convert.api.unstack_layers``) or ``scanned``
(stacked under ``nn.scan``: compile time flat in depth, what the 7B recipes use; on the CPU each
step then copies every layer's weights out of the stacks and fills the stacked gradients with
zeros first, ~5% of this step). Same numbers either way.

Step, both settings: mean next-token cross entropy over the supervised tokens, global-norm
clipping at 1.0, AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay), float32. JAX:
``common.sft_step`` (``train.step.make_train_step`` + ``train.optimizer.make_optimizer``, jitted,
state donated, compiled ahead of time: ``compile_s`` apart). PyTorch: eager, ``loss.backward()``,
``clip_grad_norm_``, ``torch.optim.AdamW``, ``torch.get_num_threads()`` threads
(``--torch-threads``), CUDA when available. Forward: the loss without gradients (JAX: the step's
``train.step.make_loss_fn`` jitted; PyTorch: ``torch.no_grad``, ``eval()``). After ``--warmup``
steps and forwards each, every timed round runs JAX step, PyTorch step, JAX forward, PyTorch
forward; medians reported, with the load average. The second step is always run (as warm-up);
its losses (``loss_second_step_*``) agree only if both sides made the same first update.
``load_s``: building, saving and converting the model. PyTorch's OpenMP threads suffer badly
when other processes hold the cores: read the ratios with the load printed beside them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LLAVA_SIZES = {
    # vision layers x width, LLM layers x width, image px, frames, text tokens, vocab
    "full": dict(vl=12, vw=384, ll=8, lw=512, img=112, frames=8, text=64, vocab=8192, rep=5),
    "quick": dict(vl=4, vw=192, ll=4, lw=256, img=56, frames=8, text=32, vocab=4096, rep=3),
    "smoke": dict(vl=2, vw=64, ll=2, lw=64, img=28, frames=2, text=16, vocab=256, rep=1),
}
PPLLAVA_SIZES = {
    # vision layers x width, image px, CLIP text layers x width, LLM layers x width, vocab,
    # videos x frames, text tokens, CLIP prompt positions and real tokens (0: all), pooling
    # kernel = stride
    "full": dict(vl=12, vw=384, img=168, tl=4, tw=256, ll=8, lw=512, vocab=32064, batch=2,
                 frames=8, text=63, clip_pos=248, clip_real=40, kernel=(2, 3, 3), rep=5),
    "quick": dict(vl=4, vw=192, img=84, tl=2, tw=128, ll=4, lw=256, vocab=4096, batch=2,
                  frames=8, text=32, clip_pos=77, clip_real=20, kernel=(2, 3, 3), rep=3),
    "smoke": dict(vl=2, vw=64, img=42, tl=1, tw=64, ll=2, lw=64, vocab=256, batch=2,
                  frames=2, text=16, clip_pos=16, clip_real=0, kernel=(2, 3, 3), rep=1),
}  # fmt: skip


def torch_llava_next(s: dict):
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


def llava_next_setup(s: dict, args: Any, tmp: Path) -> dict:
    """Both sides of the ``llava_next`` setting: config, params, JAX batch, PyTorch model and
    its inputs, the trainable set (all) and the shape fields of the JSON lines."""
    import numpy as np
    import torch
    import transformers.models.llava_next.modeling_llava_next as hf_llava

    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint

    model_t = torch_llava_next(s)
    model_t.save_pretrained(tmp / "hf")
    convert_checkpoint(tmp / "hf", tmp / "ckpt")
    family, cfg, params = load_checkpoint(tmp / "ckpt")
    assert family == "llava_next" and cfg.pooling == "none" and not cfg.btadapter
    b = args.batch or 1
    batch = common.video_sft_batch(
        cfg, batch=b, frames=s["frames"], text_len=s["text"], newline_per_frame=True
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
    # one view per frame (transformers' rule counts base + >= 1 crop for any image size)
    hf_llava.image_size_to_num_patches = lambda *a, **k: 1
    shape = dict(
        batch=b,
        frames=s["frames"],
        image_size=s["img"],
        visual_tokens_per_video=s["frames"] * (cfg.vision.num_patches + 1),
        vision=f"{s['vl']}x{s['vw']}",
        llm=f"{s['ll']}x{s['lw']}",
        vocab=s["vocab"],
    )
    return dict(cfg=cfg, params=params, batch=batch, model_t=model_t, inputs_t=inputs_t,
                trainable="all", loss_t=lambda out: out.loss, shape=shape)  # fmt: skip


def ppllava_setup(s: dict, args: Any, tmp: Path) -> dict:
    """Both sides of the ``ppllava`` setting (see the module doc)."""
    import numpy as np
    import torch
    import torch_ppllava

    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint
    from ppllava_jax.convert.ppllava_config import ppllava_config_to_hf

    cfg0 = common.ppllava_config(
        vision_layers=s["vl"], vision_width=s["vw"], llm_layers=s["ll"], llm_width=s["lw"],
        image_size=s["img"], vocab_size=s["vocab"], text_layers=s["tl"], text_width=s["tw"],
        clip_positions=s["clip_pos"], kernel=s["kernel"],
    )  # fmt: skip
    hf = ppllava_config_to_hf(cfg0)
    torch.manual_seed(0)
    model_t = torch_ppllava.TorchPPLLaVA(
        hf, hf["clip_config"], lean=args.torch_lean, checkpoint=args.torch_checkpoint
    )
    model_t.save(tmp / "pt", hf["clip_config"])
    convert_checkpoint(tmp / "pt", tmp / "ckpt")
    family, cfg, params = load_checkpoint(tmp / "ckpt")
    assert family == "ppllava" and cfg.btadapter and cfg.pooling == "ppllava"
    b = args.batch or s["batch"]
    batch = common.video_sft_batch(
        cfg,
        batch=b,
        frames=s["frames"],
        text_len=s["text"],
        clip_len=s["clip_pos"],
        clip_real=s["clip_real"],
    )
    # PyTorch: the run of visual positions becomes one image token (label -100)
    vis = batch["visual_index"] >= 0
    ids, lab = [], []
    for i in range(b):
        p0 = int(np.argmax(vis[i]))
        rest = ~vis[i] & (np.arange(vis.shape[1]) > p0)
        ids.append(np.concatenate([batch["input_ids"][i, :p0], [cfg.image_token_index],
                                   batch["input_ids"][i][rest]]))  # fmt: skip
        lab.append(np.concatenate([batch["labels"][i, :p0], [-100], batch["labels"][i][rest]]))
    ids_t = torch.tensor(np.stack(ids).astype(np.int64))
    px = batch["video_pixels"].transpose(0, 1, 4, 2, 3)  # [B, T, 3, S, S]
    inputs_t = dict(
        input_ids=ids_t,
        attention_mask=torch.ones_like(ids_t),
        pixel_values=[torch.tensor(px[i].copy()) for i in range(b)],
        media_types=["video"] * b,
        clip_ids=torch.tensor(batch["video_clip_ids"].astype(np.int64)),
        clip_mask=torch.tensor(batch["video_clip_mask"].astype(np.int64)),
        labels=torch.tensor(np.stack(lab).astype(np.int64)),
    )
    t, h, w = s["frames"] // s["kernel"][0], *(cfg.vision.grid // k for k in s["kernel"][1:])
    shape = dict(
        batch=b,
        frames=s["frames"],
        image_size=s["img"],
        visual_tokens_per_video=t * h * w,
        vision=f"{s['vl']}x{s['vw']}+btadapter{cfg.btadapter_depth}",
        clip_text=f"{s['tl']}x{s['tw']}",
        clip_positions=s["clip_pos"],
        clip_real_tokens=s["clip_real"] or s["clip_pos"],
        llm=f"{s['ll']}x{s['lw']}",
        vocab=s["vocab"],
        kernel=list(s["kernel"]),
        torch_lean=args.torch_lean,
        torch_checkpoint=args.torch_checkpoint,
    )
    return dict(cfg=cfg, params=params, batch=batch, model_t=model_t, inputs_t=inputs_t,
                trainable="ppllava_sft", loss_t=lambda out: out["loss"], shape=shape)  # fmt: skip


def main() -> int:
    ap = common.base_parser(__doc__)
    ap.add_argument("--setting", choices=("ppllava", "llava_next"), default="ppllava")
    ap.add_argument("--batch", type=int, default=0, help="videos per step (0: the setting's)")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--torch-lean", action="store_true", help="ppllava: skip unused layers")
    ap.add_argument("--torch-checkpoint", action="store_true", help="ppllava: remat adapter")
    ap.add_argument(
        "--layers",
        choices=("per_layer", "scanned"),
        default="per_layer",
        help="the JAX model's repeated layers: one per layer, or stacked under nn.scan",
    )
    args = ap.parse_args()
    size = common.size_of(args)
    s = (PPLLAVA_SIZES if args.setting == "ppllava" else LLAVA_SIZES)[size]
    repeats = args.repeats or s["rep"]
    jax = common.setup_jax()
    import numpy as np
    import torch

    from ppllava_jax.convert.api import per_layer
    from ppllava_jax.train.batches import with_target_positions, with_trimmed_clip_prompts
    from ppllava_jax.train.step import make_loss_fn

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # PyTorch on the GPU when there is one
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    # -- the same weights and inputs on both sides
    t_load = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        setup = (ppllava_setup if args.setting == "ppllava" else llava_next_setup)(
            s, args, Path(tmp)
        )
    load_s = time.perf_counter() - t_load
    cfg, batch, model_t = setup["cfg"], setup["batch"], setup["model_t"]
    params = setup["params"]
    if args.layers == "per_layer":  # converted checkpoints are scanned
        cfg, params = per_layer(cfg, params)
    params = jax.tree.map(jax.numpy.asarray, params)
    inputs_t = {
        k: ([x.to(dev) for x in v] if isinstance(v, list) and torch.is_tensor(v[0]) else v)
        for k, v in setup["inputs_t"].items()
    }
    inputs_t = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs_t.items()}

    # -- JAX: step and forward compiled ahead of time
    det = args.setting == "ppllava"  # no drop-path: both sides compute the same loss
    init_state, step = common.sft_step(
        cfg, lr=1e-5, trainable=setup["trainable"], deterministic=det
    )
    state = init_state(params)
    loss_fn = make_loss_fn(common.sft_apply_fn(cfg, deterministic=True), "sft")

    def forward(trainable, frozen, b, r):
        total, aux = loss_fn(trainable, frozen, None, b, r)
        return total / jax.numpy.maximum(aux["num_tokens"], 1)

    # as train.py feeds it: the loss's LM head only at the supervised positions, the CLIP
    # prompts' padding cut (ppllava setting: 40 real of 248 -> 64; PyTorch runs all 248)
    jbatch = jax.tree.map(
        jax.numpy.asarray, with_trimmed_clip_prompts(with_target_positions(batch))
    )
    rng = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, jbatch, rng).compile()
    t1 = time.perf_counter()
    fwd_c = jax.jit(forward).lower(state.params, state.frozen, jbatch, rng).compile()
    t2 = time.perf_counter()
    holder = {"state": state}

    def jax_step():
        holder["state"], m = compiled(holder["state"], jbatch, rng)
        return m

    def jax_forward():
        return fwd_c(holder["state"].params, holder["state"].frozen, jbatch, rng)

    # -- PyTorch
    model_t.to(dev)
    trainable_t = [p for p in model_t.parameters() if p.requires_grad]
    if args.setting == "ppllava":
        n_train_t = model_t.set_trainable()
        trainable_t = [p for p in model_t.parameters() if p.requires_grad]
        n_train_j = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        assert n_train_t == n_train_j, (n_train_t, n_train_j)
    opt = torch.optim.AdamW(trainable_t, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def torch_step():
        model_t.train()
        loss = setup["loss_t"](model_t(**inputs_t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_t, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss.detach()

    def torch_forward():
        model_t.eval()
        with torch.no_grad():
            loss = setup["loss_t"](model_t(**inputs_t))
        sync()
        return loss

    t3 = time.perf_counter()
    loss_j = float(jax_step()["loss"])  # first step: the initial weights on both sides
    t4 = time.perf_counter()
    loss_t = float(torch_step().cpu())
    t5 = time.perf_counter()
    # the second step (a warm-up step): its losses agree only if the first updates did
    loss2_j, loss2_t = float(jax_step()["loss"]), float(torch_step().cpu())
    for _ in range(max(args.warmup - 2, 0)):
        common.block(jax_step())
        torch_step()
    for _ in range(max(args.warmup, 1)):
        common.block(jax_forward())
        torch_forward()
    times: dict[str, list[float]] = {"jax": [], "torch": [], "jax_fwd": [], "torch_fwd": []}
    runs = (("jax", jax_step), ("torch", torch_step), ("jax_fwd", jax_forward),
            ("torch_fwd", torch_forward))  # fmt: skip
    for _ in range(repeats):
        for name, fn in runs:
            a = time.perf_counter()
            common.block(fn())
            times[name].append(time.perf_counter() - a)
    med = {k: common.summary(v) for k, v in times.items()}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    shape = dict(
        setting=args.setting,
        size=size,
        **setup["shape"],
        seq_len=int(batch["input_ids"].shape[1]),
        **(
            {"clip_positions_jax": int(jbatch["video_clip_ids"].shape[1])}
            if "video_clip_ids" in jbatch
            else {}
        ),
        params=n_params,
        trainable_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        dtype="float32",
        layers=args.layers,
    )
    for side, first_s, loss in (("jax", t4 - t3, loss_j), ("torch", t5 - t4, loss_t)):
        st, sf = med[side], med[f"{side}_fwd"]
        extra = dict(compile_step_s=round(t1 - t0, 3), compile_forward_s=round(t2 - t1, 3))
        common.emit(
            "train_step",
            side=side,
            **(extra if side == "jax" else {"torch_device": dev}),
            **shape,
            step_s=st["median_s"],
            **{f"step_{k}": v for k, v in st.items() if k != "median_s"},
            forward_s=sf["median_s"],
            **{f"forward_{k}": v for k, v in sf.items() if k != "median_s"},
            first_step_s=round(first_s, 3),
            loss_first_step=loss,
        )
    common.emit(
        "train_step_ratio",
        **shape,
        jax_step_s=med["jax"]["median_s"],
        torch_step_s=med["torch"]["median_s"],
        torch_over_jax=round(med["torch"]["median_s"] / med["jax"]["median_s"], 3),
        jax_forward_s=med["jax_fwd"]["median_s"],
        torch_forward_s=med["torch_fwd"]["median_s"],
        torch_over_jax_forward=round(med["torch_fwd"]["median_s"] / med["jax_fwd"]["median_s"], 3),
        jax_compile_s=round(t2 - t0, 3),
        load_s=round(load_s, 3),
        loss_jax=loss_j,
        loss_torch=loss_t,
        loss_abs_diff=abs(loss_j - loss_t),
        same_loss=bool(abs(loss_j - loss_t) <= 1e-4 * max(1.0, abs(loss_t))),
        loss_second_step_jax=loss2_j,
        loss_second_step_torch=loss2_t,
        loss_second_step_abs_diff=abs(loss2_j - loss2_t),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
