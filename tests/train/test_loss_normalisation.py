"""SFT loss normalisation: the original's per-device token mean against a direct computation.

The original (HF Trainer 4.45 + DeepSpeed ZeRO-3, ``LlavaInterleaveForConditionalGeneration``)
takes, on every device and accumulation step, ``nn.CrossEntropyLoss()`` (a token mean) of that
device's micro-batch, with targets masked by ``attention_mask[..., 1:]``; DeepSpeed scales each
backward by 1 / accumulation steps and averages gradients over devices. So the update's loss is
the mean over (device, accumulation step) of those token means, and its gradient the gradient
of that mean.

Reference here: the toy model's logits, the groups read from where a 2-way data-parallel mesh
actually places the batch's rows (a device's micro-batch ``j`` = its rows ``r`` with
``r % k == j``, the layout of ``train.step.microbatch``), the token means by torch's
``CrossEntropyLoss``, and their gradient by torch autograd with respect to the logits, pulled
back through the model with ``jax.vjp``. ``train.loss_normalization='per_device_mean'`` must
equal it; ``global_token_mean`` must not where the groups hold different token counts, and the
two must agree where they hold the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from ppllava_jax import sharding
from ppllava_jax.layout import IGNORE_INDEX
from ppllava_jax.train.losses import group_token_means, token_logps
from ppllava_jax.train.optimizer import make_optimizer, merge_params, trainable_predicate
from ppllava_jax.train.state import create_train_state
from ppllava_jax.train.step import make_grad_fn, make_train_step
from ppllava_jax.train.trainer import default_config
from tests.train.toy_model import make_batch, make_toy

ACCUM = 2  # accumulation steps
ROWS = 8  # global batch: 2 devices x 2 micro-batches x 2 rows


def _config(norm: str, group_size: int = 0):
    cfg = default_config()
    cfg.train.total_steps = 10
    cfg.train.grad_accum_steps = ACCUM
    cfg.train.loss_normalization = norm
    cfg.train.loss_group_size = group_size
    cfg.optimizer.trainable = "ppllava_sft"
    cfg.optimizer.warmup_steps = 0
    return cfg


@pytest.fixture(scope="module")
def toy():
    apply_fn, init = make_toy(dropout=0.0)
    params = init()
    cfg = _config("global_token_mean")
    tx, _ = make_optimizer(cfg.optimizer, 10)
    state = create_train_state(params, tx, trainable_predicate(cfg.optimizer))
    return apply_fn, state


def _uneven_batch() -> dict[str, np.ndarray]:
    """Supervised tokens per row differ a lot, so the groups' counts differ."""
    b = make_batch(np.random.default_rng(5), ROWS, 12)
    b["labels"][0, :] = IGNORE_INDEX
    b["labels"][0, -1] = b["input_ids"][0, -1]
    b["attention_mask"][0, :] = 1
    attended = b["attention_mask"][5, 1:] != 0
    b["labels"][5, 1:] = np.where(attended, b["input_ids"][5, 1:], IGNORE_INDEX)
    return b


def _even_batch() -> dict[str, np.ndarray]:
    """Every row: same length, same prompt: every group holds the same number of tokens."""
    b = make_batch(np.random.default_rng(6), ROWS, 12)
    b["attention_mask"][:] = 1
    b["attention_mask"][:, 10:] = 0
    b["labels"] = np.where(np.arange(12)[None] >= 4, b["input_ids"], IGNORE_INDEX)
    b["labels"] = np.where(b["attention_mask"] != 0, b["labels"], IGNORE_INDEX).astype(np.int32)
    return b


def _device_groups(batch: dict[str, np.ndarray], mesh) -> list[list[int]]:
    """Rows of every (device, micro-batch) as the mesh places the batch: device d holds one
    block of rows; its micro-batch j is its rows with index % ACCUM == j."""
    placed = sharding.shard_batch({"labels": batch["labels"]}, mesh)["labels"]
    blocks = sorted(
        {(s.index[0].start or 0, s.index[0].stop or ROWS) for s in placed.addressable_shards}
    )
    return [[r for r in range(lo, hi) if r % ACCUM == j] for lo, hi in blocks for j in range(ACCUM)]


