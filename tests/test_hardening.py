"""Hardening: exit codes (2 bad input, 3 a bug in moesim), bounded inputs, checked outputs.

Every reproducer gives one line on stderr, the right exit code, no traceback, and writes nothing
outside its output folder.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from moesim.cli import main
from moesim.errors import InternalError, ScenarioError, TraceError
from moesim.routing_trace import load_trace
from moesim.spec.limits import load_json_text, load_yaml_text
from moesim.sweep import runner
from moesim.sweep.spec import load_sweep

from .conftest import REPO

simulate_module = importlib.import_module("moesim.assembly")
TINY = REPO / "scenarios" / "tiny-cpu.yaml"


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def broken_simulate(exc: BaseException):
    def fake(*args, **kwargs):
        raise exc
    return fake


# --- 1. exit codes -----------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [InternalError("invariant broken: tokens routed: 4 != 2"),
                                 ZeroDivisionError("float division by zero")],
                         ids=["InternalError", "unexpected"])
def test_a_bug_is_exit_3_naming_the_check(exc, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(simulate_module, "simulate", broken_simulate(exc))
    assert main(["run", str(TINY), "-o", str(tmp_path / "out")]) == 3
    err = one_line(capsys.readouterr().err)
    assert err.startswith("moesim: internal error (a bug in moesim")
    assert f"{type(exc).__name__}: {exc}" in err and "--debug" in err
    assert "(at test_hardening.py:" in err            # where it broke
    assert not (tmp_path / "out").exists()


def test_bad_input_stays_exit_2(capsys):
    assert main(["validate", str(REPO / "tests/data/broken/bad_mode.yaml")]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("moesim: error: ") and "bug" not in err


def test_debug_after_the_subcommand_shows_the_traceback_and_keeps_the_exit_code():
    path = REPO / "tests/data/broken/bad_mode.yaml"
    for argv in (["--debug", "validate", str(path)], ["validate", str(path), "--debug"]):
        proc = subprocess.run([sys.executable, "-m", "moesim.cli", *argv], capture_output=True,
                              text=True, timeout=60)
        # Bad input stays exit 2 (a bug stays 3), so scripts can tell them apart under --debug.
        assert proc.returncode == 2 and "Traceback" in proc.stderr
        assert "ScenarioError" in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("moesim: error: ")


def test_an_internal_error_in_a_sweep_point_is_marked_and_exits_3(tmp_path, monkeypatch,
                                                                 capsys):
    real = simulate_module.simulate

    def flaky(scenario, **kwargs):
        if scenario.workload.seq_len == 128:
            raise InternalError("invariant broken: layer 0 token copies routed: 4 != 2")
        return real(scenario, **kwargs)

    monkeypatch.setattr(simulate_module, "simulate", flaky)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(json.dumps({"name": "t", "base": str(TINY), "sweep": {
        "grid": {"workload.seq_len": [256, 128], "parallelism.ep": [2, 3]}}}))
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "out"), "-j", "1", "-q"]) == 3
    captured = capsys.readouterr()
    last = captured.err.splitlines()[-1]      # after the sweep's header line
    assert last.startswith("moesim: internal error (a bug in moesim") and "1 point(s)" in last
    assert "Traceback" not in captured.err
    rows = [json.loads(line) for line in (tmp_path / "out/results.jsonl").read_text().split("\n")
            if line]
    kinds = {r["point"]: ("internal" if runner.is_internal_row(r) else
                          r["error"].split(":")[0] or "ok") for r in rows}
    # ep=3 does not divide: bad input, whatever the seq_len; seq_len=128 with ep=2: the bug
    assert kinds == {"seq_len=256,ep=2": "ok", "seq_len=256,ep=3": "ScenarioError",
                     "seq_len=128,ep=2": "internal", "seq_len=128,ep=3": "ScenarioError"}
    assert "InternalError: invariant broken" in rows[2]["error"]


# --- 2. bounded inputs --------------------------------------------------------------------------

def bomb(levels: int = 9, width: int = 10) -> str:
    """A 'billion laughs' flow mapping: ``width ** levels`` strings once aliases are expanded."""
    parts = ['l0: &l0 ["lol"]']
    for i in range(1, levels + 1):
        parts.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "{" + ", ".join(parts) + "}"


HOSTILE = {  # replaces that top-level key of tiny-cpu.yaml (or is added) -> error fragment
    "alias_bomb_in_str": (f"description: {bomb()}", "once aliases are expanded"),
    "alias_bomb_in_int": (f"seed: {bomb()}", "once aliases are expanded"),
    "recursive_alias": ("description: &r [*r]", "alias refers to itself"),
    "deep_nesting": ("description: " + "[" * 500 + "]" * 500, "nested deeper than 64 levels"),
    "deep_mapping": ("description: " + "{a: " * 100 + "1" + "}" * 100, "nested deeper than"),
    "int_400_digits": ("seed: " + "7" * 400, "an integer of 400 digits"),
    "int_5000_digits": ("workload: {mode: training, global_batch: " + "9" * 5000 + "}",
                        "an integer of 5000 digits"),
    "name_with_slashes": ("name: ../../x", "name: '../../x' is not a valid name"),
    "name_dotdot": ("name: ..", "name: '..' is not a valid name"),
    "name_with_nul": ('name: "a\\0b"', "name: contains the character '\\x00' at position 1"),
    "name_surrogate": ('name: "a\\ud800"', "name: contains the character '\\ud800'"),
    "name_with_space": ("name: a b", "name: 'a b' is not a valid name"),
    "nul_in_a_path": ('routing: {distribution: trace, trace: "t\\0.csv"}',
                      "routing.trace: contains the character '\\x00'"),
    "fat_tree_8M_devices": ("cluster: {hardware: cpu-local, topology: fat_tree, nodes: 1048576,"
                            " devices_per_node: 8}", "8,388,608 devices is more than the 65,536"),
    "torus_huge": ("cluster: {hardware: cpu-local, topology: torus, torus_dims: [4096, 4096, "
                   "4096]}", "devices is more than the 65,536"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_scenario_is_one_line_exit_2(name, tmp_path, monkeypatch, capsys):
    extra, fragment = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    key, kept, skipping = extra.split(":")[0], [], False
    for line in TINY.read_text().splitlines():   # drop the key's block: its line, its indented ones
        skipping = line.startswith(f"{key}:") or (skipping and line.startswith(" "))
        if not skipping:
            kept.append(line)
    path.write_text("\n".join([*kept, extra]) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for cmd in ("validate", "run"):
        start = time.monotonic()
        assert main([cmd, str(path)]) == 2
        assert time.monotonic() - start < 10
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"moesim: error: {path}: ") and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]    # nothing written


def test_name_from_set_cannot_leave_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(TINY), "--set", "name=../../x"]) == 2
    assert "name: '../../x' is not a valid name" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["/dev/zero", "/proc/self", "fifo", "big"])
def test_non_regular_and_oversized_files_are_refused_before_reading(source, tmp_path, capsys):
    if source == "fifo":
        source = str(tmp_path / "fifo.yaml")
        os.mkfifo(source)                      # reading it would block forever
    elif source == "big":
        source = str(tmp_path / "big.yaml")
        with open(source, "wb") as handle:     # sparse: 17 MiB on paper, nothing on disk
            handle.truncate(17 * 2**20)
    start = time.monotonic()
    assert main(["validate", source]) == 2
    assert time.monotonic() - start < 5
    err = one_line(capsys.readouterr().err)
    assert f"moesim: error: {source}: " in err
    assert ("not a regular file" in err or "a folder" in err
            or "more than the 16,777,216 allowed" in err)


def test_a_1e8_point_sweep_is_refused_before_expanding(tmp_path, capsys):
    grid = {f"routing.{f}": list(range(10)) for f in
            ("hot_experts", "coactivation_groups", "node_limit", "max_tokens_per_source")}
    grid.update({"seed": list(range(100)), "workload.seq_len": list(range(1, 101)),
                 "workload.micro_batch": list(range(1, 101))})
    sweep = tmp_path / "s.yaml"
    sweep.write_text(json.dumps({"name": "huge", "base": str(TINY), "sweep": {"grid": grid}}))
    start = time.monotonic()
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "out")]) == 2
    assert time.monotonic() - start < 5
    err = one_line(capsys.readouterr().err)
    assert "10 x 10 x 10 x 10 x 100 x 100 x 100 = 10,000,000,000 points" in err
    assert not (tmp_path / "out").exists()


def test_sweep_names_are_checked_or_made_safe(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text(json.dumps({"name": "../up", "base": str(TINY),
                               "sweep": {"grid": {"seed": [1, 2]}}}))
    assert main(["sweep", str(bad), "--list"]) == 2
    assert "name: '../up' is not a valid name" in one_line(capsys.readouterr().err)
    derived = tmp_path / "my sweep.yaml"     # a scenario with a sweep section and no name:
    scenario = yaml.safe_load(TINY.read_text())  # the sweep is named by the file, made safe
    del scenario["name"]
    derived.write_text(json.dumps({**scenario, "sweep": {"grid": {"seed": [1, 2]}}}))
    assert load_sweep(derived).name == "my_sweep"


def test_yaml_limits_at_their_edges():
    # 64 levels load, 65 do not; 40 digits load, 41 do not; 10**6 nodes after expansion load.
    assert load_yaml_text("[" * 63 + "1" + "]" * 63, source="x") is not None
    with pytest.raises(ScenarioError, match="nested deeper than 64"):
        load_yaml_text("[" * 64 + "1" + "]" * 64, source="x")
    assert load_yaml_text("9" * 40, source="x") == int("9" * 40)
    with pytest.raises(ScenarioError, match="41 digits"):
        load_yaml_text("9" * 41, source="x")
    # 1 + 10 + 100 + ... nodes: 5 levels of 10 aliases is 111,111 sequences + 10**5 scalars
    data = load_yaml_text(bomb(levels=5), source="x")
    assert len(data["l5"]) == 10 and data["l5"][0] is data["l4"]   # shared, not copied
    with pytest.raises(ScenarioError, match="more than 1,000,000 values"):
        load_yaml_text(bomb(levels=6), source="x")


def test_json_limits():
    assert load_json_text("[" * 63 + "]" * 63, source="p.json") == load_json_text(
        "[" * 63 + "]" * 63, source="p.json")
    for text, fragment in (("[" * 65 + "]" * 65, "nested deeper than 64"),
                           ("[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
                           ("9" * 5000, "not valid JSON"), ("[" + "9" * 60 + "]", "digits")):
        with pytest.raises(ScenarioError, match=fragment):
            load_json_text(text, source="p.json")


@pytest.mark.parametrize("row,fragment", [("0,99999999999999999999,2", "column token: id 1"),
                                          ("99999999,0,2", "column layer: id 99999999"),
                                          ("0,0,1e300", "column expert: id 1")])
def test_csv_trace_ids_are_bounded(row, fragment, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(f"layer,token,expert\n0,0,1\n{row}\n")
    start = time.monotonic()
    with pytest.raises(TraceError, match=fragment):
        load_trace(path, num_experts=8, num_layers=1, top_k=1)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("content, fragment", [("{}", "not a moesim results.json (no scenario"),
                                               ("[" * 5000 + "]" * 5000, "nested deeper than"),
                                               ("{", "not valid JSON")])
def test_plot_of_a_bad_results_json_is_exit_2_and_writes_nothing(content, fragment, tmp_path,
                                                                 capsys):
    (tmp_path / "results.json").write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    assert fragment in one_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]      # no plots/ left


@pytest.mark.parametrize("override", [".".join(["a"] * 100) + "=1", "workload..seq_len=1",
                                      "seed=" + "9" * 400, "name=" + "[" * 200 + "]" * 200])
def test_hostile_overrides_are_one_line_exit_2(override, capsys):
    assert main(["validate", str(TINY), "--set", override]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"moesim: error: {TINY}: ")


def test_a_scenario_too_big_for_memory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # P6's layer on 2,048 GPUs: each MoE layer's replica split holds a float per (node of the EP
    # group, expert, device): 256 x 4,096 x 2,048 x 8 B = 16 GiB per array, about four at once,
    # 64 GiB. It used to run until the kernel killed it; now one line, exit 2, nothing written.
    from moesim.pricing.context import estimate_memory
    from moesim.spec.scenario import load_scenario

    p6 = REPO / "scenarios" / "published" / "p6-tutel-2dh-alltoall-2048xa100.yaml"
    assert estimate_memory(load_scenario(p6)) == 4 * 8 * 256 * 4096 * 2048
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert main(["run", str(p6), "-o", str(tmp_path / "out")]) == 2
    assert time.monotonic() - start < 10
    err = one_line(capsys.readouterr().err)
    assert "about 64 GiB" in err and "simulation.max_memory=16 GiB" in err
    assert not (tmp_path / "out").exists()
    # The planner prices through the same context: refused as fast.
    start = time.monotonic()
    assert main(["plan", str(p6), "-o", str(tmp_path / "plan")]) == 2
    assert time.monotonic() - start < 10
    assert "about 64 GiB" in one_line(capsys.readouterr().err)
