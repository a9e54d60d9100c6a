"""Figures of sweeps and single runs: what users look at to answer "what if".

Each function takes plain data (sweep rows, ``results.json`` sections, trace events, accuracy
rows) and returns a :class:`matplotlib.figure.Figure` on the Agg canvas, without pyplot's global
state; :func:`save_figure` writes it as PNG and SVG. Times are shown in the unit that suits their
size (us, ms or s), always named on the axis.

Kinds: throughput per device vs a swept field (one line per combination of the other axes);
step-time breakdown as stacked bars; per-link utilisation heatmaps of the topology; a Gantt of
one step's trace; expert load [layer x expert]; expert placement [device x expert]; predicted vs
measured times of the accuracy benchmark.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

__all__ = ["BREAKDOWN_PARTS", "throughput_figure", "breakdown_figure", "link_heatmap_figure",
           "gantt_figure", "expert_load_figure", "placement_figure", "accuracy_figure",
           "save_figure", "time_unit"]

# Step-time parts, bottom to top, with their legend labels and colours.
BREAKDOWN_PARTS = {"compute": ("compute", "#4c72b0"),
                   "exposed_alltoall": ("exposed all-to-all", "#dd8452"),
                   "exposed_other_comm": ("other communication", "#8172b3"),
                   "imbalance_wait": ("load-imbalance wait", "#c44e52"),
                   "pipeline_bubble": ("pipeline bubble", "#b0b0b0")}
# Trace categories in the Gantt.
EVENT_COLOURS = {"compute": "#4c72b0", "alltoall": "#dd8452", "tp_comm": "#8172b3",
                 "dp_comm": "#937860", "optimizer": "#55a868", "link": "#dd8452",
                 "forward": "#a1c9f4", "backward": "#8de5a1"}
_FALLBACK = ("#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def time_unit(seconds: float) -> tuple[float, str]:
    """(multiplier, name) to show times of about ``seconds``: us, ms or s."""
    if seconds < 1e-3:
        return 1e6, "us"
    return (1e3, "ms") if seconds < 1.0 else (1.0, "s")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path)
    return paths


def _show(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def throughput_figure(rows: list[dict], axes: list[list[str]], x: str, *, title: str,
                      y: str = "tokens_per_s_per_device") -> Figure:
    """Throughput per device vs swept field ``x``; one line per combination of the other axes.

    ``axes`` groups the swept fields that move together (a zip group is one axis). Points that
    failed (error rows) are drawn as red crosses on the x axis.
    """
    x_axis = next(a for a in axes if x in a)
    others = [f for a in axes if a is not x_axis for f in a]
    xs = list(dict.fromkeys(_key(r, x_axis) for r in rows))
    numeric = _numeric([v[x_axis.index(x)] for v in xs])
    pos = {v: (v[x_axis.index(x)] if numeric else i) for i, v in enumerate(xs)}
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    lines = list(dict.fromkeys(_key(r, others) for r in rows))
    for i, line in enumerate(lines):
        mine = [r for r in rows if _key(r, others) == line and not r.get("error")]
        mine.sort(key=lambda r: xs.index(_key(r, x_axis)))
        label = ", ".join(f"{f.split('.')[-1]}={_show(v)}" for f, v in zip(others, line))
        ax.plot([pos[_key(r, x_axis)] for r in mine], [r[y] for r in mine], marker="o",
                color=f"C{i % 10}", label=label or None)
    failed = [r for r in rows if r.get("error")]
    if failed:
        ax.plot([pos[_key(r, x_axis)] for r in failed], [0] * len(failed), "x", color="red",
                markersize=9, clip_on=False, label="failed (see error column)")
    ax.set_ylim(bottom=0)
    ticks = [pos[v] for v in xs]
    if numeric and min(ticks) > 0 and max(ticks) / min(ticks) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [" / ".join(_show(p) for p in v) for v in xs])
    ax.minorticks_off()
    ax.set_xlabel(" / ".join(x_axis))
    ax.set_ylabel("throughput (tokens/s per device)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lines != [()] or failed:
        ax.legend(fontsize=8, title=", ".join(f.split(".")[-1] for f in others) or None,
                  title_fontsize=8)
    return fig


def _key(row: dict, fields: Sequence[str]) -> tuple:
    return tuple(_hashable(row.get(f)) for f in fields)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def breakdown_figure(rows: list[dict], labels: list[str], *, title: str) -> Figure:
    """Stacked bars of each row's step-time breakdown (``breakdown_<part>_s`` columns)."""
    parts = [p for p in BREAKDOWN_PARTS if any(f"breakdown_{p}_s" in r for r in rows)]
    parts += sorted({k[len("breakdown_"):-2] for r in rows for k in r
                     if k.startswith("breakdown_") and k[len("breakdown_"):-2] not in parts})
    longest = max((r.get("step_time_s") or 0.0 for r in rows), default=0.0)
    scale, unit = time_unit(longest or 1.0)
    fig = _figure(max(5.0, 1.2 + 0.55 * len(rows)), 5.2)
    ax = fig.add_subplot()
    bottom = np.zeros(len(rows))
    for i, part in enumerate(parts):
        label, colour = BREAKDOWN_PARTS.get(part, (part.replace("_", " "),
                                                   _FALLBACK[i % len(_FALLBACK)]))
        values = np.array([(r.get(f"breakdown_{part}_s") or 0.0) * scale for r in rows])
        ax.bar(range(len(rows)), values, bottom=bottom, color=colour, label=label, width=0.7)
        bottom += values
    for i, r in enumerate(rows):
        if r.get("error"):
            ax.text(i, 0, " " + r["error"].split(":")[0], rotation=90, ha="center",
                    va="bottom", fontsize=8, color="red")
    rotate = 0 if max((len(s) for s in labels), default=0) * len(rows) < 70 else 90
    ax.set_xticks(range(len(rows)), labels, rotation=rotate, fontsize=8)
    ax.set_ylabel(f"time per step ({unit})")
    ax.set_xlabel("sweep point" if len(rows) > 1 else "")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


