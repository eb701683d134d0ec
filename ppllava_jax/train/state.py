"""The train state: step, trainable and frozen parameters, optimizer state, DPO reference.

The optimizer state covers the trainable tree only. The DPO reference is a copy of the
*initial trainable* parameters (for ``llm_only`` that is the LLM), stored once, without
optimizer state; the reference forward uses ``merge_params(ref_params, frozen)``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from ppllava_jax.train.optimizer import Predicate, merge_params, split_params

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """A pytree (every field is a node; jit it, donate it, checkpoint it).

    Attributes:
      step: int32[], optimizer updates applied so far.
      params: the trainable parameters (nested dict).
      frozen: the frozen parameters (nested dict), never updated.
      opt_state: optax state of ``params`` only.
      ref_params: DPO only: the initial trainable parameters (frozen reference); else None.
    """

    step: jax.Array
    params: PyTree
    frozen: PyTree
    opt_state: PyTree
    ref_params: PyTree = None

    def full_params(self) -> PyTree:
        """The model's whole parameter tree (trainable merged with frozen)."""
        return merge_params(self.params, self.frozen)


def create_train_state(
    params: PyTree,
    tx: optax.GradientTransformation,
    predicate: Predicate,
    *,
    with_reference: bool = False,
) -> TrainState:
    """Split ``params`` by ``predicate`` and initialise the optimizer on the trainable part.

    Traceable: run it under ``jax.jit(..., out_shardings=state_shardings(...))`` to create a
    sharded state, or ``jax.eval_shape`` for an abstract one.
    """
    trainable, frozen = split_params(params, predicate)
    ref = jax.tree.map(jnp.copy, trainable) if with_reference else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        ref_params=ref,
    )


def _replicated_like(shardings: PyTree) -> Sharding | None:
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, Sharding)):
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec())
        if isinstance(s, Sharding):
            return s
    return None


def state_shardings(
    param_shardings: PyTree,
    tx: optax.GradientTransformation,
    predicate: Predicate,
    *,
    with_reference: bool = False,
    params_abstract: PyTree | None = None,
) -> TrainState:
    """Shardings of the ``TrainState`` built from the model's parameter shardings.

    Args:
      param_shardings: a tree of ``jax.sharding.Sharding`` shaped like the whole parameters.
      tx, predicate, with_reference: as given to ``create_train_state``.
      params_abstract: the parameters' ``ShapeDtypeStruct`` tree (or arrays), needed to lay
        out the optimizer state; its moments get the sharding of their parameter, the rest
        (counts) is replicated.
    """
    if params_abstract is None:
        raise ValueError("state_shardings needs params_abstract (the parameters' shapes)")
    rep = _replicated_like(param_shardings)
    tr_sh, fr_sh = split_params(param_shardings, predicate)
    tr_abs, _ = split_params(params_abstract, predicate)
    opt_abs = jax.eval_shape(tx.init, tr_abs)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        opt_abs,
        tr_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, Sharding),
    )
    return TrainState(
        step=rep,
        params=tr_sh,
        frozen=fr_sh,
        opt_state=opt_sh,
        ref_params=tr_sh if with_reference else None,
    )


def with_shardings(abstract: PyTree, shardings: PyTree | None) -> PyTree:
    """Attach shardings to a ``ShapeDtypeStruct`` tree (restore targets)."""
    if shardings is None:
        return abstract
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
