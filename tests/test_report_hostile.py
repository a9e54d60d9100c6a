"""Hostile inputs to ``moesim compare`` and ``moesim plot``: a results.json, trace.json, sweep.json
or accuracy CSV with a wrong-typed or non-finite field is one error line naming the file and the
field (exit 2), never a traceback (exit 3), and a failing plot writes no figure."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from moesim.cli import main
from moesim.report import plots

from .conftest import REPO


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.startswith("moesim: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real ``moesim run`` folder of the tiny scenario (results.json + trace.json)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o", str(out)]) == 0
    return out


def changed(data: dict, path: str, value) -> dict:
    """A deep copy of ``data`` with the dotted ``path`` (list indices as numbers) set."""
    data = copy.deepcopy(data)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


def bad_run(run_dir: Path, tmp_path: Path, name: str, path: str, value) -> Path:
    """A copy of the run folder whose ``name`` (results.json / trace.json) has ``path`` set."""
    folder = tmp_path / "bad"
    shutil.copytree(run_dir, folder)
    data = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(changed(data, path, value)))
    return folder


RESULT_CASES = [("breakdown", [1], "breakdown: expected a JSON object"),
                ("memory", "x", "memory: expected a non-empty list"),
                ("breakdown.compute", "x", "breakdown.compute: expected a finite number"),
                ("scenario", [1], "scenario: expected a string"),
                ("links", "x", "links: expected a JSON object"),
                ("step_time", float("nan"), "step_time: expected a finite number, got NaN"),
                ("mfu", float("inf"), "mfu: expected a finite number, got Infinity"),
                ("memory.0.total", None, "memory[0].total: expected a finite number"),
                ("links.busiest.0.utilisation", "hot", "links.busiest[0].utilisation"),
                ("experts.placement.0.1.0", 99, "experts.placement[0][1][0]: expected an expert "
                 "id in 0..7"),
                ("experts.tokens_per_expert.1", [1.0], "experts.tokens_per_expert[1] length"),
                ("experts.layers", {}, "experts.layers: expected a list")]
COMPARE_CASES = RESULT_CASES[:10]        # the rest are fields that only plot reads


@pytest.mark.parametrize("path, value, fragment", COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_compare_of_a_wrong_typed_results_json_is_exit_2_naming_file_and_field(
        path, value, fragment, run_dir, tmp_path, capsys):
    bad = bad_run(run_dir, tmp_path, "results.json", path, value) / "results.json"
    capsys.readouterr()
    assert main(["compare", str(run_dir), str(bad)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{bad}: {fragment}" in err


def test_compare_json_never_prints_invalid_json(run_dir, tmp_path, capsys):
    bad = bad_run(run_dir, tmp_path, "results.json", "tokens_per_s", float("nan"))
    capsys.readouterr()
    assert main(["compare", "--json", str(run_dir), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "tokens_per_s: expected a finite number" in one_line(
        captured.err)
    assert main(["compare", "--json", str(run_dir), str(run_dir)]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))


@pytest.mark.parametrize("path, value, fragment", RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
def test_plot_of_a_wrong_typed_results_json_is_exit_2_and_writes_nothing(
        path, value, fragment, run_dir, tmp_path, capsys):
    folder = bad_run(run_dir, tmp_path, "results.json", path, value)
    assert main(["plot", str(folder), "-o", str(tmp_path / "plots")]) == 2
    assert f"{folder / 'results.json'}: {fragment}" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("content, fragment", [
    ([1, 2, 3], "trace.json: expected a Chrome trace"),
    ({"traceEvents": [{"ph": "X", "ts": "a", "dur": None, "pid": []}]},
     "traceEvents[0].pid: expected an integer, got a list"),
    ({"traceEvents": [{"ph": "X", "ts": "a", "dur": 1, "pid": 0}]},
     "traceEvents[0].ts: expected a non-negative finite number"),
    ({"traceEvents": [{"ph": "M", "name": "thread_name", "pid": 0, "args": 5}]},
     "traceEvents[0].args: expected a JSON object"),
    ({"traceEvents": [{"ph": "X", "ts": 0, "dur": 0, "pid": 0}]}, "no timed events"),
    ({"traceEvents": "x"}, "traceEvents: expected a list")])
def test_plot_of_a_bad_trace_json_is_exit_2_and_writes_nothing(content, fragment, run_dir,
                                                               tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    (folder / "trace.json").write_text(json.dumps(content))
    assert main(["plot", str(folder), "-o", str(tmp_path / "plots")]) == 2
    err = one_line(capsys.readouterr().err)
    assert str(folder / "trace.json") in err and fragment in err
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("layer", ["-1", "99"])
def test_plot_with_a_layer_that_is_no_moe_block_writes_nothing(layer, run_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), "-o", str(out), "--layer", layer]) == 2
    assert f"--layer {layer} is not an MoE block" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_plot_failing_midway_removes_the_figures_it_wrote(run_dir, tmp_path, monkeypatch,
                                                            capsys):
    out = tmp_path / "plots"
    out.mkdir()
    (out / "mine.txt").write_text("kept")

    def save(fig, out_dir, stem):
        if stem == "gantt":
            raise OSError("disk full")
        path = Path(out_dir) / f"{stem}.png"
        path.write_bytes(b"png")
        return [path]

    monkeypatch.setattr(plots, "save_figure", save)
    assert main(["plot", str(run_dir), "-o", str(out)]) == 3
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def sweep_folder(tmp_path: Path, manifest, row: dict | None = None) -> Path:
    folder = tmp_path / "sweep"
    folder.mkdir()
    good = {"point": "zipf_s=0.5", "routing.zipf_s": 0.5, "tokens_per_s_per_device": 10.0,
            "step_time_s": 0.2, "breakdown_compute_s": 0.2, "error": "", "key": "k1"}
    (folder / "results.jsonl").write_text(json.dumps({**good, **(row or {})}) + "\n")
    (folder / "sweep.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("manifest, row, fragment", [
    ([1], None, "sweep.json: expected a JSON object (sweep manifest), got a list"),
    ({"axes": "routing.zipf_s"}, None, "sweep.json: axes: expected a list"),
    ({"axes": [[1]]}, None, "sweep.json: axes[0][0]: expected a string"),
    ({"name": {}}, None, "sweep.json: name: expected a string"),
    ({"axes": [["routing.zipf_s"]]}, {"step_time_s": "x"},
     "results.jsonl: line 1: step_time_s: expected a finite number"),
    ({"axes": [["routing.zipf_s"]]}, {"routing.zipf_s": {"a": 1}},
     "results.jsonl: line 1: routing.zipf_s: expected a swept value"),
    ({"axes": [["routing.zipf_s"]]}, {"error": 7}, "results.jsonl: line 1: error")])
def test_plot_of_a_bad_sweep_folder_is_exit_2_and_writes_nothing(manifest, row, fragment,
                                                                 tmp_path, capsys):
    folder = sweep_folder(tmp_path, manifest, row)
    assert main(["plot", str(folder), "-o", str(tmp_path / "plots")]) == 2
    err = one_line(capsys.readouterr().err)
    assert str(folder) in err and fragment in err
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("rows, fragment", [
    ("a,1,abc", "line 2: column predicted_s: expected a finite number, got 'abc'"),
    ("a,1,2\nb,nan,2", "line 3: column measured_s: expected a finite number, got 'nan'"),
    ("a,1", "line 2: column predicted_s: expected a finite number, got nothing"),
    ("a,0,2", "line 2: column measured_s: times must be > 0 seconds")])
def test_plot_of_a_bad_accuracy_csv_names_line_and_column(rows, fragment, tmp_path, capsys):
    path = tmp_path / "acc.csv"
    path.write_text(f"name,measured_s,predicted_s\n{rows}\n")
    assert main(["plot", str(path), "-o", str(tmp_path / "plots")]) == 2
    assert f"{path}: {fragment}" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "plots").exists()
