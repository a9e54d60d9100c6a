"""Tests for moesim.network: max-min rates, the fluid flow simulation and collective costs.

Expected numbers are derived by hand in the comments; the property tests check the max-min
fairness certificate (Bertsekas & Gallager: a feasible allocation is max-min fair iff every flow
crosses a saturated link on which its rate is the largest) and compare the event loop with a
naive reference simulation that recomputes every rate from scratch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InternalError
from moesim.network import (
    FlowGroup,
    all_to_all_alpha_beta,
    alltoall_bound,
    effective_bandwidth,
    hierarchical_all_reduce,
    link_time,
    max_min_rates,
    message_efficiency,
    p2p,
    paths_to_csr,
    ring_all_gather,
    ring_all_reduce,
    ring_reduce_scatter,
    simulate_concurrent,
    simulate_flows,
    tree_all_reduce,
    wire_bytes,
)
from moesim.spec.hardware import LinkSpec


def _rates(paths, capacity, active=None):
    ptr, links = paths_to_csr(paths)
    return max_min_rates(ptr, links, np.asarray(capacity, float), active)


def _simulate(sizes, starts, paths, capacity, latency, **kw):
    ptr, links = paths_to_csr(paths)
    return simulate_flows(
        np.asarray(sizes, float),
        np.asarray(starts, float),
        ptr,
        links,
        np.asarray(capacity, float),
        np.asarray(latency, float),
        **kw,
    )


def _link_loads(paths, values, n_links):
    loads = np.zeros(n_links)
    for path, value in zip(paths, values):
        for link in path:
            loads[link] += value
    return loads


def _assert_max_min_fair(paths, capacity, rates):
    """Feasible, and every flow has a bottleneck: a saturated link where its rate is the max."""
    capacity = np.asarray(capacity, float)
    finite = [r if path else 0.0 for path, r in zip(paths, rates)]
    load = _link_loads(paths, finite, capacity.size)
    assert np.all(load <= capacity * (1 + 1e-9))
    for f, path in enumerate(paths):
        if not path:
            assert rates[f] == np.inf
            continue
        assert rates[f] > 0

        def bottleneck(link, f=f):
            on_link = [rates[g] for g, p in enumerate(paths) if link in p]
            saturated = load[link] >= capacity[link] * (1 - 1e-9)
            return saturated and rates[f] >= max(on_link) * (1 - 1e-9)

        assert any(bottleneck(link) for link in path), f"flow {f} has no bottleneck"


def _reference_finish(sizes, starts, paths, capacity, latency):
    """Naive fluid simulation: every rate recomputed from scratch at every event."""
    ptr, links = paths_to_csr(paths)
    sizes, starts = np.asarray(sizes, float), np.asarray(starts, float)
    capacity = np.asarray(capacity, float)
    finish = starts.copy()
    rem = sizes.copy()
    done = (sizes == 0) | (np.diff(ptr) == 0)
    t = starts.min()
    while not done.all():
        active = ~done & (starts <= t)
        upcoming = starts[~done & (starts > t)]
        next_start = upcoming.min() - t if upcoming.size else np.inf
        if not active.any():
            t += next_start
            continue
        rate = max_min_rates(ptr, links, capacity, active)
        step = min((rem[active] / rate[active]).min(), next_start)
        rem[active] -= rate[active] * step
        t += step
        ended = active & (rem <= 1e-9 * sizes)
        finish[ended] = t
        done |= ended
    moving = (sizes > 0) & (np.diff(ptr) > 0)
    path_latency = np.array([sum(latency[link] for link in p) for p in paths])
    return np.where(moving, finish + path_latency, finish)


# --- max_min_rates ---


def test_paths_to_csr_packs_paths_in_order():
    ptr, links = paths_to_csr([[3, 1], [], [2]])
    assert ptr.tolist() == [0, 2, 2, 3]
    assert links.tolist() == [3, 1, 2]
    ptr, links = paths_to_csr([])
    assert ptr.tolist() == [0] and links.size == 0


def test_symmetric_three_flows_all_get_half_a_link():
    # A (cap 10): flows 0, 1; B (cap 10): flows 1, 2. Both links saturate at level 5.
    assert _rates([[0], [0, 1], [1]], [10, 10]).tolist() == [5, 5, 5]


def test_asymmetric_three_flows():
    # B (cap 4) saturates first at 2 (flows 1, 2); A (cap 10) then gives flow 0 the rest, 8.
    assert _rates([[0], [0, 1], [1]], [10, 4]).tolist() == pytest.approx([8, 2, 2])


def test_three_level_chain():
    # L0 (cap 1): a, b, c -> 1/3 each. L1 (cap 2): c, d -> d = 2 - 1/3 = 5/3.
    # L2 (cap 10): d, e -> e = 10 - 5/3 = 25/3.
    rates = _rates([[0], [0], [0, 1], [1, 2], [2]], [1, 2, 10])
    assert rates == pytest.approx([1 / 3, 1 / 3, 1 / 3, 5 / 3, 25 / 3], rel=1e-12)


def test_inactive_flows_get_nothing_and_empty_paths_get_infinity():
    rates = _rates([[0], [0], [], []], [10], active=np.array([True, False, True, False]))
    assert rates.tolist() == [10, 0, np.inf, 0]


@st.composite
def networks(draw, max_links=5, max_flows=7):
    n_links = draw(st.integers(1, max_links))
    capacity = draw(st.lists(st.floats(1, 100), min_size=n_links, max_size=n_links))
    link = st.integers(0, n_links - 1)
    path = st.lists(link, unique=True, max_size=min(4, n_links))
    paths = draw(st.lists(path, min_size=1, max_size=max_flows))
    return paths, capacity


@settings(max_examples=150, deadline=None)
@given(networks())
def test_rates_are_max_min_fair(network):
    paths, capacity = network
    _assert_max_min_fair(paths, capacity, _rates(paths, capacity))


# --- simulate_flows ---


def test_one_flow_over_one_link():
    # 1000 B at 100 B/s: last byte at 10 s, plus 0.5 s latency.
    result = _simulate([1000], [0], [[0]], [100], [0.5])
    assert result.finish.tolist() == [10.5]
    assert result.link_bytes.tolist() == [1000]
    assert result.link_busy.tolist() == [10]
    assert result.makespan == 10.5
    assert result.events == 1


def test_two_flows_sharing_a_link_finish_together():
    # Each gets 50 B/s: 1000 B take 20 s = 2 * b / bw, plus latency 1 + 2.
    result = _simulate([1000, 1000], [0, 0], [[0, 1], [0, 1]], [100, 400], [1, 2])
    assert result.finish.tolist() == [23, 23]
    assert result.events == 1
    assert result.link_busy.tolist() == [20, 20]


def test_later_flow_takes_over_the_bandwidth():
    # Link 10 B/s. f0 (100 B, t=0) alone until t=5: 50 B left. Both at 5 B/s: f0 ends at 15,
    # f1 has 50 B left and then gets 10 B/s: ends at 20. f2 (10 B, t=30) runs alone: ends at 31.
    result = _simulate([100, 100, 10], [0, 5, 30], [[0], [0], [0]], [10], [0])
    assert result.finish == pytest.approx([15, 20, 31], rel=1e-12)
    # Rates computed at t = 0, 5, 15 and 30.
    assert result.events == 4
    assert result.link_busy == pytest.approx([21])  # idle from 20 to 30
    assert result.makespan == pytest.approx(31)


def test_zero_size_and_local_flows_finish_at_start_without_latency():
    result = _simulate([0, 50, 10], [1, 2, 0], [[0], [], [0]], [10], [3])
    assert result.finish.tolist() == [1, 2, 4]
    assert result.makespan == 4


def test_no_flows():
    result = _simulate([], [], [], [10], [0])
    assert result.finish.size == 0 and result.makespan == 0 and result.events == 0


def _star_2x2():
    """2 nodes x 2 devices. Links: PCIe up/down per device, NIC up/down per node, NVLink."""
    pcie_up, pcie_down, nic_up, nic_down = [0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11]
    nvlink = {(0, 1): 12, (1, 0): 13, (2, 3): 14, (3, 2): 15}
    capacity = [32.0] * 8 + [25.0] * 4 + [100.0] * 4
    latency = [1e-6] * 8 + [2e-6] * 4 + [0.5e-6] * 4
    paths = []
    for src in range(4):
        for dst in range(4):
            if src == dst:
                continue
            if src // 2 == dst // 2:
                paths.append([nvlink[src, dst]])
            else:
                paths.append([pcie_up[src], nic_up[src // 2], nic_down[dst // 2], pcie_down[dst]])
    return paths, capacity, latency


def test_symmetric_all_to_all_meets_the_bound():
    # Each NIC uplink carries 4 flows of 1000 B at 25 B/s: 160 s, the busiest link, plus the
    # inter-node path latency 1 + 2 + 2 + 1 us.
    paths, capacity, latency = _star_2x2()
    result = _simulate([1000.0] * 12, [0.0] * 12, paths, capacity, latency)
    bound = alltoall_bound(result.link_bytes, np.array(capacity))
    assert bound == pytest.approx(160, rel=1e-12)
    assert result.makespan == pytest.approx(bound + 6e-6, rel=1e-9)


def test_link_bytes_are_conserved():
    rng = np.random.default_rng(7)
    paths, capacity, latency = _star_2x2()
    sizes = rng.uniform(0, 1000, len(paths))
    starts = rng.choice([0.0, 3.0, 7.5], len(paths))
    result = _simulate(sizes, starts, paths, capacity, latency)
    expected = _link_loads(paths, sizes, len(capacity))
    assert result.link_bytes == pytest.approx(expected, rel=1e-9)


@st.composite
def flow_sets(draw):
    paths, capacity = draw(networks())
    n = len(paths)
    sizes = draw(st.lists(st.one_of(st.just(0.0), st.floats(1, 1000)), min_size=n, max_size=n))
    starts = draw(st.lists(st.sampled_from([0.0, 0.0, 2.5, 7.0]), min_size=n, max_size=n))
    latency = draw(st.lists(st.floats(0, 1), min_size=len(capacity), max_size=len(capacity)))
    return sizes, starts, paths, capacity, latency


@settings(max_examples=150, deadline=None)
@given(flow_sets())
def test_simulation_invariants(case):
    sizes, starts, paths, capacity, latency = case
    result = _simulate(*case)
    capacity = np.array(capacity)
    moving = [s if p else 0.0 for s, p in zip(sizes, paths)]
    assert result.link_bytes == pytest.approx(_link_loads(paths, moving, capacity.size), rel=1e-9)
    # No link moves more than capacity * busy time, and none is busy beyond the makespan.
    assert np.all(result.link_bytes <= capacity * result.link_busy * (1 + 1e-9))
    assert np.all(result.link_busy <= result.makespan * (1 + 1e-9))
    assert result.makespan >= alltoall_bound(result.link_bytes, capacity) * (1 - 1e-9)
    reference = _reference_finish(sizes, starts, paths, capacity, np.array(latency))
    assert result.finish == pytest.approx(reference, rel=1e-6, abs=1e-9)


def _all_to_all_64ish(n_devices=16, per_node=4, seed=3):
    """A smaller version of the benchmark all-to-all: unequal sizes, many warm-started events."""
    n_nodes = n_devices // per_node
    dev_out, dev_in = np.arange(n_devices), n_devices + np.arange(n_devices)
    nic_up, nic_down = (
        2 * n_devices + np.arange(n_nodes),
        2 * n_devices + n_nodes + np.arange(n_nodes),
    )
    capacity = np.r_[np.full(2 * n_devices, 450.0), np.full(2 * n_nodes, 100.0)]
    paths = [
        [dev_out[s], dev_in[d]]
        if s // per_node == d // per_node
        else [dev_out[s], nic_up[s // per_node], nic_down[d // per_node], dev_in[d]]
        for s in range(n_devices)
        for d in range(n_devices)
        if s != d
    ]
    sizes = np.random.default_rng(seed).uniform(100, 200, len(paths))
    return sizes, paths, capacity


def test_many_events_agree_with_the_reference():
    sizes, paths, capacity = _all_to_all_64ish()
    latency = np.full(capacity.size, 1e-3)
    starts = np.zeros(len(paths))
    result = _simulate(sizes, starts, paths, capacity, latency)
    assert result.events == len(paths)  # unequal sizes: every completion is its own event
    reference = _reference_finish(sizes, starts, paths, capacity, latency)
    assert result.finish == pytest.approx(reference, rel=1e-9)


def test_coarse_merging_trades_events_for_bounded_error():
    sizes, paths, capacity = _all_to_all_64ish()
    latency = np.zeros(capacity.size)
    starts = np.zeros(len(paths))
    exact = _simulate(sizes, starts, paths, capacity, latency)
    coarse = _simulate(sizes, starts, paths, capacity, latency, rtol=1e-2)
    assert coarse.events < exact.events / 4
    assert coarse.link_bytes == pytest.approx(exact.link_bytes, rel=1e-9)
    assert coarse.makespan >= alltoall_bound(coarse.link_bytes, capacity)
    assert np.abs(coarse.finish - exact.finish).max() <= 0.05 * exact.makespan


@pytest.mark.parametrize(
    ("field", "kwargs", "match"),
    [
        ("sizes", {"sizes": [-1.0]}, "sizes must be finite and >= 0"),
        ("starts", {"starts": [np.nan]}, "starts must be finite"),
        ("capacity", {"capacity": [0.0]}, "capacity must be a 1-D array of finite values > 0"),
        ("latency", {"latency": [-1.0]}, "latency must be finite and >= 0"),
        ("paths", {"paths": [[1]]}, r"path_links must lie in \[0, 1\)"),
        ("rtol", {"rtol": -1.0}, "rtol=-1.0 must be >= 0"),
    ],
)
def test_bad_inputs_are_internal_errors(field, kwargs, match):
    args = {"sizes": [1.0], "starts": [0.0], "paths": [[0]], "capacity": [1.0], "latency": [0.0]}
    args.update(kwargs)
    rtol = args.pop("rtol", 1e-12)
    with pytest.raises(InternalError, match=match):
        _simulate(
            args["sizes"],
            args["starts"],
            args["paths"],
            args["capacity"],
            args["latency"],
            rtol=rtol,
        )


def test_malformed_csr_is_an_internal_error():
    with pytest.raises(InternalError, match="path_ptr must rise from 0"):
        max_min_rates(np.array([0, 2, 1]), np.array([0]), np.array([1.0]))
    with pytest.raises(InternalError, match=r"active has shape \(3,\)"):
        _rates([[0]], [1.0], active=np.ones(3, bool))


def test_alltoall_bound_is_the_busiest_link():
    assert alltoall_bound(np.array([10.0, 40.0, 0.0]), np.array([5.0, 10.0, 1.0])) == 4.0
    assert alltoall_bound(np.array([]), np.array([])) == 0.0


# --- collective costs ---


def test_ring_collectives_by_hand():
    # n=4, 1000 B, 100 B/s, 1 s: 3 hops + 3/4 * 10 s = 10.5; all-reduce twice that.
    assert ring_reduce_scatter(1000, 4, 100, 1) == pytest.approx(10.5)
    assert ring_all_gather(1000, 4, 100, 1) == pytest.approx(10.5)
    assert ring_all_reduce(1000, 4, 100, 1) == pytest.approx(21)
    # n=2: 2 hops + 2 * 1/2 * 10 s = 12.
    assert ring_all_reduce(1000, 2, 100, 1) == pytest.approx(12)


def test_tree_all_reduce_by_hand():
    # 2 * ceil(log2 n) hops + 2 * 10 s.
    assert tree_all_reduce(1000, 2, 100, 1) == pytest.approx(22)
    assert tree_all_reduce(1000, 4, 100, 1) == pytest.approx(24)
    assert tree_all_reduce(1000, 5, 100, 1) == pytest.approx(26)


def test_hierarchical_all_reduce_by_hand():
    # Intra RS on 4 ranks: 3*1 + 3/4*1000/100 = 10.5; inter all-reduce of 250 B over 2 nodes:
    # 2*1*5 + 2*(1/2)*250/10 = 35; intra AG: 10.5. Total 56.
    assert hierarchical_all_reduce(1000, 2, 4, 100, 1, 10, 5) == pytest.approx(56)
    # Degenerate levels fall back to a flat ring.
    assert hierarchical_all_reduce(1000, 1, 4, 100, 1, 10, 5) == ring_all_reduce(1000, 4, 100, 1)
    assert hierarchical_all_reduce(1000, 3, 1, 100, 1, 10, 5) == ring_all_reduce(1000, 3, 10, 5)


def test_all_to_all_and_p2p_by_hand():
    assert all_to_all_alpha_beta(1000, 4, 100, 1) == pytest.approx(10.5)
    assert all_to_all_alpha_beta(1000, 2, 100, 1) == pytest.approx(6)
    assert p2p(1000, 100, 1) == pytest.approx(11)
    assert p2p(0, 100, 1) == 0


def test_one_rank_costs_nothing():
    for cost in (
        ring_all_reduce,
        ring_reduce_scatter,
        ring_all_gather,
        tree_all_reduce,
        all_to_all_alpha_beta,
    ):
        assert cost(1000, 1, 100, 1) == 0
    assert hierarchical_all_reduce(1000, 1, 1, 100, 1, 10, 5) == 0


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_all_reduce_matches_a_simulated_ring(n):
    # 2(n-1) steps; in each, every rank sends nbytes/n to its ring successor over its own link.
    # The flow model prices a step as latency + (nbytes/n)/bw.
    nbytes, bw, lat = 1e6, 1e9, 2e-6
    paths = [[rank] for rank in range(n)]
    step = _simulate([nbytes / n] * n, [0.0] * n, paths, [bw] * n, [lat] * n).makespan
    assert 2 * (n - 1) * step == pytest.approx(ring_all_reduce(nbytes, n, bw, lat), rel=1e-12)


@pytest.mark.parametrize("n", [2, 4, 5])
def test_all_to_all_matches_a_simulated_pairwise_exchange(n):
    # Round k: rank r sends nbytes/n to rank (r + k) % n through its uplink and the peer's
    # downlink on a star. n - 1 rounds of latency + (nbytes/n)/bw each.
    nbytes, bw, lat = 8e6, 1e10, 1e-6
    up, down = list(range(n)), list(range(n, 2 * n))
    total = 0.0
    for k in range(1, n):
        paths = [[up[r], down[(r + k) % n]] for r in range(n)]
        latency = [lat / 2] * (2 * n)
        total += _simulate([nbytes / n] * n, [0.0] * n, paths, [bw] * (2 * n), latency).makespan
    assert total == pytest.approx(all_to_all_alpha_beta(nbytes, n, bw, lat), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 4, 100, 1), "nbytes=-1 must be finite and >= 0"),
        ((1000, 0, 100, 1), "rank count n=0"),
        ((1000, 2.5, 100, 1), "rank count n=2.5"),
        ((1000, 4, 0, 1), "bandwidth bw=0"),
        ((1000, 4, 100, -1), "latency lat=-1"),
    ],
)
def test_bad_collective_inputs_are_internal_errors(args, match):
    with pytest.raises(InternalError, match=match):
        ring_all_reduce(*args)


def test_tree_beats_ring_only_on_latency():
    # Small messages: the log-depth tree wins; large ones: the ring's (n-1)/n bandwidth term wins.
    assert tree_all_reduce(1e3, 64, 1e11, 5e-6) < ring_all_reduce(1e3, 64, 1e11, 5e-6)
    # 64 ranks: the ring saves 2/64 of 2 * 0.1 s = 3.1 ms of transfer, pays 0.57 ms more latency.
    assert tree_all_reduce(1e10, 64, 1e11, 5e-6) > ring_all_reduce(1e10, 64, 1e11, 5e-6)


# --- Message-size curve and per-collective cost (LinkSpec.half_efficiency_size) ---

# 100 GB/s line rate, 80% ceiling (80 GB/s), half rate at 100 kB, 2 us latency.
_CURVED = LinkSpec(kind="nvlink", bandwidth=100e9, latency=2e-6, efficiency=0.8,
                   half_efficiency_size=1e5)


def test_tiny_message_is_latency_bound():
    # link_time(s) = 2 us + (s + 1e5) / 8e10: at 1 byte 2 us + 1.2500125 us; doubling a tiny
    # message adds one byte-time (12.5 ps), i.e. the time is the constant latency + h / B_eff.
    assert link_time(1.0, _CURVED) == pytest.approx(2e-6 + 100_001 / 8e10, rel=1e-12)
    assert link_time(2.0, _CURVED) - link_time(1.0, _CURVED) == pytest.approx(1 / 8e10)
    assert effective_bandwidth(1.0, _CURVED) == pytest.approx(8e10 / 100_001)


def test_huge_message_reaches_the_efficiency_ceiling():
    # 1 TB: efficiency 0.8 * 1e12 / (1e12 + 1e5) = 0.8 * (1 - 1e-7); time ~ 1e12 / 8e10 = 12.5 s.
    assert effective_bandwidth(1e12, _CURVED) == pytest.approx(0.8e11 * 1e12 / (1e12 + 1e5))
    assert effective_bandwidth(1e12, _CURVED) / 8e10 > 1 - 2e-7
    assert link_time(1e12, _CURVED) == pytest.approx(12.5, rel=1e-6)
    # At the half-size the message moves at half the ceiling: 40 GB/s.
    assert effective_bandwidth(1e5, _CURVED) == pytest.approx(4e10)


def test_no_curve_by_default_keeps_the_old_cost():
    flat = LinkSpec(kind="infiniband", bandwidth=50e9, latency=4e-6, efficiency=0.97)
    sizes = np.array([1.0, 1e3, 1e9])
    assert np.allclose(message_efficiency(sizes, flat), 0.97)
    # link_time = p2p's alpha-beta with the large-message bandwidth, for every size.
    for s in sizes:
        assert link_time(s, flat) == pytest.approx(p2p(s, flat.effective_bandwidth, 4e-6))
    assert link_time(0.0, _CURVED) == 0.0


def test_wire_bytes_charge_one_half_size_per_message():
    # 1,000 B in 250 B messages with h = 500: 4 messages x (250 + 500) = 3,000 wire bytes; as one
    # message 1,000 + 500 = 1,500; no curve: unchanged; an empty flow stays empty.
    assert wire_bytes(np.array([1000.0]), 500.0, 250.0).tolist() == [3000.0]
    assert wire_bytes(np.array([1000.0]), 500.0).tolist() == [1500.0]
    assert wire_bytes(np.array([1000.0]), 0.0, 250.0).tolist() == [1000.0]
    assert wire_bytes(np.array([0.0]), 500.0).tolist() == [0.0]


def test_wire_bytes_in_the_flow_simulation_agree_with_link_time():
    # One message over one link of capacity B_eff: the fluid simulation of its wire bytes plus
    # the link latency is link_time, by two independent paths.
    for s in (1.0, 3e4, 1e5, 7e8):
        res = _simulate(wire_bytes(np.array([s]), _CURVED.half_efficiency_size), [0.0], [[0]],
                        [_CURVED.effective_bandwidth], [_CURVED.latency])
        assert res.makespan == pytest.approx(link_time(s, _CURVED), rel=1e-12)


def _group(name, sizes, paths):
    ptr, links = paths_to_csr(paths)
    return FlowGroup(name, np.asarray(sizes, float), np.zeros(len(sizes)), ptr, links)


def test_two_groups_sharing_one_uplink_each_get_half():
    # Links: 0, 1 = each group's own NIC (100 B/s), 2 = the shared leaf uplink (100 B/s), 3 = a
    # third group's private path (100 B/s). Groups a and b each move 1,000 B across the uplink:
    # alone 1,000 / 100 = 10 s; together the uplink splits 50/50, so each takes 20 s. Group c
    # shares nothing and keeps its 10 s.
    cap, lat = np.full(4, 100.0), np.zeros(4)
    groups = [_group("a", [1000.0], [[0, 2]]), _group("b", [1000.0], [[1, 2]]),
              _group("c", [1000.0], [[3]])]
    out = simulate_concurrent(groups, cap, lat)
    assert out.names == ("a", "b", "c")
    assert out.alone.tolist() == pytest.approx([10.0, 10.0, 10.0])
    assert out.finish.tolist() == pytest.approx([20.0, 20.0, 10.0])
    assert out.slowdown.tolist() == pytest.approx([2.0, 2.0, 1.0])
    assert out.result.link_bytes[2] == pytest.approx(2000.0)


def test_contention_never_speeds_a_group_up():
    rng = np.random.default_rng(3)
    cap, lat = rng.uniform(1, 10, 6), np.zeros(6)
    groups = [_group(str(g), rng.uniform(1, 50, 4),
                     [rng.choice(6, size=2, replace=False).tolist() for _ in range(4)])
              for g in range(3)]
    out = simulate_concurrent(groups, cap, lat)
    assert np.all(out.finish >= out.alone * (1 - 1e-9))
