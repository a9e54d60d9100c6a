"""Run a sweep's points and keep one tidy table of them: ``results.jsonl`` and ``results.csv``.

One row per point: the point's name, its swept values, the metrics of its simulated step (step
time, tokens/s, MFU, the step-time breakdown, cross-node traffic, load imbalance, peak memory,
dropped tokens) and ``error``, which holds the one-line message of a point that raised a
MoESimError (out of memory, an invalid combination) instead of crashing the sweep. A point that hit
a bug in moesim (an InternalError or any other exception) gets an ``error`` starting with
``internal error:``; it never reads like bad input, and the CLI exits 3 after the sweep.

Crash safety: each finished row is appended to ``results.jsonl`` as one whole line, flushed and
fsynced, so a killed sweep loses at most the points in flight. ``--resume`` reads the finished rows
back (a trailing partial line, the only kind a kill can leave, is cut off), runs only the points
whose key is missing, and at the end both files are rewritten atomically in sweep order.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from moesim.errors import MoESimError, describe_internal, is_internal
from moesim.results import (
    check_output_dir,
    discard_output_dir,
    write_json_atomic,
    write_text_atomic,
)
from moesim.spec.limits import load_json_text, read_text_bounded
from moesim.sweep.executors import check_options, run_tasks
from moesim.sweep.spec import Sweep, SweepPoint, build_point_scenario

__all__ = ["PointTask", "SweepOutcome", "simulate_point", "is_internal_row", "INTERNAL", "result_metrics", "run_sweep",
           "read_rows", "table_columns", "METRIC_COLUMNS"]

JSONL, CSV, MANIFEST, LOCK = "results.jsonl", "results.csv", "sweep.json", ".moesim-sweep.lock"
INTERNAL = "internal error: "   # prefix of the error of a point that hit a bug in moesim

# Metric columns in table order; breakdown_<part>_s columns follow step_time_s.
METRIC_COLUMNS = ("scenario", "devices", "step_time_s", "tokens_per_s", "tokens_per_s_per_device",
                  "mfu", "tflops_per_device", "cross_node_fraction", "alltoall_bytes_per_step",
                  "expert_max_over_mean", "worst_layer_max_over_mean", "device_max_over_mean",
                  "memory_peak_bytes", "memory_capacity_bytes", "dropped_tokens")


@dataclass(frozen=True)
class PointTask:
    """What a worker needs to simulate one point (picklable, self-contained)."""

    base: dict[str, Any]
    base_dir: str
    source: str
    overrides: tuple[str, ...]
    engine: str | None = None


@dataclass(frozen=True)
class SweepOutcome:
    rows: list[dict[str, Any]]      # the table, in sweep order
    computed: int                   # points simulated by this run
    skipped: int                    # points found finished in results.jsonl (resume)
    failed: int                     # rows with an error
    internal: int                   # of those, rows whose error is a bug in moesim (exit 3)
    jsonl: Path
    csv: Path


def simulate_point(task: PointTask) -> dict[str, Any]:
    """Metrics of one point, or ``{"error": "<Kind>: <message>"}`` if it raised a MoESimError.

    A bug in moesim (InternalError or any other exception) gives ``{"error": "internal error:
    <Kind>: <message> (at file:line in function)"}``: the sweep goes on and exits 3 at the end.
    """
    from moesim.assembly import simulate

    try:
        scenario = build_point_scenario(task.base, task.base_dir, task.source, task.overrides)
        result = simulate(scenario, engine=task.engine).result
        return result_metrics(result.to_dict())
    except Exception as exc:  # noqa: BLE001 - every point ends as a row
        if is_internal(exc):
            return {"error": INTERNAL + describe_internal(exc)}
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def result_metrics(r: dict[str, Any]) -> dict[str, Any]:
    """The table's metric columns from a ``Result.to_dict()`` (memory: the fullest stage)."""
    fullest = max(r["memory"], key=lambda m: m["total"] / m["capacity"])
    row: dict[str, Any] = {
        "scenario": r["scenario"], "devices": r["devices"], "step_time_s": r["step_time"],
        "tokens_per_s": r["tokens_per_s"], "tokens_per_s_per_device": r["tokens_per_s_per_device"],
        "mfu": r["mfu"], "tflops_per_device": r["tflops_per_device"]}
    row.update({f"breakdown_{part}_s": secs for part, secs in r["breakdown"].items()})
    row.update({
        "cross_node_fraction": r["alltoall"]["cross_node_fraction"],
        "alltoall_bytes_per_step": r["alltoall"]["bytes_per_step"],
        "expert_max_over_mean": r["experts"]["max_over_mean"],
        "worst_layer_max_over_mean": r["experts"]["worst_layer_max_over_mean"],
        "device_max_over_mean": r["experts"]["device_max_over_mean"],
        "memory_peak_bytes": fullest["total"], "memory_capacity_bytes": fullest["capacity"],
        "dropped_tokens": r["dropped_tokens"], "error": ""})
    return row


def run_sweep(sweep: Sweep, out_dir: str | Path, *, jobs: int = 1, executor: str = "local",
              address: str | None = None, resume: bool = False, overwrite: bool = False,
              engine: str | None = None, progress: TextIO | None = None) -> SweepOutcome:
    """Run every point of ``sweep`` not yet in ``out_dir/results.jsonl``; write the table.

    Parameters
    ----------
    jobs
        Local worker processes (``executor="local"``; 1 runs in this process).
    executor
        ``"local"`` or ``"ray"`` (on the cluster at ``address``, else a local 2-CPU instance).
    resume
        Keep the finished rows of an earlier (killed) run and simulate only the missing points.
    overwrite
        Start again, discarding earlier rows. Without ``resume`` or ``overwrite`` an existing
        non-empty ``results.jsonl`` is an error, so a finished sweep is never lost by accident.
    progress
        Stream for the progress bar (stderr in the CLI); None = quiet.

    Raises
    ------
    MoESimError
        Existing results without resume/overwrite, a resumed sweep whose base scenario changed,
        a corrupt results.jsonl, or an executor problem (e.g. Ray not installed); bad options
        (jobs < 1, an address without Ray) before the output folder is created.
    """
    check_options(executor, jobs, address)
    out, created = check_output_dir(out_dir, what="sweep output folder")
    try:
        with _locked(out):
            return _run_locked(sweep, out, jobs=jobs, executor=executor, address=address,
                               resume=resume, overwrite=overwrite, engine=engine,
                               progress=progress)
    except BaseException:
        if created is not None and not (out / JSONL).exists():
            discard_output_dir(out, created)
        raise


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (a second sweep on the same folder is refused).

    The lock is an ``flock`` on ``out/.moesim-sweep.lock``: the kernel releases it when this
    process and its workers end, however they end, so a killed sweep never leaves it stuck.
    """
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise MoESimError(f"{out} is in use by another moesim sweep (pid {holder}); wait "
                              "for it to finish or use another -o folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _run_locked(sweep: Sweep, out: Path, *, jobs: int, executor: str, address: str | None,
                resume: bool, overwrite: bool, engine: str | None,
                progress: TextIO | None) -> SweepOutcome:
    jsonl = out / JSONL
    done = _prepare(sweep, out, resume=resume, overwrite=overwrite)
    todo = [p for p in sweep.points if p.key not in done]
    tasks = [PointTask(sweep.base, sweep.base_dir, sweep.source, p.overrides, engine)
             for p in todo]
    bar = _Progress(len(sweep.points), len(sweep.points) - len(todo), progress)
    try:
        with open(jsonl, "a", encoding="utf-8") as handle, contextlib.closing(
                run_tasks(simulate_point, tasks, executor=executor, jobs=jobs,
                          address=address)) as finished:
            for i, metrics in finished:
                row = _row(todo[i], metrics)
                _append(handle, row)
                done[row["key"]] = row
                bar.update(todo[i].name, failed=bool(row["error"]))
    finally:  # interrupted or not: the CSV shows every finished point
        bar.close()
        rows = _ordered(sweep, done)
        write_text_atomic(out / CSV, to_csv(rows, sweep.fields))
    write_text_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in rows))
    ours = rows[:len(sweep.points)]
    return SweepOutcome(rows=ours, computed=len(todo), skipped=len(sweep.points) - len(todo),
                        failed=sum(1 for r in ours if r["error"]),
                        internal=sum(1 for r in ours if is_internal_row(r)), jsonl=jsonl,
                        csv=out / CSV)


def is_internal_row(row: dict[str, Any]) -> bool:
    """True if the row's point hit a bug in moesim (not a bad combination of inputs)."""
    return str(row.get("error", "")).startswith(INTERNAL)


def _prepare(sweep: Sweep, out: Path, *, resume: bool, overwrite: bool) -> dict[str, dict]:
    """Check the output folder, write the manifest; the finished rows by key (resume)."""
    jsonl, manifest = out / JSONL, out / MANIFEST
    out.mkdir(parents=True, exist_ok=True)
    exists = jsonl.exists() and jsonl.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise MoESimError(f"{jsonl} already holds results: pass --resume to finish that sweep "
                          "or --overwrite to start again")
    if resume and manifest.exists():
        old = load_json_text(read_text_bounded(manifest), source=str(manifest))
        if not isinstance(old, dict):
            raise MoESimError(f"{manifest}: not a moesim sweep manifest (a JSON object); use "
                              "another -o folder or --overwrite")
        if old.get("base_digest") != sweep.base_digest:
            raise MoESimError(f"{out}: the base scenario of {sweep.source} changed since these "
                              "results were written; use another -o folder or --overwrite")
    write_json_atomic(manifest, {
        "name": sweep.name, "description": sweep.description, "source": sweep.source,
        "scenario": sweep.base.get("name", ""), "fields": list(sweep.fields),
        "axes": [list(a) for a in sweep.axes],
        "points": len(sweep.points), "base_digest": sweep.base_digest})
    if not (resume and exists):
        jsonl.write_text("", encoding="utf-8")
        return {}
    rows, clean = read_rows(jsonl)
    with open(jsonl, "r+b") as handle:  # cut a partial last line so appends start clean
        handle.truncate(clean)
    return {r["key"]: r for r in rows}


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Whole rows of a results.jsonl and the byte length they span.

    A last line without its newline, or that is not valid JSON, is a row cut short by a kill and
    is left out; a bad line anywhere else means the file was damaged otherwise, and raises.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    rows, clean = [], 0
    for number, line in enumerate(lines[:-1], start=1):   # lines[-1]: after the last newline
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise MoESimError(f"{path}: line {number} is not a JSON row; fix or delete the "
                              "line, or rerun with --overwrite") from None
        if not isinstance(row, dict) or "key" not in row:
            raise MoESimError(f"{path}: line {number} is not a sweep row (no 'key')")
        rows.append(row)
        clean += len(line) + 1
    return rows, clean


def _row(point: SweepPoint, metrics: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"point": point.name}
    row.update(point.values)
    row.update(metrics)
    row.setdefault("error", "")
    row["key"] = point.key
    return row


def _append(handle, row: dict[str, Any]) -> None:
    """One whole line per row, on disk before the next point is reported done."""
    handle.write(json.dumps(row) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _ordered(sweep: Sweep, done: dict[str, dict]) -> list[dict[str, Any]]:
    """This sweep's rows in sweep order, then rows of points no longer in it (kept, not lost)."""
    ours = [done[p.key] for p in sweep.points if p.key in done]
    keys = {p.key for p in sweep.points}
    return ours + [r for k, r in done.items() if k not in keys]


def table_columns(rows: list[dict[str, Any]], fields: tuple[str, ...] | list[str]) -> list[str]:
    """Column order: point, swept fields, metrics (breakdown after step time), others, error, key."""
    seen = list(dict.fromkeys(k for r in rows for k in r))
    breakdown = [c for c in seen if c.startswith("breakdown_")]
    fixed = ["point", *fields, *METRIC_COLUMNS[:3], *breakdown, *METRIC_COLUMNS[3:]]
    others = [c for c in seen if c not in fixed and c not in ("error", "key")]
    return [c for c in fixed if c in seen or c in fields or c == "point"] + others + ["error",
                                                                                     "key"]


def to_csv(rows: list[dict[str, Any]], fields: tuple[str, ...] | list[str]) -> str:
    """The rows as CSV text; lists and mappings as JSON, missing values empty."""
    columns = table_columns(rows, fields)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else
                         json.dumps(r[c]) if isinstance(r[c], list | dict) else r[c]
                         for c in columns])
    return buffer.getvalue()


class _Progress:
    """A one-line progress bar with ETA (redrawn on a terminal, one line per point otherwise)."""

    def __init__(self, total: int, already: int, stream: TextIO | None, width: int = 24):
        self.total, self.done, self.failed = total, already, 0
        self.already, self.stream, self.width = already, stream, width
        self.start = time.monotonic()
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        if stream is not None and already:
            stream.write(f"resuming: {already} of {total} points already done\n")
        if self.tty:
            self._draw("", failed=False)

    def update(self, name: str, *, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.stream is not None:
            self._draw(name, failed=failed)

    def _draw(self, name: str, *, failed: bool) -> None:
        assert self.stream is not None
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.already) / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        filled = round(self.width * self.done / max(1, self.total))
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} points"
                f"  {_clock(elapsed)} elapsed, ETA {eta}"
                + (f", {self.failed} failed" if self.failed else "") + f"  {name}"
                + ("  (error)" if failed else ""))
        if self.tty:  # one screen line, or the carriage return cannot redraw it
            line = f"\r\x1b[K{line[:shutil.get_terminal_size().columns - 1]}"
        self.stream.write(line if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else \
        f"{minutes}:{secs:02d}"

