"""Failover re-planning: lost experts move into redundant live slots, nothing else moves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import InfeasiblePlacement
from moesim.placement import export
from moesim.placement.failover import live_device_load, replan_failed
from moesim.placement.placement import Placement
from moesim.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "scenarios" / "tiny-cpu.yaml"


def _placement(*devices: list[int], experts: int | None = None) -> Placement:
    """One layer, ``devices[d]`` the experts of device d's slots."""
    table = np.array([devices])
    return Placement(table, experts if experts is not None else int(table.max()) + 1)


# ----------------------------------------------------------------------------- by hand


def test_an_expert_with_a_live_replica_does_not_move():
    before = _placement([0, 1], [2, 0], [3, 1])
    plan = replan_failed(before, [0], None, expert_bytes=100.0)
    np.testing.assert_array_equal(plan.placement.slot_expert, before.slot_expert)
    assert plan.moved_slots.tolist() == [0]
    assert plan.moved_bytes == 0.0
    assert plan.lost_experts == [[]]


def test_lost_experts_take_the_least_loaded_redundant_slots_hottest_first():
    """Device 0 fails, losing experts 0 (load 6) and 1 (load 1). Redundant replicas: expert 2
    (10 tokens over 2 copies = 5 per replica, device 1) and expert 3 (4 over 2 = 2, device 2).
    Expert 0 goes first and takes expert 3's slot 0 on device 2 (2 < 5, lowest slot); expert 3
    is then down to one copy, so expert 1 takes expert 2's slot 0 on device 1."""
    before = _placement([0, 1], [2, 2], [3, 3])
    load = np.array([[6.0, 1.0, 10.0, 4.0]])
    plan = replan_failed(before, [0], load, expert_bytes=1e9)
    assert plan.placement.slot_expert[0].tolist() == [[0, 1], [1, 2], [0, 3]]
    assert plan.moved_slots.tolist() == [2]
    assert plan.moved_bytes == 2e9
    assert plan.lost_experts == [[]]
    assert plan.failed == (0,)


def test_same_node_donor_wins_when_device_node_is_given():
    """Device 0 (node 0) fails, losing expert 0. Per live replica: expert 1 (both slots of
    device 1, node 0) 8 / 2 = 4 tokens, expert 2 (devices 2, 3, node 1) 2 / 2 = 1, expert 3
    3 / 2 = 1.5: by load expert 2's slot on device 2 gives way; with nodes, expert 1's."""
    before = _placement([0, 3], [1, 1], [2, 3], [2, 3])
    load = np.array([[5.0, 8.0, 2.0, 3.0]])
    by_load = replan_failed(before, [0], load, 1.0)
    assert by_load.placement.slot_expert[0].tolist() == [[0, 3], [1, 1], [0, 3], [2, 3]]
    by_node = replan_failed(before, [0], load, 1.0, device_node=np.array([0, 0, 1, 1]))
    assert by_node.placement.slot_expert[0].tolist() == [[0, 3], [0, 1], [2, 3], [2, 3]]
    assert by_load.moved_slots.tolist() == by_node.moved_slots.tolist() == [1]


def test_too_little_redundancy_drops_the_coldest_lost_experts():
    """Device 1 fails, losing experts 2, 3, 4 (loads 3, 7, 1); only expert 1 has a spare copy,
    so the hottest lost expert (3) takes it and 2 and 4 are reported lost, without raising."""
    before = _placement([0, 1, 1], [2, 3, 4])
    load = np.array([[1.0, 1.0, 3.0, 7.0, 1.0]])
    plan = replan_failed(before, [1], load, expert_bytes=8.0)
    assert plan.placement.slot_expert[0].tolist() == [[0, 3, 1], [2, 3, 4]]
    assert plan.lost_experts == [[2, 4]]
    assert plan.moved_slots.tolist() == [1]
    assert plan.moved_bytes == 8.0


def test_no_redundancy_at_all_moves_nothing_and_loses_everything_on_the_device():
    before = _placement([0, 1], [2, 3])
    plan = replan_failed(before, [1], None, expert_bytes=1.0)
    np.testing.assert_array_equal(plan.placement.slot_expert, before.slot_expert)
    assert plan.lost_experts == [[2, 3]]


def test_live_device_load_splits_each_expert_over_its_live_copies():
    """Expert 0 (6 tokens) on devices 0 and 1: 3 each; with device 0 dead, 6 on device 1;
    expert 1 (2 tokens) only on dead device 0: dropped."""
    before = _placement([0, 1], [0, 2])
    load = np.array([[6.0, 2.0, 1.0]])
    assert live_device_load(before, [], load).tolist() == [[5.0, 4.0]]
    assert live_device_load(before, [0], load).tolist() == [[0.0, 7.0]]


@pytest.mark.parametrize("failed, load, match", [
    ([3], None, r"failed device 3 is not an EP-local index in 0\.\.2"),
    ([-1], None, r"failed device -1"),
    ([0], np.ones((2, 4)), r"load has shape \(2, 4\); expected \(1, 4\)"),
    ([0], -np.ones((1, 4)), r"load must be finite and >= 0"),
])
def test_bad_inputs_raise_infeasible_placement(failed, load, match):
    with pytest.raises(InfeasiblePlacement, match=match):
        replan_failed(_placement([0, 1], [2, 0], [3, 1]), failed, load, 1.0)


# ----------------------------------------------------------------------------- random placements