_DEVICE = re.compile(r"^n(\d+)\.([a-z]+)(\d+)$")


def _split_link(name: str) -> tuple[str, str]:
    a, _, b = name.partition("->")
    return a, b


def _switch_kind(name: str) -> str:
    """``n0.nvsw`` -> nvsw, ``leaf3`` -> leaf, ``g0.rail5`` -> rail."""
    return re.sub(r"\d+", "", name.split(".")[-1])


def link_heatmap_figure(links: list[dict], *, title: str, complete: bool) -> Figure:
    """Utilisation of each link: one [node x device] panel per (class, direction) of the links
    that attach devices, and one [source x destination] panel for switch-to-switch links.

    ``links``: dicts with ``link`` ("a->b"), ``class`` and ``utilisation`` (0..1). Links not
    listed are grey (``complete=False``: only the busiest were reported) or zero.
    """
    panels: dict[str, dict[tuple[int, int], float]] = {}
    fabric: dict[tuple[str, str], float] = {}
    for entry in links:
        a, b = _split_link(entry["link"])
        da, db = _DEVICE.match(a), _DEVICE.match(b)
        util = 100.0 * entry["utilisation"]
        if da or db:
            dev = da or db
            peer = _switch_kind(b if da else a) if not (da and db) else "peer"
            arrow = f"device -> {peer}" if da else f"{peer} -> device"
            cell = (int(dev.group(1)), int(dev.group(3)))
            panel = panels.setdefault(f"{entry['class']}: {arrow}", {})
            panel[cell] = max(panel.get(cell, 0.0), util)
        else:
            fabric[(a, b)] = util
    count = len(panels) + bool(fabric)
    if count == 0:
        raise ValueError("no links to draw")
    nodes = 1 + max((n for p in panels.values() for n, _ in p), default=0)
    devs = 1 + max((d for p in panels.values() for _, d in p), default=0)
    vmax = max([100.0 * e["utilisation"] for e in links] + [1e-9])
    fig = _figure(min(4.2 * count, 17), 1.6 + min(nodes, 48) * 0.22 + 1.2)
    grid = fig.subplots(1, count, squeeze=False)[0]
    image = None
    for ax, (name, cells) in zip(grid, sorted(panels.items())):
        matrix = np.full((nodes, devs), np.nan if not complete else 0.0)
        for (n, d), u in cells.items():
            matrix[n, d] = u
        image = _heat(ax, matrix, vmax, [f"{d}" for d in range(devs)],
                      [f"n{n}" for n in range(nodes)])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("device index in node")
        ax.set_ylabel("node")
    if fabric:
        image = _fabric_panel(grid[-1], fabric, vmax)
    fig.colorbar(image, ax=list(grid), label="link utilisation (% of bandwidth over the step)",
                 shrink=0.9)
    note = "" if complete else " (grey: not among the busiest links reported)"
    fig.suptitle(title + note, fontsize=10)
    return fig


