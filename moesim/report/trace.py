"""Chrome / Perfetto trace of one simulated step (``trace.json``).

One process per pipeline stage (its straggler device: the EP-group member with the most expert
work), with a compute track and a communication track; one process for the busiest links, whose
tracks show when all-to-alls load them. Open it in https://ui.perfetto.dev or chrome://tracing.
Time is in microseconds, as the trace event format requires.
"""

from __future__ import annotations

from typing import Any

__all__ = ["chrome_trace"]

_COLOURS = {"compute": "thread_state_running", "alltoall": "terrible", "tp_comm": "bad",
            "idle": "grey", "dp_comm": "yellow", "optimizer": "good"}


def chrome_trace(sim, max_events: int = 200_000) -> dict[str, Any]:
    """The trace event JSON object of ``sim`` (a :class:`moesim.sim.simulate.Simulation`)."""
    s = sim.scenario
    events: list[dict[str, Any]] = []
    rep = sim.rep_device
    links_pid = s.parallelism.pp + 1
    for stage in range(s.parallelism.pp):
        rank = int(sim.layout.ep_group(stage, 0)[rep])
        events.append(_meta("process_name", stage, 0, f"stage {stage} · {sim.topology.devices[rank]}"))
        events.append(_meta("thread_name", stage, 1, "compute stream"))
        events.append(_meta("thread_name", stage, 2, "comm stream (all-to-all, TP)"))
        events.append(_meta("thread_name", stage, 3, "pipeline chunks"))
    events.append(_meta("process_name", links_pid, 0, "busiest links (EP group 0, stage 0)"))
    busiest = sim.result.links["busiest"][: s.outputs.trace_links]
    link_tid = {b["link"]: i + 1 for i, b in enumerate(busiest)}
    for name, tid in link_tid.items():
        events.append(_meta("thread_name", links_pid, tid, name))
    index_of = {f"{a}->{b}": i for i, (a, b) in enumerate(sim.topology.link_ends)}
    for span in sim.spans:
        if len(events) >= max_events:
            break
        run = sim.runs[(span.stage, span.kind, span.chunk)]
        label = f"{span.kind} mb{span.micro_batch} chunk{span.chunk}"
        events.append(_slice(span.stage, 3, label, "pipeline", span.start, span.end - span.start,
                             "generic_work"))
        for i, op in enumerate(run.ops):
            start = span.start + float(run.start[i, rep])
            dur = float(run.end[i, rep] - run.start[i, rep])
            if dur <= 0:
                continue
            tid = 1 if op.stream == "compute" else 2
            events.append(_slice(span.stage, tid, f"{op.name} L{op.layer}", op.category, start,
                                 dur, _COLOURS.get(op.category)))
            if op.collective is not None and span.stage == 0:
                for link in op.collective.link_index:
                    name = "->".join(sim.topology.link_ends[link])
                    if name in link_tid:
                        events.append(_slice(links_pid, link_tid[name], op.name, "link",
                                             start, dur, "terrible"))
    del index_of
    for stage, end in enumerate(sim.stage_end):
        last = max(sp.end for sp in sim.spans if sp.stage == stage)
        if end > last:
            events.append(_slice(stage, 2, "gradient sync + optimizer", "dp_comm", last,
                                 end - last, "yellow"))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"scenario": s.name, "step_time_s": sim.result.step_time}}


def _meta(kind: str, pid: int, tid: int, name: str) -> dict[str, Any]:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _slice(pid, tid, name, cat, start_s, dur_s, colour) -> dict[str, Any]:
    event = {"ph": "X", "pid": pid, "tid": tid, "name": name, "cat": cat,
             "ts": round(start_s * 1e6, 3), "dur": round(dur_s * 1e6, 3)}
    if colour:
        event["cname"] = colour
    return event
