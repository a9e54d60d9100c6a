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

import io
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from moesim.results import write_bytes_atomic  # noqa: E402

__all__ = ["BREAKDOWN_PARTS", "throughput_figure", "breakdown_figure", "link_heatmap_figure",
           "gantt_figure", "expert_load_figure", "placement_figure", "accuracy_figure",
           "save_figure", "show_value", "time_unit"]

# Step-time parts, bottom to top, with their legend labels and colours.
BREAKDOWN_PARTS = {"compute": ("compute", "#4c72b0"),
                   "exposed_alltoall": ("exposed all-to-all", "#dd8452"),
                   "exposed_other_comm": ("other communication", "#8172b3"),
                   "imbalance_wait": ("load-imbalance wait", "#c44e52"),
                   "pipeline_bubble": ("pipeline bubble", "#b0b0b0")}
# Trace categories in the Gantt: colour and legend label.
EVENT_KINDS = {"compute": ("#4c72b0", "compute"), "alltoall": ("#dd8452", "all-to-all"),
               "tp_comm": ("#8172b3", "TP / CP communication"),
               "dp_comm": ("#937860", "gradient sync + optimizer"),
               "optimizer": ("#55a868", "optimizer"), "link": ("#e5ae38", "link busy (all-to-all)"),
               "forward": ("#a1c9f4", "forward chunk"), "backward": ("#8de5a1", "backward chunk")}
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


