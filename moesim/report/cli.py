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
import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesim.errors import MoESimError

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

    manifest = _read_json(folder / "search.json")
    with open(folder / "search.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    name = Path(str(manifest.get("source", folder.name))).stem
    if manifest.get("serving"):
        fig = plots.pareto_figure(rows, title=f"{name}: serving layouts on "
                                  f"{manifest.get('devices')} devices")
        return plots.save_figure(fig, out_dir, "pareto")
    fig = plots.search_memory_figure(rows, title=f"{name}: training layouts on "
                                     f"{manifest.get('devices')} devices")
    return plots.save_figure(fig, out_dir, "step-time-vs-memory")


def plot_sweep(folder: Path, out_dir: str | Path, *, x: str | None = None) -> list[Path]:
    """Throughput vs each swept axis (or ``x`` only) and the breakdown of every point."""
    from moesim.report import plots
    from moesim.sweep.runner import read_rows

    rows, _ = read_rows(folder / "results.jsonl")
    if not rows:
        raise MoESimError(f"{folder / 'results.jsonl'} holds no finished points yet")
    manifest = _read_json(folder / "sweep.json") if (folder / "sweep.json").exists() else {}
    name, scenario = manifest.get("name", folder.name), manifest.get("scenario", "")
    axes = manifest.get("axes") or [[f] for f in manifest.get("fields", [])]
    if x is not None and not any(x in a for a in axes):
        raise MoESimError(f"--x {x!r} is not a swept field (swept: "
                          f"{', '.join(f for a in axes for f in a)})")
    about = f"\nbase scenario: {scenario}" if scenario else ""
    written = []
    for field in [x] if x is not None else [a[0] for a in axes]:
        fig = plots.throughput_figure(rows, axes, field,
                                      title=f"{name}: throughput vs {field}{about}")
        written += plots.save_figure(fig, out_dir, f"throughput-vs-{field.replace('.', '-')}")
    fields = [f for a in axes for f in a]
    labels = ["\n".join(plots.show_value(r.get(f)) for f in fields) for r in rows]
    fig = plots.breakdown_figure(rows, labels, xlabel=" / ".join(fields),
                                 title=f"{name}: step-time breakdown per point{about}")
    return written + plots.save_figure(fig, out_dir, "breakdown")


def plot_run(folder: Path, out_dir: str | Path, *, layer: int | None = None,
             window: tuple[float, float] | None = None) -> list[Path]:
    """Breakdown, link utilisation, Gantt (if trace.json), expert load and placement of a run."""
    from moesim.report import plots
    from moesim.results import run_label
    from moesim.sweep.runner import result_metrics

    result = _read_json(folder / "results.json")
    needed = ("scenario", "step_time", "tokens_per_s", "mfu", "breakdown", "memory", "alltoall",
              "experts", "links")
    missing = [k for k in needed if not isinstance(result, dict) or k not in result]
    if missing:
        raise MoESimError(f"{folder / 'results.json'}: not a moesim results.json (no "
                          f"{', '.join(missing)})")
    name = run_label(result["scenario"], result.get("overrides", []))
    written = []
    row = result_metrics(result)
    fig = plots.breakdown_figure([row], [name], title=f"{name}: step-time breakdown "
                                 "(critical stage's busiest device)")
    written += plots.save_figure(fig, out_dir, "breakdown")
    links = result["links"]
    listed = links.get("all") or links.get("busiest", [])
    # busiest lists at most 20 links with traffic: fewer means it lists all of them
    complete = "all" in links or len(listed) < 20
    if listed:
        fig = plots.link_heatmap_figure(listed, complete=complete,
                                        title=f"{name}: link utilisation ({links.get('scope')})")
        written += plots.save_figure(fig, out_dir, "links")
    if (folder / "trace.json").exists():
        trace = _read_json(folder / "trace.json")
        what = f"{window[0]:g} s to {window[1]:g} s of one step" if window else "one step"
        fig = plots.gantt_figure(trace["traceEvents"], window=window,
                                 title=f"{name}: timeline of {what}")
        written += plots.save_figure(fig, out_dir, "gantt")
    return written + _expert_figures(result, out_dir, layer)


def _expert_figures(result: dict[str, Any], out_dir, layer: int | None) -> list[Path]:
    from moesim.report import plots
    from moesim.results import run_label

    name, experts = run_label(result["scenario"], result.get("overrides", [])), result["experts"]
    loads, layers = experts["tokens_per_expert"], experts["layers"]
    if not loads:
        return []
    fig = plots.expert_load_figure(loads, layers, title=f"{name}: expert load per MoE layer")
    written = plots.save_figure(fig, out_dir, "expert-load")
    if layer is None:
        imbalance = [max(v) / max(sum(v) / len(v), 1e-30) for v in loads]
        index = imbalance.index(max(imbalance))
    elif layer in layers:
        index = layers.index(layer)
    else:
        raise MoESimError(f"--layer {layer} is not an MoE block of {name} (MoE blocks: "
                          f"{layers[0]}..{layers[-1]})")
    fig = plots.placement_figure(experts["placement"][index], loads[index], layer=layers[index],
                                 title=f"{name}: expert placement (EP group 0, stage 0)")
    return written + plots.save_figure(fig, out_dir, "placement")


def plot_accuracy(path: Path, out_dir: str | Path) -> list[Path]:
    """Predicted vs measured scatter of an accuracy CSV (``name,measured_s,predicted_s``)."""
    from moesim.report import plots
    from moesim.spec.limits import read_text_bounded

    rows = list(csv.DictReader(read_text_bounded(path).splitlines()))
    need = {"name", "measured_s", "predicted_s"}
    if not rows or not need <= set(rows[0]):
        raise MoESimError(f"{path}: an accuracy CSV needs a header with {', '.join(sorted(need))}"
                          " and at least one row")
    try:
        bad = next((r["name"] for r in rows if min(float(r["measured_s"]),
                                                   float(r["predicted_s"])) <= 0), None)
    except ValueError as exc:
        raise MoESimError(f"{path}: {exc}") from None
    if bad is not None:
        raise MoESimError(f"{path}: row {bad!r}: times must be > 0 seconds")
    fig = plots.accuracy_figure(rows, title=f"moesim accuracy: predicted vs measured ({path.name})")
    return plots.save_figure(fig, out_dir, "accuracy")


def _read_json(path: Path) -> Any:
    """A results/manifest JSON file, bounded in size and depth (moesim.spec.limits)."""
    from moesim.spec.limits import load_json_text, read_text_bounded

    return load_json_text(read_text_bounded(path, limit=256 * 2**20), source=str(path))
