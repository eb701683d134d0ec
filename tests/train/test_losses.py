"""Losses: next-token cross entropy against NumPy, sequence log-probs, DPO by hand."""

import jax.numpy as jnp
import numpy as np

from ppllava_jax.layout import IGNORE_INDEX
from ppllava_jax.train.losses import token_logps
from tests.train.loss_helpers import dpo_loss, next_token_loss


def _np_reference(logits, labels, mask):
    """Straightforward loops: position l predicts labels[l + 1]."""
    total, count, per_row = 0.0, 0, np.zeros(len(labels))
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = labels[b, t + 1]
            if y == IGNORE_INDEX or mask[b, t + 1] == 0 or mask[b, t] == 0:
                continue
            z = logits[b, t].astype(np.float64)
            logp = z[y] - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
            total -= logp
            count += 1
            per_row[b] += logp
    return total, count, per_row


def _example(seed=0, b=3, n=7, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, v)).astype(np.float32) * 3
    labels = rng.integers(0, v, size=(b, n)).astype(np.int32)
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[1, 4] = IGNORE_INDEX
    mask = np.ones((b, n), np.int32)
    mask[0, 5:] = 0  # right padding (labels there are not IGNORE: the mask must exclude them)
    mask[2, :1] = 0  # left padding
    return logits, labels, mask


def test_next_token_loss_matches_numpy():
    logits, labels, mask = _example()
    s, n = next_token_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    ref_s, ref_n, _ = _np_reference(logits, labels, mask)
    assert int(n) == ref_n == 12
    np.testing.assert_allclose(float(s), ref_s, rtol=1e-6)
    # bf16 logits are upcast: the loss is still computed in float32
    s16, _ = next_token_loss(jnp.asarray(logits, jnp.bfloat16), labels, mask)
    assert s16.dtype == jnp.float32


def test_sequence_logps_matches_numpy():
    logits, labels, mask = _example(1)
    logp, _ = token_logps(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    got = jnp.sum(logp, axis=-1)  # per row: what DPO sums
    _, _, ref = _np_reference(logits, labels, mask)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)


def test_dpo_loss_hand_computed():
    beta = 0.1
    pc, pr = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0])
    rc, rr = jnp.array([-1.5, -2.0]), jnp.array([-1.5, -2.0])
    # pair 0: chosen reward 0.1*( -1.0+1.5) = 0.05, rejected 0.1*(-2.0+1.5) = -0.05, margin 0.1
    #         loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443966600735709
    # pair 1: chosen reward 0.1*(-3.0+2.0) = -0.1, rejected 0.1*(-1.0+2.0) = 0.1, margin -0.2
    #         loss = log(1 + e^0.2) = 0.7981388693815918
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(
        float(loss), (0.6443966600735709 + 0.7981388693815918) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(float(m["rewards/chosen"]), (0.05 - 0.1) / 2, atol=1e-7)
    np.testing.assert_allclose(float(m["rewards/rejected"]), (-0.05 + 0.1) / 2, atol=1e-7)
    np.testing.assert_allclose(float(m["rewards/accuracies"]), 0.5)
    np.testing.assert_allclose(float(m["rewards/margins"]), (0.1 - 0.2) / 2, atol=1e-7)
    # policy == reference: loss log 2, zero rewards
    loss0, m0 = dpo_loss(pc, pr, pc, pr, beta)
    np.testing.assert_allclose(float(loss0), np.log(2.0), rtol=1e-7)
    assert float(m0["rewards/margins"]) == 0.0
