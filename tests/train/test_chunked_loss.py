"""The chunked loss (``train.loss_chunk_size``): the LM head and cross entropy over sequence
chunks of the supervised positions, from the model's final hidden states.

Against the logits path: per-token log-probabilities and their gradients (hidden states and
head), chunk sizes that do not divide the sequence, rows without supervision, padding on either
side, bfloat16; PPLLaVA's ``return_logits=False`` output; and the SFT (both loss
normalisations) and DPO gradients of the train step (a tiny LLaMA, tied and untied head).
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.layout import IGNORE_INDEX
from ppllava_jax.train.losses import chunked_token_logps, token_logps
from ppllava_jax.train.optimizer import make_optimizer, trainable_predicate
from ppllava_jax.train.state import create_train_state
from ppllava_jax.train.step import make_grad_fn
from ppllava_jax.train.trainer import default_config
from tests.sft_loss import mean_loss
from tests.train.loss_helpers import llm_only_state

REF = Path(__file__).resolve().parents[1] / "fixtures/reference_ppllava"


def _problem(rng, b=4, length=13, d=8, v=29, dtype=jnp.float32):
    hidden = jnp.asarray(rng.normal(size=(b, length, d)), dtype)
    head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    labels = rng.integers(0, v, (b, length))
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[1] = IGNORE_INDEX  # a row with nothing supervised
    labels[2, 8] = IGNORE_INDEX  # a gap inside an answer
    mask = np.ones((b, length), np.int32)
    mask[0, :3] = 0  # left padding
    mask[3, -4:] = 0  # right padding (its labels there are ignored through the mask)
    return hidden, head, jnp.asarray(labels, jnp.int32), jnp.asarray(mask)


def _reference(hidden, head, labels, mask):
    logits = jnp.dot(hidden, head.astype(hidden.dtype)).astype(jnp.float32)
    return token_logps(logits, labels, mask)


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_same_logps_and_gradients(chunk):
    rng = np.random.default_rng(chunk)
    hidden, head, labels, mask = _problem(rng)
    ref_lp, ref_m = _reference(hidden, head, labels, mask)
    got_lp, got_m = jax.jit(chunked_token_logps, static_argnums=4)(
        hidden, head, labels, mask, chunk
    )
    np.testing.assert_array_equal(got_m, ref_m)
    np.testing.assert_allclose(got_lp, ref_lp, atol=1e-5, rtol=1e-6)
    assert int(ref_m.sum()) > 10 and float(jnp.abs(ref_lp).min()) == 0.0

    weights = jnp.asarray(rng.normal(size=ref_lp.shape), jnp.float32)

    def grads(fn):
        return jax.jit(
            jax.grad(lambda h, w: jnp.sum(fn(h, w, labels, mask)[0] * weights), argnums=(0, 1))
        )(hidden, head)

    ref_g = grads(_reference)
    got_g = grads(lambda h, w, lab, m: chunked_token_logps(h, w, lab, m, chunk))
    for a, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(ref_g[0][1]).max()) == 0.0  # the unsupervised row gets no gradient


def test_bfloat16_hidden_matches_the_dense_head():
    """bf16 hidden states: the head runs in bf16 as the model's ``nn.Dense`` does, then
    float32 — the same numbers as the logits path."""
    rng = np.random.default_rng(0)
    hidden, head, labels, mask = _problem(rng, dtype=jnp.bfloat16)
    ref_lp, _ = _reference(hidden, head, labels, mask)
    got_lp, _ = chunked_token_logps(hidden, head, labels, mask, 5)
    np.testing.assert_allclose(got_lp, ref_lp, atol=1e-5)


def test_bad_chunk_size():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="train.loss_chunk_size=0"):
        chunked_token_logps(*_problem(rng), 0)


# -- the models and the train step -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """The reference fixture's PPLLaVA (converted) and a right-padded video batch with labels."""
    import tempfile

    from ppllava_jax.convert.api import convert_checkpoint, load_checkpoint
    from ppllava_jax.data.collate import Media, Sample, collate
    from ppllava_jax.models.ppllava import PPLLaVA

    with tempfile.TemporaryDirectory() as tmp:
        convert_checkpoint(REF, Path(tmp) / "ckpt")
        _, cfg, params = load_checkpoint(Path(tmp) / "ckpt")
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    samples = []
    for n, answer in ((11, 4), (14, 6)):
        ids = rng.integers(3, cfg.image_token_index - 1, n).astype(np.int32)
        ids[1] = cfg.image_token_index
        labels = np.full(n, IGNORE_INDEX, np.int32)
        labels[-answer:] = ids[-answer:]
        px = rng.normal(size=(2, s, s, 3)).astype(np.float32)
        clip = rng.integers(1, 90, 6).astype(np.int32)
        samples.append(
            Sample(ids, labels=labels, media=Media("video", px), clip_ids=clip, clip_mask=None)
        )
    batch = collate(samples, cfg, padding_side="right", clip_length=6)
    return PPLLaVA(cfg), params, batch


