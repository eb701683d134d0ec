"""A checkpoint directory loaded onto a local mesh, ready to answer (eval.py, the chat, the demo).

Checkpoint directory (written by ``train.py``'s final export, or ``convert_torch_weights.py``
plus the tokenizers copied in)::

    DIR/config.json          model config (``params_io.save_params``)
    DIR/params/              orbax parameters
    DIR/tokenizer/           the LLM tokenizer (AutoTokenizer.from_pretrained); required
                             unless --tokenizer is given
    DIR/clip_tokenizer/      the CLIP tokenizer of the prompt encoder (pooling 'ppllava');
                             required unless --clip_tokenizer is given
    DIR/inference.json       optional: {"template": "plain_v1", "num_frames": 8, ...}
                             defaults for the evaluation / chat flags

:func:`load_setup` checks the directory (``checkpoint_check``) before anything is restored, and
answers with per-layer weights (``scan_layers=False``; a scanned checkpoint is unstacked once on
load, ``convert.api.unstack_layers``): in the cached decoding loop a scanned model slices each
layer's weights out of the stacks into new buffers at every token (XLA's CPU backend does it:
up to 1.7x slower decoding, ``benchmarks/README.md``), an unscanned one reads them in place;
:func:`place_batch` puts a host batch on the mesh; :func:`video_buckets` gives the merged-length
buckets of a video prompt; :meth:`Setup.sampling` the decoding settings with the checkpoint's
stop and pad tokens; :meth:`Setup.relevance` the prompt-to-patch relevance of a placed batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from ppllava_jax import sharding
from ppllava_jax.convert.api import DTYPES, per_layer
from ppllava_jax.data import collate as col
from ppllava_jax.evaluate import checkpoint_check
from ppllava_jax.generate import PROMPT_BUCKETS, SamplingConfig, prompt_buckets

FROM_CHECKPOINT = "checkpoint"  # load_setup: the tokenizer setting the checkpoint was trained with


@dataclasses.dataclass
class Setup:
    """A loaded checkpoint ready to answer: model, config, params on ``mesh``, tokenizers."""

    model: Any
    cfg: Any
    params: Any
    mesh: Any
    tokenizer_dir: str
    clip_tokenizer_dir: str
    template: str = "plain_v1"
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: str = ""
    # Llama pre-tokenization of exact prompts (load_llm_tokenizer): True legacy (the released
    # Vicuna / LLaVA-NeXT tokenizers), False non-legacy, None as the tokenizer file says
    tokenizer_legacy: bool | None = True

    _tok: Any = None
    _eval_tok: Any = None
    _relevance_fn: Any = None

    @property
    def tokenizer(self):
        """The LLM tokenizer as saved (template prompts, as in training; decoding)."""
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tok

    @property
    def eval_tokenizer(self):
        """The tokenizer of exact prompts: ``load_llm_tokenizer(dir, tokenizer_legacy)``."""
        if self._eval_tok is None:
            from ppllava_jax.data.tokenizers import load_llm_tokenizer

            self._eval_tok = load_llm_tokenizer(self.tokenizer_dir, legacy=self.tokenizer_legacy)
        return self._eval_tok

    def sampling(self, max_new_tokens: int, **kw: Any) -> SamplingConfig:
        """Decoding settings that stop at the checkpoint's EOS (the config's, else the
        tokenizer's) and pad with its pad token (else 0). kw: temperature, top_k, top_p..."""
        llm = self.cfg.llm
        eos = llm.eos_token_id if llm.eos_token_id is not None else self.tokenizer.eos_token_id
        pad = llm.pad_token_id if llm.pad_token_id is not None else 0
        return SamplingConfig(
            max_new_tokens=int(max_new_tokens), eos_token_id=int(eos), pad_token_id=int(pad), **kw
        )

    def relevance(self, placed: dict[str, jax.Array]) -> np.ndarray | None:
        """float32[B, T, h, w]: the prompt-to-patch cosine of every video of a placed batch
        (``place_batch``); None when the model's pooling has no prompt guidance. Compiled once
        per batch shape, shared by everything using this set-up."""
        if self._relevance_fn is None:
            model = self.model
            self._relevance_fn = jax.jit(
                lambda p, b: model.apply({"params": p}, b, method="embed_inputs")[1].get("video")
            )
        with sharding.mesh_context(self.mesh):
            maps = self._relevance_fn(self.params, placed)
        return None if maps is None else np.asarray(jax.device_get(maps), np.float32)


def parse_mesh(spec: str | dict | None) -> dict[str, int]:
    """ "data=1,fsdp=-1,tensor=1" -> dict (default: every local device on fsdp)."""
    if isinstance(spec, dict):
        return {k: int(v) for k, v in spec.items()}
    out = {}
    for part in (spec or "fsdp=-1").split(","):
        if part.strip():
            k, v = part.split("=")
            out[k.strip()] = int(v)
    return out