@st.composite
def _failure(draw):
    """A random placement (1-3 layers), a proper subset of failed devices, random loads."""
    ep = draw(st.integers(2, 5))
    slots = draw(st.integers(1, 4))
    experts = draw(st.integers(2, ep * slots))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers = rng.integers(1, 4)
    tables = [rng.permutation(np.concatenate([np.arange(experts),
                                              rng.integers(0, experts, ep * slots - experts)]))
              for _ in range(layers)]
    placement = Placement.from_physical(np.stack(tables), ep, experts)
    failed = draw(st.lists(st.integers(0, ep - 1), min_size=1, max_size=ep - 1, unique=True))
    load = rng.integers(0, 50, (layers, experts)).astype(float)
    node = np.arange(ep) // 2 if draw(st.booleans()) else None
    return placement, failed, load, node


@settings(max_examples=150, deadline=None)
@given(_failure())
def test_random_failures_move_exactly_the_lost_experts(case):
    """Each expert with no live copy costs one slot; when the live slots can hold every expert
    (E <= live slots) none stays lost, else exactly E - live slots do, the coldest; failed
    devices keep their slots; every changed slot held an expert that keeps a live copy."""
    placement, failed, load, node = case
    expert_bytes = 3.5e6
    plan = replan_failed(placement, failed, load, expert_bytes, device_node=node)
    dead = np.isin(np.arange(placement.ep), failed)
    live_slots = int((~dead).sum()) * placement.slots_per_device
    E = placement.num_experts
    assert plan.moved_bytes == plan.total_moved_slots * expert_bytes
    for layer in range(placement.num_layers):
        old, new = placement.slot_expert[layer], plan.placement.slot_expert[layer]
        np.testing.assert_array_equal(new[dead], old[dead])
        had_live = np.unique(old[~dead])
        was_lost = np.setdiff1d(np.arange(E), had_live)
        assert plan.lost_experts[layer] == sorted(plan.lost_experts[layer])
        assert len(plan.lost_experts[layer]) == max(0, E - live_slots)
        rehomed = np.setdiff1d(was_lost, plan.lost_experts[layer])
        assert plan.moved_slots[layer] == rehomed.size
        now_live = np.unique(new[~dead])
        np.testing.assert_array_equal(now_live, np.setdiff1d(np.arange(E),
                                                             plan.lost_experts[layer]))
        assert set(new[new != old].tolist()) == set(rehomed.tolist())
        if plan.lost_experts[layer] and rehomed.size:
            assert load[layer, rehomed].min() >= load[layer, plan.lost_experts[layer]].max()


# ----------------------------------------------------------------------------- CLI


def test_cli_replans_a_current_plan_and_reports_moved_bytes(tmp_path, capsys):
    """tiny-cpu, ep=2, 8 experts, 8 redundant slots (8 per device). Device 1 fails and holds
    the only copies of experts 6 and 7; device 0 holds two copies each of experts 0 and 1, so
    both lost experts move: 2 slots of expert_params x 4 bytes (fp32)."""
    s = load_scenario(TINY, ["placement.redundant_experts=8"])
    layers = s.model.num_moe_layers
    current = Placement(np.tile([[[0, 1, 2, 3, 4, 5, 0, 1], [6, 7, 2, 3, 4, 5, 6, 7]]],
                                (layers, 1, 1)), 8)
    export.write_plan(tmp_path / "current.json", current)
    out = tmp_path / "after.json"
    code = main(["plan", str(TINY), "--set", "placement.redundant_experts=8", "--failed-devices",
                 "1", "--current", str(tmp_path / "current.json"), "-o", str(out)])
    assert code == 0
    expert_bytes = s.model.expert_params * 4
    text = capsys.readouterr().out
    assert f"moved {2 * layers} slots = {2 * layers * expert_bytes / 1e9:.3f} GB" in text
    doc = json.loads(out.read_text())
    assert doc["metadata"]["failover"]["moved_bytes"] == 2 * layers * expert_bytes
    assert doc["metadata"]["failover"]["lost_experts"] == {}
    after = export.load_plan(out, s)
    for layer in range(layers):
        assert sorted(after.slot_expert[layer, 0].tolist()) == list(range(8))
        np.testing.assert_array_equal(after.slot_expert[layer, 1], current.slot_expert[layer, 1])


def test_cli_starts_from_the_scenarios_policy_plan(tmp_path, capsys):
    out = tmp_path / "after.json"
    assert main(["plan", str(TINY), "--failed-devices", "0", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "placement policy" in text and "wrote" in text
    assert export.read_plan(out).ep == 2


@pytest.mark.parametrize("value, fragment", [
    ("2", "--failed-devices: device 2 is out of range; expected comma-separated EP-local "
          "device indices in 0..1"),
    ("0,x", "--failed-devices: 'x' is not an integer"),
    ("0,1", "--failed-devices: all 2 devices of the EP group failed"),
])
def test_cli_bad_failed_devices_is_a_one_line_error(tmp_path, capsys, value, fragment):
    code = main(["plan", str(TINY), "--failed-devices", value, "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def test_cli_current_without_failed_devices_is_read_before_planning(tmp_path, capsys):
    # Without --failed-devices, --current is the rebalance advisor's running plan (issue 18);
    # a missing file is reported before any planner runs.
    code = main(["plan", str(TINY), "--current", "x.json", "-o", str(tmp_path / "p.json")])
    assert code == 2
    assert "x.json: no such plan file" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
