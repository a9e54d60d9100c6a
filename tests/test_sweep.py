"""Sweeps: expansion of grid and zip, validation, the results table, resume, executors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moesim.cli import main
from moesim.errors import MoESimError, ScenarioError
from moesim.sweep import runner
from moesim.sweep.runner import read_rows, run_sweep
from moesim.sweep.spec import load_sweep, point_key

from .conftest import REPO

TINY = REPO / "scenarios" / "tiny-cpu.yaml"


def write_sweep(tmp_path, sweep: dict, name: str = "sweep.yaml", **top):
    """A sweep file over tiny-cpu (or over ``scenario=`` given inline) in tmp_path."""
    data = {"name": "t", **({} if "scenario" in top else {"base": str(TINY)}), **top}
    path = tmp_path / name
    path.write_text(json.dumps({**data, "sweep": sweep}))
    return path


@pytest.fixture
def small(tmp_path):
    """4 points of tiny-cpu: zipf skew x (batch, seq) zipped; about 0.1 s each."""
    return load_sweep(write_sweep(tmp_path, {
        "grid": {"routing.zipf_s": [0.0, 1.2]},
        "zip": {"workload.global_batch": [8, 16], "workload.seq_len": [256, 128]}}))


def test_grid_times_zip_in_file_order_last_field_fastest(small):
    assert [p.name for p in small.points] == [
        "zipf_s=0.0,global_batch=8,seq_len=256", "zipf_s=0.0,global_batch=16,seq_len=128",
        "zipf_s=1.2,global_batch=8,seq_len=256", "zipf_s=1.2,global_batch=16,seq_len=128"]
    assert small.axes == (("routing.zipf_s",), ("workload.global_batch", "workload.seq_len"))
    s = small.scenario(small.points[3])
    assert (s.routing.zipf_s, s.workload.global_batch, s.workload.seq_len) == (1.2, 16, 128)


def test_set_applies_to_every_point_and_enters_the_key(tmp_path):
    plain = load_sweep(write_sweep(tmp_path, {"grid": {"seed": [1, 2]}}, "a.yaml"))
    fixed = load_sweep(write_sweep(tmp_path, {"grid": {"seed": [1, 2]}}, "b.yaml",
                                   set={"model.num_layers": 2}))
    assert all(fixed.scenario(p).model.num_layers == 2 for p in fixed.points)
    assert plain.scenario(plain.points[0]).model.num_layers == 4
    assert {p.key for p in plain.points}.isdisjoint(p.key for p in fixed.points)


def test_point_key_is_a_stable_hash_of_the_sorted_overrides():
    a = point_key(["seed=1", "routing.zipf_s=0.5"])
    assert a == point_key(["routing.zipf_s=0.5", "seed=1"])
    assert a != point_key(["seed=1", "routing.zipf_s=0.6"])
    import hashlib
    assert a == hashlib.sha256(b"routing.zipf_s=0.5\nseed=1").hexdigest()[:16]


def test_scenario_with_its_own_sweep_section(tmp_path):
    import yaml
    data = yaml.safe_load(TINY.read_text())
    data["sweep"] = {"grid": {"parallelism.ep": [1, 2]}}
    path = tmp_path / "inline.yaml"
    path.write_text(yaml.safe_dump(data))
    sweep = load_sweep(path)
    assert [sweep.scenario(p).parallelism.ep for p in sweep.points] == [1, 2]


@pytest.mark.parametrize(("sweep", "top", "field", "message"), [
    ({"zip": {"seed": [1, 2], "routing.zipf_s": [0.1]}}, {}, "sweep.zip",
     "equal lengths.*seed: 2, routing.zipf_s: 1"),
    ({"grid": {"parallelism.epp": [1]}}, {}, "sweep.parallelism.epp",
     "parallelism has no field 'epp'"),
    ({"grid": {"hardware": ["h100-sxm"]}}, {}, "sweep.hardware", "not a scenario field"),
    ({"grid": {"seed": []}}, {}, "sweep.grid.seed", "non-empty list"),
    ({"grid": {"seed": [1]}, "zip": {"seed": [2]}}, {}, "sweep", "swept twice"),
    ({"grid": {"seed": [1, 1]}}, {}, "sweep", "same scenario"),
    ({"grids": {"seed": [1]}}, {}, "sweep.grids", "allowed: grid, zip"),
    ({"grid": {"seed": [1]}}, {"set": {"workload.bogus": 1}}, "set.workload.bogus", "no field"),
    ({"grid": {"seed": [1]}}, {"base": "missing.yaml"}, "base", "not found"),
])
def test_bad_sweep_files_name_file_and_field(tmp_path, sweep, top, field, message):
    path = write_sweep(tmp_path, sweep, **top)
    with pytest.raises(ScenarioError, match=message) as info:
        load_sweep(path)
    assert info.value.source == str(path) and info.value.field == field


def reference_rows(small, tmp_path):
    """The table of ``small`` computed point by point, without the runner."""
    rows = []
    for p in small.points:
        metrics = runner.simulate_point(runner.PointTask(
            small.base, small.base_dir, small.source, p.overrides))
        rows.append({"point": p.name, **dict(p.values), **metrics, "key": p.key})
    return rows


def test_table_rows_are_the_points_simulated_one_by_one(small, tmp_path):
    outcome = run_sweep(small, tmp_path / "out")
    assert outcome.rows == reference_rows(small, tmp_path)
    written, _ = read_rows(outcome.jsonl)
    assert written == outcome.rows
    lines = list(csv.reader(outcome.csv.read_text().splitlines()))
    header = lines[0]
    assert header[:4] == ["point", "routing.zipf_s", "workload.global_batch", "workload.seq_len"]
    assert {"step_time_s", "tokens_per_s_per_device", "mfu", "breakdown_compute_s",
            "cross_node_fraction", "memory_peak_bytes", "dropped_tokens"} <= set(header)
    assert header[-2:] == ["error", "key"] and len(lines) == 1 + len(small.points)
    step = float(lines[1][header.index("step_time_s")])
    assert step == outcome.rows[0]["step_time_s"]
    # the breakdown columns add up to the step time
    for r in outcome.rows:
        parts = sum(v for k, v in r.items() if k.startswith("breakdown_"))
        assert parts == pytest.approx(r["step_time_s"], rel=1e-9)


def test_local_pool_and_ray_give_identical_tables(small, tmp_path):
    inline = run_sweep(small, tmp_path / "inline", jobs=1)
    pool = run_sweep(small, tmp_path / "pool", jobs=2)
    ray = run_sweep(small, tmp_path / "ray", executor="ray")
    for out in (pool, ray):
        assert out.csv.read_text() == inline.csv.read_text()
        assert out.jsonl.read_text() == inline.jsonl.read_text()


def test_failing_points_are_rows_with_errors(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"grid": {
        "parallelism.ep": [2, 3], "workload.seq_len": [256, 2_000_000]}}))
    outcome = run_sweep(sweep, tmp_path / "out")
    errors = {r["point"]: r["error"].split(":")[0] for r in outcome.rows}
    assert errors == {"ep=2,seq_len=256": "", "ep=2,seq_len=2000000": "OutOfMemory",
                      "ep=3,seq_len=256": "ScenarioError", "ep=3,seq_len=2000000": "ScenarioError"}
    assert outcome.failed == 3
    assert "must divide dp * tp" in outcome.rows[2]["error"]
    oom = outcome.rows[1]
    assert "step_time_s" not in oom and oom["parallelism.ep"] == 2
    table = list(csv.DictReader(outcome.csv.read_text().splitlines()))
    assert table[1]["step_time_s"] == "" and table[1]["error"] == oom["error"]
    assert float(table[0]["step_time_s"]) == outcome.rows[0]["step_time_s"]


def counting(monkeypatch, fail_after: int | None = None):
    """Record the points simulate_point is called on (-j 1 runs them in this process);
    raise KeyboardInterrupt, as a kill would stop the runner, after ``fail_after`` calls."""
    calls = []
    real = runner.simulate_point

    def spy(task):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        calls.append(task.overrides)
        return real(task)

    monkeypatch.setattr(runner, "simulate_point", spy)
    return calls


def test_resume_after_an_interrupt_recomputes_nothing_and_loses_nothing(small, tmp_path,
                                                                       monkeypatch):
    reference = run_sweep(small, tmp_path / "ref")
    out = tmp_path / "out"
    calls = counting(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(small, out)
    kept, _ = read_rows(out / "results.jsonl")
    assert [r["point"] for r in kept] == [p.name for p in small.points[:2]]
    partial = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["point"] for r in partial] == [p.name for p in small.points[:2]]
    monkeypatch.undo()
    calls = counting(monkeypatch)
    resumed = run_sweep(small, out, resume=True)
    assert calls == [p.overrides for p in small.points[2:]]
    assert (resumed.computed, resumed.skipped) == (2, 2)
    assert resumed.csv.read_text() == reference.csv.read_text()
    assert resumed.jsonl.read_text() == reference.jsonl.read_text()


def test_resume_cuts_a_half_written_last_row(small, tmp_path, monkeypatch):
    reference = run_sweep(small, tmp_path / "ref")
    lines = reference.jsonl.read_text().splitlines(keepends=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text(lines[0] + lines[2] + lines[1][: len(lines[1]) // 2])
    rows, clean = read_rows(out / "results.jsonl")
    assert [r["point"] for r in rows] == [small.points[0].name, small.points[2].name]
    assert clean == len(lines[0]) + len(lines[2])
    calls = counting(monkeypatch)
    resumed = run_sweep(small, out, resume=True)
    assert calls == [small.points[1].overrides, small.points[3].overrides]
    assert resumed.jsonl.read_text() == reference.jsonl.read_text()
    assert resumed.csv.read_text() == reference.csv.read_text()


def test_a_damaged_row_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(MoESimError, match="line 2 is not a JSON row"):
        read_rows(path)


def test_existing_results_need_resume_or_overwrite(small, tmp_path):
    run_sweep(small, tmp_path / "out")
    with pytest.raises(MoESimError, match="--resume.*--overwrite"):
        run_sweep(small, tmp_path / "out")
    assert run_sweep(small, tmp_path / "out", overwrite=True).computed == len(small.points)
    assert run_sweep(small, tmp_path / "out", resume=True).computed == 0


def test_resume_refuses_a_changed_base_scenario(small, tmp_path):
    run_sweep(small, tmp_path / "out")
    changed = load_sweep(write_sweep(tmp_path, {"grid": {"routing.zipf_s": [0.0]}}, "c.yaml",
                                     scenario={**small.base, "seed": 7}))
    with pytest.raises(MoESimError, match="base scenario .* changed"):
        run_sweep(changed, tmp_path / "out", resume=True)


def test_ray_missing_is_a_clear_error(small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    with pytest.raises(MoESimError, match=r"pip install 'moesim\[ray\]'"):
        run_sweep(small, tmp_path / "out", executor="ray")


def test_cli_sweep_with_progress(small, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", small.source, "-o", str(out), "-j", "1"]) == 0
    captured = capsys.readouterr()
    assert "4/4 points" in captured.err and "ETA" in captured.err
    assert "4 points (4 simulated, 0 resumed, 0 with errors)" in captured.out
    assert main(["sweep", small.source, "-o", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mixtral-ep-x-nodes", "deepseek-zipf-x-planner",
                                  "switch-topk-x-experts", "nvlink-vs-ib"])
def test_shipped_sweeps_load_and_every_point_is_a_valid_scenario(name):
    sweep = load_sweep(REPO / "scenarios" / "sweeps" / f"{name}.yaml")
    assert 4 <= len(sweep.points) <= 30
    for p in sweep.points:
        scenario = sweep.scenario(p)
        assert scenario.parallelism.world == scenario.num_devices


# --- killing a running sweep --------------------------------------------------------------------

KILL_POINTS = list(range(8))


def kill_sweep(tmp_path):
    """8 points of the 4-node Mixtral scenario (about 0.5 s each in a worker)."""
    return write_sweep(tmp_path, {"grid": {"seed": KILL_POINTS}}, name="kill.yaml",
                       base=str(REPO / "scenarios" / "mixtral-8x7b-train-4node.yaml"))


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphaned zombie waits for init to reap it; it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    outcome = run_sweep(load_sweep(kill_sweep(tmp)), tmp / "out", jobs=1)
    return outcome.csv.read_bytes(), outcome.jsonl.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_sweep_leaves_no_worker_and_resumes_byte_identically(sig, tmp_path,
                                                                     uninterrupted):
    path, out = kill_sweep(tmp_path), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "moesim.cli", "sweep", str(path), "-o",
                             str(out), "-j", "2", "-q"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        jsonl = out / "results.jsonl"
        while not (jsonl.exists() and jsonl.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        workers = children_of(proc.pid)
        assert len(workers) >= 2                    # the pool (and its manager's helpers)
        os.kill(proc.pid, sig)
        killed = time.monotonic()
        proc.wait(timeout=5)
        while any(alive(w) for w in workers) and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert not [w for w in workers if alive(w)], "workers outlived the sweep by 5 s"
        assert proc.returncode == -sig if sig == signal.SIGKILL else proc.returncode == 128 + sig
        if sig == signal.SIGTERM:
            assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = jsonl.read_text().count("\n")
    assert 1 <= done < len(KILL_POINTS)
    assert main(["sweep", str(path), "-o", str(out), "--resume", "-j", "1", "-q"]) == 0
    assert ((out / "results.csv").read_bytes(), jsonl.read_bytes()) == uninterrupted


def test_two_sweeps_on_one_folder_are_refused(small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with runner._locked(out):                # as if another sweep were running there
        assert main(["sweep", small.source, "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert f"{out} is in use by another moesim sweep (pid {os.getpid()})" in err
        assert not (out / "results.jsonl").exists()
    assert main(["sweep", small.source, "-o", str(out), "-q", "-j", "1"]) == 0  # free again
