"""``moesim plot RESULTS -o DIR``: every figure that RESULTS supports, as PNG and SVG.

RESULTS is one of:

- a sweep folder (``results.jsonl`` + ``sweep.json`` from ``moesim sweep``): throughput per device
  vs each swept axis, and the step-time breakdown of every point;
- a run folder (``results.json``, optionally ``trace.json``, from ``moesim run``): breakdown,
  per-link utilisation, Gantt of the step, expert load and expert placement;
- a search folder (``search.json`` + ``search.csv`` from ``moesim search``): the Pareto frontier
  of tokens/s per GPU against tokens/s per user (serving), or step time against memory per
  device by layout family (training);
- a CSV with columns ``name,measured_s,predicted_s`` (the accuracy benchmark): predicted vs
  measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesim.errors import MoESimError, ScenarioError

__all__ = ["register", "plot_results", "plot_search", "plot_sweep", "plot_run", "plot_accuracy"]


def register(sub, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``plot`` subcommand to the ``moesim`` parser."""
    p = sub.add_parser("plot", help="figures of a sweep, a run, or the accuracy benchmark",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="sweep folder, run folder, or accuracy CSV")
    p.add_argument("-o", "--output", help="output folder (default: RESULTS/plots)")
    p.add_argument("--x", help="sweep: the swept field on the x axis (default: one plot per axis)")
    p.add_argument("--layer", type=int, help="run: MoE block for the placement map "
                   "(default: the most imbalanced)")
    p.add_argument("--window", metavar="START:END", type=_window,
                   help="run: zoom the Gantt into this time range, in seconds (e.g. 0.5:0.7)")
    commands["plot"] = _cmd_plot


def _window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END in seconds") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END")
    return start, end


def _cmd_plot(args: argparse.Namespace) -> int:
    path = Path(args.results)
    from moesim.results import check_output_dir, discard_output_dir

    out = Path(args.output) if args.output else (path if path.is_dir() else path.parent) / "plots"
    if not path.exists():
        raise MoESimError(f"{path}: no such file or folder")
    out, created = check_output_dir(out, what="plot folder")
    try:
        written = plot_results(path, out, x=args.x, layer=args.layer, window=args.window)
    except BaseException:
        discard_output_dir(out, created)
        raise
    for p in written:
        print(p)
    return 0


def plot_results(path: str | Path, out_dir: str | Path, *, x: str | None = None,
                 layer: int | None = None,
                 window: tuple[float, float] | None = None) -> list[Path]:
    """Make every figure ``path`` supports under ``out_dir``; return the files written.

    Raises
    ------
    MoESimError
        ``path`` is none of a sweep folder, a run folder or an accuracy CSV, or is unreadable.
    """
    path = Path(path)
    if path.is_file() and path.name in ("results.jsonl", "results.json"):
        path = path.parent
    if path.is_dir() and (path / "search.json").exists():
        return plot_search(path, out_dir)
    if path.is_dir() and (path / "results.jsonl").exists():
        return plot_sweep(path, out_dir, x=x)
    if path.is_dir() and (path / "results.json").exists():
        return plot_run(path, out_dir, layer=layer, window=window)
    if path.is_file() and path.suffix == ".csv":
        return plot_accuracy(path, out_dir)
    raise MoESimError(f"{path}: not a sweep folder (results.jsonl), a run folder (results.json) "
                      "or an accuracy CSV (name,measured_s,predicted_s)")


def plot_search(folder: Path, out_dir: str | Path) -> list[Path]:
    """A ``moesim search`` folder: the Pareto frontier (serving) or step time against memory per
    device by layout family (training)."""
    from moesim.report import plots
    from moesim.report.compare import expect_mapping

    source = str(folder / "search.json")
    manifest = expect_mapping(_read_json(folder / "search.json"), source, None,
                              "a JSON object (search manifest)")
    rows = _read_csv(folder / "search.csv")
    name = Path(str(manifest.get("source", folder.name))).stem
    if manifest.get("serving"):
        for line, row in enumerate(rows, start=2):
            pre = "" if str(row.get("simulated")).lower() == "true" else "screened_"
            for column in (f"{pre}tokens_per_s_per_user", f"{pre}tokens_per_s_per_gpu"):
                _csv_number(row, column, folder / "search.csv", line)
        fig = plots.pareto_figure(rows, title=f"{name}: serving layouts on "
                                  f"{manifest.get('devices')} devices")
        return _save_all([("pareto", fig)], out_dir)
    for line, row in enumerate(rows, start=2):
        step = "step_time_s" if row.get("step_time_s") not in (None, "") else \
            "screened_step_time_s"
        for column in ("memory_bytes", step) + (("memory_capacity_bytes",) if line == 2 else ()):
            _csv_number(row, column, folder / "search.csv", line)
    fig = plots.search_memory_figure(rows, title=f"{name}: training layouts on "
                                     f"{manifest.get('devices')} devices")
    return _save_all([("step-time-vs-memory", fig)], out_dir)


