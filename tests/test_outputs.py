"""Output safety: byte-identical results, atomic writes, never deleting a user's files."""

from __future__ import annotations

import importlib
import json
import os

import pytest
from matplotlib.figure import Figure

from moesim import results
from moesim.cli import main
from moesim.report.plots import save_figure


def test_same_scenario_gives_byte_identical_results(tmp_path):
    from tests.conftest import REPO
    scenario = str(REPO / "scenarios" / "tiny-cpu.yaml")
    main(["run", scenario, "-o", str(tmp_path / "a")])
    main(["run", scenario, "-o", str(tmp_path / "b")])
    for name in ("results.json", "trace.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    results.write_json_atomic(target, {"old": 1})

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-serialisation

    monkeypatch.setattr(results.json, "dumps", explode)
    with pytest.raises(KeyboardInterrupt):
        results.write_json_atomic(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_outputs_get_the_permissions_of_any_new_file(tmp_path):
    """The temporary file is private (mkstemp's 0600); the outputs must not be: under umask 027
    a new file is 0640, so group members can read results the owner shares. Figures are
    rendered in memory and written the same way (whole, or not at all)."""
    old = os.umask(0o027)
    try:
        results.write_text_atomic(tmp_path / "a.txt", "x")
        results.write_files_together(tmp_path, {"c.json": "{}", "d.txt": "y"})
        save_figure(Figure(figsize=(1, 1)), tmp_path, "e")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(("a.txt", "b.txt", "c.json", "d.txt", "e.png", "e.svg"), 0o640)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_dir_keeps_the_users_other_files(tmp_path):
    from tests.conftest import REPO
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    main(["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o", str(out)])
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "results.json").exists()


# --- output paths checked before any work, outputs written all-or-nothing ----------------------

def _unusable_outputs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    return {"existing_file": a_file, "under_a_file": a_file / "out", "proc": "/proc/moesim-out",
            "proc_root": "/proc", "sys": "/sys/moesim-out", "long_name": tmp_path / ("x" * 300),
            "long_path": tmp_path / "/".join(["y" * 200] * 25), "dev_null": "/dev/null"}


@pytest.mark.parametrize("case", ["existing_file", "under_a_file", "proc", "proc_root", "sys",
                                  "long_name", "long_path", "dev_null"])
@pytest.mark.parametrize("command", ["run", "sweep", "plot"])
def test_unusable_output_is_refused_before_any_work(case, command, tmp_path, monkeypatch,
                                                    capsys):
    from tests.conftest import REPO
    out = str(_unusable_outputs(tmp_path)[case])
    calls = []
    sim_module = importlib.import_module("moesim.assembly")
    monkeypatch.setattr(sim_module, "simulate", lambda *a, **k: calls.append(a))
    if command == "run":
        argv = ["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o", out]
    elif command == "sweep":
        sweep = tmp_path / "s.yaml"
        sweep.write_text(json.dumps({"name": "s", "base": str(REPO / "scenarios/tiny-cpu.yaml"),
                                     "sweep": {"grid": {"seed": [1, 2]}}}))
        argv = ["sweep", str(sweep), "-o", out, "-j", "1", "-q"]
    else:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "results.json").write_text("{}")
        argv = ["plot", str(run_dir), "-o", out]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("moesim: error: ") and "folder" in err[-1]
    assert "Traceback" not in "\n".join(err) and calls == []
    assert (tmp_path / "a_file").read_text() == "mine"
    assert {p.name for p in tmp_path.iterdir()} <= {"a_file", "run", "s.yaml"}


