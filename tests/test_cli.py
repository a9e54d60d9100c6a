"""The CLI: shipped scenarios validate, broken ones fail with one line naming the field, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moesim.cli import main

REPO = Path(__file__).resolve().parent.parent
BROKEN = REPO / "tests" / "data" / "broken"
SHIPPED = sorted(p for p in (REPO / "scenarios").glob("*.yaml"))

# broken file -> a fragment its error must contain (the field path, or what is wrong)
EXPECTED = {
    "bad_mode": "workload.mode: 'finetune' is not allowed",
    "bad_redundant": "placement.redundant_experts",
    "bad_unit": "cluster.scale_up_bandwidth: unit 'parsecs'",
    "batch_not_divisible": "workload.global_batch",
    "bool_for_int": "parallelism.ep: expected an integer",
    "capacity_factor_zero": "model.capacity_factor",
    "decode_without_context": "workload.context_len",
    "degrees_mismatch": "parallelism: tp * pp * dp",
    "ep_not_divisor": "parallelism.ep: ep=3",
    "explicit_disconnected": "cluster: device 'c' has no links",
    "huge_layers": "model.num_layers: 2000000000000 must be <= 10000",
    "missing_workload": "workload: required field is missing",
    "negative_bandwidth": "cluster.scale_out_bandwidth",
    "negative_batch": "workload.global_batch: -8 must be >= 1",
    "not_a_mapping": "a scenario must be a YAML mapping",
    "out_of_memory": "devices of pipeline stage 0 need",
    "placement_file_missing": "placement.file",
    "too_many_pp": "parallelism: tp * pp * dp = 1 * 8 * 1",
    "topk_too_large": "model.top_k: top_k=9",
    "torus_bad_dims": "cluster.torus_dims",
    "trace_missing_file": "routing.trace",
    "truncated_yaml": "not valid YAML at line 3",
    "unknown_distribution": "routing.distribution: 'pareto'",
    "unknown_model": "model: unknown model 'mixtral-9x9b'",
    "unknown_nested_field": "workload.sequence: unknown field",
    "unknown_profile": "cluster.hardware: unknown hardware profile 'h999'",
    "unknown_top_field": "colour: unknown field 'colour'",
    "unknown_topology": "cluster.topology: 'hypercube'",
    "wrong_type_seq": "workload.seq_len: expected an integer",
    "zipf_negative": "routing.zipf_s: -1.0 must be >= 0",
}


def test_corpus_is_complete():
    assert sorted(p.stem for p in BROKEN.glob("*.yaml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_scenario_gets_one_line_error(name, capsys):
    path = BROKEN / f"{name}.yaml"
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moesim: error: ")
    assert str(path) in err and EXPECTED[name] in err
    assert "Traceback" not in err


def test_broken_scenario_exit_code_from_a_real_process():
    path = BROKEN / "unknown_nested_field.yaml"
    proc = subprocess.run([sys.executable, "-m", "moesim.cli", "run", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "workload.sequence" in proc.stderr


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_scenario_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_run_writes_results_and_trace(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["scenario"] == "tiny-cpu" and result["step_time"] > 0
    trace = json.loads((out / "trace.json").read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert "compute stream" in names and any(n.startswith("stage 0") for n in names)
    cats = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"compute", "alltoall", "pipeline"} <= cats
    assert "step time" in capsys.readouterr().out


def test_set_override_changes_the_scenario(tmp_path):
    args = ["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "--no-trace"]
    main(args + ["-o", str(tmp_path / "a")])
    main(args + ["-o", str(tmp_path / "b"), "--set", "routing.zipf_s=0"])
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["experts"]["max_over_mean"] > b["experts"]["max_over_mean"]


def test_bad_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_info_lists_shipped_things(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b" in out and "h100-sxm" in out and "tiny-cpu.yaml" in out


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_scenario_runs(path, tmp_path, capsys):
    # Includes DeepSeek-V3 on 2048 GPUs; invariants are checked inside every simulation.
    assert main(["run", str(path), "-o", str(tmp_path), "--no-trace"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["step_time"] > 0 and result["tokens_per_s"] > 0
    assert sum(result["breakdown"].values()) == pytest.approx(result["step_time"], rel=1e-6)


# --- conveniences -------------------------------------------------------------------------------

def test_version_and_python_dash_m(capsys):
    import moesim
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"moesim {moesim.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "moesim", "--version"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == f"moesim {moesim.__version__}\n"


def test_shipped_scenario_by_name_and_json_output(tmp_path, capsys):
    assert main(["run", "tiny-cpu", "-o", str(tmp_path), "--no-trace", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert printed.pop("written") == [str(tmp_path / "results.json"),
                                      str(tmp_path / "summary.txt")]
    assert printed == on_disk and on_disk["scenario_file"] == str(SHIPPED_BY_NAME["tiny-cpu"])
    assert main(["validate", "tiny-cpu", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    # tiny-cpu: 2 nodes x 2 devices, tp=1 pp=2 dp=2 ep=2 (scenarios/tiny-cpu.yaml)
    assert check["valid"] and check["cluster"]["devices"] == 4 and check["cluster"]["nodes"] == 2
    assert check["layout"]["pp"] == 2 and len(check["memory_bytes"]) == 2
    for stage in check["memory_bytes"]:
        parts = sum(stage[k] for k in ("dense_weights", "expert_weights", "gradients",
                                       "optimizer", "activations", "kv_cache", "comm_buffers",
                                       "reserved"))
        assert parts == pytest.approx(stage["total"], rel=1e-9)
    assert main(["run", "no-such-scenario"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no shipped scenario of that name" in err
    assert "tiny-cpu" in err


SHIPPED_BY_NAME = {p.stem: p for p in SHIPPED}


def test_compare_two_runs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "tiny-cpu", "-o", str(a), "--no-trace"]) == 0
    assert main(["run", "tiny-cpu", "-o", str(b), "--no-trace", "--set",
                 "workload.global_batch=16"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b / "results.json")]) == 0
    table = capsys.readouterr().out
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert "B: tiny-cpu [workload.global_batch=16]" in table
    change = 100 * (rb["step_time"] - ra["step_time"]) / ra["step_time"]
    step_line = next(line for line in table.splitlines() if line.startswith("step time"))
    assert step_line.endswith(f"{change:+.1f}%")
    assert all(f"  {part}" in table for part in ra["breakdown"]) and "busiest links A" in table
    assert main(["compare", str(a), str(b), "--json"]) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["step time"]["a"] == ra["step_time"] and rows["MFU"]["b"] == rb["mfu"]
    assert main(["compare", str(a), str(tmp_path / "nothing")]) == 2
    assert "no results.json here" in capsys.readouterr().err


def test_every_option_has_help():
    import argparse

    from moesim.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    owned = ("run", "validate", "info", "compare", "sweep", "plot")   # plan, calibrate: elsewhere
    missing = [f"{name} {a.option_strings or a.dest}" for name in owned
               for a in sub.choices[name]._actions if not a.help]
    missing += [str(a.option_strings) for a in parser._actions if not a.help]
    assert missing == []
