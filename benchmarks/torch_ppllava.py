"""An eager PyTorch PPLLaVA (CLIP + BT-Adapter, prompt-guided pooling, LLaMA): the baseline the
benchmarks compare this project with. Benchmark-side reference code, not part of the package.

It computes what the authors' PyTorch code computes (their
``LlavaInterleaveForConditionalGeneration`` with ``pooling: ppllava`` and ``btadapter: true``),
organised the way that code does it: a Python
loop over the samples of a batch, each sample's frames through transformers' ``CLIPVisionModel``
(all hidden states, then the BT-Adapter layers read them), the sample's CLIP prompt through
transformers' ``CLIPTextModel`` under ``torch.no_grad``, the prompt-weighted 3-D pooling with
``Tensor.unfold``, the LLaVA MLP, the image tokens replaced in place by the visual tokens, and
transformers' ``LlamaForCausalLM`` over ``inputs_embeds``; the loss is the mean next-token cross
entropy over the attended, supervised positions. ``tests/test_torch_ppllava.py`` checks it
against the authors' outputs (``tests/fixtures/reference_ppllava``).

Parameters carry the released checkpoint's names (``vision_tower.vision_model.*`` incl.
``btadapter_S_layers`` / ``btadapter_T_layers``, ``multi_modal_projector.*`` incl.
``clip_text_model``, ``language_model.model.*``, ``language_model.lm_head.*``,
``image_newline``), so ``save`` writes a directory ``ppllava_jax.convert`` reads and
``from_pretrained`` reads one the original wrote.

    model = TorchPPLLaVA.from_pretrained("tests/fixtures/reference_ppllava")
    out = model(input_ids, attention_mask, pixel_values, media_types, clip_ids, clip_mask,
                image_sizes=image_sizes, labels=labels)     # out["logits"], out["loss"]

Inputs (one entry per sample in the lists): ``input_ids`` / ``attention_mask`` / ``labels``
``int64[B, L]`` with one ``image_token_index`` per image (video: 1, multi-image: one per image);
``pixel_values[i]``: a video or multi-image sample ``float32[T, 3, S, S]``, an any-resolution
image ``float32[V, 3, S, S]`` (base view, then the grid crops); ``media_types[i]`` in
``video | image | multi-image``; ``clip_ids`` / ``clip_mask`` ``int64[B, Lc]``;
``image_sizes`` ``(height, width)`` per sample (images only).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

IGNORE_INDEX = -100
# the SFT trainable set (ppllava_jax.train.optimizer's "ppllava_sft" preset, torch names): the
# LLM, the BT-Adapter, linear_1/2, the projector's post-LN and projections, image_newline
SFT_TRAINABLE = (
    r"^language_model\.",
    r"^vision_tower\.vision_model\.btadapter_",
    r"^multi_modal_projector\."
    r"(linear_1|linear_2|clip_visual_ln|clip_visual_projection|clip_text_projection)\.",
    r"^image_newline$",
)


def read_config(ckpt_dir: str | Path) -> tuple[dict, dict]:
    """``(config.json, the CLIP config)`` of a PPLLaVA directory: ``clip_config`` inside
    config.json, else ``<clip_weight or clip>/config.json`` next to it."""
    d = json.loads((Path(ckpt_dir) / "config.json").read_text())
    clip = d.get("clip_config")
    if clip is None:
        clip = json.loads(
            (Path(ckpt_dir) / (d.get("clip_weight") or "clip") / "config.json").read_text()
        )
    return d, clip


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per row of ``x`` (its leading axis), as timm."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    u = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
    return x.div(keep) * u.floor()


class LongCLIPTextEmbeddings(nn.Module):
    """Long-CLIP text embeddings: token table, and two raw position tables of the same length;
    positions below ``keep`` (20) read ``position_embedding``, the others
    ``position_embedding_res``."""

    def __init__(self, vocab: int, positions: int, width: int, keep: int = 20):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Parameter(torch.empty(positions, width).normal_(std=0.01))
        self.position_embedding_res = nn.Parameter(torch.empty(positions, width).normal_(std=0.01))
        self.keep = keep

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        n = input_ids.shape[-1]
        low = (torch.arange(n, device=input_ids.device) < self.keep).to(
            self.position_embedding.dtype
        )
        pos = self.position_embedding[:n] * low[:, None]
        pos = pos + self.position_embedding_res[:n] * (1 - low)[:, None]
        return self.token_embedding(input_ids) + pos[None]


class TemporalLayer(nn.Module):
    """``btadapter_T_layers.{j}``: attention across the T frames of each patch location,
    ``temporal_fc``, residual on the patches; the class token passes through."""

    def __init__(self, cfg: CLIPVisionConfig, rate: float):
        super().__init__()
        c = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(c)
        self.self_attn = CLIPAttention(cfg)
        self.temporal_fc = nn.Linear(c, c)
        self.rate = rate

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """x: ``[B, 1 + P*T, C]`` (patches patch-major, time-minor)."""
        cls, patches = x[:, :1], x[:, 1:]
        b, pt, c = patches.shape
        h = self.layer_norm1(patches.reshape(b * (pt // t), t, c))
        h = drop_path(self.self_attn(h)[0], self.rate, self.training)
        h = self.temporal_fc(h).reshape(b, pt, c)
        return torch.cat([cls, patches + h], dim=1)


class SpatialLayer(nn.Module):
    """``btadapter_S_layers.{j}``: a CLIP encoder layer run per frame; the class token is copied
    to every frame and its outputs averaged over the frames."""

    def __init__(self, cfg: CLIPVisionConfig, rate: float):
        super().__init__()
        c = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(c)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(c)
        self.mlp = CLIPMLP(cfg)
        self.rate = rate

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        b, pt, c = patches.shape
        p = pt // t
        frames = patches.reshape(b, p, t, c).transpose(1, 2).reshape(b * t, p, c)
        h = torch.cat([cls.repeat_interleave(t, dim=0), frames], dim=1)
        h = drop_path(self.self_attn(self.layer_norm1(h))[0], self.rate, self.training)
        h_cls = h[:, :1].reshape(b, t, 1, c).mean(1)
        h_patches = h[:, 1:].reshape(b, t, p, c).transpose(1, 2).reshape(b, pt, c)
        x = x + torch.cat([h_cls, h_patches], dim=1)
        return x + self.mlp(self.layer_norm2(x))


def attach_btadapter(vm: CLIPVisionModel, depth: int, max_t: int, drop: bool = False) -> None:
    """Add the BT-Adapter's parameters to a ``CLIPVisionModel`` under the original's names.
    Drop-path rates as the original passes them (spatial ``linspace(0, 0.1, depth)``, temporal
    0.1), or all 0 unless ``drop``."""
    cfg, c = vm.config, vm.config.hidden_size
    dpr = [0.1 * j / max(depth - 1, 1) for j in range(depth)] if drop else [0.0] * depth
    vm.btadapter_S_layers = nn.ModuleList(SpatialLayer(cfg, dpr[j]) for j in range(depth))
    rt = 0.1 if drop else 0.0
    vm.btadapter_T_layers = nn.ModuleList(TemporalLayer(cfg, rt) for _ in range(depth))
    vm.btadapter_time_embed = nn.Embedding(max_t, c)
    vm.btadapter_cls_token = nn.Parameter(torch.zeros(1, 1, c))


class TorchPPLLaVA(nn.Module):
    """PPLLaVA (Vicuna family: CLIP + BT-Adapter + LLaMA, ``pooling: ppllava``) in PyTorch."""

    def __init__(self, hf: dict, clip_hf: dict, *, lean: bool = False, checkpoint: bool = False,
                 drop_path: bool = False):  # fmt: skip
        """hf: the PPLLaVA config.json; clip_hf: the CLIP config (its ``text_config``).
        lean: run the CLIP layers and adapter layers up to the feature layer only (the
        original runs them all). checkpoint: recompute the adapter layers in the backward
        (``torch.utils.checkpoint``, as the original does in training). drop_path: the
        original's drop-path rates in training (off: every path kept)."""
        super().__init__()
        self.hf, self.lean, self.checkpoint = hf, lean, checkpoint
        if hf.get("pooling") != "ppllava" or not hf.get("btadapter") or hf.get("qwen"):
            raise ValueError("only the Vicuna family with btadapter and pooling 'ppllava'")
        vcfg = CLIPVisionConfig(**hf["vision_config"])
        tcfg = CLIPTextConfig(**clip_hf["text_config"])
        self.depth = int(hf.get("btadapter_depth", 4))
        self.extended = bool(hf.get("extend_clip"))
        if self.extended:  # Long-CLIP: 77 -> 248 positions
            tcfg.max_position_embeddings = 4 * tcfg.max_position_embeddings - 60
        tower = nn.Module()
        tower.vision_model = CLIPVisionModel(vcfg)
        attach_btadapter(tower.vision_model, self.depth, int(hf.get("max_T", 64)), drop_path)
        self.vision_tower = tower
        proj = nn.Module()
        d_llm, c = hf["text_config"]["hidden_size"], vcfg.hidden_size
        proj.linear_1 = nn.Linear(c, d_llm)
        proj.act = ACT2FN[hf.get("projector_hidden_act", "gelu")]
        proj.linear_2 = nn.Linear(d_llm, d_llm)
        proj.clip_text_model = CLIPTextModel(tcfg)
        if self.extended:
            n, w = tcfg.max_position_embeddings, tcfg.hidden_size
            proj.clip_text_model.embeddings = LongCLIPTextEmbeddings(tcfg.vocab_size, n, w)
        pd = clip_hf.get("projection_dim", 512)
        proj.clip_text_projection = nn.Linear(tcfg.hidden_size, pd, bias=False)
        proj.clip_visual_ln = nn.LayerNorm(c, eps=vcfg.layer_norm_eps)
        proj.clip_visual_projection = nn.Linear(c, pd, bias=False)
        proj.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)), requires_grad=False)
        self.multi_modal_projector = proj
        self.language_model = LlamaForCausalLM(LlamaConfig(**hf["text_config"]))
        self.image_newline = nn.Parameter(torch.empty(d_llm).normal_(std=0.02))
        self.feature_layer = int(hf.get("vision_feature_layer", -2))
        self.strategy = hf.get("vision_feature_select_strategy", "default")
        self.frame_shape = tuple(hf["frame_shape"])
        self.temp = float(hf.get("pooling_temp", 0.01))
        vk, vs = hf["pooling_kernel"], hf["pooling_stride"]
        self.video_window = (tuple(vk), tuple(vs))
        ik, is_ = hf.get("image_pooling_kernel") or vk, hf.get("image_pooling_stride") or vs
        self.image_window = (tuple(ik), tuple(is_))

    # -- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, **kw: Any) -> TorchPPLLaVA:
        """Build from ``config.json`` and load ``*.safetensors`` (every tensor, strictly)."""
        from safetensors.torch import load_file

        hf, clip = read_config(ckpt_dir)
        model = cls(hf, clip, **kw)
        state = {}
        for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
            state.update(load_file(str(f)))
        model.load_state_dict(state, strict=True)
        return model

    def save(self, out_dir: str | Path, clip_hf: dict) -> None:
        """``model.safetensors`` + ``config.json`` + ``clip/config.json`` (the authors' layout)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        (out / "clip").mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        hf = {k: v for k, v in self.hf.items() if k != "clip_config"}
        (out / "config.json").write_text(json.dumps({**hf, "clip_weight": "clip"}, indent=1))
        (out / "clip" / "config.json").write_text(json.dumps(clip_hf, indent=1))

    def set_trainable(self, patterns: tuple[str, ...] | None = SFT_TRAINABLE) -> int:
        """``requires_grad`` on the parameters whose name matches a pattern (None: all, except
        the frozen ``logit_scale``); returns the trainable count."""
        n = 0
        for name, p in self.named_parameters():
            on = patterns is None or any(re.search(r, name) for r in patterns)
            p.requires_grad_(on and not name.endswith("logit_scale"))
            n += p.numel() if p.requires_grad else 0
        return n

    # -- vision tower ----------------------------------------------------------------------
    def _adapter(self, j: int, x1: torch.Tensor, x2: torch.Tensor | None, t: int) -> torch.Tensor:
        """Adapter j after CLIP layer ``L - D + j``: x1 ``[B*T, 1+P, C]`` its output, x2 the
        adapter stream ``[B, 1 + P*T, C]`` (None before adapter 0)."""
        vm = self.vision_tower.vision_model
        bt, l1, c = x1.shape
        b, p = bt // t, l1 - 1
        x1 = x1.reshape(b, t, l1, c)
        cls = x1[:, :, 0].mean(1, keepdim=True)
        patches = x1[:, :, 1:].transpose(1, 2).reshape(b, p * t, c)  # (p t)
        if x2 is None:  # the stream starts: adapter class token, positions, time embeddings
            pos = vm.embeddings.position_embedding.weight
            own = vm.btadapter_cls_token[0] + pos[:1]
            time = vm.btadapter_time_embed.weight[:t]
            patches = patches.reshape(b, p, t, c) + pos[1:, None] + time[None]
            x = torch.cat([(cls + own) / 2, patches.reshape(b, p * t, c)], dim=1)
        else:
            x = x2 + torch.cat([cls, patches], dim=1)
        for layer in (vm.btadapter_T_layers[j], vm.btadapter_S_layers[j]):
            if self.checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, t, use_reentrant=False)
            else:
                x = layer(x, t)
        return x

    @staticmethod
    def _combine(x: torch.Tensor, x2: torch.Tensor, t: int) -> torch.Tensor:
        """The hidden state reported once the adapter runs: CLIP's class token per frame, the
        patches averaged with the adapter's (back in per-frame order)."""
        bt, l1, c = x.shape
        x2p = x2[:, 1:].reshape(bt // t, l1 - 1, t, c).transpose(1, 2).reshape(bt, l1 - 1, c)
        return torch.cat([x[:, :1], (x[:, 1:] + x2p) / 2], dim=1)

    def vision_features(self, pixels: torch.Tensor, t: int) -> torch.Tensor:
        """pixels ``[B*T, 3, S, S]`` (B sequences of T frames) -> hidden state
        ``vision_feature_layer`` ``[B*T, P, C]`` (class token dropped by 'default')."""
        vm = self.vision_tower.vision_model
        n_layers = vm.config.num_hidden_layers
        k = self.feature_layer % (n_layers + 1)
        first = n_layers - self.depth
        if self.lean:  # only the layers the feature layer reads
            h = vm.pre_layrnorm(vm.embeddings(pixels))
            hidden = [h]
            for layer in vm.encoder.layers[: max(k, first + 1)]:
                h = layer(h, None)
                h = h[0] if isinstance(h, tuple) else h
                hidden.append(h)
        else:
            hidden = list(vm(pixel_values=pixels, output_hidden_states=True).hidden_states)
        x2 = None
        states = list(hidden)
        for j in range(self.depth):
            i = first + j + 1  # hidden state i = output of CLIP layer i - 1
            if self.lean and i > k:
                break
            x2 = self._adapter(j, hidden[i], x2, t)
            states[i] = self._combine(hidden[i], x2, t)
        feats = states[k]
        return feats[:, 1:] if self.strategy == "default" else feats

    # -- projector -------------------------------------------------------------------------
    def pool(self, feats: torch.Tensor, clip_ids, clip_mask, t: int, video: bool) -> torch.Tensor:
        """One sample's ``[T, P, C]`` features -> pooled visual tokens ``[T'*h'*w', D]``."""
        pr = self.multi_modal_projector
        fh, fw = self.frame_shape
        e = pr.clip_visual_projection(pr.clip_visual_ln(feats)).reshape(
            1, -1, pr.clip_visual_projection.out_features
        )
        with torch.no_grad():
            txt = pr.clip_text_model(
                input_ids=clip_ids[None], attention_mask=clip_mask[None]
            ).pooler_output
        c = pr.clip_text_projection(txt)
        e = e / e.norm(p=2, dim=-1, keepdim=True)
        c = c / c.norm(p=2, dim=-1, keepdim=True)
        sim = torch.einsum("ad,bvd->abv", c, e).diagonal(dim1=0, dim2=1).transpose(0, 1)
        attn = torch.softmax(sim * pr.logit_scale.exp(), dim=-1).reshape(1, t, fh, fw)
        v = pr.linear_2(pr.act(pr.linear_1(feats)))  # [T, P, D]
        v = v.reshape(1, t, fh, fw, -1).permute(0, 4, 1, 2, 3)  # [1, D, T, h, w]
        kernel, stride = self.video_window if video else self.image_window
        out = weighted_pool3d(v, attn, kernel, stride, self.temp)  # [1, D, T', h', w']
        self.last_visual_attention = sim.reshape(1, t, fh, fw).detach()
        return out.flatten(2).transpose(1, 2)[0]

    def encode(self, pixels: torch.Tensor, media: str, clip_ids, clip_mask, image_size=None):
        """One sample's visual tokens, one ``[N_i, D]`` tensor per image token."""
        if media in ("video", "multi-image"):
            t = pixels.shape[0]
            if t == 3:  # the original reads a 3-frame [1, T, 3, H, W] input as [1, 3, T, H, W]
                pixels = pixels.transpose(0, 1)
            feats = self.vision_features(pixels, t)
            tokens = self.pool(feats, clip_ids, clip_mask, t, video=media == "video")
            return [tokens] if media == "video" else list(tokens.reshape(t, -1, tokens.shape[-1]))
        if media != "image":
            raise ValueError(f"media type {media!r}")
        v = pixels.shape[0]  # any-resolution views, each its own 1-frame sequence
        feats = self.vision_features(pixels, 1)
        tokens = self.pool(feats, clip_ids, clip_mask, v, video=False).reshape(
            v, -1, self.image_newline.shape[0]
        )
        side = int(math.isqrt(tokens.shape[1]))
        if v == 1:
            return [torch.cat([tokens[0], self.image_newline[None]], dim=0)]
        rows, cols = get_anyres_image_grid_shape(
            tuple(int(s) for s in image_size), self.hf["image_grid_pinpoints"],
            self.hf["vision_config"]["image_size"],
        )  # fmt: skip
        grid = tokens[1:].reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
        grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), torch.as_tensor(image_size))
        nl = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1)
        grid = torch.cat([grid, nl], dim=-1).flatten(1, 2).transpose(0, 1)
        return [torch.cat([tokens[0], grid], dim=0)]

    # -- merge, LLM, loss -----------------------------------------------------------------------
    def merge(self, input_ids, attention_mask, labels, visual: list[list[torch.Tensor]]):
        """Each image token replaced by its visual tokens; rows padded to the longest on the side
        the input was padded on (zeros, mask 0, label -100). Returns embeddings, mask, labels,
        position ids."""
        image_token = self.hf["image_token_index"]
        embed = self.language_model.get_input_embeddings()
        pad = self.hf.get("pad_token_id", 0)
        left = not bool((input_ids[:, -1] == pad).any())
        rows = []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool()
            ids = input_ids[i][keep]
            lab = labels[i][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            text = embed(ids)
            parts_e, parts_l, start = [], [], 0
            at = (ids == image_token).nonzero().flatten().tolist()
            for n, pos in enumerate(at):
                tok = visual[i][n]
                parts_e += [text[start:pos], tok.to(text.dtype)]
                parts_l += [
                    lab[start:pos],
                    torch.full((tok.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device),
                ]
                start = pos + 1
            parts_e.append(text[start:])
            parts_l.append(lab[start:])
            rows.append((torch.cat(parts_e), torch.cat(parts_l)))
        length = max(e.shape[0] for e, _ in rows)
        d = rows[0][0].shape[-1]
        out_e = rows[0][0].new_zeros(len(rows), length, d)
        dev = out_e.device
        out_m = torch.zeros(len(rows), length, dtype=torch.long, device=dev)
        out_l = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=dev)
        for i, (e, lab) in enumerate(rows):
            sl = slice(length - e.shape[0], length) if left else slice(0, e.shape[0])
            out_e[i, sl], out_m[i, sl], out_l[i, sl] = e, 1, lab
        pos = (out_m.cumsum(-1) - 1).masked_fill(out_m == 0, 1)
        return out_e, out_m, out_l, pos

    def forward(self, input_ids, attention_mask, pixel_values, media_types, clip_ids, clip_mask,
                image_sizes=None, labels=None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Logits ``[B, L', V]`` of the merged sequence, its ``attention_mask`` and ``labels``,
        and (with labels) the loss."""
        visual = [
            self.encode(
                pixel_values[i], str(media_types[i]), clip_ids[i], clip_mask[i],
                None if image_sizes is None else image_sizes[i],
            )
            for i in range(len(pixel_values))
        ]  # fmt: skip
        emb, mask, lab, pos = self.merge(input_ids, attention_mask, labels, visual)
        logits = self.language_model(
            inputs_embeds=emb, attention_mask=mask, position_ids=pos
        ).logits
        out = {"logits": logits, "attention_mask": mask, "labels": lab}
        if labels is not None:
            m = mask[:, 1:] != 0
            out["loss"] = F.cross_entropy(
                logits[:, :-1][m], lab[:, 1:][m], ignore_index=IGNORE_INDEX
            )
        return out


def weighted_pool3d(x, weights, kernel, stride, temperature: float) -> torch.Tensor:
    """The original's weighted pooling: ``x [N, C, D, H, W]``, ``weights [N, D, H, W]``; each
    window's weights ``softmax(w / temperature)``, the output the weighted sum
    ``[N, C, D', H', W']``."""
    (kd, kh, kw), (sd, sh, sw) = kernel, stride
    xu = x.unfold(2, kd, sd).unfold(3, kh, sh).unfold(4, kw, sw)
    wu = weights.unfold(1, kd, sd).unfold(2, kh, sh).unfold(3, kw, sw)
    n, c, od, oh, ow = xu.shape[:5]
    xu = xu.contiguous().view(n, c, od, oh, ow, -1)
    wu = F.softmax(wu.contiguous().view(n, od, oh, ow, -1) / temperature, dim=-1)
    return (xu * wu.unsqueeze(1)).sum(dim=-1)
