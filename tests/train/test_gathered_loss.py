"""The loss at the supervised positions only (a batch with ``target_positions``): the LM head
and cross entropy over ``K`` gathered positions instead of all ``L``.

Against the full-logits path (``token_logps`` of ``hidden @ head``): per-token log-probabilities
and gradients (hidden states and head) with padding on either side, gaps and unsupervised rows;
the host planner ``data.collate.target_positions``; and the train step's loss, aux and gradients
(SFT with both normalisations, DPO; one and two micro-batches) on a tiny LLaMA, tied and untied.
Also: one micro-batch (no accumulators) gives the gradients of the accumulating scan.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.data.collate import TARGET_POSITIONS, count_targets, target_positions
from ppllava_jax.train.losses import gathered_token_logps
from ppllava_jax.train.step import make_grad_fn
from tests.train.loss_helpers import llm_only_state
from tests.train.test_chunked_loss import _lm, _problem, _reference


@pytest.mark.parametrize("multiple", [1, 4, 64])
def test_same_logps_and_gradients(multiple):
    rng = np.random.default_rng(multiple)
    hidden, head, labels, mask = _problem(rng)
    pos = jnp.asarray(target_positions(np.asarray(labels), np.asarray(mask), multiple))
    assert pos.shape[1] <= labels.shape[1] - 1 and (pos.shape[1] % multiple == 0 or multiple > 12)
    ref_lp, ref_m = _reference(hidden, head, labels, mask)
    got_lp, got_m = jax.jit(gathered_token_logps)(hidden, head, labels, mask, pos)
    assert int(got_m.sum()) == int(ref_m.sum()) > 10
    # scatter the gathered values back to their positions: the full path's values
    back = (
        jnp.zeros_like(ref_lp)
        .at[jnp.arange(4)[:, None], jnp.maximum(pos, 0)]
        .add(jnp.where(got_m, got_lp, 0.0))
    )
    np.testing.assert_allclose(back, ref_lp, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got_lp.sum(), ref_lp.sum(), rtol=1e-6)

    weights = jnp.asarray(rng.normal(size=ref_lp.shape), jnp.float32)
    w_at = jnp.take_along_axis(weights, jnp.maximum(pos, 0), axis=1)

    def ref_loss(h, w):
        return jnp.sum(_reference(h, w, labels, mask)[0] * weights)

    def got_loss(h, w):
        return jnp.sum(gathered_token_logps(h, w, labels, mask, pos)[0] * w_at)

    ref_g = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(hidden, head)
    got_g = jax.jit(jax.grad(got_loss, argnums=(0, 1)))(hidden, head)
    for a, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)


def test_planner():
    labels = np.full((3, 10), -100, np.int32)
    labels[0, 6:] = 5
    labels[2, [3, 7]] = 1
    mask = np.ones((3, 10), np.int32)
    mask[0, -1] = 0  # right padding: the last target is not supervised
    pos = target_positions(labels, mask, multiple=4)
    assert pos.shape == (3, 4) and pos.dtype == np.int32
    np.testing.assert_array_equal(pos[0], [5, 6, 7, -1])
    np.testing.assert_array_equal(pos[1], [-1, -1, -1, -1])
    np.testing.assert_array_equal(pos[2], [2, 6, -1, -1])
    assert target_positions(labels, mask, multiple=64).shape == (3, 9)  # at most L - 1
    assert target_positions(labels, mask, count=7).shape == (3, 7)
    with pytest.raises(ValueError, match="more than count"):
        target_positions(labels, mask, count=2)
    assert count_targets(labels, mask) == 3


def test_training_batches_list_a_power_of_two_of_targets():
    """``with_target_positions``: K = the longest row's targets rounded up to a power of two, at
    least 16, at most L - 1; every supervised position listed once, in order."""
    from ppllava_jax.train.batches import with_target_positions

    for length, n, k in ((64, 3, 16), (64, 17, 32), (64, 33, 63), (12, 5, 11)):
        labels = np.full((2, length), -100, np.int32)
        labels[1, length - n :] = 7
        mask = np.ones((2, length), np.int32)
        out = with_target_positions({"labels": labels, "attention_mask": mask})
        pos = out[TARGET_POSITIONS]
        assert pos.shape == (2, k), (length, n, pos.shape)
        np.testing.assert_array_equal(pos[0], -1)
        np.testing.assert_array_equal(pos[1, :n], np.arange(length - n - 1, length - 1))
        np.testing.assert_array_equal(pos[1, n:], -1)


def _close(got, ref, atol=2e-6, rtol=2e-4):
    g_got, aux_got = got
    g_ref, aux_ref = ref
    for key in aux_ref:
        np.testing.assert_allclose(aux_got[key], aux_ref[key], rtol=2e-5, atol=1e-6, err_msg=key)
    leaves = jax.tree.leaves_with_path(g_ref)
    assert max(float(jnp.abs(g).max()) for _, g in leaves) > 1e-3
    for (path, r), a in zip(leaves, jax.tree.leaves(g_got), strict=True):
        np.testing.assert_allclose(a, r, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "tied,mode,norm,accum",
    [
        (False, "sft", "global_token_mean", 1),
        (False, "sft", "global_token_mean", 2),
        (False, "sft", "per_device_mean", 2),
        (False, "dpo", None, 1),
        (True, "sft", "global_token_mean", 1),
    ],
)
def test_train_step_gradients_unchanged(tied, mode, norm, accum):
    apply_fn, params, batch = _lm(tied)
    state = llm_only_state(params, mode)
    kw = dict(accum_steps=accum)
    if norm:
        kw.update(loss_normalization=norm, loss_group_size=1)
    rng = jax.random.key(0)
    ref = jax.jit(make_grad_fn(apply_fn, mode, **kw))(state, batch, rng)
    pos = target_positions(np.asarray(batch["labels"]), np.asarray(batch["attention_mask"]), 4)
    assert pos.shape[1] < batch["labels"].shape[1] - 1  # fewer positions than the full path
    gathered = {**batch, TARGET_POSITIONS: jnp.asarray(pos)}
    got = jax.jit(make_grad_fn(apply_fn, mode, **kw))(state, gathered, rng)
    _close(got, ref)


def test_one_micro_batch_equals_the_accumulating_scan():
    """``grad_accum_steps=1`` takes no accumulators; a batch given with its micro-batch axis
    ``[2, B/2, ...]`` runs the scan: same mean gradients (global token mean)."""
    apply_fn, params, batch = _lm(False)
    state = llm_only_state(params, "sft")
    rng = jax.random.key(0)
    one = jax.jit(make_grad_fn(apply_fn, "sft", accum_steps=1))(state, batch, rng)
    two = jax.jit(make_grad_fn(apply_fn, "sft", accum_steps=2))(state, batch, rng)
    _close(one, two, atol=1e-6, rtol=1e-5)


def test_the_step_reads_the_positions():
    """Leaving a supervised position out of ``target_positions`` changes the loss: the step
    takes the gathered path (it does not ignore the key)."""
    apply_fn, params, batch = _lm(False)
    state = llm_only_state(params, "sft")
    pos = target_positions(np.asarray(batch["labels"]), np.asarray(batch["attention_mask"]), 1)
    fewer = pos.copy()
    fewer[0, 0] = -1
    fn = jax.jit(make_grad_fn(apply_fn, "sft"))
    rng = jax.random.key(0)
    _, full = fn(state, {**batch, TARGET_POSITIONS: jnp.asarray(pos)}, rng)
    _, cut = fn(state, {**batch, TARGET_POSITIONS: jnp.asarray(fewer)}, rng)
    assert int(cut["num_tokens"]) == int(full["num_tokens"]) - 1
    assert float(cut["loss_sum"]) != float(full["loss_sum"])


def test_training_batches_cut_the_clip_prompt_padding():
    """``with_trimmed_clip_prompts``: every group's prompts cut to the longest real one rounded
    up to a power of two (at least ``MIN_CLIP_LENGTH``, at most the padded length)."""
    from ppllava_jax.data.clip_prompts import clip_prompt_length, trim_clip_prompts
    from ppllava_jax.train.batches import MIN_CLIP_LENGTH, with_trimmed_clip_prompts

    for full, longest, k in ((248, 40, 64), (248, 65, 128), (248, 130, 248), (32, 10, 32)):
        ids = np.arange(1, 2 * full + 1, dtype=np.int32).reshape(2, full)
        mask = np.zeros((2, full), np.int32)
        mask[0, :longest], mask[1, :3] = 1, 1
        img = np.zeros((1, full), np.int32)
        batch = {"video_clip_ids": ids, "video_clip_mask": mask}
        batch |= {"image_clip_ids": img, "image_clip_mask": img, "input_ids": np.ones((2, 5))}
        assert clip_prompt_length(batch) == longest
        out = with_trimmed_clip_prompts(batch)
        assert k == full or k >= MIN_CLIP_LENGTH
        for key in ("video_clip_ids", "video_clip_mask", "image_clip_ids", "image_clip_mask"):
            assert out[key].shape == (batch[key].shape[0], k), (full, longest, key)
            np.testing.assert_array_equal(out[key], batch[key][:, :k])
        assert out["input_ids"] is batch["input_ids"]
    with pytest.raises(ValueError, match="more than length=39"):
        trim_clip_prompts(batch | {"video_clip_mask": np.ones((2, 248), np.int32)}, 39)
