"""`moesim sweep` on bad input: one error line naming file and field, exit 2, no output folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moesim.cli import main

from .conftest import REPO

GRID = "sweep: {grid: {routing.zipf_s: [0.5, 1.0]}}\n"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """tmp_path as the working folder, with tiny-cpu copied in as base.yaml."""
    shutil.copy(REPO / "scenarios" / "tiny-cpu.yaml", tmp_path / "base.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(capsys, sweep_text: str, *flags: str, file: str = "sw.yaml") -> str:
    """Run the sweep file ``sweep_text``; assert exit 2, no output folder, one stderr line."""
    with open(file, "w", encoding="utf-8") as handle:
        handle.write(sweep_text)
    code = main(["sweep", file, "-q", "-j", "1", "-o", "out", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not Path("out").exists()
    return err


OK = "name: ok\nbase: base.yaml\n" + GRID


@pytest.mark.parametrize(("flags", "expected"), [
    (("-j", "0"), "-j/--jobs: 0"),
    (("-j", "-3"), "-j/--jobs: -3"),
    (("--address", "10.0.0.1:6379"), "needs --executor ray"),
    (("--executor", "ray", "--address", " "), "--address: must not be empty"),
])
def test_bad_flags_are_refused_before_any_output(probe, capsys, flags, expected):
    assert expected in refused(capsys, OK, *flags)


def test_empty_output_path_is_refused(probe, capsys):
    (probe / "sw.yaml").write_text(OK)
    with pytest.raises(SystemExit) as exc:    # argparse refuses a bad flag value by exiting
        main(["sweep", "sw.yaml", "-q", "-j", "1", "-o", ""])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "-o/--output: must not be empty" in err and err.count("\n") == 1
    assert not (probe / "results").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("name: s\n" + GRID, "sw.yaml: model: required field is missing"),
    ("name: s\nbase: base.yaml\nset: {parallelism.tp: abc}\n" + GRID,
     "sw.yaml: set.parallelism.tp: expected an integer"),
    ("name: s\nbase: sw.yaml\n" + GRID, "sw.yaml: base: 'sw.yaml' is this sweep file itself"),
    ("name: s\nscenario: {name: x}\n" + GRID, "sw.yaml: scenario.model: required field"),
    ("name: s\nbase: ok.yaml\n" + GRID, "sw.yaml: base: 'ok.yaml' is a sweep file"),
])
def test_an_invalid_base_scenario_is_refused_up_front(probe, capsys, text, expected):
    (probe / "ok.yaml").write_text(OK)
    assert expected in refused(capsys, text)


@pytest.mark.parametrize(("sweep", "expected"), [
    ("{grid: {routing.zipf_s: [0.5, abc, -1]}}",
     'sweep.grid.routing.zipf_s[1]: "abc" is not allowed: expected a number'),
    ("{grid: {routing.zipf_s: [0.5, -1]}}", "sweep.grid.routing.zipf_s[1]: -1 is not allowed: "
     "-1.0 must be >= 0"),
    ("{grid: {parallelism: [{tp: 1, pp: 2, dp: 2, ep: 2}, {tp: 0}]}}",
     "sweep.grid.parallelism[1]: {\"tp\": 0} is not allowed: parallelism.tp: 0 must be >= 1"),
    ("{zip: {cluster.nodes: [1, 2], parallelism.dp: [1, x]}}",
     'sweep.zip.parallelism.dp[1]: "x" is not allowed: expected an integer'),
])
def test_a_value_its_field_never_allows_is_refused(probe, capsys, sweep, expected):
    assert "sw.yaml: " + expected in refused(capsys, f"name: s\nbase: base.yaml\nsweep: {sweep}\n")


def test_valid_sweep_still_runs_and_invalid_combinations_stay_rows(probe, capsys):
    (probe / "ok.yaml").write_text(OK)
    assert main(["sweep", "ok.yaml", "-q", "-j", "1", "-o", "out"]) == 0
    assert "2 points (2 simulated, 0 resumed, 0 with errors)" in capsys.readouterr().out
    # ep=3 does not divide dp * tp: a combination the loader checks across fields, so one row
    (probe / "ep.yaml").write_text("name: ep\nbase: base.yaml\nsweep: {grid: "
                                   "{parallelism.ep: [2, 3]}}\n")
    assert main(["sweep", "ep.yaml", "-q", "-j", "1", "-o", "out_ep"]) == 0
    assert "2 points (2 simulated, 0 resumed, 1 with errors)" in capsys.readouterr().out


def test_a_corrupt_manifest_under_resume_is_named(tmp_path, capsys):
    cli_main = main
    shutil.copy(REPO / "scenarios" / "tiny-cpu.yaml", tmp_path / "base.yaml")
    sweep = tmp_path / "sw.yaml"
    sweep.write_text("name: sw\nbase: base.yaml\nsweep: {grid: {routing.zipf_s: [0.5, 1.0]}}\n")
    out = tmp_path / "out"
    assert cli_main(["sweep", str(sweep), "-o", str(out), "-j", "1", "-q"]) == 0
    capsys.readouterr()
    for text, said in (("{", "not valid JSON"), ("[1]", "not a moesim sweep manifest")):
        (out / "sweep.json").write_text(text)
        assert cli_main(["sweep", str(sweep), "-o", str(out), "-j", "1", "-q", "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert f"{out / 'sweep.json'}: {said}" in err[-1]
