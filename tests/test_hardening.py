"""Hardening: exit codes (2 bad input, 3 a bug in moesim), bounded inputs, checked outputs.

Every reproducer gives one line on stderr, the right exit code, no traceback, and writes nothing
outside its output folder.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from moesim.cli import main
from moesim.errors import InternalError
from moesim.sweep import runner

from .conftest import REPO

simulate_module = importlib.import_module("moesim.sim.simulate")
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


def test_debug_after_the_subcommand_shows_the_traceback():
    path = REPO / "tests/data/broken/bad_mode.yaml"
    for argv in (["--debug", "validate", str(path)], ["validate", str(path), "--debug"]):
        proc = subprocess.run([sys.executable, "-m", "moesim.cli", *argv], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1 and "Traceback" in proc.stderr
        assert "ScenarioError" in proc.stderr


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
