"""Output safety: byte-identical results, atomic writes, never deleting a user's files."""

from __future__ import annotations

import json

import pytest

from moesim import results
from moesim.cli import main


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


def test_output_dir_keeps_the_users_other_files(tmp_path):
    from tests.conftest import REPO
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    main(["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o", str(out)])
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "results.json").exists()