def plot_sweep(folder: Path, out_dir: str | Path, *, x: str | None = None) -> list[Path]:
    """Throughput vs each swept axis (or ``x`` only) and the breakdown of every point."""
    from moesim.report import plots
    from moesim.sweep.runner import read_rows

    rows, _ = read_rows(folder / "results.jsonl")
    if not rows:
        raise MoESimError(f"{folder / 'results.jsonl'} holds no finished points yet")
    manifest = _check_sweep_manifest(folder / "sweep.json") \
        if (folder / "sweep.json").exists() else {}
    name, scenario = manifest.get("name", folder.name), manifest.get("scenario", "")
    axes = manifest.get("axes") or [[f] for f in manifest.get("fields", [])]
    if x is not None and not any(x in a for a in axes):
        raise MoESimError(f"--x {x!r} is not a swept field (swept: "
                          f"{', '.join(f for a in axes for f in a)})")
    fields = [f for a in axes for f in a]
    _check_sweep_rows(rows, fields, str(folder / "results.jsonl"))
    about = f"\nbase scenario: {scenario}" if scenario else ""
    figures = []
    for field in [x] if x is not None else [a[0] for a in axes]:
        fig = plots.throughput_figure(rows, axes, field,
                                      title=f"{name}: throughput vs {field}{about}")
        figures.append((f"throughput-vs-{field.replace('.', '-')}", fig))
    labels = ["\n".join(plots.show_value(r.get(f)) for f in fields) for r in rows]
    fig = plots.breakdown_figure(rows, labels, xlabel=" / ".join(fields),
                                 title=f"{name}: step-time breakdown per point{about}")
    return _save_all(figures + [("breakdown", fig)], out_dir)


def _check_sweep_manifest(path: Path) -> dict[str, Any]:
    """sweep.json, if the fields plot reads have their types: name and scenario strings, axes a
    list of lists of field names (fields a list of field names)."""
    from moesim.report.compare import expect, expect_list, expect_mapping, expect_text

    source = str(path)
    manifest = expect_mapping(_read_json(path), source, None, "a JSON object (sweep manifest)")
    for key in ("name", "scenario"):
        if key in manifest:
            expect_text(manifest[key], source, key)
    for i, field in enumerate(expect_list(manifest.get("fields") or [], source, "fields")):
        expect_text(field, source, f"fields[{i}]")
    for i, axis in enumerate(expect_list(manifest.get("axes") or [], source, "axes")):
        if not expect_list(axis, source, f"axes[{i}]"):
            expect("a non-empty list of swept field names", axis, source, f"axes[{i}]")
        for j, field in enumerate(axis):
            expect_text(field, source, f"axes[{i}][{j}]")
    return manifest


def _check_sweep_rows(rows: list[dict[str, Any]], fields: list[str], source: str) -> None:
    """Each results.jsonl row as the figures read it: swept values are scalars (or lists of
    them), error a string; a finished point has finite throughput, step time and breakdown."""
    from moesim.report.compare import MISSING, expect, expect_number

    def scalar(value: Any) -> bool:
        return value is None or isinstance(value, str | bool) or (
            isinstance(value, float) and math.isfinite(value)) or (
            isinstance(value, int) and abs(value) < 2**63)

    for line, row in enumerate(rows, start=1):
        where = f"line {line}: "
        for field in fields:
            value = row.get(field)
            if not (scalar(value) or isinstance(value, list) and all(map(scalar, value))):
                expect("a swept value (a finite number, string, boolean, null or a list of "
                       "them)", value, source, where + field)
        error = row.get("error")
        if error is not None and not isinstance(error, str):
            expect("a string", error, source, where + "error")
        if error:
            continue
        expect_number(row.get("tokens_per_s_per_device", MISSING), source,
                      where + "tokens_per_s_per_device")
        expect_number(row.get("step_time_s", MISSING), source, where + "step_time_s")
        for key, value in row.items():
            if key.startswith("breakdown_") and key.endswith("_s"):
                expect_number(value, source, where + key, null=True)


