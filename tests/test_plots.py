"""Plots: each figure function draws the data it is given, with labelled axes and a title.

The figures are inspected as matplotlib objects (lines, bars, images, labels), on small data whose
expected picture is known by hand; one test runs ``moesim plot`` end to end on real outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.patches import Rectangle

from moesim.cli import main
from moesim.errors import MoESimError
from moesim.report import plots
from moesim.report.cli import plot_results

from .conftest import REPO


def sweep_row(ep, nodes, tps, step=0.2, error=""):
    row = {"point": f"ep={ep},nodes={nodes}", "parallelism.ep": ep, "cluster.nodes": nodes,
           "error": error}
    if not error:
        row.update(tokens_per_s_per_device=tps, step_time_s=step,
                   breakdown_compute_s=step / 2, breakdown_exposed_alltoall_s=step / 4,
                   breakdown_pipeline_bubble_s=step / 4)
    return row


ROWS = [sweep_row(1, 1, 0, error="OutOfMemory: too big"), sweep_row(1, 2, 900.0),
        sweep_row(2, 1, 800.0), sweep_row(2, 2, 700.0, step=0.4)]
AXES = [["parallelism.ep"], ["cluster.nodes"]]


def test_throughput_one_line_per_other_axis_and_failures_marked():
    fig = plots.throughput_figure(ROWS, AXES, "parallelism.ep", title="demo: throughput")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "parallelism.ep"
    assert ax.get_ylabel() == "throughput (tokens/s per device)"
    assert ax.get_title() == "demo: throughput"
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert set(by_label) == {"nodes=1", "nodes=2", "failed (see error column)"}
    assert list(by_label["nodes=1"].get_xdata()) == [2]     # ep=1, nodes=1 failed
    assert list(by_label["nodes=1"].get_ydata()) == [800.0]
    assert list(by_label["nodes=2"].get_xdata()) == [1, 2]
    assert list(by_label["nodes=2"].get_ydata()) == [900.0, 700.0]
    assert list(by_label["failed (see error column)"].get_xdata()) == [1]
    assert ax.get_ylim()[0] == 0


def test_throughput_zip_axis_shares_the_x_ticks_and_strings_are_categories():
    rows = [{"a.x": v, "a.y": w, "b": s, "tokens_per_s_per_device": t, "error": ""}
            for (v, w), s, t in [(("p", 1), "u", 5.0), (("q", 2), "u", 6.0),
                                 (("p", 1), "v", 7.0), (("q", 2), "v", 8.0)]]
    fig = plots.throughput_figure(rows, [["a.x", "a.y"], ["b"]], "a.x", title="t")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "a.x / a.y"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["p / 1", "q / 2"]
    assert sorted(line.get_label() for line in ax.get_lines()) == ["b=u", "b=v"]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[0, 1], [0, 1]]


def test_breakdown_stacks_to_the_step_time_in_a_readable_unit():
    good = [r for r in ROWS if not r["error"]]
    fig = plots.breakdown_figure(ROWS, ["1\n1", "1\n2", "2\n1", "2\n2"], title="demo: parts",
                                 xlabel="ep / nodes")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "time per step (ms)"
    assert ax.get_xlabel() == "ep / nodes" and ax.get_title() == "demo: parts"
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 3 * len(ROWS)                        # 3 parts present, 4 points
    tops = {}
    for bar in bars:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), bar.get_y() + bar.get_height())
    assert tops[0] == 0.0                                     # the failed point has no bar
    assert [tops[i] for i in (1, 2, 3)] == pytest.approx([1e3 * r["step_time_s"] for r in good])
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "compute", "exposed all-to-all", "pipeline bubble"}
    assert any("OutOfMemory" in t.get_text() for t in ax.texts)


def test_link_heatmap_places_each_link_on_its_node_and_device():
    links = [{"link": "n1.gpu2->n1.nvsw", "class": "scale_up", "utilisation": 0.5},
             {"link": "n0.nvsw->n0.gpu0", "class": "scale_up", "utilisation": 0.25},
             {"link": "n0.gpu1->leaf0", "class": "scale_out", "utilisation": 0.1},
             {"link": "leaf0->core", "class": "fabric", "utilisation": 0.75}]
    fig = plots.link_heatmap_figure(links, title="demo: links", complete=False)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"scale_up: device -> nvsw", "scale_up: nvsw -> device",
                           "scale_out: device -> leaf", "switch -> switch"}
    up = panels["scale_up: device -> nvsw"].images[0].get_array()
    assert up.shape == (2, 3) and up[1, 2] == 50.0 and np.ma.is_masked(up[0, 0])
    assert panels["scale_up: nvsw -> device"].images[0].get_array()[0, 0] == 25.0
    assert panels["switch -> switch"].images[0].get_array()[0, 0] == 75.0
    assert panels["scale_out: device -> leaf"].get_xlabel() == "device index in node"
    assert panels["scale_out: device -> leaf"].get_ylabel() == "node"
    colourbar = [ax for ax in fig.axes if not ax.get_title()][0]
    assert colourbar.get_ylabel() == "utilisation (% of the step)"
    assert "demo: links" in fig.get_suptitle()


def test_gantt_rows_are_trace_tracks_and_bars_are_events():
    events = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "stage 0"}},
              {"ph": "M", "name": "thread_name", "pid": 0, "tid": 1, "args": {"name": "compute"}},
              {"ph": "M", "name": "thread_name", "pid": 0, "tid": 2, "args": {"name": "comm"}},
              {"ph": "X", "pid": 0, "tid": 1, "cat": "compute", "name": "a", "ts": 0, "dur": 400},
              {"ph": "X", "pid": 0, "tid": 1, "cat": "compute", "name": "b", "ts": 600, "dur": 400},
              {"ph": "X", "pid": 0, "tid": 2, "cat": "alltoall", "name": "c", "ts": 400,
               "dur": 200}]
    fig = plots.gantt_figure(events, title="demo: step")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0 | compute", "stage 0 | comm"]
    assert ax.get_xlabel() == "time in step (ms)" and ax.get_title() == "demo: step"
    spans = sorted((round((e.y0 + e.y1) / 2), round(e.x0, 9), round(e.x1, 9))
                   for c in ax.collections if isinstance(c, PolyCollection)
                   for e in (p.get_extents() for p in c.get_paths()))
    assert spans == [(0, 0.0, 0.4), (0, 0.6, 1.0), (1, 0.4, 0.6)]   # (row, start, end) in ms
    assert ax.get_xlim() == pytest.approx((0.0, 1.0))       # 1000 us step shown in ms
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"compute", "all-to-all"}


def test_expert_load_image_is_load_over_layer_mean():
    load = [[1.0, 3.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]
    fig = plots.expert_load_figure(load, [3, 5], title="demo: load")
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (2, 4)
    assert image[0, 1] == pytest.approx(1.5) and image[1].tolist() == [1.0] * 4
    assert image[0, 2] == pytest.approx(1 / 2.0)              # zero load clipped to the floor
    assert [t.get_text() for t in ax.get_yticklabels()] == ["3", "5"]
    assert ax.get_xlabel() == "expert id" and ax.get_ylabel() == "MoE layer (block index)"


def test_placement_map_splits_load_over_replicas():
    # 2 devices x 2 slots; expert 0 replicated on both devices
    fig = plots.placement_figure([[0, 1], [0, 2]], [4.0, 2.0, 1.0], layer=7, title="demo: map")
    ax, side = fig.axes[0], fig.axes[1]
    image = ax.images[0].get_array()                          # [devices, experts] / mean load
    mean = (2.0 + 2.0 + 2.0 + 1.0) / 2                        # devices carry 4 and 3 tokens
    assert image[0, 0] == pytest.approx(2.0 / mean) and image[1, 2] == pytest.approx(1 / mean)
    assert np.ma.is_masked(image[0, 2]) and np.ma.is_masked(image[1, 1])
    widths = [p.get_width() for p in side.patches]
    assert widths == pytest.approx([4.0 / mean, 3.0 / mean])
    assert ax.get_xlabel() == "expert id" and ax.get_ylabel() == "device (rank in EP group)"
    assert side.get_xlabel() == "device load / mean" and "layer 7" in ax.get_title()


def test_accuracy_scatter_and_error_in_title():
    rows = [{"name": "a", "measured_s": "0.010", "predicted_s": "0.011"},
            {"name": "b", "measured_s": "0.020", "predicted_s": "0.016"}]
    fig = plots.accuracy_figure(rows, title="demo: accuracy")
    ax = fig.axes[0]
    points = [c for c in ax.collections if isinstance(c, PathCollection)][0].get_offsets()
    assert np.allclose(points, [[10.0, 11.0], [20.0, 16.0]])  # in ms
    assert ax.get_xlabel() == "measured time (ms)" and ax.get_ylabel() == "predicted time (ms)"
    assert "mean abs. error 15.0%, max 20.0%" in ax.get_title()  # (10% + 20%) / 2
    assert ax.get_xscale() == ax.get_yscale() == "log"


def test_save_figure_writes_png_and_svg(tmp_path):
    rows = [{"name": "a", "measured_s": "1.0", "predicted_s": "1.2"}]
    png, svg = plots.save_figure(plots.accuracy_figure(rows, title="t"), tmp_path, "acc")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert b"<svg" in svg.read_bytes()[:1000]


def test_moesim_plot_on_a_sweep_a_run_and_an_accuracy_csv(tmp_path, monkeypatch):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: tiny-ep\nbase: {REPO / 'scenarios' / 'tiny-cpu.yaml'}\n"
                     "sweep: {grid: {parallelism.ep: [1, 2], routing.zipf_s: [0.0, 1.0]}}\n")
    assert main(["sweep", str(sweep), "-o", str(tmp_path / "sw"), "-j", "1", "-q"]) == 0
    assert main(["run", str(REPO / "scenarios" / "tiny-cpu.yaml"), "-o",
                 str(tmp_path / "run")]) == 0
    (tmp_path / "acc.csv").write_text("name,measured_s,predicted_s\nx,0.5,0.4\ny,1.0,1.1\n")
    figures = {}    # stem -> Figure; drawing them all is slow and the tests above inspect them

    def keep(fig, out_dir, stem):
        figures[stem] = fig
        return [tmp_path / f"{stem}.png"]

    monkeypatch.setattr(plots, "save_figure", keep)
    plot_results(tmp_path / "sw", tmp_path / "p")
    assert figures["throughput-vs-parallelism-ep"].axes[0].get_title() == (
        "tiny-ep: throughput vs parallelism.ep\nbase scenario: tiny-cpu")
    assert len(figures["breakdown"].axes[0].get_xticklabels()) == 4
    plot_results(tmp_path / "run", tmp_path / "p")
    plot_results(tmp_path / "acc.csv", tmp_path / "p")
    assert set(figures) == {"throughput-vs-parallelism-ep", "throughput-vs-routing-zipf_s",
                            "breakdown", "links", "gantt", "expert-load", "placement",
                            "accuracy"}
    assert figures["expert-load"].axes[0].images[0].get_array().shape == (4, 8)  # tiny-cpu
    assert all(fig.axes and any(ax.get_title() or fig.get_suptitle() for ax in fig.axes)
               for fig in figures.values())
    with pytest.raises(MoESimError, match="not a swept field"):
        plot_results(tmp_path / "sw", tmp_path / "p", x="seed")
    with pytest.raises(MoESimError, match="not a sweep folder"):
        plot_results(tmp_path, tmp_path / "p")
