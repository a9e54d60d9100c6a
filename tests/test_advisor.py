"""Rebalance advisor: bytes and time to move expert weights, stall models, payoff."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.placement import advisor, heldout
from moesim.placement.export import write_plan
from moesim.placement.placement import Placement
from moesim.placement.traces import synthetic_trace
from moesim.pricing.context import PricingContext
from moesim.spec.scenario import load_scenario

TINY = Path(__file__).resolve().parent.parent / "scenarios" / "tiny-cpu.yaml"
# tiny-cpu on 2 nodes x 2 CPU devices, one EP group of 4, 16 experts (4 slots per device), fp32.
SETS = ["parallelism.pp=1", "parallelism.dp=4", "parallelism.ep=4", "model.num_experts=16"]
SCALE_OUT = 400e6 / 8 * 0.81     # cpu-local.yaml scale_out: 400 Mb/s x efficiency 0.81 (B/s)
SCALE_UP = 2e9 * 1.0             # cpu-local.yaml scale_up: 2 GB/s x efficiency 1.0 (B/s)
CURRENT = np.arange(16).reshape(1, 4, 4)   # device d holds experts 4d..4d+3


def _setup(layers: int = 1):
    s = load_scenario(TINY, SETS)
    ctx = PricingContext.from_scenario(s)
    assert list(ctx.device_node) == [0, 0, 1, 1]
    expert_bytes = s.model.expert_params * 4.0                     # fp32 weights
    trace = synthetic_trace(16, s.model.num_moe_layers, 512, s.model.top_k, seed=1)
    choices = heldout.every_token(ctx, trace)
    return s, ctx, expert_bytes, choices


def _swap(table: np.ndarray, pairs: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = table.copy()
    for d1, s1, d2, s2 in pairs:
        out[:, d1, s1], out[:, d2, s2] = table[:, d2, s2], table[:, d1, s1]
    return out


def _advice(layers_changed: np.ndarray, stall: str = "blocking") -> advisor.Advice:
    s, ctx, expert_bytes, choices = _setup()
    current = np.repeat(CURRENT, s.model.num_moe_layers, axis=0)
    new = current.copy()
    new[: len(layers_changed)] = layers_changed
    return advisor.advise(ctx, Placement(current, 16), Placement(new, 16),
                          choices[: s.model.num_moe_layers], expert_bytes, stall=stall)


def test_migration_time_by_hand_on_two_nodes():
    """Swapping k experts between GPU0 (node 0) and GPU2 (node 1) sends k experts' weights each
    way, one flow per direction over the scale-out links; swapping with GPU1 (same node) goes over
    the scale-up link. Each extra expert adds expert_bytes / bandwidth to the move time (the
    paths' latency is the same in both cases, so it cancels)."""
    s, ctx, expert_bytes, _ = _setup()
    one = _swap(CURRENT, [(0, 3, 2, 3)])
    two = _swap(CURRENT, [(0, 3, 2, 3), (0, 2, 2, 2)])
    a, b = _advice(one), _advice(two)
    assert a.moved_slots == 2 and b.moved_slots == 4
    assert a.moved_bytes == pytest.approx(2 * expert_bytes)
    assert b.moved_bytes == pytest.approx(4 * expert_bytes)
    assert b.layer_move_time[0] - a.layer_move_time[0] == pytest.approx(expert_bytes / SCALE_OUT,
                                                                         rel=1e-6)
    assert all(t == 0.0 for t in a.layer_move_time[1:])          # other layers unchanged
    near_one = _advice(_swap(CURRENT, [(0, 3, 1, 3)]))
    near_two = _advice(_swap(CURRENT, [(0, 3, 1, 3), (0, 2, 1, 2)]))
    assert near_two.layer_move_time[0] - near_one.layer_move_time[0] == pytest.approx(
        expert_bytes / SCALE_UP, rel=1e-6)
    # Blocking: serving stops for the whole copy; payoff = ceil(stall / gain) when it gains.
    assert a.stall == pytest.approx(a.move_time)
    if a.gain > 0:
        assert a.payoff_passes == math.ceil(a.stall / a.gain)
    else:
        assert a.payoff_passes == math.inf


def test_layerwise_stall_only_counts_what_compute_does_not_hide():
    one = _swap(CURRENT, [(0, 3, 2, 3)])
    blocking, layerwise = _advice(one), _advice(one, stall="layerwise")
    idle = sum(c for c in _compute_per_layer(one))
    assert layerwise.stall == pytest.approx(max(0.0, blocking.move_time - idle))
    assert layerwise.stall <= blocking.stall


def _compute_per_layer(first_layer: np.ndarray) -> list[float]:
    from moesim.placement import objective
    s, ctx, _, choices = _setup()
    table = np.repeat(CURRENT, s.model.num_moe_layers, axis=0)
    table[0] = first_layer
    return [c.compute for c in objective.plan_cost(ctx, choices, Placement(table, 16)).layers]


def test_same_plan_relabelled_moves_nothing_and_never_pays_off():
    """A plan that only renumbers nodes and GPUs is aligned back onto the current one."""
    relabelled = CURRENT[:, [3, 2, 1, 0], ::-1]
    a = _advice(relabelled)
    assert a.moved_slots == 0 and a.moved_bytes == 0 and a.stall == 0
    assert a.gain == pytest.approx(0.0, abs=1e-12) and a.payoff_passes in (0.0, math.inf)


def test_a_copy_already_on_the_receiving_device_is_free():
    old = np.array([[0, 1], [0, 2], [3, 4], [5, 6]])
    new = np.array([[1, 0], [0, 2], [3, 4], [5, 6]])     # GPU0 re-slots its own experts
    pairs, nbytes, changed = advisor.weight_copies(old, new, np.array([0, 0, 1, 1]), 10.0)
    assert changed == 2 and len(pairs) == 0 and nbytes.sum() == 0
    new = np.array([[0, 3], [0, 2], [1, 4], [5, 6]])     # 3 to GPU0 (from GPU2), 1 to GPU2
    pairs, nbytes, changed = advisor.weight_copies(old, new, np.array([0, 0, 1, 1]), 10.0)
    assert changed == 2 and sorted(map(tuple, pairs.tolist())) == [(0, 2), (2, 0)]


def test_plan_current_prints_the_advice(tmp_path, capsys):
    s, ctx, _, _ = _setup()
    current = np.repeat(CURRENT, s.model.num_moe_layers, axis=0)
    write_plan(tmp_path / "current.json", Placement(current, 16))
    args = ["plan", str(TINY), *sum((["--set", x] for x in SETS), []), "--planner", "eplb",
            "--current", str(tmp_path / "current.json"), "-o", str(tmp_path / "new.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "advice" in out and "pays off after" in out and "stall (layerwise)" in out
    assert main(args + ["--json", "--stall", "blocking"]) == 0
    doc = json.loads(capsys.readouterr().out)
    a = doc["advice"]
    assert a["stall_model"] == "blocking" and a["stall"] == pytest.approx(a["move_time"])
    assert a["gain"] == pytest.approx(a["current_time"] - a["new_time"])


def test_a_fading_gain_pays_off_later_or_never():
    """Gains measured on consecutive windows of 10 passes: 4, 2, 1 us halve every 10 passes, so
    tau = 10 / ln 2 = 14.43 passes and g0 = 4 x 2**0.5 = 5.657 us (the centre of the first window
    is 5 passes in). All the gain it will ever bring is g0 x tau = 81.6 us: a 40 us stall pays
    off after -tau ln(1 - 40 / 81.6) = 9.7 -> 10 passes (a steady 4 us gain: 10 as well), a
    90 us stall never does (a steady gain: after 23)."""
    d = advisor.fit_decay([4e-6, 2e-6, 1e-6], passes_per_window=10.0)
    assert d.tau == pytest.approx(10 / math.log(2))
    assert d.g0 == pytest.approx(4e-6 * 2 ** 0.5)
    total = d.g0 * d.tau
    assert d.payoff(40e-6) == math.ceil(-d.tau * math.log(1 - 40e-6 / total)) == 10
    assert d.payoff(90e-6) == math.inf
    assert advisor.Decay(4e-6, math.inf).payoff(90e-6) == 23
    # A gain gone by the second window: only the first counts, no fading fit from one point.
    gone = advisor.fit_decay([3e-6, -1e-6, 2e-6], passes_per_window=5.0)
    assert gone.g0 == pytest.approx(3e-6) and gone.tau == math.inf
    # A gain that grows does not fade; no gain at all never pays.
    assert advisor.fit_decay([1e-6, 2e-6], 5.0).tau == math.inf
    assert advisor.fit_decay([-1e-6, 2e-6], 5.0).payoff(1e-6) == math.inf


def test_plan_current_on_a_trace_measures_how_the_gain_fades(tmp_path, capsys):
    """With a per-token trace the advisor prices both plans on 4 consecutive windows of the
    pricing part, and its payoff is the fitted decay's (recomputed here from what it prints)."""
    trace = Path(__file__).resolve().parent.parent / "scenarios" / "traces" / \
        "stdlib-moe-32e-top4.npz"
    sets = sum((["--set", x] for x in ["model.num_experts=32", "model.top_k=4"]), [])
    base = ["plan", str(TINY), *sets, "--trace", str(trace)]
    assert main([*base, "--planner", "contiguous", "-o", str(tmp_path / "current.json")]) == 0
    capsys.readouterr()
    assert main([*base, "--planner", "eplb", "--current", str(tmp_path / "current.json"),
                 "-o", str(tmp_path / "new.json"), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["advice"]
    gains = a["window_gains"]
    assert len(gains) == 4 and a["passes_per_window"] > 0
    d = advisor.fit_decay(gains, a["passes_per_window"])
    assert a["gain_decay_passes"] == pytest.approx(d.tau)
    assert a["payoff_passes"] == (d.payoff(a["stall"]) if math.isfinite(d.tau) else
                                  (math.ceil(a["stall"] / a["gain"]) if a["gain"] > 0
                                   else math.inf))
    assert main([*base, "--planner", "eplb", "--current", str(tmp_path / "current.json"),
                 "-o", str(tmp_path / "new.json")]) == 0
    assert "drift" in capsys.readouterr().out