def _heat(ax, matrix: np.ndarray, vmax: float, xlabels: list[str], ylabels: list[str]):
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#e0e0e0")
    image = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    step_x, step_y = max(1, len(xlabels) // 16), max(1, len(ylabels) // 24)
    ax.set_xticks(range(0, len(xlabels), step_x), xlabels[::step_x], fontsize=8)
    ax.set_yticks(range(0, len(ylabels), step_y), ylabels[::step_y], fontsize=8)
    return image


def _fabric_panel(ax, fabric: dict[tuple[str, str], float], vmax: float):
    """[source x destination] switch links; a pair without a link stays grey."""
    sources = sorted({a for a, _ in fabric}, key=_natural)
    targets = sorted({b for _, b in fabric}, key=_natural)
    matrix = np.full((len(sources), len(targets)), np.nan)
    for (a, b), u in fabric.items():
        matrix[sources.index(a), targets.index(b)] = u
    image = _heat(ax, matrix, vmax, targets, sources)
    ax.tick_params(axis="x", rotation=90)
    ax.set_title("switch -> switch", fontsize=9)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    return image


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def gantt_figure(events: list[dict], *, title: str, max_rows: int = 40) -> Figure:
    """Gantt of one step from Chrome trace events: one row per (process, thread) track, bars
    coloured by category (pipeline chunks by forward / backward); gaps are idle time."""
    names = {(e["pid"], e.get("tid", 0)): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    slices = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]
    if not slices:
        raise ValueError("the trace has no timed events")
    tracks = sorted({(e["pid"], e.get("tid", 0)) for e in slices})[:max_rows]
    end = max(e["ts"] + e["dur"] for e in slices) * 1e-6
    scale, unit = time_unit(end)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in slices:
        track = (e["pid"], e.get("tid", 0))
        if track in tracks:
            row = tracks.index(track)
            bars.setdefault((row, _event_kind(e)), []).append(
                (e["ts"] * 1e-6 * scale, e["dur"] * 1e-6 * scale))
    fig = _figure(11, 1.4 + 0.34 * len(tracks))
    ax = fig.add_subplot()
    kinds = list(dict.fromkeys(kind for _, kind in sorted(bars)))
    colours = {k: EVENT_COLOURS.get(k, _FALLBACK[i % len(_FALLBACK)]) for i, k in enumerate(kinds)}
    for (row, kind), spans in bars.items():
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=colours[kind], linewidth=0)
    labels = [f"{procs.get(pid, pid)} | {names.get((pid, tid), tid)}" for pid, tid in tracks]
    ax.set_yticks(range(len(tracks)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, end * scale)
    ax.set_xlabel(f"time in step ({unit})")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=colours[k], label=k) for k in kinds], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), title="white: idle", title_fontsize=8)
    return fig


def _event_kind(event: dict) -> str:
    cat = event.get("cat", "other")
    if cat == "pipeline":
        return "backward" if event["name"].startswith("B") else "forward"
    return cat