def test_ppllava_returns_hidden_and_head(tiny):
    """``return_logits=False``: the final hidden states and the head give the logits and the
    model's own loss; the default call is unchanged."""
    model, params, batch = tiny
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def both(p):
        full = model.apply({"params": p}, batch)
        full["loss"] = mean_loss(full["logits"], batch)
        out = model.apply({"params": p}, inputs, return_logits=False)
        return full, out

    full, out = jax.jit(both)(params)
    assert "logits" not in out and "loss" not in out and "hidden" not in full
    np.testing.assert_allclose(jnp.dot(out["hidden"], out["lm_head"]), full["logits"], atol=1e-5)
    lp, m = chunked_token_logps(
        out["hidden"], out["lm_head"], batch["labels"], inputs["attention_mask"], 3
    )
    np.testing.assert_allclose(-lp.sum() / m.sum(), full["loss"], rtol=1e-6)


@functools.cache
def _lm(tied: bool):
    """A tiny LLaMA as the step's model (parameters under ``language_model`` so the trainable
    presets apply) and a batch of 4 rows (2 DPO pairs), padded on both sides."""
    from ppllava_jax.models.config import LlamaConfig
    from ppllava_jax.models.llama import LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(1)
    b, length = 4, 12
    ids = rng.integers(1, 40, (b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    mask[0, :2] = 0
    mask[3, -3:] = 0
    labels = np.where(np.arange(length) >= 6, ids, IGNORE_INDEX).astype(np.int32)
    labels[2, 6:9] = IGNORE_INDEX
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "positions": pos}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    init = model.init(jax.random.PRNGKey(0), batch["input_ids"], positions=batch["positions"])
    params = {"language_model": init["params"]}

    def apply_fn(p, b, *, train, rng, **kw):
        del train, rng
        return model.apply(
            {"params": p["language_model"]},
            b["input_ids"],
            positions=b["positions"],
            attention_mask=b["attention_mask"],
            **kw,
        )

    return apply_fn, params, batch


@pytest.mark.parametrize(
    "tied,mode,norm",
    [
        (False, "sft", "global_token_mean"),
        (False, "sft", "per_device_mean"),
        (False, "dpo", None),
        (True, "sft", "global_token_mean"),
    ],
)
def test_train_step_gradients_unchanged(tied, mode, norm):
    apply_fn, params, batch = _lm(tied)
    state = llm_only_state(params, mode)
    kw = dict(accum_steps=2)
    if norm:
        kw.update(loss_normalization=norm, loss_group_size=1)
    rng = jax.random.key(0)
    ref_g, ref_aux = jax.jit(make_grad_fn(apply_fn, mode, **kw))(state, batch, rng)
    got_g, got_aux = jax.jit(make_grad_fn(apply_fn, mode, loss_chunk_size=3, **kw))(
        state, batch, rng
    )
    for key in ref_aux:
        np.testing.assert_allclose(got_aux[key], ref_aux[key], rtol=2e-5, atol=1e-6, err_msg=key)
    leaves = jax.tree.leaves_with_path(ref_g)
    assert max(float(jnp.abs(g).max()) for _, g in leaves) > 1e-3
    for (path, r), a in zip(leaves, jax.tree.leaves(got_g), strict=True):
        np.testing.assert_allclose(a, r, atol=2e-6, rtol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_model_without_hidden_is_a_clear_error():
    _, params, batch = _lm(False)
    cfg = default_config()
    tx, _ = make_optimizer(cfg.optimizer, 10)
    state = create_train_state(params, tx, trainable_predicate(cfg.optimizer))
    logits_only = lambda p, b, *, train, rng, **kw: {"logits": jnp.zeros((4, 12, 5))}  # noqa: E731
    with pytest.raises(ValueError, match="set train.loss_chunk_size=0"):
        make_grad_fn(logits_only, "sft", loss_chunk_size=4)(state, batch, jax.random.key(0))
