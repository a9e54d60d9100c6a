"""Calibrated profiles: table interpolation, the compute model using them, `moesim calibrate`,
the validation config against moesim's routing, and the accuracy benchmark's smoke run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from moesim import cli, routing, validation
from moesim.calibration import Curve, MeasuredTables
from moesim.calibration_cli import find_suite
from moesim.compute import KernelTimer
from moesim.errors import CalibrationError, MoESimError, ScenarioError
from moesim.placement.placement import Placement
from moesim.spec.hardware import load_hardware

from .conftest import HAND_PROFILE, REPO, merge

FFN_TOKENS = [1, 4, 16, 64, 256, 1024]
FFN_SECONDS = [1e-5, 2e-5, 5e-5, 1.6e-4, 6e-4, 2.4e-3]
CALIBRATION = {
    "metadata": {"host": "test"},
    "kernels": {
        "expert_ffn": [{"hidden": 256, "ffn": 512, "experts": 1, "tokens": FFN_TOKENS,
                        "seconds": FFN_SECONDS}],
        "gate": [{"hidden": 256, "experts": 4, "top_k": 1, "tokens": [1, 1024],
                  "seconds": [5e-6, 1e-4]}],
    },
}


def write_profile(tmp_path: Path, calibration: dict | None = CALIBRATION) -> Path:
    profile = merge(HAND_PROFILE, {"calibration": calibration} if calibration else {})
    path = tmp_path / "measured.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


# ---- interpolation --------------------------------------------------------------------------

def test_curve_is_exact_on_grid_points_and_a_power_law_between():
    c = Curve(np.array(FFN_TOKENS, float), np.array(FFN_SECONDS))
    np.testing.assert_allclose(c(np.array(FFN_TOKENS, float)), FFN_SECONDS, rtol=1e-12)
    # log-log midpoint of (4, 2e-5) and (16, 5e-5): sqrt(4 * 16) = 8 -> sqrt(2e-5 * 5e-5)
    assert c(8.0) == pytest.approx(np.sqrt(2e-5 * 5e-5), rel=1e-12)


def test_curve_is_monotone_between_grid_points():
    c = Curve(np.array(FFN_TOKENS, float), np.array(FFN_SECONDS))
    t = np.geomspace(1, 1024, 2001)
    s = c(t)
    assert np.all(np.diff(s) >= 0)
    i = np.searchsorted(FFN_TOKENS, t, side="right").clip(1, len(FFN_TOKENS) - 1)
    lo, hi = np.array(FFN_SECONDS)[i - 1], np.array(FFN_SECONDS)[i]
    assert np.all((s >= lo * (1 - 1e-12)) & (s <= hi * (1 + 1e-12)))


def test_curve_outside_grid_keeps_edge_below_and_scales_linearly_above():
    c = Curve(np.array([2.0, 8.0]), np.array([1.0, 3.0]))
    assert c(0.5) == 1.0                      # weight-bound: no cheaper than the edge
    assert c(32.0) == pytest.approx(12.0)     # compute-bound: 3 s x 32 / 8
    assert c.outside(np.array([0.5, 2.0, 8.0, 9.0])).tolist() == [True, False, False, True]


def test_curve_cuts_upward_spikes_to_a_running_minimum():
    c = Curve(np.array([1.0, 2.0, 4.0, 8.0]), np.array([1.0, 5.0, 2.0, 3.0]))
    assert c.seconds.tolist() == [1.0, 2.0, 2.0, 3.0]


# ---- reading a profile ----------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"seconds": [1e-5, 2e-5]}, r"expert_ffn\[0\]\.seconds: 2 values for 6"),
    ({"tokens": [1, 4, 4, 64, 256, 1024]}, r"expert_ffn\[0\]\.tokens: .* strictly increasing"),
    ({"seconds": [1e-5, -2e-5, 5e-5, 1.6e-4, 6e-4, 2.4e-3]}, r"expert_ffn\[0\]\.seconds"),
    ({"hidden": "big"}, r"expert_ffn\[0\]\.hidden: 'big' must be an integer"),
])
def test_bad_table_raises_calibration_error_naming_file_and_field(tmp_path, change, field):
    bad = merge(CALIBRATION, {})
    bad["kernels"]["expert_ffn"][0].update(change)
    path = write_profile(tmp_path, bad)
    with pytest.raises(CalibrationError, match=rf"measured\.yaml: calibration\.kernels\.{field}"):
        MeasuredTables.from_profile(load_hardware(str(path)))


def test_table_is_read_at_its_p10_where_recorded(tmp_path):
    with_p10 = merge(CALIBRATION, {})
    with_p10["kernels"]["expert_ffn"][0]["p10"] = [s / 2 for s in FFN_SECONDS]
    tables = MeasuredTables.from_profile(load_hardware(str(write_profile(tmp_path, with_p10))))
    assert tables.expert_ffn(256, 512, np.array([64.0])) == pytest.approx(0.8e-4)
    with_p10["kernels"]["expert_ffn"][0]["p10"] = [1e-5]
    with pytest.raises(CalibrationError, match=r"expert_ffn\[0\]\.p10: 1 values for 6"):
        MeasuredTables.from_profile(load_hardware(str(write_profile(tmp_path, with_p10))))


def test_profile_without_kernels_section_is_refused(tmp_path):
    path = write_profile(tmp_path, {"metadata": {}})
    with pytest.raises(CalibrationError, match="calibration.kernels: missing"):
        MeasuredTables.from_profile(load_hardware(str(path)))


def test_expert_ffn_sums_slots_and_no_table_means_roofline(tmp_path):
    tables = MeasuredTables.from_profile(load_hardware(str(write_profile(tmp_path))))
    assert tables.expert_ffn(256, 512, np.array([64.0, 0.0, 16.0])) == pytest.approx(2.1e-4)
    assert tables.expert_ffn(256, 1024, np.array([64.0])) is None     # no (256, 1024) table
    assert tables.attention(256, 128) is None
    assert tables.gate(256, 4, 2048) == pytest.approx(2e-4)           # beyond grid: linear
    assert tables.summary() == ("calibrated tables (expert_ffn 50%, 50% roofline, gate 100% "
                                "(100% beyond grid), attention 0% → roofline)")


def test_grouped_table_serves_when_no_single_expert_table(tmp_path):
    grouped = {"kernels": {"expert_ffn": [{"hidden": 256, "ffn": 512, "experts": 4,
                                           "tokens": [8, 32], "seconds": [1e-4, 4e-4]}]}}
    tables = MeasuredTables.from_profile(load_hardware(str(write_profile(tmp_path, grouped))))
    # 2 active slots of mean 32 tokens = half a group call at 32 tokens per expert
    assert tables.expert_ffn(256, 512, np.array([16.0, 48.0, 0.0])) == pytest.approx(2e-4)


def test_tables_change_kernel_timer_results(tmp_path):
    measured = load_hardware(str(write_profile(tmp_path)))
    from moesim.spec.models import load_model
    model = load_model({"base": "tiny-cpu", "num_experts": 4, "top_k": 1})
    plain = KernelTimer(model, measured.device)
    timed = KernelTimer(model, measured.device, tables=MeasuredTables.from_profile(measured))
    slots = np.array([64.0, 16.0])
    assert timed.experts(slots) == pytest.approx(1.6e-4 + 5e-5)
    assert plain.experts(slots) != pytest.approx(timed.experts(slots), rel=0.1)
    assert timed.attention(128, 64) == plain.attention(128, 64)       # no attention table


def test_moesim_run_reports_the_calibrated_source(tmp_path):
    profile = write_profile(tmp_path)
    scenario = {"name": "cal", "model": {"base": "tiny-cpu", "num_experts": 4, "top_k": 1,
                                         "num_layers": 2},
                "cluster": {"hardware": str(profile), "topology": "fat_tree", "nodes": 2},
                "parallelism": {"tp": 1, "pp": 1, "dp": 4, "ep": 4},
                "workload": {"mode": "training", "global_batch": 4, "seq_len": 64}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    assert cli.main(["run", str(path), "-o", str(tmp_path / "out"), "--no-trace"]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["compute_source"] == ("calibrated tables (expert_ffn 100%, gate 100%, "
                                        "attention 0% → roofline)")


# ---- validation: same routing and placement as the simulator --------------------------------

def layer(tmp_path, **kw):
    args = {"hidden": 256, "ffn": 512, "num_experts": 8, "top_k": 2, "tokens_per_rank": 64,
            "routing": {"distribution": "zipf", "zipf_s": 1.0}} | kw
    return validation.layer_scenario(hardware=write_profile(tmp_path, None), **args)


def test_layer_config_has_moesims_token_counts_per_rank_and_expert(tmp_path):
    s = layer(tmp_path, nodes=2, ranks_per_node=2)
    cfg = validation.layer_config(s)
    ids = np.array(cfg["routing"]["expert_ids"])                      # [ranks, tokens, k]
    assert ids.shape == (4, 64, 2)
    counts = np.stack([np.bincount(r.ravel(), minlength=8) for r in ids])
    costs = validation.cost_model(s)
    np.testing.assert_array_equal(counts, routing.counts_from_choices(costs.choices[0], 4, 8))
    per_slot = counts.sum(axis=0)[np.array(cfg["placement"])]        # [ranks, slots]
    np.testing.assert_array_equal(per_slot, costs.block(0).traffic.slot_tokens)


def test_layer_config_refuses_replicas_and_subsampling(tmp_path):
    s = layer(tmp_path)
    replicated = Placement(np.array([[[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]]]), 8)
    with pytest.raises(ScenarioError, match="replicated expert"):
        validation.layer_config(s, placement=replicated)
    sub = replace(s, routing=replace(s.routing, max_tokens_per_source=16))
    with pytest.raises(ScenarioError, match="max_tokens_per_source >= 64"):
        validation.layer_config(sub)


def test_predicted_layer_is_the_blocks_ops_in_sequence(tmp_path):
    s = layer(tmp_path)
    b = validation.cost_model(s).block(0)
    hand = (b.gate + b.permute / 2 + b.dispatch.duration + b.experts.max() + b.permute / 2
            + b.combine.duration)
    assert validation.predict_layer(s) == pytest.approx(hand, rel=1e-12)
    # a phase runs from the device's previous phase end, so it includes the barrier wait
    e = b.experts
    assert validation.predict_phases(s) == pytest.approx({
        "route": b.gate + b.permute / 2, "dispatch": b.dispatch.duration,
        "expert": e.max() + b.permute / 2, "combine": b.combine.duration + e.max() - e.min(),
        "total": hand}, rel=1e-12)
    assert e.max() > e.min()  # zipf routing: the wait is really there


def test_two_nodes_share_one_shaped_egress_each(tmp_path):
    # HAND: scale_up 100 GB/s, 1 us; scale_out 10 GB/s, 5 us; balanced routing, 2 x 2 ranks
    s = layer(tmp_path, nodes=2, ranks_per_node=2, routing={"distribution": "balanced"})
    b = validation.cost_model(s).block(0)
    tokens = b.traffic.tokens                                         # [src, dst]
    cross = max(tokens[:2, 2:].sum(), tokens[2:, :2].sum()) * 256 * 4  # bytes out of a node
    assert b.dispatch.duration == pytest.approx(cross / 10e9 + 5e-6, rel=0.02)


# ---- the CLI and the torch suite (subprocesses) ---------------------------------------------

def test_missing_suite_and_missing_torch_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(CalibrationError, match="not with the wheel"):
        find_suite(tmp_path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    args = cli.build_parser().parse_args(["calibrate", "--tiny", "-o", str(tmp_path / "x.yaml")])
    with pytest.raises(MoESimError, match=r"pip install 'moesim\[calibrate\]'"):
        cli.COMMANDS["calibrate"](args)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrate") / "tiny.yaml"
    done = subprocess.run([sys.executable, "-m", "moesim.cli", "calibrate", "--tiny",
                           "--nprocs", "2", "-o", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"cluster: {{hardware: {out}}}" in done.stdout
    return out


def test_moesim_calibrate_tiny_writes_a_loadable_profile(tiny_profile):
    profile = load_hardware(str(tiny_profile))
    tables = MeasuredTables.from_profile(profile)
    assert (64, 192, 1) in tables.expert_ffn_tables and "scale_up" in profile.links
    assert profile.calibration["metadata"]["threads"] == 1


def test_accuracy_benchmark_tiny_runs(tiny_profile, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--tiny",
                           "--profile", str(tiny_profile), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "placement ranking" in done.stdout and "median |error|" in done.stdout
    # the real layer computed exactly moesim's tokens per (rank, slot) in both configs
    assert "identical in the real layer and in moesim: 2/2 configs" in done.stdout
    rows = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    assert [r["name"] for r in rows] == ["tiny-zipf-packed", "tiny-zipf-balanced"]
    assert all(float(r["measured_s"]) > 0 and float(r["predicted_s"]) > 0 for r in rows)
