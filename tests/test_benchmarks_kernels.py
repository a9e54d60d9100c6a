"""The measured-kernel benchmark stays runnable without aiconfigurator: its smoke run, its moesim
side against the simulator's own step, the workloads it builds against the measured calls, the
H200 variant's datasheet figures, and the committed reference file's internal consistency."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moesim.assembly import simulate
from moesim.pricing.context import PricingContext
from moesim.spec.hardware import load_hardware
from moesim.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import kernels_vs_measured as kvm  # noqa: E402

TINY = REPO / "scenarios" / "tiny-cpu.yaml"


def tiny_decode(micro_batches: int = 1) -> list[str]:
    # 4 tokens x top-2 = 8 copies per device = one of each expert: even load, all-to-all traffic.
    return ["parallelism={tp: 1, pp: 1, dp: 4, ep: 4}", "routing.distribution=balanced",
            f"workload={{mode: decode, global_batch: {16 * micro_batches}, seq_len: 1, "
            "micro_batch: 4, context_len: 64}"]


def test_smoke_runs_without_aiconfigurator(capsys):
    assert kvm.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "tiny-cpu decode (moesim ms)" in out
    for wid in kvm.WORKLOADS:
        assert f"{wid} h100_sxm: measured for" in out


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_components_add_up_to_the_simulated_step(micro_batches):
    # Two paths: the benchmark's plain sum of per-block costs, and the engine's schedule of the
    # same ops. With pp = 1, no overlap and even routing (every device equally loaded), the
    # forward-only step is the sum of all components, once per micro-batch, plus the one kernel
    # the benchmark leaves out (aiconfigurator's graph has none): the softmax over each
    # micro-batch's FP32 logits, 4 tokens x 1,000 vocabulary x 4 bytes.
    s = load_scenario(TINY, tiny_decode(micro_batches))
    comps = kvm.moesim_components(s)
    # shared_output_add is the part of shared_dense some measured graphs lack (none here).
    assert set(comps) == {*kvm.COMPONENTS, "shared_output_add"}
    assert comps["shared_output_add"] == 0.0
    assert comps["all_to_all"] > 0 and comps["routed_experts"] > 0 and comps["attention"] > 0
    softmax = PricingContext.from_scenario(s).timer.elementwise(4 * 1000 * 4)
    assert sum(comps[c] for c in kvm.COMPONENTS) + micro_batches * softmax == pytest.approx(
        simulate(s).result.step_time, rel=1e-9)


def test_micro_batches_scale_the_step():
    one = kvm.moesim_components(load_scenario(TINY, tiny_decode(1)))
    two = kvm.moesim_components(load_scenario(TINY, tiny_decode(2)))
    for name in kvm.COMPONENTS:
        assert two[name] == pytest.approx(2 * one[name], rel=1e-12)


def test_h200_variant_has_datasheet_memory_and_nothing_else_changes():
    h100 = load_hardware("h100-sxm")
    h200 = kvm.h200_variant(h100)
    assert h200.device.memory == 141e9 and h200.device.memory_bandwidth == 4.8e12
    assert h200.device.peak_flops == h100.device.peak_flops
    assert h200.device.matmul_efficiency == h100.device.matmul_efficiency
    assert h200.device.memory_efficiency == h100.device.memory_efficiency
    assert h200.links["scale_up"].bandwidth == 900e9 / 2
    assert h200.links["scale_out"] == h100.links["scale_out"]


def test_h200_variant_speeds_up_a_memory_bound_kernel_by_the_bandwidth_ratio():
    # W2's decode lm head + embedding are memory-bound at 64 tokens: two kernels (head GEMM,
    # embedding gather; the softmax over the logits is not compared), each a fixed launch floor
    # plus bytes over HBM bandwidth, so the time less the floors scales by 3.35 / 4.8 TB/s.
    scenario = kvm.build("W2")
    floors = 2 * scenario.hardware.device.kernel_overhead
    runs = scenario.workload.global_batch // scenario.parallelism.dp // scenario.workload.micro_batch
    h100 = kvm.moesim_components(scenario)["lm_head_embedding"] - runs * floors
    h200 = kvm.moesim_components(kvm.build("W2", variant=True))["lm_head_embedding"] - runs * floors
    assert floors > 0
    assert h200 == pytest.approx(h100 * 3.35 / 4.8, rel=1e-9)


def test_workloads_match_the_measured_calls():
    data = json.loads(kvm.DATA.read_text())
    for wid, (_, _, _, key) in kvm.WORKLOADS.items():
        s = kvm.build(wid)
        call = data["workloads"][key]["call"]
        par, wl = s.parallelism, s.workload
        assert s.hardware.name == "h100-sxm"
        assert (par.tp, par.dp, par.ep) == (1, call["attention_dp_size"], call["moe_ep_size"])
        assert s.routing.distribution == "balanced_random"   # even load, random pairs
        assert wl.global_batch // par.dp == wl.micro_batch == call["batch_size"]
        if call["mode"] == "static_gen":
            assert (wl.mode, wl.seq_len, wl.context_len) == ("decode", 1, call["isl"])
        else:
            assert (wl.mode, wl.seq_len) == ("prefill", call["isl"])


def test_reference_file_components_are_its_ops_summed():
    data = json.loads(kvm.DATA.read_text())
    assert "aiconfigurator 0.12.0" in data["source"] and data["license"] == "Apache-2.0"
    assert kvm.DATA.stat().st_size < 300_000   # three systems (H100, H200, B200), a few ops each
    owner = {op: comp for comp, ops in data["component_ops"].items() for op in ops}
    for w in data["workloads"].values():
        for rows in w["results"].values():
            for entry in rows.values():
                if "error" in entry:
                    continue
                summed = dict.fromkeys(entry["components_ms"], 0.0)
                for op, ms in entry["ops_ms"].items():
                    summed[owner[op.split("_", 1)[1]]] += ms
                assert entry["unmapped_ms"] == {}
                # A routed-expert time read off one table row must be an even-routing row.
                for row in entry.get("moe_served_by", []):
                    assert row["distribution"] in ("balanced", "uniform")
                for comp, ms in entry["components_ms"].items():
                    if ms is None:   # partial entry: routing-dependent, not measured evenly
                        assert "partial" in entry and comp in ("routed_experts", "all_to_all")
                        assert summed[comp] == 0.0   # and none of its ops was kept
                        continue
                    assert ms == pytest.approx(summed[comp], abs=1e-3)


def test_drop_writes_the_profile_without_those_tables_and_refuses_unknown_kinds(tmp_path):
    import yaml

    from moesim.errors import MoESimError
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"calibration": {"kernels": {
        "gemm": [], "mla_module_generation": [], "moe": []}}}))
    (tmp_path / "x").mkdir()
    out = Path(kvm.without_tables(str(profile), ["mla_module_generation"], tmp_path / "x"))
    assert sorted(yaml.safe_load(out.read_text())["calibration"]["kernels"]) == ["gemm", "moe"]
    assert sorted(yaml.safe_load(profile.read_text())["calibration"]["kernels"]) == [
        "gemm", "mla_module_generation", "moe"]                  # the original is untouched
    with pytest.raises(MoESimError, match="no measured tables of kind attention_context"):
        kvm.without_tables(str(profile), ["attention_context"], tmp_path)