@pytest.mark.parametrize("broken", ["trace", "rename"])
def test_results_and_trace_are_written_together_or_not_at_all(broken, tmp_path, monkeypatch,
                                                              capsys):
    from tests.conftest import REPO
    scenario = str(REPO / "scenarios" / "tiny-cpu.yaml")
    out = tmp_path / "out"
    assert main(["run", scenario, "-o", str(out), "--set", "seed=1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["results.json", "summary.txt", "trace.json"]
    if broken == "trace":   # the trace cannot be made: results.json must not change either
        import moesim.report.trace as trace_module
        monkeypatch.setattr(trace_module, "chrome_trace", lambda sim: 1 / 0)
    else:                   # the disk fills between the renames
        real, seen = os.replace, []

        def replace(src, dst):
            seen.append(dst)
            if len(seen) == 2:
                raise OSError(28, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(results.os, "replace", replace)
    code = main(["run", scenario, "-o", str(out), "--set", "seed=2"])
    assert code == (3 if broken == "trace" else 2)   # a bug in moesim / a full disk
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before      # nothing of the failed run reached the folder, no temp files


def test_a_failed_run_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    import moesim.report.trace as trace_module
    from tests.conftest import REPO
    monkeypatch.setattr(trace_module, "chrome_trace", lambda sim: 1 / 0)
    out = tmp_path / "new" / "deeper"
    assert main(["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o", str(out)]) == 3
    assert list(tmp_path.iterdir()) == []


def test_no_trace_removes_a_stale_trace(tmp_path, capsys):
    from tests.conftest import REPO
    scenario = str(REPO / "scenarios" / "tiny-cpu.yaml")
    assert main(["run", scenario, "-o", str(tmp_path)]) == 0
    assert main(["run", scenario, "-o", str(tmp_path), "--no-trace", "--set", "seed=3"]) == 0
    assert not (tmp_path / "trace.json").exists()     # it belonged to the earlier run


# --- self-describing results --------------------------------------------------------------------

def test_results_json_describes_its_run_and_rebuilds_it(tmp_path, monkeypatch, capsys):
    import hashlib

    import moesim
    from moesim.spec.scenario import scenario_from_mapping
    from tests.conftest import REPO
    monkeypatch.chdir(tmp_path)
    scenario = str(REPO / "scenarios" / "tiny-cpu.yaml")
    assert main(["run", scenario, "--no-trace"]) == 0
    baseline = (tmp_path / "results" / "tiny-cpu" / "results.json").read_bytes()
    overrides = ["seed=3", "workload.seq_len=128"]
    assert main(["run", scenario, "--no-trace", "--set", overrides[0], "--set", overrides[1]]) == 0
    out = capsys.readouterr().out
    assert "overrides       seed=3, workload.seq_len=128" in out
    digest = hashlib.sha256(b"seed=3\nworkload.seq_len=128").hexdigest()[:8]
    folder = tmp_path / "results" / f"tiny-cpu-{digest}"      # not the baseline's folder
    assert (tmp_path / "results" / "tiny-cpu" / "results.json").read_bytes() == baseline
    data = json.loads((folder / "results.json").read_text())
    assert data["overrides"] == overrides and data["seed"] == 3
    assert data["moesim_version"] == moesim.__version__
    assert data["scenario_file"] == scenario
    assert data["hardware_profile"]["name"] == "cpu-local"
    assert data["hardware_profile"]["path"] == str(REPO / "hardware_profiles" / "cpu-local.yaml")
    resolved = data["resolved_scenario"]
    assert resolved["workload"]["seq_len"] == 128 and resolved["seed"] == 3
    # the recorded scenario alone reproduces the run (a second, independent path to the result)
    resolved.pop("source"), resolved.pop("hardware")
    again = moesim.simulate(scenario_from_mapping(resolved, source="results.json")).result
    assert again.to_dict()["step_time"] == data["step_time"]
    assert again.to_dict()["breakdown"] == data["breakdown"]
    summary = (folder / "summary.txt").read_text()
    assert summary.splitlines()[1] == "overrides       seed=3, workload.seq_len=128"


def test_a_resolved_scenario_with_quantities_reads_back(tmp_path, monkeypatch):
    # Quantity fields (a bandwidth override, simulation.max_memory) are written with their SI
    # unit: a bare number in a unit field is refused on reading, so results.json once recorded
    # a scenario it could not rebuild.
    import moesim
    from moesim.spec.scenario import scenario_from_mapping
    from tests.conftest import REPO
    monkeypatch.chdir(tmp_path)
    scenario = str(REPO / "scenarios" / "tiny-cpu.yaml")
    assert main(["run", scenario, "--no-trace", "-o", "out",
                 "--set", "cluster.scale_up_bandwidth=200 GB/s"]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    resolved = data["resolved_scenario"]
    assert resolved["cluster"]["scale_up_bandwidth"] == "200000000000.0 B/s"
    assert resolved["simulation"]["max_memory"] == f"{16.0 * 2**30!r} B"
    resolved.pop("source"), resolved.pop("hardware")
    again = moesim.simulate(scenario_from_mapping(resolved, source="results.json")).result
    assert again.to_dict()["step_time"] == data["step_time"]