def local_mesh(spec: str | dict | None = None):
    """A mesh over this host's devices; with all sizes given and fewer than the devices, the
    first ``prod(sizes)`` devices (a smaller mesh, e.g. for tests)."""
    shape = parse_mesh(spec)
    devices = jax.local_devices()
    if all(v > 0 for v in shape.values()):
        n = int(np.prod(list(shape.values())))
        if n < len(devices):
            devices = devices[:n]
        shape = {**{"data": 1, "fsdp": 1, "tensor": 1}, **shape}
    return sharding.make_mesh(shape, devices)


def _need_dir(path: str, what: str, flag: str) -> str:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} directory {path!r} not found: put it in the checkpoint directory or pass "
            f"{flag}"
        )
    return path


def inference_defaults(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``DIR/inference.json`` (defaults such as ``num_frames``, ``template``), {} when absent
    or unreadable."""
    try:
        with open(os.path.join(os.fspath(checkpoint), "inference.json")) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def load_setup(
    checkpoint: str,
    *,
    tokenizer: str = "",
    clip_tokenizer: str = "",
    template: str = "",
    mesh: str | dict | None = None,
    dtype: str | None = None,
    tokenizer_legacy: bool | None | str = FROM_CHECKPOINT,
) -> Setup:
    """Read a checkpoint directory (module docstring) onto a local mesh.

    dtype: the model's dtype while answering, its compute and its parameters (restored into
    it): ``float16`` as the original evaluates (its models are loaded in ``torch.float16``),
    ``bfloat16``, ``float32``; None: the checkpoint config's (parameters as stored).
    tokenizer_legacy: see :attr:`Setup.tokenizer_legacy`; ``FROM_CHECKPOINT``: what
    ``inference.json`` records (the setting training used), else True (legacy)."""
    from ppllava_jax.models.ppllava import PPLLaVA

    checkpoint = os.fspath(checkpoint)
    if dtype and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    runtime = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    # a missing directory, another family, a params/ tree unlike config.json's model: said
    # before anything is restored (checkpoint_check)
    checkpoint_check.check_checkpoint(checkpoint, runtime)
    defaults = inference_defaults(checkpoint)
    if tokenizer_legacy == FROM_CHECKPOINT:
        tokenizer_legacy = defaults.get("tokenizer_legacy", True)
    m = local_mesh(mesh)
    cfg, params, _ = sharding.restore_params_onto_mesh(checkpoint, m, **runtime)
    cfg, params = per_layer(cfg, params)  # answering reads every layer once a token (above)
    tok = _need_dir(tokenizer or os.path.join(checkpoint, "tokenizer"), "tokenizer", "--tokenizer")
    ctok = clip_tokenizer or os.path.join(checkpoint, "clip_tokenizer")
    if cfg.pooling == "ppllava":
        _need_dir(ctok, "CLIP tokenizer", "--clip_tokenizer")
    return Setup(
        model=PPLLaVA(cfg),
        cfg=cfg,
        params=params,
        mesh=m,
        tokenizer_dir=tok,
        clip_tokenizer_dir=ctok if os.path.isdir(ctok) else "",
        # the family's template when inference.json names none (converted checkpoints)
        template=template
        or defaults.get("template", "plain_qwen" if getattr(cfg, "qwen", False) else "plain_v1"),
        defaults=defaults,
        checkpoint=checkpoint,
        tokenizer_legacy=tokenizer_legacy,
    )


def place_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host arrays onto the mesh, batch axis over ``data`` x ``fsdp`` (local meshes: a sharded
    ``device_put``; a global mesh: ``sharding.shard_batch``)."""
    if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        sh = sharding.batch_shardings(batch, mesh)
        return {k: jax.device_put(np.asarray(v), sh[k]) for k, v in batch.items()}
    return sharding.shard_batch(batch, mesh)


def eval_batch_size(batch_size: int, mesh) -> int:
    """The per-host batch for ``mesh``: ``batch_size``, or (0) the smallest multiple of the
    data-parallel devices that is >= 8. A batch whose rows (``batch_size`` x hosts on a global
    mesh) ``data`` x ``fsdp`` does not divide would be replicated: ``sharding.ShardingError``
    before anything compiles, saying what divides."""
    local = all(d.process_index == jax.process_index() for d in mesh.devices.flat)
    hosts = 1 if local else jax.process_count()
    n = sharding.batch_devices(mesh)
    step = n // int(np.gcd(n, hosts))
    batch_size = int(batch_size or step * -(-8 // step))
    what = f"--batch_size {batch_size}" + (f" x {hosts} hosts" if hosts > 1 else "")
    sharding.check_batch_rows(batch_size * hosts, mesh, what=what, setting="--batch_size")
    return batch_size


def video_buckets(cfg: Any, num_frames: int, max_new_tokens: int) -> list[int]:
    """Merged-length buckets for videos of ``num_frames`` frames that leave room for the answer
    within the decoder's positions."""
    t, h, w = col.Planner(cfg).item_grid("video", num_frames)
    buckets = prompt_buckets(t * h * w, PROMPT_BUCKETS)
    limit = int(cfg.llm.max_position_embeddings) - int(max_new_tokens)
    fit = [b for b in buckets if b <= limit]
    return fit or [max(limit, t * h * w + 16)]
