"""Tests for moesim.placement.eplb (DeepSeek EPLB re-implementation) and the placement baselines."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InfeasiblePlacement
from moesim.placement.baselines import contiguous, device_loads, random_placement, round_robin
from moesim.placement.eplb import balanced_packing, eplb_rebalance, replicate_experts

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- published and hand examples


def test_reproduces_published_example():
    example = json.loads((DATA / "eplb_example.json").read_text())
    plan = eplb_rebalance(
        np.array(example["weight"], dtype=float),
        example["num_replicas"],
        example["num_groups"],
        example["num_nodes"],
        example["num_gpus"],
    )
    np.testing.assert_array_equal(plan.physical_to_logical, example["phy2log"])
    expected_count = [np.bincount(row, minlength=12) for row in example["phy2log"]]
    np.testing.assert_array_equal(plan.replica_count, expected_count)


def test_balanced_packing_by_hand():
    weight = np.array([[5.0, 9, 1, 4, 7, 2], [3, 3, 3, 3, 3, 3], [10, 1, 1, 1, 1, 1]])
    pack_index, rank_in_pack = balanced_packing(weight, 2)
    # Row 0, heaviest first: 9->p0, 7->p1, 5->p1 (7<9), 4->p0 (9<12), 2->p1 (12<13, now full),
    # 1->p0 (only pack with room).
    # Row 1, all ties: stable order 0..5, equally light packs -> lowest index: alternate p0, p1.
    # Row 2: 10->p0, then the 1s go to p1 until it is full (3 items), the rest to p0.
    np.testing.assert_array_equal(pack_index, [[1, 0, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1],
                                               [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rank_in_pack, [[1, 0, 2, 1, 0, 2], [0, 0, 1, 1, 2, 2],
                                                 [0, 0, 1, 2, 1, 2]])

    # One item per pack: item i stays in pack i (heaviest-first would have given 2, 0, 1).
    pack_index, rank_in_pack = balanced_packing(np.array([[1.0, 5, 3]]), 3)
    np.testing.assert_array_equal(pack_index, [[0, 1, 2]])
    np.testing.assert_array_equal(rank_in_pack, [[0, 0, 0]])


def test_replicate_experts_by_hand():
    # Per-replica loads 6,3,2: expert 0 gets a replica (6/2 = 3), which ties expert 1's 3; the
    # lower id (0) wins the second extra (6/3 = 2).
    physical_to_logical, replica_rank, replica_count = replicate_experts(np.array([[6.0, 3, 2]]), 5)
    np.testing.assert_array_equal(physical_to_logical, [[0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(replica_rank, [[0, 0, 0, 1, 2]])
    np.testing.assert_array_equal(replica_count, [[3, 1, 1]])


def test_hierarchical_by_hand():
    # 4 experts, 4 groups of 1, 2 nodes x 2 GPUs, 8 slots (2 per GPU).
    # Step 1: groups heaviest first: e2 (9) -> n0, e3 (4) -> n1, e1 (2) -> n1 (4 < 9),
    #   e0 (1) -> n0 (n1 full). Node order: [2, 0 | 3, 1].
    # Step 2: node0 loads [9,1], 4 slots: add 2, 2 -> counts [3,1];
    #   node1 loads [4,2]: add 3 (4>2), then tie 2 vs 2 -> lower local index (expert 3): [3,1].
    # Step 3: node0 replicas (3,1,3,3) onto 2 GPUs: r0->g0, r2->g1, r3->g0 (tie), r1->g1
    #   -> slots [2,2 | 2,0]; node1 replicas (4/3,2,4/3,4/3): r1->g0, r0->g1, r2->g1, r3->g0
    #   -> slots [1,3 | 3,3].
    plan = eplb_rebalance(np.array([[1.0, 2, 9, 4]]), 8, 4, 2, 4)
    np.testing.assert_array_equal(plan.physical_to_logical, [[2, 2, 2, 0, 1, 3, 3, 3]])
    np.testing.assert_array_equal(plan.replica_count, [[1, 1, 3, 3]])
    # Replica r of an expert is the r-th one created: expert 2's are slots 0, 2, 1.
    np.testing.assert_array_equal(
        plan.logical_to_physical, [[[3, -1, -1], [4, -1, -1], [0, 2, 1], [6, 7, 5]]]
    )


def test_plan_arrays_are_read_only():
    plan = eplb_rebalance(np.array([[1.0, 2, 3, 4]]), 4, 1, 1, 2)
    with pytest.raises(ValueError):
        plan.physical_to_logical[0, 0] = 1


# ---------------------------------------------------------------- brute-force oracle


@pytest.mark.parametrize("weight", [[7.0, 1, 3], [5.0, 5, 2], [0.0, 4, 4]])
@pytest.mark.parametrize("num_physical", [3, 4, 5, 7])
def test_replication_minimises_hottest_replica(weight, num_physical):
    counts = itertools.product(range(1, num_physical + 1), repeat=len(weight))
    best = min(max(np.array(weight) / c) for c in counts if sum(c) == num_physical)
    _, _, replica_count = replicate_experts(np.array([weight]), num_physical)
    assert max(np.array(weight) / replica_count[0]) == pytest.approx(best)


# ---------------------------------------------------------------- invariants on random inputs


@st.composite
def eplb_problems(draw):
    num_nodes = draw(st.integers(1, 3))
    num_gpus = num_nodes * draw(st.integers(1, 3))
    hierarchical = draw(st.booleans())
    if hierarchical:
        num_groups = num_nodes * draw(st.integers(1, 3))
        num_logical = num_groups * draw(st.integers(1, 3))
    else:
        num_groups = draw(st.sampled_from([g for g in range(2, 8) if g % num_nodes])) \
            if num_nodes > 1 else 1
        num_logical = draw(st.integers(1, 12))
    slots_per_gpu = -(-num_logical // num_gpus) + draw(st.integers(0, 2))
    num_layers = draw(st.integers(1, 3))
    high = draw(st.sampled_from([3, 1000]))  # small range: many ties
    weight = draw(st.lists(st.integers(0, high), min_size=num_layers * num_logical,
                           max_size=num_layers * num_logical))
    weight = np.array(weight, dtype=float).reshape(num_layers, num_logical)
    return weight, slots_per_gpu * num_gpus, num_groups, num_nodes, num_gpus


@settings(max_examples=150, deadline=None)
@given(eplb_problems())
def test_plan_invariants(problem):
    weight, num_physical, num_groups, num_nodes, num_gpus = problem
    num_layers, num_logical = weight.shape
    plan = eplb_rebalance(weight, num_physical, num_groups, num_nodes, num_gpus)
    assert plan.physical_to_logical.shape == (num_layers, num_physical)
    assert num_physical % num_gpus == 0  # so every GPU holds exactly P / num_gpus slots
    for layer in range(num_layers):
        slots_of = np.bincount(plan.physical_to_logical[layer], minlength=num_logical)
        assert len(slots_of) == num_logical and slots_of.min() >= 1
        np.testing.assert_array_equal(plan.replica_count[layer], slots_of)
        assert plan.replica_count[layer].sum() == num_physical
        # logical_to_physical lists each expert's slots once, then -1 padding.
        for expert in range(num_logical):
            listed = plan.logical_to_physical[layer, expert]
            count = plan.replica_count[layer, expert]
            assert (listed[count:] == -1).all()
            assert sorted(listed[:count]) == list(
                np.flatnonzero(plan.physical_to_logical[layer] == expert)
            )
    if num_groups % num_nodes == 0:
        # Hierarchical: every expert's replicas, and every group, stay inside one node.
        node_of_slot = np.arange(num_physical) // (num_physical // num_nodes)
        group_size = num_logical // num_groups
        for layer in range(num_layers):
            for group in range(num_groups):
                experts = range(group * group_size, (group + 1) * group_size)
                mask = np.isin(plan.physical_to_logical[layer], experts)
                assert len(set(node_of_slot[mask])) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.data())
def test_balanced_packing_fills_every_pack_exactly(num_packs, items_per_pack, data):
    num_items = num_packs * items_per_pack
    weight = np.array(data.draw(st.lists(st.floats(0, 100), min_size=num_items,
                                         max_size=num_items)))[None, :]
    pack_index, rank_in_pack = balanced_packing(weight, num_packs)
    np.testing.assert_array_equal(np.bincount(pack_index[0], minlength=num_packs),
                                  [items_per_pack] * num_packs)
    for pack in range(num_packs):
        assert sorted(rank_in_pack[0, pack_index[0] == pack]) == list(range(items_per_pack))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 10), st.integers(1, 4), st.integers(0, 2), st.data())
def test_baselines_hold_every_expert(num_layers, num_experts, num_devices, extra, data):
    num_physical = (-(-num_experts // num_devices) + extra) * num_devices
    load = np.array(data.draw(st.lists(st.integers(0, 9), min_size=num_layers * num_experts,
                                       max_size=num_layers * num_experts)), dtype=float)
    load = load.reshape(num_layers, num_experts)
    sizes = (num_layers, num_experts, num_devices, num_physical)
    for placement in [contiguous(*sizes), contiguous(*sizes, load=load), round_robin(*sizes),
                      round_robin(*sizes, load=load), random_placement(*sizes, 7, load=load)]:
        assert placement.shape == (num_layers, num_physical)
        for row in placement:
            assert np.bincount(row, minlength=num_experts).min() >= 1
            assert row.max() < num_experts
        # Splitting each expert's load over its replicas conserves the total.
        np.testing.assert_allclose(device_loads(load, placement, num_devices).sum(axis=1),
                                   load.sum(axis=1))


# ---------------------------------------------------------------- load balance


def test_eplb_balances_skew_that_contiguous_does_not():
    # 64 experts on 8 GPUs, 72 slots (one redundant per GPU). Experts 0..7 get 100 tokens, the
    # rest 1: the hot block is exactly device 0's block under contiguous placement.
    # Both give each hot expert one extra replica (8 extras, greedy on load / count), 50 tokens
    # each. Contiguous keeps 0..7 on device 0; their extras fill devices 1..7's free slot, and
    # the last (expert 7) can only go to device 0: 7 * 50 + 2 * 50 = 450 there.
    # EPLB packs heaviest-first into the lightest GPU: the 16 half-loads of 50 land two per GPU,
    # then the 56 ones seven per GPU: every GPU carries 107 = the mean, a perfect balance.
    load = np.ones((1, 64))
    load[0, :8] = 100.0
    mean = load.sum() / 8
    eplb = eplb_rebalance(load, 72, num_groups=1, num_nodes=1, num_gpus=8)
    eplb_loads = device_loads(load, eplb.physical_to_logical, 8)
    contiguous_loads = device_loads(load, contiguous(1, 64, 8, 72, load=load), 8)
    np.testing.assert_allclose(eplb_loads, [[107.0] * 8])
    assert contiguous_loads[0, 0] == pytest.approx(450.0)
    assert eplb_loads.max() / mean <= contiguous_loads.max() / mean
    assert eplb_loads.max() / mean == pytest.approx(1.0)


# ---------------------------------------------------------------- baselines by hand


def test_baselines_by_hand():
    # 4 experts, 2 devices x 3 slots. Contiguous: [0,1,_ | 2,3,_]; without load the extras are
    # experts 0, 1: 0 avoids device 0 (holds it) -> slot 5; 1 has only slot 2 left.
    np.testing.assert_array_equal(contiguous(1, 4, 2, 6), [[0, 1, 1, 2, 3, 0]])
    # Load 1,1,9,1: extras are 2 (9 -> 4.5) then 2 again (4.5 > 1); slot 2, then slot 5.
    np.testing.assert_array_equal(contiguous(1, 4, 2, 6, load=np.array([[1, 1, 9, 1]])),
                                  [[0, 1, 2, 2, 3, 2]])
    # Round robin, 5 experts: device 0 holds 0,2,4; device 1 holds 1,3 and the extra 0.
    np.testing.assert_array_equal(round_robin(1, 5, 2, 6), [[0, 2, 4, 1, 3, 0]])


def test_random_placement_is_a_seeded_permutation():
    first = random_placement(4, 6, 2, 8, 3)
    np.testing.assert_array_equal(first, random_placement(4, 6, 2, 8, 3))
    for row in first:
        assert sorted(row) == [0, 0, 1, 1, 2, 3, 4, 5]  # extras without load: experts 0, 1
    assert len({tuple(row) for row in first}) > 1  # layers are shuffled independently


def test_device_loads_by_hand():
    # Expert 0 (load 6) has 2 replicas: 3 each. Device 0 = 3 + 2, device 1 = 3 + 4.
    loads = device_loads(np.array([[6.0, 2, 4]]), np.array([[0, 1, 0, 2]]), 2)
    np.testing.assert_allclose(loads, [[5.0, 7.0]])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.ones((1, 4)), 6, 1, 1, 4), r"num_physical=6 .* num_gpus=4"),
        ((np.ones((1, 4)), 2, 1, 1, 2), r"num_physical=2 must be >= num_experts=4"),
        ((np.ones((1, 6)), 8, 4, 2, 4), r"num_experts=6 must be a multiple of num_groups=4"),
        ((np.ones((1, 4)), 6, 2, 2, 3), r"num_gpus=3 must be a multiple of num_nodes=2"),
        ((np.ones(4), 4, 1, 1, 1), r"shape \(4,\)"),
        ((-np.ones((1, 4)), 4, 1, 1, 1), r"finite and >= 0"),
        ((np.ones((1, 4)), 4, 1, 1, 0), r"num_gpus=0 must be >= 1"),
    ],
)
def test_eplb_rejects_bad_arguments(args, match):
    with pytest.raises(InfeasiblePlacement, match=match):
        eplb_rebalance(*args)


@pytest.mark.parametrize("baseline", [contiguous, round_robin])
def test_baselines_reject_bad_sizes(baseline):
    with pytest.raises(InfeasiblePlacement, match=r"num_physical=7 .* num_devices=2"):
        baseline(1, 4, 2, 7)
    with pytest.raises(InfeasiblePlacement, match=r"num_physical=4 must be >= num_experts=6"):
        baseline(1, 6, 2, 4)
    with pytest.raises(InfeasiblePlacement, match=r"load has shape \(2, 4\)"):
        baseline(1, 4, 2, 4, load=np.ones((2, 4)))
    with pytest.raises(InfeasiblePlacement, match=r"num_physical=3 .* num_devices=2"):
        random_placement(1, 2, 2, 3, 0)
