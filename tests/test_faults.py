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
    # 4 devices, 4 experts, one per device, balanced top-1 routing: device 1 fails. Its own T
    # tokens are lost; the three live sources each send T/4 tokens to expert 1, which has no
    # replica: all dropped too.
    sim = simulate(make_scenario({"faults": [{"kind": "device", "device": 1}]}))
    layer = sim.scenario.model.moe_layer_ids[0]
    tr = sim.costs.block(layer).traffic
    tokens = 256
    assert tr.dropped == pytest.approx(tokens + 3 * tokens / 4)
    assert tr.counts[1].sum() == 0 and tr.slot_tokens[1].sum() == 0
    assert tr.counts.sum() == pytest.approx(3 * tokens - 3 * tokens / 4)
    per_step = sim.result.faults["dropped_tokens_due_to_faults"]
    # x 4 MoE layers x 1 micro-batch
    assert per_step == pytest.approx((tokens + 3 * tokens / 4) * 4 * 1)


def test_replicas_take_over_a_failed_devices_experts(make_scenario):
    # 8 slots for 4 experts: every expert has two replicas on different devices, so only the
    # failed device's own 256 tokens are lost (in each of the 4 MoE layers).
    sim = simulate(make_scenario({"placement": {"policy": "round_robin",
                                                "redundant_experts": 4},
                                  "faults": [{"kind": "device", "device": 1}]}))
    assert sim.result.faults["dropped_tokens_due_to_faults"] == pytest.approx(256 * 4)
    tr = sim.costs.block(sim.scenario.model.moe_layer_ids[0]).traffic
    assert tr.slot_tokens[1].sum() == 0 and tr.counts.sum() == pytest.approx(3 * 256)


def _tiny(overrides=()):
    from moesim.spec.scenario import load_scenario
    return simulate(load_scenario(REPO_SCENARIOS / "tiny-cpu.yaml", list(overrides))).result


REPO_SCENARIOS = __import__("pathlib").Path(__file__).resolve().parent.parent / "scenarios"


def test_failing_every_device_never_speeds_the_step_up_and_loses_every_token():
    healthy = _tiny()
    faults = ",".join(f"{{kind: device, device: {d}}}" for d in range(4))
    broken = _tiny([f"faults=[{faults}]"])
    assert broken.step_time >= healthy.step_time
    # tiny-cpu: per step 8 sequences x 256 tokens x top-2 x 4 MoE layers, all lost.
    assert broken.dropped_tokens == pytest.approx(8 * 256 * 2 * 4)
    assert broken.mfu == pytest.approx(0.0, abs=1e-12)


def test_a_failed_ep_group_drops_its_tokens_and_the_step_waits_for_the_others():
    healthy = _tiny()
    broken = _tiny(["faults=[{kind: device, device: 0}, {kind: device, device: 1}]"])
    assert broken.step_time >= healthy.step_time
    assert broken.dropped_tokens > 0 and broken.mfu < healthy.mfu


def test_a_fault_after_the_step_changes_nothing():
    healthy = _tiny()
    late = _tiny(["faults=[{kind: device, device: 0, at: '100 s'}]"])
    assert late.step_time == healthy.step_time
    assert late.dropped_tokens == healthy.dropped_tokens == 0
    assert late.faults["step_time_change_pct"] == 0


def test_two_faults_for_one_device_are_refused():
    from moesim.errors import ScenarioError
    from moesim.spec.scenario import load_scenario
    with pytest.raises(ScenarioError, match=r"faults\[1\]: faults\[0\] already names"):
        load_scenario(REPO_SCENARIOS / "tiny-cpu.yaml",
                      ["faults=[{kind: device, device: 0}, {kind: device, device: 0, "
                       "slowdown: 2}]"])


def test_two_batch_overlap_with_an_odd_micro_batch_runs():
    # Half of one token per device: the routing sample's weight carries the fraction.
    r = _tiny(["communication.overlap=two_batch", "workload.seq_len=1"])
    assert r.step_time > 0 and r.dropped_tokens == 0


def test_validate_refuses_the_link_faults_run_would_refuse(capsys):
    from moesim.cli import main
    fault = "faults=[{kind: link, link: [x, y]}]"
    for command in (["validate", "tiny-cpu"], ["run", "tiny-cpu", "--no-trace"]):
        assert main([*command, "--set", fault]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "tiny-cpu.yaml: faults:" in err and "no such link" in err
