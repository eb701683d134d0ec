"""Epoch order and host sharding (data/order.py): weights, determinism, shards, resharding."""

import numpy as np
import pytest

from ppllava_jax.data.order import EpochOrder, consumed, reshard_state, with_consumed


def _order(sizes=(10, 4), weights=(0.5, 2.0), **kw):
    args = dict(seed=0, shuffle=True, training=True, num_epochs=0, shard_index=0, shard_count=1)
    args.update(kw)
    return EpochOrder(list(sizes), list(weights), **args)


def test_weights_repeat_or_subsample_each_source():
    o = _order()
    e0 = o.epoch_order(0)
    assert (e0[:, 0] == 0).sum() == 5 and (e0[:, 0] == 1).sum() == 8
    assert len(set(e0[e0[:, 0] == 0, 1].tolist())) == 5  # a half, without repeats
    assert np.bincount(e0[e0[:, 0] == 1, 1]).tolist() == [2, 2, 2, 2]  # each twice
    np.testing.assert_array_equal(e0, _order().epoch_order(0))  # a function of (seed, epoch)
    assert not np.array_equal(e0, o.epoch_order(1))
    assert not np.array_equal(e0, _order(seed=1).epoch_order(0))


def test_fractional_weight_draws_floor_or_ceil():
    o = _order(sizes=(3,), weights=(0.5,))  # 1.5 samples per epoch
    counts = {o.global_length(e) for e in range(40)}
    assert counts == {1, 2}
    k = 0
    for e in range(6):  # locate / start_of agree with the varying epoch lengths
        assert o.start_of(e) == k
        assert o.locate(k) == (e, 0)
        k += o.shard_length(e)


def test_items_of_training_shards_are_disjoint_and_cut_to_a_multiple():
    sizes, weights = (7,), (1.0,)
    items = [
        [_order(sizes, weights, shard_index=p, shard_count=2)[k] for k in range(3)] for p in (0, 1)
    ]
    assert all(len({(x["source"], x["index"]) for x in shard}) == 3 for shard in items)
    pos = sorted(x["position"] for shard in items for x in shard)
    assert pos == list(range(6))  # 7 samples, 2 hosts: 3 each, the 7th left for all
    assert _order(sizes, weights, shard_count=2)[3]["epoch"] == 1


def test_evaluation_pads_to_a_multiple_of_the_hosts_in_file_order():
    o = _order((5,), (1.0,), training=False, shard_index=1, shard_count=2)
    assert len(o) == 3
    got = [o[k] for k in range(3)]
    assert [x["index"] for x in got[:2]] == [1, 3] and got[2]["pad"]
    with pytest.raises(IndexError):
        o[3]


def test_too_few_samples_for_the_hosts_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than the 4 hosts"):
        _order((3,), (1.0,), shard_count=4)
    with pytest.raises(ValueError, match="draws no sample"):
        _order((3,), (0.0,))


def test_consumed_round_trips_through_worker_states():
    single = {"next_index": 5}
    assert consumed(with_consumed(single, 9)) == 9
    workers = {
        "next_index_in_cycle": 0,
        "iterators_in_use_states": [{"next_index": 0}, {"next_index": 0}, {"next_index": 0}],
        "exhausted": [0, 0, 0],
        "future_states": {},
    }
    st = with_consumed(workers, 7)  # workers read items w, w + 3, ...: 3, 2, 2 of the 7
    assert [s["next_index"] for s in st["iterators_in_use_states"]] == [3, 2, 2]
    assert st["next_index_in_cycle"] == 1 and consumed(st) == 7


def test_reshard_two_hosts_to_one_resumes_at_the_next_position():
    o = _order((20,), (1.0,), shard_count=2)
    states = [{"parent": {"next_index": 4}, "skipped": {"bad_media": 1}, "batches": 2}] * 2
    new = reshard_state(o, states, 0, 1)
    assert new["parent"]["next_index"] == 8  # positions 0..7 were read by the two hosts
    assert new["skipped"] == {"bad_media": 2} and new["batches"] == 2
    halves = [reshard_state(o, states, p, 2)["parent"]["next_index"] for p in (0, 1)]
    assert halves == [4, 4]  # the same host count resumes where it was
