"""Tests of calibrate/gpu_check.py: the one-GPU check, run end to end in --dry-run on the CPU,
plus its pieces (the case list, moesim's prediction, the profile merge, the FP8 expert)."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibrate import gpu_check  # noqa: E402
from calibrate.gpu_check import GPU_CASES, LayerCase, predict_seconds, tiny_case  # noqa: E402
from moesim.calibration import MeasuredTables  # noqa: E402
from moesim.spec.hardware import DeviceSpec, load_hardware  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, str]:
    """One ``--dry-run`` as CI launches it: (output folder, wall seconds, stdout)."""
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "calibrate" / "gpu_check.py"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, time.monotonic() - t0, proc.stdout


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "gpu_check" / "moe_layer.csv").open() as stream:
        return list(csv.DictReader(stream))


def test_dry_run_finishes_in_seconds(dry_run):
    assert dry_run[1] < 30


def test_dry_run_profile_loads_with_moesim_and_has_every_case_shape(dry_run):
    out = dry_run[0]
    profile = load_hardware(str(out / "hardware_profiles" / "measured" /
                                "cpu-dry-run-measured.yaml"))
    assert profile.name == "cpu-dry-run-measured"
    tables = MeasuredTables.from_profile(profile)
    for case in map(tiny_case, GPU_CASES):
        assert (case.hidden, case.ffn, 1) in tables.expert_ffn_tables
        assert (case.hidden, case.experts) in tables.gate_tables
        assert case.hidden in tables.attention_tables
    decode = profile.calibration["kernels"]["attention_decode"]
    assert [t["batch"] for t in decode] == [1, 32]
    for table in decode:
        assert len(table["seconds"]) == len(table["context"]) >= 2
        assert all(s > 0 for s in table["seconds"])


def test_dry_run_table_has_one_row_per_case_with_positive_finite_ratios(dry_run):
    out, _, stdout = dry_run
    rows = _rows(out)
    assert [r["case"] for r in rows] == [c.name for c in GPU_CASES]
    fp8 = json.loads((out / "gpu_check" / "summary.json").read_text())["fp8"]
    for row in rows:
        if row["dtype"] == "fp8" and not fp8["supported"]:
            assert row["status"].startswith("skipped")
            continue
        assert row["status"] == "ok"
        measured = float(row["measured_ms"])
        for key in ("datasheet", "measured_prof"):
            ratio = float(row[f"{key}_ratio"])
            assert math.isfinite(ratio) and ratio > 0
            assert ratio == pytest.approx(float(row[f"{key}_ms"]) / measured, rel=1e-9)
    for row in rows:
        assert f"| {row['case']} |" in stdout  # the printed table has every row too


def test_dry_run_summary_is_the_median_and_worst_error_of_the_table(dry_run):
    out = dry_run[0]
    summary = json.loads((out / "gpu_check" / "summary.json").read_text())["summary"]
    rows = [r for r in _rows(out) if r["status"] == "ok"]
    for key in ("datasheet", "measured_prof"):
        errors = [abs(float(r[f"{key}_ratio"]) - 1) for r in rows]
        assert summary[key]["cases"] == len(rows)
        assert summary[key]["median_abs_error"] == pytest.approx(statistics.median(errors))
        assert summary[key]["worst_abs_error"] == pytest.approx(max(errors))
    text = (out / "gpu_check" / "moe_layer.md").read_text()
    assert "median |error|" in text


def test_dry_run_layer_routes_every_token_to_top_k_experts(dry_run):
    state = json.loads((dry_run[0] / "gpu_check" / "summary.json").read_text())
    for case in map(tiny_case, GPU_CASES):
        if case.name not in state["cases"]:
            continue  # an FP8 case skipped on a torch without float8
        slots = state["cases"][case.name]["slot_tokens"]
        assert len(slots) == case.experts
        assert sum(slots) == case.tokens * case.top_k


def test_dry_run_collectives_at_world_size_one_are_the_identity(dry_run):
    coll = json.loads((dry_run[0] / "gpu_check" / "summary.json").read_text())["collectives"]
    assert coll["backend"] == "gloo" and coll["world_size"] == 1
    assert set(coll["ops"]) == {"all_to_all", "all_to_all_uneven", "all_reduce", "all_gather"}
    for op in coll["ops"].values():
        assert op["correct"] and op["seconds"] > 0


def test_gpu_cases_span_the_issue_ranges():
    assert 8 <= len(GPU_CASES) <= 12
    assert len({c.name for c in GPU_CASES}) == len(GPU_CASES)
    assert min(c.hidden for c in GPU_CASES) == 2048 and max(c.hidden for c in GPU_CASES) == 7168
    assert min(c.experts for c in GPU_CASES) == 8 and max(c.experts for c in GPU_CASES) == 256
    assert {c.top_k for c in GPU_CASES} == {1, 2, 8}
    assert min(c.tokens for c in GPU_CASES) == 1 and max(c.tokens for c in GPU_CASES) == 8192
    assert {c.dtype for c in GPU_CASES} == {"bf16", "fp8"}
    # FP8 GEMMs (cuBLASLt) need K and N multiples of 16, at full and at dry-run size.
    for case in (*GPU_CASES, *map(tiny_case, GPU_CASES)):
        assert case.hidden % 16 == 0 and case.ffn % 16 == 0
        assert case.top_k <= case.experts


def test_prediction_is_gate_plus_experts_plus_permute_by_hand():
    """Roofline by hand on a device of round numbers (1000 FLOP/s, 100 B/s, efficiency 1, no
    SM count and no launch floor, so every kernel is max(FLOPs / peak, bytes / bandwidth)).

    hidden 4, ffn 8, 2 experts, top-1, 2 tokens both routed to expert 0, BF16 (2 bytes):
    gate: router GEMM [2, 4] x [4, 2]: max(32 FLOP -> 0.032, (16 + 16 B in, 2*2*4 = 16 B of FP32
          logits out) -> 0.48) = 0.48; top-k reads the logits three ways: 48 B -> 0.48; fused
          residual add + norm (read input and residual, write both) 2*4*4*2 = 64 B -> 0.64;
          gate = 1.6 s.
    experts: up GEMM [2, 4] x [4, 16]: max(256 FLOP, 16 + 128 + 64 B) -> 2.08; down GEMM
          [2, 8] x [8, 4]: max(128 FLOP, 32 + 64 + 16 B) -> 1.12; SwiGLU 2*3*8*2 = 96 B -> 0.96;
          experts = 4.16 s.
    permute: 4 passes * 2 copies * 4 * 2 B = 64 B -> 0.64 s.  Total 6.4 s.
    """
    device = DeviceSpec(name="round", peak_flops={"bf16": 1e3}, memory=1e9,
                        memory_bandwidth=1e2)
    case = LayerCase("hand", "none", 4, 8, 2, 1, 2, "bf16")
    assert predict_seconds(case, device, None, [2, 0]) == pytest.approx(6.4)


def test_fp8_prediction_uses_the_fp8_peak():
    """Compute-bound case: 8192 tokens over 8 experts of 4096 x 14336. FP8 halves the GEMM time
    (twice the peak), so on the H200 datasheet FP8 comes out faster than BF16."""
    h200 = load_hardware("h200-sxm").device
    case = GPU_CASES[2]  # mixtral-t8192, bf16
    slots = [case.tokens * case.top_k // case.experts] * case.experts
    bf16 = predict_seconds(case, h200, None, slots)
    fp8 = predict_seconds(LayerCase(**{**case.__dict__, "dtype": "fp8"}), h200, None, slots)
    gemm_flops = 2 * 3 * case.hidden * case.ffn * case.tokens * case.top_k
    gemm_bf16 = gemm_flops / (h200.flops("bf16") * h200.matmul_efficiency)
    assert bf16 > gemm_bf16  # the GEMMs plus memory-bound glue
    assert bf16 - fp8 > 0.4 * gemm_bf16  # about half the GEMM time saved, less the FP8 casts


def test_merge_keeps_every_shape_once(tmp_path):
    def profile(hidden: int, experts: int, first: float) -> dict:
        return {"name": "x", "device": {"name": "d", "kind": "gpu", "peak_flops": {"bf16": 1.0},
                                        "memory": 1, "memory_bandwidth": 1.0},
                "calibration": {"metadata": {"command": f"h{hidden}"}, "kernels": {
                    "expert_ffn": [{"hidden": hidden, "ffn": 8, "experts": 1, "tokens": [1],
                                    "seconds": [first]}],
                    "gate": [{"hidden": hidden, "experts": experts, "tokens": [1],
                              "seconds": [first]}],
                    "attention": [{"hidden": hidden, "tokens": [1], "seconds": [first]}],
                    "gemm": {"sizes": [1], "flops_per_s": [first]},
                    "memcpy": {"bytes": [1], "bytes_per_s": [first]}}}}
    paths = []
    for i, p in enumerate([profile(64, 8, 1.0), profile(64, 16, 2.0), profile(96, 8, 3.0)]):
        paths.append(tmp_path / f"{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(p))
    merged = gpu_check.merge_profiles(paths, "merged")
    k = merged["calibration"]["kernels"]
    assert merged["name"] == "merged"
    assert [(r["hidden"], r["seconds"][0]) for r in k["expert_ffn"]] == [(64, 1.0), (96, 3.0)]
    assert [(r["hidden"], r["experts"]) for r in k["gate"]] == [(64, 8), (64, 16), (96, 8)]
    assert [r["hidden"] for r in k["attention"]] == [64, 96]
    assert k["gemm"]["flops_per_s"] == [1.0]  # the first run's
    assert merged["calibration"]["metadata"]["gpu_check_shapes"] == ["h64", "h64", "h96"]


def test_fp8_expert_agrees_with_the_bf16_expert():
    torch.manual_seed(0)
    h, f, t = 64, 128, 32
    w = (torch.randn(f, h) * h**-0.5, torch.randn(f, h) * h**-0.5, torch.randn(h, f) * f**-0.5)
    x = torch.randn(t, h).to(torch.bfloat16)
    ref = gpu_check.moe_layer._swiglu(x.float(), w)
    got = gpu_check.fp8_swiglu(x, gpu_check.Fp8Expert.of(w)).float()
    # e4m3 keeps 3 mantissa bits: a relative error of a few percent over the whole output.
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
    assert gpu_check.fp8_swiglu(x[:0], gpu_check.Fp8Expert.of(w)).shape == (0, h)