def _wrap(fig: Figure, text: str) -> str:
    """``text`` wrapped to the figure's width (about 11 characters per inch at 10-12 pt)."""
    width = max(30, int(fig.get_figwidth() * 11))
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` under ``out_dir``: both are rendered in memory first
    (a drawing error writes neither), then each is written atomically (never a half-written
    image); return their paths."""
    out = Path(out_dir)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    images = []
    for path in paths:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:])
        images.append(buffer.getvalue())
    for i, (path, data) in enumerate(zip(paths, images)):
        try:
            write_bytes_atomic(path, data)
        except BaseException:
            for done in paths[:i]:
                done.unlink(missing_ok=True)
            raise
    return paths


def show_value(value: Any) -> str:
    """A swept value as a short label (0.4, 64, eplb)."""
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
    # colour by the first other axis, line style by the rest, so that many lines stay distinct
    split = len(next((a for a in axes if a is not x_axis), []))
    heads = list(dict.fromkeys(line[:split] for line in lines))
    tails = list(dict.fromkeys(line[split:] for line in lines))
    for line in lines:
        mine = [r for r in rows if _key(r, others) == line and not r.get("error")]
        mine.sort(key=lambda r: xs.index(_key(r, x_axis)))
        label = ", ".join(f"{f.split('.')[-1]}={show_value(v)}" for f, v in zip(others, line))
        if not mine and label:
            label += " (every point failed)"
        style = tails.index(line[split:])
        ax.plot([pos[_key(r, x_axis)] for r in mine], [r[y] for r in mine],
                color=f"C{heads.index(line[:split]) % 10}", label=label or None,
                marker="os^Dv"[style % 5], linestyle=("-", "--", ":", "-.")[style % 4])
    failed = [r for r in rows if r.get("error")]
    if failed:
        ax.plot([pos[_key(r, x_axis)] for r in failed], [0] * len(failed), "x", color="red",
                markersize=9, clip_on=False, label="failed (see error column)")
    ax.set_ylim(bottom=0)
    ticks = [pos[v] for v in xs]
    if numeric and min(ticks) > 0 and max(ticks) / min(ticks) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [" / ".join(show_value(p) for p in v) for v in xs])
    ax.minorticks_off()
    ax.set_xlabel(" / ".join(x_axis))
    ax.set_ylabel("throughput (tokens/s per device)")
    ax.set_title(_wrap(fig, title))
    ax.grid(alpha=0.3)
    if lines != [()] or failed:
        ax.legend(fontsize=8)
    return fig


def _key(row: dict, fields: Sequence[str]) -> tuple:
    return tuple(_hashable(row.get(f)) for f in fields)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def breakdown_figure(rows: list[dict], labels: list[str], *, title: str,
                     xlabel: str = "") -> Figure:
    """Stacked bars of each row's step-time breakdown (``breakdown_<part>_s`` columns).

    ``labels``: one per row; a multi-line label (one swept value per line) stays horizontal
    while it fits under its bar, else it is written on one rotated line.
    """
    parts = [p for p in BREAKDOWN_PARTS if any(f"breakdown_{p}_s" in r for r in rows)]
    parts += sorted({k[len("breakdown_"):-2] for r in rows for k in r
                     if k.startswith("breakdown_") and k[len("breakdown_"):-2] not in parts})
    longest = max((r.get("step_time_s") or 0.0 for r in rows), default=0.0)
    scale, unit = time_unit(longest or 1.0)
    fig = _figure(max(7.0, 2.5 + 0.6 * len(rows)), 5.0)
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
    longest = max((len(part) for s in labels for part in s.split("\n")), default=0)
    fits = longest * 0.075 < 0.6 * (fig.get_figwidth() - 2.5) / max(1, len(rows))
    labels = labels if fits else [s.replace("\n", ", ") for s in labels]
    ax.set_xticks(range(len(rows)), labels, rotation=0 if fits else 90, fontsize=8)
    ax.set_ylabel(f"time per step ({unit})")
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.06 * max(float(bottom.max()), 1e-12))  # stacked bars' tops are sticky
    ax.set_title(_wrap(fig, title))
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
            assert dev is not None
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
    fig = _figure(min(1.5 + 4.2 * count, 17), 2.8 + min(nodes, 48) * 0.22)
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
    assert image is not None   # at least one panel was drawn
    fig.colorbar(image, ax=list(grid), label="utilisation (% of the step)", shrink=0.9)
    note = "" if complete else "\ngrey: not among the busiest links reported"
    fig.suptitle(_wrap(fig, title + note), fontsize=10)
    return fig


def _heat(ax, matrix: np.ndarray, vmax: float, xlabels: list[str], ylabels: list[str]):
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e0e0e0")
    image = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    step_x, step_y = max(1, len(xlabels) // 16), max(1, len(ylabels) // 24)
    ax.set_xticks(range(0, len(xlabels), step_x), xlabels[::step_x], fontsize=8)
    ax.set_yticks(range(0, len(ylabels), step_y), ylabels[::step_y], fontsize=8)
    if matrix.size <= 64:  # few cells: write the numbers in
        for (row, col), value in np.ndenumerate(matrix):
            if value == value:
                ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * vmax else "black")
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


def gantt_figure(events: list[dict], *, title: str, window: tuple[float, float] | None = None,
                 max_rows: int = 40) -> Figure:
    """Gantt of one step from Chrome trace events: one row per (process, thread) track, bars
    coloured by category (pipeline chunks by forward / backward); gaps are idle time.

    ``window``: (start, end) in seconds to zoom into; a bar's width is its true duration, so
    events much shorter than the shown span are thin (zoom in, or open the trace in Perfetto).
    """
    names = {(e["pid"], e.get("tid", 0)): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    slices = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]
    if not slices:
        raise ValueError("the trace has no timed events")
    tracks = sorted({(e["pid"], e.get("tid", 0)) for e in slices})[:max_rows]
    start, end = window or (0.0, max(e["ts"] + e["dur"] for e in slices) * 1e-6)
    scale, unit = time_unit(end - start if window else end)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in slices:
        track = (e["pid"], e.get("tid", 0))
        if track in tracks:
            bars.setdefault((tracks.index(track), _event_kind(e)), []).append(
                (e["ts"] * 1e-6 * scale, e["dur"] * 1e-6 * scale))
    fig = _figure(11, 1.4 + 0.34 * len(tracks))
    ax = fig.add_subplot()
    kinds = list(dict.fromkeys(kind for _, kind in sorted(bars)))
    style = {k: EVENT_KINDS.get(k, (_FALLBACK[i % len(_FALLBACK)], k)) for i, k in enumerate(kinds)}
    for (row, kind), spans in bars.items():
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=style[kind][0], linewidth=0,
                       rasterized=len(spans) > 200)   # keeps the SVG of a long trace small
    labels = [f"{procs.get(pid, pid)} | {names.get((pid, tid), tid)}" for pid, tid in tracks]
    ax.set_yticks(range(len(tracks)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(start * scale, end * scale)
    ax.set_xlabel(f"time in step ({unit})")
    ax.set_title(_wrap(fig, title))
    ax.legend(handles=[Patch(color=style[k][0], label=style[k][1]) for k in kinds], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), title="white: idle", title_fontsize=8)
    return fig


def _event_kind(event: dict) -> str:
    cat = event.get("cat", "other")
    if cat == "pipeline":
        return "backward" if event["name"].startswith("B") else "forward"
    return cat


def expert_load_figure(tokens_per_expert: list[list[float]], layers: list[int], *,
                       title: str) -> Figure:
    """Heatmap of expert load [MoE layer x expert], relative to each layer's mean load, on a log
    colour scale centred on 1 (white = balanced; an expert with no tokens takes the coldest
    colour)."""
    load = np.asarray(tokens_per_expert, dtype=float)          # [moe layers, experts]
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-30)
    positive = rel[rel > 0]
    span = max(2.0, float(rel.max()), 1.0 / float(positive.min()) if positive.size else 2.0)
    fig = _figure(max(6.5, min(3 + 0.05 * load.shape[1], 14)), 2.8 + min(0.2 * load.shape[0], 8))
    ax = fig.add_subplot()
    image = ax.imshow(np.maximum(rel, 1.0 / span), cmap="RdBu_r", aspect="auto",
                      norm=LogNorm(vmin=1.0 / span, vmax=span), interpolation="nearest")
    step = max(1, load.shape[0] // 24)
    ax.set_yticks(range(0, len(layers), step), [str(v) for v in layers[::step]], fontsize=8)
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer (block index)")
    ax.set_title(_wrap(fig, title))
    bar = fig.colorbar(image, ax=ax, label="tokens / layer mean")
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
             if 1.0 / span <= t <= span]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
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
    fig = _figure(min(5 + 0.04 * experts, 13), 2.2 + min(0.2 * slots.shape[0], 7))
    ax, side = fig.subplots(1, 2, width_ratios=[5, 1], sharey=True)
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="white")
    image = ax.imshow(matrix / mean, cmap=cmap, aspect="auto", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert id")
    ax.set_ylabel("device (rank in EP group)")
    ax.set_title(f"layer {layer}: replicas and their load", fontsize=9)
    side.barh(range(len(per_device)), per_device / mean, color="#4c72b0")
    side.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    side.set_xlabel("device load / mean")
    fig.colorbar(image, ax=[ax, side], label="replica load / mean device load", shrink=0.9)
    fig.suptitle(_wrap(fig, title), fontsize=10)
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
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"measured time ({unit})")
    ax.set_ylabel(f"predicted time ({unit})")
    error = np.abs(predicted - measured) / measured
    ax.set_title(_wrap(fig, title) + f"\n{len(rows)} cases, mean abs. error {100 * error.mean():.1f}%, "
                 f"max {100 * error.max():.1f}%", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return fig


def search_memory_figure(rows: list[dict], *, title: str) -> Figure:
    """Training search: step time against memory per device, one colour per layout family
    (TP/PP/EP); simulated layouts drawn filled, screened ones hollow.

    ``rows``: search.csv rows (strings or numbers) with ``layout``, ``simulated``,
    ``memory_bytes``, ``memory_capacity_bytes`` and ``step_time_s`` or ``screened_step_time_s``.
    """
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    families = list(dict.fromkeys(_family(r) for r in rows))   # rows come best first
    shown = families[:8]
    for i, fam in enumerate(shown):
        mine = [r for r in rows if _family(r) == fam]
        for simulated in (False, True):
            pts = [r for r in mine if _flag(r.get("simulated")) == simulated]
            if not pts:
                continue
            ax.scatter([float(r["memory_bytes"]) / 2**30 for r in pts],
                       [_step(r) for r in pts], s=36 if simulated else 14,
                       facecolors=f"C{i}" if simulated else "none", edgecolors=f"C{i}",
                       label=f"{fam}{' (simulated)' if simulated else ''}")
    rest = [r for r in rows if _family(r) not in shown]
    if rest:
        ax.scatter([float(r["memory_bytes"]) / 2**30 for r in rest], [_step(r) for r in rest],
                   s=8, color="0.7", label="other layouts")
    if rows:
        ax.axvline(float(rows[0]["memory_capacity_bytes"]) / 2**30, color="red", linestyle=":",
                   label="device memory")
    ax.set_yscale("log")
    ax.set_xlabel("memory per device (GiB, fullest stage)")
    ax.set_ylabel("step time (s; simulated where filled, else screened)")
    ax.set_title(_wrap(fig, title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def pareto_figure(rows: list[dict], *, title: str) -> Figure:
    """Serving search: tokens/s per GPU against tokens/s per user, the Pareto frontier joined.

    ``rows``: search.csv rows with ``tokens_per_s_per_gpu``/``tokens_per_s_per_user`` (or their
    ``screened_`` versions), ``meets_limits`` and ``pareto``.
    """
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()

    def xy(r: dict) -> tuple[float, float]:
        sim = _flag(r.get("simulated"))
        pre = "" if sim else "screened_"
        return float(r[f"{pre}tokens_per_s_per_user"]), float(r[f"{pre}tokens_per_s_per_gpu"])

    ok = [r for r in rows if _flag(r.get("meets_limits"))]
    bad = [r for r in rows if not _flag(r.get("meets_limits"))]
    if bad:
        xs, ys = zip(*[xy(r) for r in bad], strict=True)
        ax.scatter(xs, ys, s=8, color="0.75", label="breaks a latency limit")
    if ok:
        xs, ys = zip(*[xy(r) for r in ok], strict=True)
        ax.scatter(xs, ys, s=12, color="C0", label="within the limits")
    front = sorted((xy(r), r) for r in ok if _flag(r.get("pareto")))
    if front:
        ax.plot([p[0][0] for p in front], [p[0][1] for p in front], "-o", color="C3",
                label="Pareto frontier")
        for (x, y), r in front:
            ax.annotate(f"{r['layout']} b{r.get('batch_per_replica', '')}", (x, y), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("tokens/s per user (1 / TPOT)")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(_wrap(fig, title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _family(row: dict) -> str:
    return " ".join(p for p in str(row["layout"]).split() if p[:2] in ("TP", "PP", "EP"))


def _step(row: dict) -> float:
    value = row.get("step_time_s")
    return float(value) if value not in (None, "") else float(row["screened_step_time_s"])
