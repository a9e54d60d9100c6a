"""Runtime invariants fail on deliberately broken inputs (an invariant that cannot fail checks
nothing), and hold on real traffic; the all-groups link check sees groups that share a link."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moesim.assembly import scenario_placement, simulate
from moesim.errors import InternalError
from moesim.pricing.context import PricingContext
from moesim.sim.costs import CostModel
from moesim.sim.invariants import check_collective, check_traffic
from moesim.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent


def first_block(name: str, overrides=()):
    s = load_scenario(REPO / "scenarios" / name, list(overrides))
    ctx = PricingContext.from_scenario(s)
    costs = CostModel(ctx, scenario_placement(s))
    return ctx, costs.block(s.model.moe_layer_ids[0])


def check(ctx, traffic) -> None:
    check_traffic(traffic, ctx.tokens_per_source, ctx.top_k,
                  ctx.hidden * ctx.dispatch_bytes_per_elem, ctx.device_node, ctx.algorithm, "t")


@pytest.fixture(scope="module")
def direct():
    return first_block("mixtral-8x7b-infer-1node.yaml", ["communication.alltoall=direct"])


@pytest.fixture(scope="module")
def hierarchical():
    return first_block("published/s2-gpt-oss-120b-automodel-64xh100.yaml")


def test_real_traffic_passes(direct, hierarchical):
    for ctx, block in (direct, hierarchical):
        check(ctx, block.traffic)
        check_collective(block.dispatch, ctx.topology.capacity, "t")


def test_bytes_moved_between_sources_break_the_per_source_check(direct):
    # Swap the bytes of two flows with different sources: the totals (all the old check
    # compared) stay equal, the per-source sums do not.
    ctx, block = direct
    tr = block.traffic
    src = tr.pairs[:, 0]
    a = 0
    b = int(np.flatnonzero((src != src[a]) & (tr.dispatch_bytes != tr.dispatch_bytes[a]))[0])
    swapped = tr.dispatch_bytes.copy()
    swapped[[a, b]] = swapped[[b, a]]
    assert swapped.sum() == pytest.approx(tr.dispatch_bytes.sum())
    with pytest.raises(InternalError, match="each device sends"):
        check(ctx, replace(tr, dispatch_bytes=swapped))


def test_flows_to_the_wrong_destination_break_the_per_destination_check(direct):
    ctx, block = direct
    tr = block.traffic
    pairs = tr.pairs.copy()
    # Re-address one flow to another destination, same source: per-source sums unchanged.
    row = 0
    others = [d for d in range(ctx.ep) if d not in (pairs[row, 0], pairs[row, 1])]
    pairs[row, 1] = others[0]
    with pytest.raises(InternalError, match="each device receives"):
        check(ctx, replace(tr, pairs=pairs))


def test_slot_tokens_moved_between_devices_break_token_conservation(direct):
    ctx, block = direct
    tr = block.traffic
    slots = tr.slot_tokens.copy()
    slots[0, 0] += 5.0
    slots[1, 0] -= 5.0
    with pytest.raises(InternalError, match="receives vs its slots compute"):
        check(ctx, replace(tr, slot_tokens=slots))


def test_hierarchical_nvlink_bytes_are_checked_per_device(hierarchical):
    ctx, block = hierarchical
    tr = block.traffic
    node = ctx.device_node
    local = np.flatnonzero(node[tr.pairs[:, 0]] == node[tr.pairs[:, 1]])
    bent = tr.dispatch_bytes.copy()
    bent[local[0]] *= 1.5
    with pytest.raises(InternalError, match="NVLink dispatch bytes"):
        check(ctx, replace(tr, dispatch_bytes=bent))


def test_hierarchical_network_copies_are_bounded(hierarchical):
    ctx, block = hierarchical
    tr = block.traffic
    node = ctx.device_node
    cross = np.flatnonzero(node[tr.pairs[:, 0]] != node[tr.pairs[:, 1]])
    bent = tr.dispatch_bytes.copy()
    bent[cross] *= ctx.top_k + 1          # more copies than token-expert pairs
    with pytest.raises(InternalError, match="network copies"):
        check(ctx, replace(tr, dispatch_bytes=bent))


@pytest.fixture(scope="module")
def allgather():
    return first_block("mixtral-8x7b-infer-1node.yaml", ["communication.alltoall=allgather"])


def test_allgather_traffic_passes_and_a_short_source_breaks_it(allgather):
    ctx, block = allgather
    tr = block.traffic
    check(ctx, tr)
    check_collective(block.dispatch, ctx.topology.capacity, "t")
    # Drop one flow: its source sends, and its destination receives, one token set too few.
    with pytest.raises(InternalError, match="all-gather dispatch bytes each device sends"):
        check(ctx, replace(tr, pairs=tr.pairs[1:], dispatch_bytes=tr.dispatch_bytes[1:]))


def test_allgather_flows_swapped_between_destinations_break_the_pair_check(allgather):
    # Re-address 0->2 to 3 and 1->3 to 2: every device still sends and receives its total
    # (the per-device sums hold), but 0 now sends to 3 twice and to 2 never.
    ctx, block = allgather
    tr = block.traffic
    pairs = tr.pairs.copy()
    a = int(np.flatnonzero((pairs[:, 0] == 0) & (pairs[:, 1] == 2))[0])
    b = int(np.flatnonzero((pairs[:, 0] == 1) & (pairs[:, 1] == 3))[0])
    pairs[a, 1], pairs[b, 1] = 3, 2
    with pytest.raises(InternalError, match=r"\(source, destination\) pair"):
        check(ctx, replace(tr, pairs=pairs))


def test_allgather_with_a_failed_device_holds_and_a_flow_to_it_breaks_it(make_scenario):
    # Four devices, device 1 failed: the simulation (which checks its invariants) runs, the
    # three live devices gather among themselves (6 flows, none touching device 1); a flow
    # re-addressed to the failed device is caught.
    sim = simulate(make_scenario({"communication": {"alltoall": "allgather"},
                                  "faults": [{"kind": "device", "device": 1}]}))
    ctx = sim.costs.ctx
    tr = sim.costs.block(sim.scenario.model.moe_layer_ids[0]).traffic
    assert len(tr.pairs) == 6 and not np.any(tr.pairs == 1)
    check(ctx, tr)
    pairs = tr.pairs.copy()
    pairs[0, 1] = 1
    with pytest.raises(InternalError, match="each device receives"):
        check(ctx, replace(tr, pairs=pairs))


def test_a_link_over_its_capacity_breaks_the_collective_check(direct):
    ctx, block = direct
    coll = block.dispatch
    over = coll.link_bytes.copy()
    over[0] = ctx.topology.capacity[coll.link_index[0]] * coll.duration * 1.01
    with pytest.raises(InternalError, match="more bytes than capacity"):
        check_collective(replace(coll, link_bytes=over), ctx.topology.capacity, "t")


# Two nodes joined by one uplink; ranks alternate nodes, so each of the two EP groups
# (ranks 0-1 and 2-3) spans both nodes and sends all its dispatch over that uplink.
SHARED_UPLINK = {
    "cluster": {"topology": "explicit", "nodes": 2,
                "devices": [{"name": f"d{i}", "node": i % 2} for i in range(4)],
                "links": [*({"a": f"d{i}", "b": f"s{i % 2}", "bandwidth": "1000 GB/s",
                             "latency": "0 us"} for i in range(4)),
                          {"a": "s0", "b": "s1", "bandwidth": "10 GB/s", "latency": "0 us"}]},
    "parallelism": {"tp": 1, "pp": 1, "dp": 4, "ep": 2},
    "workload": {"mode": "prefill", "global_batch": 4, "seq_len": 256, "micro_batch": 1},
}


def test_groups_sharing_an_uplink_are_reported(make_scenario):
    sim = simulate(make_scenario(SHARED_UPLINK))
    check = sim.result.links["all_groups"]
    # Each group alone: its dispatch crosses s0->s1 and s1->s0, each direction carrying one
    # device's half of the tokens. Every byte is on the 10 GB/s uplink (device links are 100x
    # faster), so the all-to-all lasts ~bytes/10 GB/s; both groups at once put twice the bytes
    # on the uplink in that time: load 2 (a little less, for the time the fast links add).
    assert check["groups"] == check["groups_checked"] == 2
    assert check["link"] in ("s0->s1", "s1->s0")
    assert check["worst_link_load"] == pytest.approx(2.0, rel=0.02)
    ratio = f"{check['worst_link_load']:.2f}x its capacity"
    assert any(ratio in note and "groups share links" in note for note in sim.result.notes)


def test_disjoint_groups_are_not_reported(make_scenario):
    sim = simulate(make_scenario())       # 4 devices, one EP group of 4
    assert sim.result.links["all_groups"]["worst_link_load"] <= 1.0 + 1e-6
    assert not any("groups share links" in note for note in sim.result.notes)