def _reference(logits: np.ndarray, batch: dict[str, np.ndarray], groups: list[list[int]]):
    """The original's loss (mean over groups of each group's CrossEntropyLoss) and its gradient
    with respect to the logits, by torch."""
    z = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    labels = torch.tensor(batch["labels"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"])
    losses = []
    for rows in groups:
        sm = mask[rows][..., 1:] != 0
        shift_logits = z[rows][..., :-1, :][sm]
        shift_labels = labels[rows][..., 1:][sm]
        losses.append(torch.nn.CrossEntropyLoss()(shift_logits, shift_labels))
    loss = torch.stack(losses).mean()
    loss.backward()
    return float(loss.detach()), z.grad.numpy(), [float(x.detach()) for x in losses]


def _global_reference(logits: np.ndarray, batch: dict[str, np.ndarray]) -> float:
    return _reference(logits, batch, [list(range(ROWS))])[0]


def _logits(apply_fn, state, batch):
    def f(trainable, frozen, batch):
        params = merge_params(trainable, frozen)
        return apply_fn(params, batch, train=False, rng=jax.random.key(0))["logits"]

    return jax.jit(f)(state.params, state.frozen, batch)


def _vjp_grads(apply_fn, state, batch, dlogits):
    @jax.jit
    def pull(trainable, cotangent):
        f = lambda p: apply_fn(
            merge_params(p, state.frozen), batch, train=False, rng=jax.random.key(0)
        )
        _, back = jax.vjp(lambda p: f(p)["logits"], trainable)
        return back(cotangent)[0]

    return pull(state.params, jnp.asarray(dlogits, jnp.float32))


def _max_rel(a, b) -> float:
    num = max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
    return num / den


def test_per_device_mean_is_the_original_rule(toy) -> None:
    apply_fn, state = toy
    batch = _uneven_batch()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": -1})  # tensor does not split rows
    groups = _device_groups(batch, mesh)
    assert groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    logits = np.asarray(_logits(apply_fn, state, batch))
    ref_loss, dlogits, group_losses = _reference(logits, batch, groups)
    glob = _global_reference(logits, batch)
    assert abs(ref_loss - glob) > 1e-2 * abs(glob)  # the two rules differ on this batch
    assert len(set(np.round(group_losses, 6))) == 4

    # the gradient of the step (2 micro-batches, groups = 2 devices' rows)
    grad_fn = make_grad_fn(
        apply_fn, accum_steps=ACCUM, loss_normalization="per_device_mean", batch_shards=2
    )
    grads, aux = jax.jit(grad_fn)(state, batch, jax.random.key(0))
    assert int(aux["num_groups"]) == 4
    np.testing.assert_allclose(float(aux["loss_sum"]) / 4, ref_loss, rtol=1e-5)
    want = _vjp_grads(apply_fn, state, batch, dlogits)
    assert _max_rel(grads, want) < 1e-5
    # the same by an explicit group size
    grads8, _ = jax.jit(
        make_grad_fn(
            apply_fn, accum_steps=ACCUM, loss_normalization="per_device_mean", loss_group_size=2
        )
    )(state, batch, jax.random.key(0))
    assert _max_rel(grads8, want) < 1e-6
    # global_token_mean is the token mean of the whole batch: a different gradient
    g_glob, aux_glob = jax.jit(make_grad_fn(apply_fn, accum_steps=ACCUM))(
        state, batch, jax.random.key(0)
    )
    np.testing.assert_allclose(
        float(aux_glob["loss_sum"] / aux_glob["num_tokens"]), glob, rtol=1e-5
    )
    assert _max_rel(g_glob, want) > 1e-2


def test_train_step_reads_the_devices_from_the_mesh(toy) -> None:
    """Through ``make_train_step`` on a sharded state: the groups are the data x fsdp shards."""
    apply_fn, state = toy
    batch = _uneven_batch()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": -1})
    rep = NamedSharding(mesh, PartitionSpec())
    param_sh = jax.tree.map(lambda _: rep, state.params)
    st = jax.device_put(state, rep)
    placed = sharding.shard_batch(batch, mesh)
    logits = np.asarray(_logits(apply_fn, state, batch))
    ref_loss = _reference(logits, batch, _device_groups(batch, mesh))[0]
    for norm, want in (
        ("per_device_mean", ref_loss),
        ("global_token_mean", _global_reference(logits, batch)),
    ):
        step = make_train_step(apply_fn, _config(norm), param_shardings=param_sh)
        _, m = jax.jit(step)(st, placed, jax.random.key(0))
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5, err_msg=norm)


def test_equal_counts_agree(toy) -> None:
    apply_fn, state = toy
    batch = _even_batch()
    out = {}
    for norm in ("per_device_mean", "global_token_mean"):
        fn = make_grad_fn(apply_fn, accum_steps=ACCUM, loss_normalization=norm, batch_shards=2)
        out[norm] = jax.jit(fn)(state, batch, jax.random.key(0))
    logits = np.asarray(_logits(apply_fn, state, batch))
    groups = [[0, 2], [4, 6], [1, 3], [5, 7]]
    ref_loss = _reference(logits, batch, groups)[0]
    np.testing.assert_allclose(ref_loss, _global_reference(logits, batch), rtol=1e-12)
    (g1, a1), (g2, a2) = out["per_device_mean"], out["global_token_mean"]
    np.testing.assert_allclose(float(a1["loss_sum"]) / 4, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(a2["loss_sum"] / a2["num_tokens"]), ref_loss, rtol=1e-5)
    assert _max_rel(g1, g2) < 1e-5


def test_group_token_means_and_settings() -> None:
    logp = -jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]], bool)
    logp = jnp.where(mask, logp, 0.0)
    means, counts = group_token_means(logp, mask, 2)
    np.testing.assert_allclose(means, [(0 + 1 + 2 + 3) / 4, 0.0])  # empty group: 0, not NaN
    assert counts.tolist() == [4, 0]
    with pytest.raises(ValueError, match="train.loss_group_size"):
        group_token_means(logp, mask, 3)
    apply_fn, _ = make_toy()
    with pytest.raises(ValueError, match="train.loss_normalization"):
        make_train_step(apply_fn, _config("per_token"))
    # the logp the step uses is the losses module's
    assert token_logps is not None
