"""moesim's placement planner: brute-force oracles on tiny cases, invariants, objective, traces."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InfeasiblePlacement, ScenarioError
from moesim.placement import hypergraph as hg
from moesim.placement import objective, planner
from moesim.placement.eplb import eplb_rebalance
from moesim.placement.placement import Placement
from moesim.placement.traces import synthetic_groups, synthetic_trace
from moesim.pricing.context import PricingContext
from moesim.routing_trace import RoutingTrace
from moesim.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "scenarios" / "tiny-cpu.yaml"
# tiny-cpu on 2 nodes of 1 device each, one EP group spanning both, hierarchical all-to-all
TWO_NODES = ["cluster.devices_per_node=1", "parallelism.pp=1", "parallelism.dp=2",
             "parallelism.ep=2", "communication.alltoall=hierarchical",
             "workload.global_batch=2", "workload.seq_len=64"]


def _node_of(table: np.ndarray, device_node: np.ndarray, num_experts: int) -> np.ndarray:
    """Node of each expert of a replica-free layer ``[ep, slots]``."""
    node = np.full(num_experts, -1)
    for device, experts in enumerate(table):
        node[experts] = device_node[device]
    assert (node >= 0).all()
    return node


def _random_tokens(seed: int, num_experts: int, count: int, k: int | None = None
                   ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 4)) if k is None else k
    return np.array([rng.choice(num_experts, k, replace=False) for _ in range(count)])


# ----------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("seed", range(12))
def test_partition_is_the_brute_force_optimum(seed):
    """8 experts on 2 nodes of 4 slots, node load at most 15% above the mean: the planner's
    split has the lowest touch cost (tokens touching the busier node + tokens touching a node on
    average) of all 70 splits that respect the cap."""
    tokens = _random_tokens(seed, 8, int(np.random.default_rng(seed).integers(6, 40)))
    load = np.bincount(tokens.ravel(), minlength=8).astype(float)
    shape = planner.ClusterShape(8, np.array([0, 1]), 4)
    table = planner.plan_layer(planner.LayerRouting(load, tokens), shape, 0, 0.15)
    got = _node_of(table, shape.device_node, 8)
    cap = load.sum() / 2 * 1.15 + 1e-9
    feasible = []
    for first in itertools.combinations(range(8), 4):
        part = np.isin(np.arange(8), first, invert=True).astype(int)
        if np.bincount(part, weights=load, minlength=2).max() <= cap:
            touched = [len({p for p in part[row]}) for row in tokens]   # nodes per token
            busiest = max(sum(p in part[row] for row in tokens) for p in (0, 1))
            feasible.append(busiest + sum(touched) / 2)
    assert np.bincount(got, weights=load, minlength=2).max() <= cap
    assert hg.touch_cost(tokens, got, 2) == min(feasible)


def test_level_touch_moves_the_expert_that_overloads_a_node_by_hand():
    """Experts 0, 1, 2 on node 0, expert 3 on node 1; 5 tokens choose (0, 1), 5 choose (2, 3).
    Node 0 is touched by all 10 tokens, node 1 by 5: cost 10 + 15 / 2 = 17.5. Moving expert 2
    to node 1 leaves 5 and 5 touches, cost 5 + 10 / 2 = 10, the least there is."""
    tokens = np.array([[0, 1]] * 5 + [[2, 3]] * 5)
    load = np.array([5.0, 5.0, 5.0, 5.0])
    limits = hg.Limits(max_load=20.0, capacity=np.array([3, 3]), demand=np.ones(4, np.int64))
    start = np.array([0, 0, 0, 1])
    assert hg.touch_cost(tokens, start, 2) == 17.5
    got = hg.level_touch(tokens, load, start, limits)
    np.testing.assert_array_equal(got, [0, 0, 1, 1])
    np.testing.assert_array_equal(hg.touch(tokens, got, 2), [5, 5])
    assert hg.touch_cost(tokens, got, 2) == 10.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(2, 4), st.integers(2, 3))
def test_level_touch_never_raises_its_cost_and_keeps_the_limits(seed, parts, k):
    """On random tokens and a random feasible start: the touches sum to the connectivity,
    leveling never raises the touch cost, keeps every part within its load cap and slots, and
    never moves an expert held everywhere (part -1)."""
    rng = np.random.default_rng(seed)
    experts = parts * 4
    tokens = _random_tokens(seed, experts, int(rng.integers(5, 80)), k)
    load = np.bincount(tokens.ravel(), minlength=experts).astype(float) + 1.0
    start = np.repeat(np.arange(parts), 4)[rng.permutation(experts)]
    start[rng.integers(experts)] = -1
    held = start >= 0
    weight = np.bincount(start[held], weights=load[held], minlength=parts)
    limits = hg.Limits(max_load=float(weight.max()) * 1.1, capacity=np.full(parts, 5),
                       demand=np.ones(experts, np.int64))
    assert hg.touch(tokens, start, parts).sum() == hg.connectivity(tokens, start)
    got = hg.level_touch(tokens, load, start, limits)
    assert hg.touch_cost(tokens, got, parts) <= hg.touch_cost(tokens, start, parts)
    assert (got == -1).sum() == 1 and got[start == -1] == -1
    moved = got >= 0
    assert np.bincount(got[moved], weights=load[moved], minlength=parts).max() \
        <= limits.max_load + 1e-9
    assert np.bincount(got[moved], minlength=parts).max() <= 5


def test_choose_trades_balance_across_layers_by_hand():
    """Two layers, each with a moesim option and EPLB's (last). Layer 0: moesim 10 s at balance
    1.00, EPLB 12 s at 1.10; layer 1: moesim 5 s at 1.15, EPLB 8 s at 1.10. Cheapest per layer:
    1.00 + 1.15 = 2.15 <= 2.20 (EPLB's sum), so both take moesim although layer 1 alone is less
    balanced than its EPLB plan. With layer 1's moesim option at 1.30 the sum 2.30 exceeds
    2.20; the only better balanced switch is layer 1 to EPLB (3 s for 0.20), so the picks are
    (moesim, EPLB)."""
    Option = planner.Option
    none = np.zeros((1, 1))
    options = [[Option(none, 1.00, 10.0), Option(none, 1.10, 12.0)],
               [Option(none, 1.15, 5.0), Option(none, 1.10, 8.0)]]
    assert planner._choose(options, True) == [0, 0]
    options[1][0] = Option(none, 1.30, 5.0)
    assert planner._choose(options, True) == [0, 1]
    assert planner._choose(options, False) == [0, 1]      # no objective: per layer, strict


@pytest.mark.parametrize("seed", range(6))
def test_plan_reaches_the_brute_force_best_layer_time(seed):
    """Every split of 6 experts over 2 nodes of 3 slots priced by the objective: among those
    no less balanced than EPLB (the planner's rule), the planner returns the cheapest."""
    s = load_scenario(TINY, TWO_NODES + ["model.num_experts=6"])
    ctx = PricingContext.from_scenario(s)
    # each token twice in a row: both devices route the same tokens, so a split and its
    # mirror image cost the same and the optimum is a property of the split
    tokens = np.repeat(_random_tokens(seed, 6, 64, k=2), 2, axis=0)
    trace = RoutingTrace("t", 6, expert_ids=tokens[None])
    score = objective.layer_scorer(ctx, objective.trace_choices(ctx, trace), 6)
    load = trace.layer_counts()[0]
    shape = planner.ClusterShape(6, ctx.device_node, 3)
    eplb = [eplb_rebalance(load[None], 6, g, g, 2).physical_to_logical.reshape(2, 3)
            for g in (1, 2)]
    cap = min(max(load[d].sum() for d in table) for table in eplb) + 1e-9
    splits = [np.array([list(c), [e for e in range(6) if e not in c]])
              for c in itertools.combinations(range(6), 3)]
    best = min(score(0, t) for t in splits if max(load[d].sum() for d in t) <= cap)
    plan = planner.plan(planner.routing_from_trace(trace), shape, score=score)
    assert max(load[d].sum() for d in plan.slot_expert[0]) <= cap
    assert score(0, plan.slot_expert[0]) == pytest.approx(best, rel=1e-12)


def test_clear_groups_are_found_and_balanced():
    """Two groups that only co-occur among themselves: each lands whole on one node."""
    rng = np.random.default_rng(0)
    groups = [np.array([0, 3, 5, 6]), np.array([1, 2, 4, 7])]
    tokens = np.array([rng.choice(groups[t % 2], 2, replace=False) for t in range(200)])
    load = np.bincount(tokens.ravel(), minlength=8).astype(float)
    table = planner.plan_layer(planner.LayerRouting(load, tokens),
                               planner.ClusterShape(8, np.array([0, 0, 1, 1]), 2), 0, 0.1)
    node = _node_of(table, np.array([0, 0, 1, 1]), 8)
    assert len(set(node[groups[0]])) == 1 and len(set(node[groups[1]])) == 1
    assert hg.connectivity(tokens, node) == len(tokens)


# ----------------------------------------------------------------------------- invariants


@settings(max_examples=25, deadline=None)
@given(nodes=st.integers(1, 3), gpus=st.integers(1, 3), experts=st.integers(2, 12),
       spare=st.integers(0, 6), k=st.integers(1, 3), seed=st.integers(0, 10_000),
       everywhere=st.integers(0, 4), tolerance=st.sampled_from([0.0, 0.05, 0.5]))
def test_every_expert_placed_equal_slots(nodes, gpus, experts, spare, k, seed, everywhere,
                                         tolerance):
    ep = nodes * gpus
    slots = -(-(experts + spare) // ep)
    k = min(k, experts)
    rng = np.random.default_rng(seed)
    tokens = np.array([rng.choice(experts, k, replace=False) for _ in range(30)])
    load = np.bincount(tokens.ravel(), minlength=experts) * rng.random()
    shape = planner.ClusterShape(experts, np.repeat(np.arange(nodes), gpus), slots)
    table = planner.plan_layer(planner.LayerRouting(load, tokens), shape, everywhere,
                               tolerance, seed=[seed])
    assert table.shape == (ep, slots)                       # equal slots per device
    counts = np.bincount(table.ravel(), minlength=experts)
    assert (counts >= 1).all()                              # every expert placed
    assert counts.sum() - experts == ep * slots - experts   # replicas = the spare slots
    again = planner.plan_layer(planner.LayerRouting(load, tokens), shape, everywhere,
                               tolerance, seed=[seed])
    np.testing.assert_array_equal(table, again)             # deterministic


@settings(max_examples=25, deadline=None)
@given(nodes=st.integers(1, 4), gpus=st.integers(1, 3), experts=st.integers(2, 16),
       spare=st.integers(0, 8), seed=st.integers(0, 10_000),
       tolerance=st.sampled_from([0.0, 0.05, 0.5]))
def test_spread_plan_fills_every_slot_and_never_exceeds_eplbs_copies_per_node(
        nodes, gpus, experts, spare, seed, tolerance):
    """Replicas spread over nodes: every expert placed, equal slots, deterministic, and an
    expert on at most min(EPLB's copies, nodes) distinct nodes."""
    from moesim.placement.eplb import replicate_experts

    ep = nodes * gpus
    slots = -(-(experts + spare) // ep)
    rng = np.random.default_rng(seed)
    tokens = np.array([rng.choice(experts, min(2, experts), replace=False) for _ in range(30)])
    load = np.bincount(tokens.ravel(), minlength=experts) * rng.random()
    shape = planner.ClusterShape(experts, np.repeat(np.arange(nodes), gpus), slots)
    info = planner.LayerRouting(load, tokens)
    table = planner.plan_layer_spread(info, shape, tolerance, seed=[seed])
    assert table.shape == (ep, slots)
    assert (np.bincount(table.ravel(), minlength=experts) >= 1).all()
    np.testing.assert_array_equal(table, planner.plan_layer_spread(info, shape, tolerance,
                                                                   seed=[seed]))
    copies = replicate_experts(load[None, :] + 1e-12, ep * slots)[2][0]
    on = np.zeros((experts, nodes), dtype=bool)
    on[table, shape.device_node[:, None]] = True
    assert (on.sum(axis=1) <= np.minimum(copies, nodes)).all()


@pytest.mark.parametrize("seed", range(8))
def test_spread_plan_puts_eplbs_copies_on_distinct_nodes(seed):
    """24 experts on 4 nodes of 2 GPUs x 4 slots (8 spare): each expert's copies, as EPLB
    counts them, lie on min(copies, 4) different nodes (the rest inside a node)."""
    from moesim.placement.eplb import replicate_experts

    rng = np.random.default_rng(seed)
    load = rng.zipf(1.6, 24).astype(float) + rng.random(24)
    shape = planner.ClusterShape(24, np.repeat(np.arange(4), 2), 4)
    table = planner.plan_layer_spread(planner.LayerRouting(load), shape, 0.05, seed=[seed])
    copies = replicate_experts(load[None, :] + 1e-12, 32)[2][0]
    assert (copies > 1).any()
    on = np.zeros((24, 4), dtype=bool)
    on[table, shape.device_node[:, None]] = True
    np.testing.assert_array_equal(on.sum(axis=1), np.minimum(copies, 4))


def test_spread_plan_by_hand():
    """3 nodes of 1 GPU x 2 slots, loads 3, 3, 1, 1: EPLB's two spare slots copy experts 0 and 1
    (3 -> 1.5 each), so each is on two different nodes and experts 2 and 3 on one; the node
    without a hot copy holds 2 and 3 (load 2 against 3 elsewhere: 1.5 + 1.5)."""
    shape = planner.ClusterShape(4, np.array([0, 1, 2]), 2)
    table = planner.plan_layer_spread(planner.LayerRouting(np.array([3.0, 3.0, 1.0, 1.0])),
                                      shape, 0.0)
    nodes = [{int(n) for n in np.flatnonzero((table == e).any(axis=1))} for e in range(4)]
    assert [len(n) for n in nodes] == [2, 2, 1, 1]
    assert nodes[2] == nodes[3] and not nodes[2] & (nodes[0] | nodes[1])


def test_replicate_everywhere_puts_a_copy_on_each_node():
    tokens = _random_tokens(1, 16, 200)
    load = np.bincount(tokens.ravel(), minlength=16).astype(float)
    shape = planner.ClusterShape(16, np.repeat([0, 1, 2, 3], 2), 3)  # 24 slots, 8 spare
    assert shape.max_everywhere() == 2                    # 2 experts x 3 extra copies <= 8
    table = planner.plan_layer(planner.LayerRouting(load, tokens), shape, 2, 0.05)
    hottest = np.argsort(-load, kind="stable")[:2]
    for expert in hottest:
        nodes = {int(shape.device_node[d]) for d in range(8) if expert in table[d]}
        assert nodes == {0, 1, 2, 3}


def test_expected_device_loads_by_hand():
    """2 nodes of 1 device, expert 0 on device 0 and expert 1 on device 1, loads 3:1, 8 pairs
    per device per batch: device 0 gets 6 pairs from itself and 6 from device 1 (no copy on
    its node), Poisson so variance 12; device 1 gets 2 + 2."""
    from moesim.placement.local_search import balance, expected_device_loads

    shape = planner.ClusterShape(2, np.array([0, 1]), 1)
    table, load = np.array([[0], [1]]), np.array([3.0, 1.0])
    mean, std = expected_device_loads(load, table, shape, 8.0)
    np.testing.assert_allclose(mean, [12.0, 4.0])
    np.testing.assert_allclose(std, np.sqrt([12.0, 4.0]))
    z = np.sqrt(2 * np.log(2))
    assert balance(load, table, shape, 8.0) == pytest.approx((12 + z * np.sqrt(12)) / 8)
    assert balance(load, table, shape) == pytest.approx(1.5)            # no noise: 12 / 8


def test_unequal_nodes_are_rejected():
    with pytest.raises(InfeasiblePlacement, match="same number of EP devices"):
        planner.ClusterShape(8, np.array([0, 0, 0, 1]), 2)
    with pytest.raises(InfeasiblePlacement, match="cannot hold 9 experts"):
        planner.ClusterShape(9, np.array([0, 1]), 4)


def test_layers_past_the_evaluation_budget_get_eplbs_plan_and_say_so():
    from moesim.placement.local_search import eplb_best

    trace = synthetic_trace(16, 3, 1024, 2, seed=2)
    shape = planner.ClusterShape(16, np.repeat([0, 1], 2), 5)
    calls = []
    layers = planner.routing_from_trace(trace)
    plan = planner.plan(layers, shape, planner.PlannerConfig(max_evaluations=0),
                        score=lambda layer, slots: 1.0,
                        progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(plan.slot_expert,
                                  np.stack([eplb_best(info.load, shape)[0] for info in layers]))
    assert plan.notes and "the last 3 of 3 layers use EPLB's plan" in plan.notes[0]


def test_the_budget_counts_evaluations_so_plans_repeat_exactly():
    trace = synthetic_trace(16, 3, 1024, 2, seed=2)
    shape = planner.ClusterShape(16, np.repeat([0, 1], 2), 5)
    layers = planner.routing_from_trace(trace)
    seen = []

    def score(layer, slots):
        seen.append(layer)
        return float(np.sum(slots * (layer + 1)) % 7)

    first = planner.plan(layers, shape, planner.PlannerConfig(max_evaluations=40), score=score)
    used = len(seen)
    second = planner.plan(layers, shape, planner.PlannerConfig(max_evaluations=40), score=score)
    assert len(seen) == 2 * used and used >= 40
    np.testing.assert_array_equal(first.slot_expert, second.slot_expert)
    assert first.notes == second.notes


# ----------------------------------------------------------------------------- better than EPLB


def test_fewer_cross_node_touches_than_eplb_and_as_balanced():
    """32 experts in 4 co-activation groups on 4 nodes: moesim keeps tokens on fewer nodes
    than EPLB, and its device loads are no less balanced."""
    trace = synthetic_trace(32, 2, 4096, 4, coactivation_groups=4, coactivation_strength=3.0,
                            drift=0.0, seed=3)
    shape = planner.ClusterShape(32, np.repeat(np.arange(4), 2), 5)   # 40 slots, 8 spare
    layers = planner.routing_from_trace(trace)
    plan = planner.plan(layers, shape, planner.PlannerConfig(seed=0))
    loads = trace.layer_counts()
    eplb = eplb_rebalance(loads, 40, 4, 4, 8).physical_to_logical.reshape(2, 8, 5)
    for layer in range(2):
        tokens = trace.expert_ids[layer].astype(np.int64)
        node_of = _home(plan.slot_expert[layer], shape)
        assert hg.connectivity(tokens, node_of) < hg.connectivity(tokens, _home(eplb[layer],
                                                                                 shape))
        mine = planner.expected_device_loads(loads[layer], plan.slot_expert[layer], shape)[0]
        theirs = planner.expected_device_loads(loads[layer], eplb[layer], shape)[0]
        assert mine.max() <= theirs.max() + 1e-9


def _home(table: np.ndarray, shape: planner.ClusterShape) -> np.ndarray:
    """Node of each expert held on one node only; -1 for experts held on several."""
    holders = np.zeros((shape.num_experts, shape.num_nodes), dtype=bool)
    holders[table, shape.device_node[:, None]] = True
    return np.where(holders.sum(axis=1) == 1, holders.argmax(axis=1), -1)


# ----------------------------------------------------------------------------- migration


def test_migration_budget_limits_moved_slots():
    trace = synthetic_trace(16, 3, 2048, 2, coactivation_groups=4, seed=5)
    shape = planner.ClusterShape(16, np.repeat([0, 1], 2), 5)
    layers = planner.routing_from_trace(trace)
    current = Placement(np.arange(60).reshape(3, 4, 5) % 16, 16)
    frozen = planner.plan(layers, shape, planner.PlannerConfig(migration_budget=0.0),
                          current=current, expert_bytes=1e6)
    np.testing.assert_array_equal(frozen.slot_expert, current.slot_expert)
    free = planner.plan(layers, shape, planner.PlannerConfig(migration_budget=1e12),
                        current=current, expert_bytes=1e6)
    some = planner.plan(layers, shape, planner.PlannerConfig(migration_budget=25e6),
                        current=current, expert_bytes=1e6)
    moved = [planner.moved_slots(p.slot_expert, current.slot_expert) for p in (free, some)]
    assert 0 < moved[1] <= 25 and moved[1] <= moved[0]


def test_align_keeps_a_relabelled_plan_in_place():
    """Nodes, GPUs and slots permuted: aligning back to the original moves nothing."""
    rng = np.random.default_rng(0)
    old = rng.permutation(24).reshape(6, 4)          # 3 nodes x 2 GPUs, 4 slots
    device_node = np.repeat([0, 1, 2], 2)
    new = old[[5, 4, 1, 0, 3, 2]][:, ::-1]
    aligned = planner.align_to(new, old, device_node)
    assert planner.moved_slots(aligned, old) == 0


# ----------------------------------------------------------------------------- objective


def test_closed_form_matches_flow_simulation_on_one_flow():
    """One source, one remote expert: the all-to-all is one flow, so the closed form (bytes
    over the bottleneck capacity plus path latency) equals the flow simulation."""
    s = load_scenario(TINY, TWO_NODES + ["model.top_k=1", "communication.alltoall=direct"])
    ctx = PricingContext.from_scenario(s)
    placement = Placement(np.array([[[0, 1, 2, 3], [4, 5, 6, 7]]]), 8)
    ids = np.array([[[5]] * 64])                     # every token to expert 5 on device 1
    choices = objective.trace_choices(ctx, RoutingTrace("t", 8, expert_ids=ids))
    fast = objective.layer_cost(ctx, choices[0], placement, 0)
    exact = objective.layer_cost(ctx, choices[0], placement, 0, exact=True)
    assert fast.dispatch == pytest.approx(exact.dispatch, rel=1e-9)
    # by hand: device 0's 64 tokens cross, 256 floats of 4 bytes each
    links = ctx.topology.path_links(int(ctx.group[0]), int(ctx.group[1]))
    nbytes = 64 * 256 * 4
    by_hand = nbytes / ctx.topology.capacity[links].min() + ctx.topology.latency[links].sum()
    assert fast.dispatch == pytest.approx(by_hand, rel=1e-12)
    assert fast.cross_node_bytes == pytest.approx(2 * nbytes)   # dispatch + fp32 combine
    assert fast.max_over_mean == pytest.approx(2.0)             # all load on one of two


def test_moesim_policy_runs_in_the_simulator():
    from moesim.assembly import simulate

    s = load_scenario(TINY, ["placement.policy=moesim"])
    sim = simulate(s)
    assert sim.placement.name == "moesim"
    assert sim.result.step_time > 0


# ----------------------------------------------------------------------------- traces


def test_synthetic_trace_shape_determinism_and_drift():
    a = synthetic_trace(32, 2, 4000, 4, drift=0.5, seed=1)
    b = synthetic_trace(32, 2, 4000, 4, drift=0.5, seed=1)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert a.expert_ids.shape == (2, 4000, 4)
    assert (np.diff(np.sort(a.expert_ids, axis=2), axis=2) > 0).all()   # distinct per token

    def shift(trace):
        first, second = (w.layer_counts() for w in (trace.window(0, .5), trace.window(.5, 1)))
        return np.abs(first / first.sum(1, keepdims=True)
                      - second / second.sum(1, keepdims=True)).sum(1).mean()

    still = synthetic_trace(32, 2, 4000, 4, drift=0.0, seed=1)
    assert shift(a) > 2 * shift(still)


def test_synthetic_trace_coactivation_keeps_tokens_in_groups():
    strong = synthetic_trace(32, 1, 4000, 4, coactivation_groups=4, coactivation_strength=4.0)
    none = synthetic_trace(32, 1, 4000, 4, coactivation_strength=0.0)
    rng = np.random.default_rng([0, 0])
    rng.permutation(32)                                  # the base popularity's draw
    from moesim.routing import coactivation_partition
    group = coactivation_partition(32, 4, rng)
    same = lambda t: (group[t.expert_ids[0]] == group[t.expert_ids[0][:, :1]]).mean()  # noqa
    assert same(strong) > 0.8 > 0.5 > same(none)
    np.testing.assert_array_equal(
        synthetic_groups(32, 1, coactivation_groups=4, coactivation_strength=4.0)[0], group)
    assert synthetic_groups(32, 1, coactivation_strength=0.0) is None


def test_synthetic_trace_rejects_bad_sizes():
    with pytest.raises(ScenarioError, match="top_k=9"):
        synthetic_trace(8, 1, 10, 9)
    with pytest.raises(ScenarioError, match="multiple of windows"):
        synthetic_trace(8, 1, 11, 2, windows=2)


# ----------------------------------------------------------------------------- benchmark


def _planner_benchmark():
    """benchmarks/planner.py as a module (under its own name: moesim has a ``planner`` too)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("planner_benchmark",
                                                  REPO / "benchmarks" / "planner.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["planner_benchmark"] = bench       # dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_tiny_prints_every_planner(capsys):
    bench = _planner_benchmark()
    assert bench.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    for name in ("contiguous", "round_robin", "eplb", "eplb_global", "moesim"):
        assert f"  {name} " in out
    assert out.count("moesim vs best EPLB") == 2


def test_benchmark_seeds_line_by_hand_and_runs(capsys):
    """--seeds N: one line a setting with the mean and range of moesim's figures; by hand for
    two seeds (-10% and -12%, 0.8x and 0.9x, balance 1.2 and 1.3 against 1.1)."""
    bench = _planner_benchmark()
    line = bench.seeds_line("X", [bench.Summary(-10.0, 0.8, 1.2, 1.1),
                                  bench.Summary(-12.0, 0.9, 1.3, 1.1)])
    assert line == ("X over 2 seeds: layer time -11.0 (-12.0 .. -10.0) %, sends 0.850 "
                    "(0.800 .. 0.900) x hierarchical, balance gap +0.150 (+0.100 .. +0.200)")
    assert bench.main(["--tiny", "--seeds", "2", "--only", "mixtral"]) == 0
    out = capsys.readouterr().out
    assert out.count(" over 2 seeds: ") == 1 and "moesim vs best EPLB" not in out


def test_benchmark_domain_splits_and_lines_by_hand(tmp_path):
    """The recorded trace is held out once per text domain: tokens rotated to start at each
    domain, the first half planned on, the second scored; every token in exactly one half of
    each split. Pooled figures: sends averaged over splits, layer costs over layers x splits.
    The network line: the all-to-all's share of the faster EPLB plan's layer time."""
    from types import SimpleNamespace

    from moesim.placement import heldout, objective
    from moesim.routing_trace import RoutingTrace

    bench = _planner_benchmark()
    path = tmp_path / "t.npz"
    token = np.arange(6, dtype=np.int16)
    ids = np.stack([token, token + 6], axis=1)[None]                # token t: experts t, t + 6
    np.savez(path, expert_ids=ids, domain=np.array([0, 0, 1, 1, 1, 2]))
    starts = bench.domain_starts(path)
    assert starts.tolist() == [0, 2, 5]
    trace = RoutingTrace(str(path), 12, expert_ids=ids.astype(np.int32))
    splits = bench.domain_splits(trace, starts)
    firsts = [[int(half.expert_ids[0, 0, 0]) for half in pair] for pair in splits]
    assert firsts == [[0, 3], [2, 5], [5, 2]]        # the token that opens each half
    for plan, held in splits:
        both = np.concatenate([plan.expert_ids, held.expert_ids], axis=1)
        assert sorted(map(tuple, both[0].tolist())) == sorted(map(tuple, ids[0].tolist()))
    np.savez(path, expert_ids=ids)
    assert bench.domain_starts(path).tolist() == [0]

    def run(sends, times, seconds, even):
        costs = tuple(SimpleNamespace(layer_time=t, alltoall=0.0, compute=t,
                                      cross_node_bytes=0.0, max_over_mean=1.0) for t in times)
        return heldout.HeldOutScore(sends, objective.PlanCost(costs)), seconds, even

    # The network line, by hand: the faster EPLB plan (8 s) spends 4 s in all-to-all (50%);
    # a 15% shorter layer needs it 15 / 50 = 30% shorter; moesim's 3 s is 25% shorter, sends
    # 1.6 / 2.0 = 0.80x. At 0.8 s of 8 s (10%) no all-to-all cut reaches 15%.
    def row(name, time, alltoall, sends):
        return (name, SimpleNamespace(cost=SimpleNamespace(layer_time=time, alltoall=alltoall),
                                      sends_per_token=sends), 0.0, 1.0)

    assert bench.network_line([row("eplb", 10.0, 6.0, 3.0), row("eplb_global", 8.0, 4.0, 2.0),
                               row("moesim", 7.0, 3.0, 1.6)]) == (
        "  network: all-to-all 50% of the faster EPLB plan's layer time; a 15% shorter layer "
        "needs it 30% shorter; moesim's all-to-all -25% against it, at 0.80x its sends/token")
    assert "under 15%, so no all-to-all cut" in bench.network_line(
        [row("eplb", 8.0, 0.8, 2.0), row("moesim", 8.0, 0.8, 2.0)])
    score, seconds, even = bench.pooled([run(2.0, [1.0, 3.0], 0.5, 1.2),
                                         run(1.0, [5.0], 1.5, 1.4)])
    assert score.sends_per_token == 1.5 and score.cost.layer_time == 3.0
    assert seconds == 1.0 and even == pytest.approx(1.3)


def test_plan_cli_takes_several_planners_and_writes_the_cheapest(tmp_path, capsys):
    import json

    from moesim.cli import main
    from moesim.placement.export import load_plan
    from moesim.spec.scenario import load_scenario

    out = tmp_path / "plan.json"
    code = main(["plan", "tiny-cpu", "--planner", "contiguous", "eplb", "round_robin", "--json",
                 "-o", str(out)])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    times = {row["planner"]: row["layer_time"] for row in doc["planners"]}
    assert set(times) == {"contiguous", "eplb", "round_robin"}
    best = min(times, key=times.get)
    assert doc["best"] == best
    s = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml")
    assert load_plan(out, s).name == best


def test_plan_refuses_an_unwritable_output_before_planning(capsys):
    from moesim.cli import main
    assert main(["plan", "tiny-cpu", "-o", "/proc/plan.json"]) == 2
    assert "cannot be written" in capsys.readouterr().err


# --- replica selection: own GPU, own node, least loaded (the rule engines use) -------------------

# 2 nodes x 2 GPUs, 2 slots each: expert 0 on GPUs 0 and 1 (node 0 only), expert 1 on GPUs 0 and 3.
_REPLICA_TABLE = np.array([[[0, 1], [0, 2], [3, 4], [5, 1]]])
_REPLICA_NODE = np.array([0, 0, 1, 1])
_REPLICA_COUNTS = np.array([[1., 2., 0., 0., 0., 0.],     # source GPU 0
                            [1., 1., 1., 0., 0., 0.],     # source GPU 1
                            [2., 1., 0., 1., 1., 0.],     # source GPU 2
                            [4., 1., 0., 0., 0., 2.]])    # source GPU 3


def test_replica_selection_least_loaded_by_hand():
    """Kept at home: GPU0 1+2 (experts 0, 1), GPU1 1+1 (experts 0, 2), GPU2 1+1, GPU3 1+2.
    One candidate: GPU1's expert-1 token goes to GPU0 (own node), GPU2's to GPU3 (own node).
    Loads before the free choice: GPU0 4, GPU1 2, GPU2 2, GPU3 4. Node 1's 2+4 = 6 expert-0
    tokens have no replica on their node; candidates GPU0 (4) and GPU1 (2): filled to level
    (6 + 4 + 2) / 2 = 6, GPU0 takes 2 (1/3), GPU1 takes 4 (2/3). The even split gives 3 and 3."""
    placement = Placement(_REPLICA_TABLE, 6)
    split = placement.replica_split(0, _REPLICA_NODE, counts=_REPLICA_COUNTS)
    assert np.allclose(split.by_node[1, 0], [1 / 3, 2 / 3, 0, 0])
    assert np.allclose(split.by_node[0, 1], [1, 0, 0, 0])      # own node first
    tokens, per_device_expert = split.route(_REPLICA_COUNTS)
    assert np.allclose(per_device_expert.sum(axis=1), [6, 6, 2, 4])
    # GPU2 keeps 2 (experts 3, 4) and sends its expert-1 token to GPU3.
    assert np.allclose(tokens[2], [2 / 3, 4 / 3, 2, 1]) and np.allclose(tokens[3], [4 / 3, 8 / 3, 0, 3])
    even = Placement(_REPLICA_TABLE, 6, replica_rule="even")
    _, per_even = even.replica_split(0, _REPLICA_NODE, counts=_REPLICA_COUNTS).route(_REPLICA_COUNTS)
    assert np.allclose(per_even.sum(axis=1), [7, 5, 2, 4])
    # Without the token counts there is nothing to balance against: the even split.
    assert np.allclose(placement.replica_split(0, _REPLICA_NODE).by_node[1, 0], [.5, .5, 0, 0])


def test_water_fill_only_reaches_the_lowest_when_the_volume_is_small():
    from moesim.placement.placement import _water_fill
    assert np.allclose(_water_fill(np.array([4.0, 2.0]), 1.0), [0, 1])
    assert np.allclose(_water_fill(np.array([4.0, 2.0, 3.0]), 3.0), [0, 2 / 3, 1 / 3])


def test_pricing_and_simulator_traffic_use_the_least_loaded_rule():
    """The same counts through moesim.traffic (what pricing and the simulator call): each GPU
    computes 6, 6, 2, 4 token-expert pairs; the even split would give 7, 5, 2, 4."""
    from moesim import routing, traffic
    src, exp = np.nonzero(_REPLICA_COUNTS)
    reps = _REPLICA_COUNTS[src, exp].astype(int)
    choices = routing.LayerChoices(np.repeat(exp, reps)[:, None].astype(np.int32),
                                   np.repeat(src, reps).astype(np.int32), 1.0)
    for rule, want in (("least_loaded", [6, 6, 2, 4]), ("even", [7, 5, 2, 4])):
        flows = traffic.layer_traffic(choices, Placement(_REPLICA_TABLE, 6, replica_rule=rule), 0,
                                      device_node=_REPLICA_NODE, tokens_per_source=5.0, hidden=8,
                                      dispatch_bytes_per_elem=1.0, combine_bytes_per_elem=2.0,
                                      capacity_factor=None, top_k=1)
        assert np.allclose(flows.slot_tokens.sum(axis=1), want)
    with pytest.raises(InfeasiblePlacement, match="replica_rule"):
        Placement(_REPLICA_TABLE, 6, replica_rule="random")


# --- held-out evaluation ------------------------------------------------------------------------

_EP4 = ["parallelism.pp=1", "parallelism.dp=4", "parallelism.ep=4"]


def test_trace_layouts_are_read_from_the_file_the_flag_or_the_shape(tmp_path):
    from moesim.errors import TraceError
    from moesim.routing_trace import load_trace
    ids = synthetic_trace(8, 4, 64, 2, seed=3).expert_ids                   # [layers, tokens, k]
    np.savez(tmp_path / "lt.npz", expert_ids=ids)
    np.savez(tmp_path / "tl.npz", expert_ids=ids.transpose(1, 0, 2))
    np.savez(tmp_path / "said.npz", expert_ids=ids[:, :4].transpose(1, 0, 2),
             layout=np.array("tokens,layers,k"))                             # 4 tokens: ambiguous
    kw = dict(num_experts=8, num_layers=4, top_k=2)
    for name in ("lt.npz", "tl.npz"):
        assert np.array_equal(load_trace(tmp_path / name, **kw).expert_ids, ids)
    assert np.array_equal(load_trace(tmp_path / "said.npz", **kw).expert_ids,
                          ids[:, :4])
    with pytest.raises(TraceError, match="says layout 'tokens,layers,k'"):
        load_trace(tmp_path / "said.npz", layout="layers,tokens,k", **kw)
    with pytest.raises(TraceError, match="neither axis"):
        load_trace(tmp_path / "lt.npz", num_experts=8, num_layers=5, top_k=2)


def test_every_held_out_token_is_scored_once():
    from moesim import routing
    from moesim.placement import heldout
    s = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml", _EP4)
    ctx = PricingContext.from_scenario(s)
    trace = synthetic_trace(8, s.model.num_moe_layers, 1000, 2, seed=4)
    choices = heldout.every_token(ctx, trace)
    for layer, c in enumerate(choices):
        counts = routing.counts_from_choices(c, ctx.ep, 8)
        # The 1000 tokens stand for the batch's ep * tokens_per_source real tokens.
        assert counts.sum() == pytest.approx(ctx.ep * ctx.tokens_per_source * 2)
        per_expert = np.bincount(trace.expert_ids[layer].ravel(), minlength=8)
        assert np.allclose(counts.sum(axis=0) / c.weight, per_expert)
    sampled = heldout.every_token(ctx, trace, sample=100, seed=1)
    assert sampled[0].num_tokens == 100 and sampled[0].weight == pytest.approx(
        ctx.ep * ctx.tokens_per_source / 100)


def test_sends_per_token_by_hand():
    """GPU d holds experts 2d, 2d+1; nodes {GPU0, GPU1}, {GPU2, GPU3}. Token 0 (GPU0: 0, 1)
    stays on node 0; token 1 (GPU1: 4, 6) reaches node 1 once (one copy per node); token 2 (GPU2:
    0, 5) reaches node 0; token 3 (GPU3: 6, 7) stays. Mean 2 / 4 = 0.5."""
    from moesim import routing
    from moesim.placement import heldout
    s = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml", _EP4)
    ctx = PricingContext.from_scenario(s)
    choices = routing.LayerChoices(np.array([[0, 1], [4, 6], [0, 5], [6, 7]], dtype=np.int32),
                                   np.arange(4, dtype=np.int32), 1.0)
    placement = Placement(np.arange(8).reshape(1, 4, 2), 8)
    assert heldout.sends_per_token(ctx, choices, placement, 0) == pytest.approx(0.5)


def test_plan_eval_trace_writes_every_plan_into_a_folder(tmp_path, capsys):
    import json

    from moesim.cli import main
    from moesim.placement import heldout
    from moesim.placement.export import load_plan
    s = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml", _EP4)
    trace = synthetic_trace(8, s.model.num_moe_layers, 600, 2, drift=0.3, seed=5)
    np.savez(tmp_path / "plan.npz", expert_ids=trace.expert_ids[:, :300])
    np.savez(tmp_path / "held.npz", expert_ids=trace.expert_ids[:, 300:].transpose(1, 0, 2))
    out = tmp_path / "plans"
    args = ["plan", str(REPO / "scenarios" / "tiny-cpu.yaml"), *sum((["--set", x] for x in _EP4),
                                                                     []),
            "--trace", str(tmp_path / "plan.npz"), "--eval-trace", str(tmp_path / "held.npz"),
            "--planner", "contiguous", "eplb", "--json", "-o", str(out)]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "300 of 300 tokens" in doc["scored_on"]
    summary = json.loads((out / "evaluation.json").read_text())
    ctx = PricingContext.from_scenario(s)
    held = heldout.every_token(ctx, RoutingTrace("t", 8, expert_ids=trace.expert_ids[:, 300:]))
    for row in summary["planners"]:
        plan = load_plan(out / row["file"], s)
        again = heldout.score(ctx, held, plan)
        assert row["layer_time"] == pytest.approx(again.cost.layer_time)
        assert row["sends_per_token"] == pytest.approx(again.sends_per_token)
    assert {r["planner"] for r in summary["planners"]} == {"contiguous", "eplb"}


# --- planning against drift ---------------------------------------------------------------------

def _ep4_choices(tokens: int = 480):
    from moesim.placement import heldout
    s = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml", _EP4)
    ctx = PricingContext.from_scenario(s)
    trace = synthetic_trace(8, s.model.num_moe_layers, tokens, 2, seed=6)
    return ctx, heldout.every_token(ctx, trace)


def test_time_windows_cut_whole_rounds_and_keep_the_batch():
    ctx, choices = _ep4_choices()
    c = choices[0]                                   # 480 tokens = 120 rounds of 4 sources
    parts = objective.time_windows(c, 3, ctx.ep)
    assert [p.num_tokens for p in parts] == [160, 160, 160]
    assert all(p.weight == pytest.approx(3 * c.weight) for p in parts)
    assert np.array_equal(np.concatenate([p.experts for p in parts]), c.experts)
    assert all(np.array_equal(p.source, np.arange(160) % 4) for p in parts)
    assert objective.time_windows(c, 1, ctx.ep) == [c]


def test_drift_relabels_a_fraction_of_tokens_by_one_permutation():
    _, choices = _ep4_choices()
    c = choices[0]
    assert np.array_equal(objective.drifted(c, 0.0, np.random.default_rng(1), 8).experts,
                          c.experts)
    rng = np.random.default_rng(1)
    perm = np.random.default_rng(1).permutation(8)
    moved = objective.drifted(c, 1.0, rng, 8)
    assert np.array_equal(moved.experts, perm[c.experts])
    # Every expert's load moves to its image: the load profile is kept.
    before = np.bincount(c.experts.ravel(), minlength=8)
    assert np.array_equal(np.bincount(moved.experts.ravel(), minlength=8)[perm], before)


def test_robust_score_is_mean_and_worst_of_the_windows():
    ctx, choices = _ep4_choices()
    table = np.arange(8).reshape(4, 2)
    one = objective.robust_scorer(ctx, choices, 8, windows=1)
    assert one(1, table) == pytest.approx(objective.layer_scorer(ctx, choices, 8)(1, table))
    worst = objective.robust_scorer(ctx, choices, 8, windows=3, drift=0.0, worst_weight=1.0)
    mean = objective.robust_scorer(ctx, choices, 8, windows=3, drift=0.0, worst_weight=0.0)
    times = [objective.layer_cost(ctx, part, Placement(table[None], 8), 0).layer_time
             for part in objective.time_windows(choices[1], 3, ctx.ep)]
    assert worst(1, table) == pytest.approx(max(times))
    assert mean(1, table) == pytest.approx(np.mean(times))


@pytest.mark.parametrize("args, named", [
    (["--seed", "-1"], "--seed=-1 must be >= 0"),
    (["--max-evaluations", "-1"], "--max-evaluations=-1 must be >= 0"),
])
def test_plan_cli_refuses_negative_seed_and_budget(tmp_path, capsys, args, named):
    from moesim.cli import main
    assert main(["plan", "tiny-cpu", "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "internal error" not in err
    assert not (tmp_path / "out").exists()
