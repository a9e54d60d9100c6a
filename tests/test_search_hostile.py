"""moesim search on bad input: one error line naming the file and the field, exit 2, no traceback
and no output folder left behind."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from moesim.cli import main

from .conftest import REPO

TINY = REPO / "scenarios" / "tiny-cpu.yaml"
PINNED = {"workload.micro_batch": [1], "parallelism.zero_stage": [1],
          "memory.recompute": ["none"], "communication.overlap": ["none"],
          "communication.alltoall": ["direct"], "parallelism.schedule": ["1f1b"]}


def _search_file(tmp_path: Path, search: dict) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["search"] = search
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refused(capsys, argv: list[str], *names: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:     # argparse refuses a bad flag value by exiting
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for name in names:
        assert name in err[0], err[0]


@pytest.mark.parametrize("knob,values,says", [
    ("parallelism.tp", ["abc"], "expected an integer"),
    ("parallelism.tp", [0], ">= 1"),
    ("workload.micro_batch", [0, -1], ">= 1"),
    ("communication.alltoall", ["warp"], "'warp' is not allowed (allowed: 'direct'"),
    ("parallelism.zero_stage", [1, 7], "<= 3"),
    ("memory.recompute", ["bogus"], "'bogus' is not allowed (allowed: 'none'"),
    ("parallelism.ep", [[1, 2]], "expected an integer"),
    ("placement.policy", ["file"], "needs placement.file"),
])
def test_bad_knob_values_are_refused_up_front(tmp_path, capsys, knob, values, says):
    path = _search_file(tmp_path, {knob: values})
    out = tmp_path / "out"
    _refused(capsys, ["search", str(path), "-q", "-j", "1", "-o", str(out)],
             str(path), f"search.{knob}", says)
    assert not out.exists()


def test_bad_flags_are_refused_before_any_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _refused(capsys, ["search", str(TINY), "-q", "-j", "0", "-o", str(out)], "-j/--jobs")
    assert not out.exists()
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["search", str(TINY), "-q", "-j", "1", "-o", ""],
             "-o/--output: must not be empty")
    assert list(tmp_path.iterdir()) == []


def test_no_valid_layout_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import moesim.search.runner as runner

    monkeypatch.setattr(runner, "enumerate_layouts", lambda spec: ([], Counter(), False))
    path = _search_file(tmp_path, PINNED)
    out = tmp_path / "a" / "out"
    _refused(capsys, ["search", str(path), "-q", "-j", "1", "-o", str(out)], "no valid layout")
    assert not (tmp_path / "a").exists()


def test_valid_search_still_runs(tmp_path, capsys):
    # 2.0 is the integer 2 as the scenario loader reads it
    path = _search_file(tmp_path, {**PINNED, "parallelism.tp": [1, 2.0], "top": 2})
    out = tmp_path / "out"
    assert main(["search", str(path), "-q", "-j", "1", "-o", str(out)]) == 0
    manifest = json.loads((out / "search.json").read_text())
    assert manifest["valid"] >= 1 and manifest["simulated"] >= 1
    assert "TP2.0" not in (out / "search.csv").read_text()