def expert_load_figure(tokens_per_expert: list[list[float]], layers: list[int], *,
                       title: str) -> Figure:
    """Heatmap of expert load [MoE layer x expert], relative to each layer's mean load."""
    load = np.asarray(tokens_per_expert, dtype=float)          # [moe layers, experts]
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-30)
    fig = _figure(min(4 + 0.05 * load.shape[1], 14), 1.8 + min(0.3 * load.shape[0], 9))
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))
    image = ax.imshow(rel, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    step = max(1, load.shape[0] // 24)
    ax.set_yticks(range(0, len(layers), step), [str(v) for v in layers[::step]], fontsize=8)
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer (block index)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="tokens routed / layer mean (1 = balanced)")
    return fig


def placement_figure(placement: list[list[int]], load: list[float], *, layer: int,
                     title: str) -> Figure:
    """Map [device x expert] of one layer: a cell is coloured where the device hosts a replica of
    the expert, by the load that replica takes (the expert's tokens / its replicas, relative to
    the mean per device); the right panel shows each device's total.

    ``placement``: [devices][slots] -> expert id (one layer); ``load``: [experts] tokens.
    """
    slots = np.asarray(placement, dtype=int)                    # [devices, slots]
    experts = len(load)
    replicas = np.bincount(slots.ravel(), minlength=experts)
    share = np.asarray(load, dtype=float) / np.maximum(replicas, 1)
    matrix = np.full((slots.shape[0], experts), np.nan)
    for device, hosted in enumerate(slots):
        for e in hosted:
            matrix[device, e] = share[e]
    per_device = np.nansum(matrix, axis=1)
    mean = per_device.mean() if per_device.mean() > 0 else 1.0
    fig = _figure(min(5 + 0.05 * experts, 15), 2.0 + min(0.22 * slots.shape[0], 10))
    ax, side = fig.subplots(1, 2, width_ratios=[5, 1], sharey=True)
    cmap = matplotlib.colormaps["magma_r"].copy()
    cmap.set_bad("white")
    image = ax.imshow(matrix / mean, cmap=cmap, aspect="auto", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert id")
    ax.set_ylabel("device (rank in EP group)")
    ax.set_title(f"layer {layer}: replicas and their load", fontsize=9)
    side.barh(range(len(per_device)), per_device / mean, color="#4c72b0")
    side.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    side.set_xlabel("device load / mean")
    fig.colorbar(image, ax=[ax, side], label="replica load / mean device load", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return fig


def accuracy_figure(rows: list[dict], *, title: str) -> Figure:
    """Predicted vs measured times (log-log) with the y = x line and a +-20% band.

    ``rows``: dicts with ``name``, ``measured_s``, ``predicted_s`` (seconds, > 0).
    """
    measured = np.array([float(r["measured_s"]) for r in rows])
    predicted = np.array([float(r["predicted_s"]) for r in rows])
    scale, unit = time_unit(float(np.median(measured)))
    lo = min(measured.min(), predicted.min()) * scale / 1.5
    hi = max(measured.max(), predicted.max()) * scale * 1.5
    fig = _figure(6.2, 5.6)
    ax = fig.add_subplot()
    line = np.array([lo, hi])
    ax.fill_between(line, line / 1.2, line * 1.2, color="#dddddd", label="within 20%")
    ax.plot(line, line, color="black", linewidth=0.8, label="predicted = measured")
    ax.scatter(measured * scale, predicted * scale, color="#4c72b0", zorder=3, label="case")
    if len(rows) <= 25:
        for r, mx, py in zip(rows, measured * scale, predicted * scale):
            ax.annotate(str(r["name"]), (mx, py), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"measured time ({unit})")
    ax.set_ylabel(f"predicted time ({unit})")
    error = np.abs(predicted - measured) / measured
    ax.set_title(f"{title}\n{len(rows)} cases, mean abs. error {100 * error.mean():.1f}%, "
                 f"max {100 * error.max():.1f}%", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return fig