def plot_run(folder: Path, out_dir: str | Path, *, layer: int | None = None,
             window: tuple[float, float] | None = None) -> list[Path]:
    """Breakdown, link utilisation, Gantt (if trace.json), expert load and placement of a run.

    Every input (results.json, trace.json, ``layer``) is checked before any figure is written.
    """
    from moesim.report import plots
    from moesim.report.compare import RUN_FIELDS, check_result
    from moesim.report.trace import check_trace
    from moesim.results import run_label
    from moesim.sweep.runner import result_metrics

    result = check_result(_read_json(folder / "results.json"), str(folder / "results.json"),
                          needed=RUN_FIELDS)
    name = run_label(result["scenario"], result.get("overrides") or [])
    experts = result["experts"]
    loads, layers = experts["tokens_per_expert"], experts["layers"]
    if layer is not None and loads and layer not in layers:
        blocks = f"{layers[0]}..{layers[-1]}" if layers == list(
            range(layers[0], layers[-1] + 1)) else ", ".join(map(str, layers[:16])) + (
            ", ..." if len(layers) > 16 else "")
        raise MoESimError(f"--layer {layer} is not an MoE block of {name} (MoE blocks: "
                          f"{blocks})")
    events = None
    if (folder / "trace.json").exists():
        events = check_trace(_read_json(folder / "trace.json"), str(folder / "trace.json"))
    figures = [("breakdown", plots.breakdown_figure(
        [result_metrics(result)], [name],
        title=f"{name}: step-time breakdown (critical stage's busiest device)"))]
    links = result["links"]
    listed = links.get("all") or links.get("busiest", [])
    # busiest lists at most 20 links with traffic: fewer means it lists all of them
    complete = "all" in links or len(listed) < 20
    if listed:
        figures.append(("links", plots.link_heatmap_figure(
            listed, complete=complete, title=f"{name}: link utilisation ({links.get('scope')})")))
    if events is not None:
        what = f"{window[0]:g} s to {window[1]:g} s of one step" if window else "one step"
        figures.append(("gantt", plots.gantt_figure(events, window=window,
                                                    title=f"{name}: timeline of {what}")))
    if loads:
        figures.append(("expert-load", plots.expert_load_figure(
            loads, layers, title=f"{name}: expert load per MoE layer")))
        if layer is None:
            imbalance = [max(v) / max(sum(v) / len(v), 1e-30) for v in loads]
            index = imbalance.index(max(imbalance))
        else:
            index = layers.index(layer)
        figures.append(("placement", plots.placement_figure(
            experts["placement"][index], loads[index], layer=layers[index],
            title=f"{name}: expert placement (EP group 0, stage 0)")))
    return _save_all(figures, out_dir)


def plot_accuracy(path: Path, out_dir: str | Path) -> list[Path]:
    """Predicted vs measured scatter of an accuracy CSV (``name,measured_s,predicted_s``)."""
    from moesim.report import plots

    rows = _read_csv(path)
    need = {"name", "measured_s", "predicted_s"}
    if not rows or not need <= set(rows[0]):
        raise MoESimError(f"{path}: an accuracy CSV needs a header with {', '.join(sorted(need))}"
                          " and at least one row")
    for line, row in enumerate(rows, start=2):
        for column in ("measured_s", "predicted_s"):
            if _csv_number(row, column, path, line) <= 0:
                raise ScenarioError(f"column {column}: times must be > 0 seconds, got "
                                    f"{row[column]!r} (row {row.get('name')!r})",
                                    source=str(path), field=f"line {line}")
    fig = plots.accuracy_figure(rows, title=f"moesim accuracy: predicted vs measured ({path.name})")
    return _save_all([("accuracy", fig)], out_dir)


def _save_all(figures: list[tuple[str, Any]], out_dir: str | Path) -> list[Path]:
    """Save each (stem, figure) with :func:`plots.save_figure`; if one fails, the files this call
    wrote are removed again (a failed plot leaves nothing behind)."""
    from moesim.report import plots

    written: list[Path] = []
    try:
        for stem, fig in figures:
            written += plots.save_figure(fig, out_dir, stem)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return written


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file (bounded in size, moesim.spec.limits) as dicts by header."""
    from moesim.spec.limits import read_text_bounded

    try:
        return list(csv.DictReader(read_text_bounded(path, limit=256 * 2**20).splitlines()))
    except csv.Error as exc:
        raise ScenarioError(f"not a valid CSV: {exc}", source=str(path)) from None


def _csv_number(row: dict[str, Any], column: str, path: Path, line: int) -> float:
    """``row[column]`` as a finite float; else a ScenarioError naming the file, line and column."""
    value: Any = row.get(column)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        shown = "nothing" if value in (None, "") else repr(value)[:40]
        raise ScenarioError(f"column {column}: expected a finite number, got {shown}",
                            source=str(path), field=f"line {line}")
    return number


def _read_json(path: Path) -> Any:
    """A results/manifest JSON file, bounded in size and depth (moesim.spec.limits)."""
    from moesim.spec.limits import load_json_text, read_text_bounded

    return load_json_text(read_text_bounded(path, limit=256 * 2**20), source=str(path))
