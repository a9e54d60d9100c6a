"""Faults: slowed devices and links, failed links re-routed, the strike time."""

from __future__ import annotations

import pytest

from moesim.assembly import simulate
from moesim.errors import TopologyError


def _compute_seconds(sim, device: int) -> float:
    total = 0.0
    for span in sim.spans:
        run = sim.runs[(span.stage, span.kind, span.chunk)]
        total += sum(float(run.end[i, device] - run.start[i, device])
                     for i, op in enumerate(run.ops) if op.stream == "compute")
    return total


def test_slowed_device_adds_exactly_its_compute_time(make_scenario):
    # Balanced routing, no overlap: every compute op sits between barriers, so doubling one
    # device's compute adds exactly that device's compute time to the step.
    # (Gradient sync not overlapped, so the longer backward does not hide more of it.)
    serial = {"communication": {"dp_overlap": False}}
    healthy = simulate(make_scenario(serial))
    slowed = simulate(make_scenario({**serial, "faults": [{"kind": "device", "device": 2,
                                                           "slowdown": 2}]}))
    extra = _compute_seconds(healthy, 2)
    assert slowed.result.step_time == pytest.approx(healthy.result.step_time + extra, rel=1e-9)
    assert slowed.result.faults["healthy_step_time"] == pytest.approx(healthy.result.step_time)


def test_fault_striking_after_the_step_changes_nothing(make_scenario):
    healthy = simulate(make_scenario()).result
    late = simulate(make_scenario({"faults": [{"kind": "device", "device": 0, "slowdown": 3,
                                               "at": "10 s"}]})).result
    early = simulate(make_scenario({"faults": [{"kind": "device", "device": 0,
                                                "slowdown": 3}]})).result
    assert late.step_time == pytest.approx(healthy.step_time, rel=1e-12)
    assert early.step_time > healthy.step_time


def test_slowed_nic_slows_the_alltoall(make_scenario):
    healthy = simulate(make_scenario()).result
    slow = simulate(make_scenario({"faults": [{"kind": "link", "link": ["n0.gpu0", "leaf0"],
                                               "slowdown": 4}]})).result
    assert slow.breakdown["exposed_alltoall"] > healthy.breakdown["exposed_alltoall"]


RING = {
    "cluster": {"topology": "explicit", "nodes": 1,
                "devices": [{"name": f"d{i}", "node": i} for i in range(4)],
                "links": [{"a": f"d{i}", "b": f"d{(i + 1) % 4}", "bandwidth": "10 GB/s",
                           "latency": "1 us"} for i in range(4)]},
}


def test_failed_link_reroutes_around_a_ring(make_scenario):
    healthy = simulate(make_scenario(RING)).result
    cut = simulate(make_scenario({**RING, "faults": [{"kind": "link",
                                                      "link": ["d0", "d1"]}]})).result
    # d0 <-> d1 traffic now takes three hops the other way: more load on the remaining links.
    assert cut.breakdown["exposed_alltoall"] > healthy.breakdown["exposed_alltoall"]


def test_failed_links_that_cut_a_device_off_are_an_error(make_scenario):
    faults = [{"kind": "link", "link": ["d0", "d1"]}, {"kind": "link", "link": ["d3", "d0"]}]
    with pytest.raises(TopologyError, match="d0"):
        simulate(make_scenario({**RING, "faults": faults}))


def test_slowdown_between_zero_and_one_is_rejected(make_scenario):
    from moesim.errors import ScenarioError
    with pytest.raises(ScenarioError, match="slowdown"):
        make_scenario({"faults": [{"kind": "device", "device": 0, "slowdown": 0.5}]})


def test_failed_device_drops_tokens_of_experts_without_a_live_replica(make_scenario):
    # 4 devices, 4 experts, one per device, balanced top-1 routing: device 1 fails. The three
    # live sources each send T/4 tokens to expert 1, which has no replica: all dropped.
    sim = simulate(make_scenario({"faults": [{"kind": "device", "device": 1}]}))
    layer = sim.scenario.model.moe_layer_ids[0]
    tr = sim.costs.block(layer).traffic
    tokens = 256
    assert tr.dropped == pytest.approx(3 * tokens / 4)
    assert tr.counts[1].sum() == 0 and tr.slot_tokens[1].sum() == 0
    assert tr.counts.sum() == pytest.approx(3 * tokens - 3 * tokens / 4)
    per_step = sim.result.faults["dropped_tokens_due_to_faults"]
    assert per_step == pytest.approx(3 * tokens / 4 * 4 * 1)   # x 4 MoE layers x 1 micro-batch


def test_replicas_take_over_a_failed_devices_experts(make_scenario):
    # 8 slots for 4 experts: every expert has two replicas on different devices, so nothing drops.
    sim = simulate(make_scenario({"placement": {"policy": "round_robin",
                                                "redundant_experts": 4},
                                  "faults": [{"kind": "device", "device": 1}]}))
    assert sim.result.faults["dropped_tokens_due_to_faults"] == 0
    tr = sim.costs.block(sim.scenario.model.moe_layer_ids[0]).traffic
    assert tr.slot_tokens[1].sum() == 0 and tr.counts.sum() == pytest.approx(3 * 256)
