"""Tests of the calibration suite in calibrate/: timing, alpha-beta fits, profile writing, and a
tiny end-to-end calibration run with two spawned gloo ranks."""

from __future__ import annotations

import ast
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibrate import bench_kernels, profile_writer  # noqa: E402
from calibrate.bench_collectives import zipf_splits  # noqa: E402
from calibrate.bench_kernels import TimingPolicy, log2_grid, measure, percentile  # noqa: E402
from calibrate.fit import (  # noqa: E402
    FitError,
    all_to_all_bytes_moved,
    bytes_moved_per_rank,
    fit_alpha_beta,
)
from calibrate.run_calibration import run  # noqa: E402

SIZES = [4096 * 2**k for k in range(13)]  # 4 KB .. 16 MB
OWN_FILES = ("__init__.py", "bench_kernels.py", "bench_collectives.py", "fit.py",
             "profile_writer.py", "run_calibration.py")


def assert_grows(seconds: list[float]) -> None:
    """The biggest point is slower than the fastest of the three smallest.

    Contention on a shared machine only ever adds time, so a noisy small point can exceed its
    true value but the minimum of three rarely does; the biggest point (10x+ the work) is then
    slower whatever the noise did to it.
    """
    assert seconds[-1] > min(seconds[:3]), seconds


# ---- end-to-end tiny calibration -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    """One ``--tiny --nprocs 2`` run as a user would launch it: (profile, file text, stderr)."""
    out = tmp_path_factory.mktemp("calib") / "tiny.yaml"
    # One torch thread: on a shared 2-core box a 2-thread OpenMP region stalls whenever a
    # neighbour holds a core, which would make small kernels look slower than big ones.
    cmd = [sys.executable, str(ROOT / "calibrate" / "run_calibration.py"), "--tiny",
           "--nprocs", "2", "--threads", "1", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    return yaml.safe_load(text), text, proc.stderr


def test_tiny_run_reports_every_stage_and_writes_a_commented_profile(tiny):
    profile, text, stderr = tiny
    assert [f"stage {i}/10" in stderr for i in range(1, 11)] == [True] * 10
    assert text.startswith("# moesim hardware profile measured by calibrate/run_calibration.py")
    meta = profile["calibration"]["metadata"]
    assert {"host", "date", "torch_version", "device_name", "backend", "threads", "nprocs",
            "command"} <= set(meta)
    assert (meta["backend"], meta["nprocs"], meta["threads"]) == ("gloo", 2, 1)
    assert profile["device"]["kind"] == "cpu"
    assert profile["node"] == {"devices_per_node": 2}


def test_tiny_summary_sections_are_the_best_measured_figures(tiny):
    profile, _, _ = tiny
    kernels = profile["calibration"]["kernels"]
    assert profile["device"]["peak_flops"]["fp32"] == pytest.approx(
        max(kernels["gemm"]["flops_per_s"]), rel=1e-5)
    assert profile["device"]["memory_bandwidth"] == pytest.approx(
        max(kernels["memcpy"]["bytes_per_s"]), rel=1e-5)
    even = [e for e in profile["calibration"]["collectives"]["all_to_all"] if not e["uneven"]]
    assert len(even) == 1 and even[0]["link"] == "intra_node"
    assert profile["links"]["scale_up"] == pytest.approx(
        {"kind": "loopback", "bandwidth": even[0]["beta"], "latency": even[0]["alpha"]})
    assert "scale_out" not in profile["links"]  # one host: nothing crossed a node boundary


def test_tiny_kernel_tables_take_longer_for_more_work(tiny):
    profile, _, _ = tiny
    kernels = profile["calibration"]["kernels"]
    single, grouped = kernels["expert_ffn"]
    assert (single["experts"], single["tokens"][-1]) == (1, 256)
    assert (grouped["experts"], grouped["tokens"][-1]) == (8, 32)  # 8 experts x 32 = 256 tokens
    for table in [single, grouped, *kernels["gate"], *kernels["attention"]]:
        assert len(table["seconds"]) == len(table["tokens"])
        assert_grows(table["seconds"])
    for table in (single, grouped):
        for lo, mid, hi in zip(table["p10"], table["seconds"], table["p90"]):
            assert lo <= mid <= hi
    gemm = kernels["gemm"]
    gemm_seconds = [2 * n**3 / f for n, f in zip(gemm["sizes"], gemm["flops_per_s"])]
    assert_grows(gemm_seconds)
    memcpy = kernels["memcpy"]
    copy_seconds = [2 * b / r for b, r in zip(memcpy["bytes"], memcpy["bytes_per_s"])]
    assert_grows(copy_seconds)


def test_tiny_collective_tables_grow_with_bytes_and_fit(tiny):
    profile, _, _ = tiny
    tables = profile["calibration"]["collectives"]
    assert sorted(e["uneven"] for e in tables["all_to_all"]) == [False, True]
    for entry in [*tables["all_to_all"], *tables["all_reduce"], *tables["all_gather"]]:
        assert (entry["link"], entry["ranks"]) == ("intra_node", 2)
        assert entry["bytes"] == [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
        assert_grows(entry["seconds"])
        assert entry["alpha"] >= 0.0 and entry["beta"] > 0.0


def test_run_rejects_bad_arguments_with_exit_code_2(capsys):
    assert run(["--top-k", "9", "--experts", "8", "-o", "unused.yaml"]) == 2
    assert "--top-k (=9) must be <= --experts (=8)" in capsys.readouterr().err


def test_calibration_suite_imports_only_torch_yaml_and_the_stdlib():
    allowed = set(sys.stdlib_module_names) | {"torch", "yaml", "calibrate", "__future__"}
    for path in (ROOT / "calibrate" / name for name in OWN_FILES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


# ---- timing utilities ------------------------------------------------------------------------

def test_percentile_interpolates_between_order_statistics():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(list(range(11)), 10) == 1.0
    assert percentile([7.0], 90) == 7.0


def test_log2_grid_covers_the_bounds():
    assert log2_grid(1, 4096) == [2**k for k in range(13)]
    assert log2_grid(3, 20) == [4, 8, 16, 20]
    assert log2_grid(4, 64, step=2) == [4, 16, 64]


def test_measure_batches_short_calls_and_reports_seconds_per_call(monkeypatch):
    clock = [0.0]
    calls = []

    def call() -> None:  # every call costs exactly 2**-10 s on the fake clock
        calls.append(1)
        clock[0] += 2.0**-10

    monkeypatch.setattr(bench_kernels, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    policy = TimingPolicy(warmup=3, repeats=4, min_repeats=2, budget_s=1.0,
                          min_sample_s=5 * 2.0**-10)
    timing = measure(call, torch.device("cpu"), policy)
    # 5 calls a sample (to last min_sample_s), 4 samples (the budget allows 204)
    assert (timing.inner, timing.repeats) == (5, 4)
    assert timing.median == timing.p10 == timing.p90 == 2.0**-10
    assert len(calls) == 3 + 5 * 4  # warm-up (the last one timed as the estimate) + samples


def test_measure_caps_the_samples_by_the_budget(monkeypatch):
    clock = [0.0]

    def slow() -> None:  # 0.25 s a call: a 1 s budget fits 4 samples, min_repeats wins below
        clock[0] += 0.25

    monkeypatch.setattr(bench_kernels, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    timing = measure(slow, torch.device("cpu"), TimingPolicy(repeats=10, budget_s=1.0))
    assert (timing.inner, timing.repeats, timing.median) == (1, 4, 0.25)
    timing = measure(slow, torch.device("cpu"), TimingPolicy(min_repeats=3, budget_s=0.1))
    assert timing.repeats == 3


# ---- alpha-beta fits -------------------------------------------------------------------------

def test_fit_recovers_alpha_and_beta_exactly_without_noise():
    alpha, beta = 25e-6, 12.5e9
    fit = fit_alpha_beta(SIZES, [alpha + b / beta for b in SIZES])
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.beta == pytest.approx(beta, rel=1e-9)
    assert fit.max_rel_error < 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_fit_is_within_5_percent_under_2_percent_multiplicative_noise(seed):
    rng = random.Random(seed)
    alpha, beta = 40e-6, 3e9
    seconds = [(alpha + b / beta) * (1 + rng.gauss(0.0, 0.02)) for b in SIZES]
    fit = fit_alpha_beta(SIZES, seconds)
    assert fit.alpha == pytest.approx(alpha, rel=0.05)
    assert fit.beta == pytest.approx(beta, rel=0.05)


def test_fit_clamps_negative_alpha_and_refits_the_slope():
    beta = 2e9
    seconds = [b / beta - 1e-7 for b in SIZES]  # unconstrained fit: alpha = -1e-7
    fit = fit_alpha_beta(SIZES, seconds)
    assert fit.alpha == 0.0

    def objective(g: float) -> float:
        return sum(((g * b - t) / t) ** 2 for b, t in zip(SIZES, seconds))

    g = 1.0 / fit.beta  # the clamped optimum beats every slope on a fine grid around it
    assert all(objective(g) <= objective(g * (1 + k / 1000)) for k in range(-50, 51))


@pytest.mark.parametrize(("nbytes", "seconds", "match"), [
    ([4096], [1e-5], "at least 2 points"),
    ([4096, 8192], [1e-5], "must pair up"),
    ([4096, -1], [1e-5, 2e-5], "bytes must be positive"),
    ([4096, 8192], [1e-5, math.nan], "seconds must be positive"),
    ([4096, 4096], [1e-5, 2e-5], "two distinct sizes"),
    ([4096, 8192, 16384], [3e-5, 2e-5, 1e-5], "do not grow with bytes"),
])
def test_fit_rejects_unusable_points(nbytes, seconds, match):
    with pytest.raises(FitError, match=match):
        fit_alpha_beta(nbytes, seconds)


def test_bytes_moved_per_rank_follows_the_bus_conventions():
    assert bytes_moved_per_rank("all_to_all", 1024, 4) == 768.0  # b (n-1)/n
    assert bytes_moved_per_rank("all_reduce", 1024, 4) == 1536.0  # 2 b (n-1)/n
    assert bytes_moved_per_rank("all_gather", 1024, 4) == 3072.0  # b (n-1)
    with pytest.raises(FitError, match="unknown collective 'broadcast'"):
        bytes_moved_per_rank("broadcast", 1024, 4)


def test_all_to_all_bytes_moved_equal_splits_match_the_even_formula():
    splits = [[256] * 4 for _ in range(4)]  # 1024 float32 per rank, evenly split
    assert all_to_all_bytes_moved(splits, 4) == bytes_moved_per_rank("all_to_all", 4096, 4)


def test_zipf_splits_make_rank_zero_hot_and_keep_rows_whole():
    assert zipf_splits(300, 2) == [[200, 100], [200, 100]]  # weights 1 : 1/2
    # rank 0 receives 200 from rank 1 and rank 1 sends it: the busiest rank moves 200 elements
    assert all_to_all_bytes_moved(zipf_splits(300, 2), 4) == 800.0
    assert all(sum(row) == 1001 for row in zipf_splits(1001, 3))


# ---- profile writer --------------------------------------------------------------------------

def _failing_serializer(data, stream):
    stream.write("name: half-writ")  # something reached the temp file before the failure
    raise RuntimeError("serializer exploded")


def test_failed_write_leaves_the_old_profile_intact(tmp_path, monkeypatch):
    target = tmp_path / "profile.yaml"
    profile_writer.write_profile(target, {"name": "old", "device": {"memory": 1}})
    before = target.read_bytes()
    monkeypatch.setattr(profile_writer, "_serialize", _failing_serializer)
    with pytest.raises(RuntimeError, match="serializer exploded"):
        profile_writer.write_profile(target, {"name": "new"})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.yaml"]  # no temp file left


def test_write_profile_replaces_the_file_with_header_comments(tmp_path):
    target = tmp_path / "sub" / "profile.yaml"
    profile_writer.write_profile(target, {"name": "old"})
    data = {"name": "new", "t": {"seconds": [1e-05, 0.25], "tokens": (1, 2)}}
    profile_writer.write_profile(target, data, header="line one\nline two")
    text = target.read_text()
    assert text.splitlines()[:2] == ["# line one", "# line two"]
    assert yaml.safe_load(text) == {"name": "new", "t": {"seconds": [1e-05, 0.25],
                                                         "tokens": [1, 2]}}
    # An ordinary file, not mkstemp's private 0600: what a new file gets under the umask.
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_fallback_yaml_emitter_round_trips_through_pyyaml():
    data = {
        "name": "measured-host", "tricky": ["yes", "1.5", "a: b", "", "null", "x#y"],
        "numbers": [1e-05, 2.5e9, 3, -0.0, math.inf], "flags": [True, False, None],
        "rows": [{"link": "intra_node", "bytes": [4096, 8192]}, {"empty": [], "nested": {}}],
        "deep": [[1, 2], [3]],
    }
    assert yaml.safe_load(profile_writer.to_yaml(data)) == data


def test_write_profile_without_pyyaml_uses_the_fallback_emitter(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    data = {"name": "x", "gemm": {"sizes": [128], "flops_per_s": [1.5e-05]}}
    target = profile_writer.write_profile(tmp_path / "p.yaml", data, header="hand-written")
    text = target.read_text()
    assert text == "# hand-written\n" + profile_writer.to_yaml(data)
    assert yaml.safe_load(text) == data


def test_build_profile_takes_links_from_even_all_to_all_fits():
    kernels = {"gemm": {"sizes": [128, 256], "flops_per_s": [1e12, 3e12]},
               "memcpy": {"bytes": [1, 2], "bytes_per_s": [5e11, 2e12]}}

    def entry(link: str, uneven: bool, alpha: float, beta: float) -> dict:
        return {"link": link, "ranks": 8, "uneven": uneven, "bytes": [1, 2],
                "seconds": [1.0, 2.0], "alpha": alpha, "beta": beta}

    coll = {"all_to_all": [entry("intra_node", False, 1e-5, 4e11),
                           entry("intra_node", True, 2e-5, 1e11),
                           entry("inter_node", False, 3e-5, 4e10)]}
    profile = profile_writer.build_profile(
        name="p", host="h", date="d", device={"name": "H100", "kind": "gpu", "memory": 80e9},
        kernels=kernels, collectives=coll, layout={"ranks_per_node": 8},
        metadata={"dtype": "bfloat16"})
    assert profile["device"]["peak_flops"] == {"bf16": 3e12}
    assert profile["device"]["memory_bandwidth"] == 2e12
    assert profile["links"] == {
        "scale_up": {"kind": "nvlink", "bandwidth": 4e11, "latency": 1e-5},
        "scale_out": {"kind": "infiniband", "bandwidth": 4e10, "latency": 3e-5}}
    assert profile["node"] == {"devices_per_node": 8}
