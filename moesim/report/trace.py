"""Chrome / Perfetto trace of one simulated step (``trace.json``).

One process per pipeline stage (its straggler device: the EP-group member with the most expert
work), with a compute track and a communication track; one process for the busiest links, whose
tracks show when all-to-alls load them. Open it in https://ui.perfetto.dev or chrome://tracing.
Time is in microseconds, as the trace event format requires.
"""

from __future__ import annotations

from typing import Any

__all__ = ["chrome_trace", "check_trace"]

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


def check_trace(data: Any, source: str) -> list[dict[str, Any]]:
    """The events of a loaded trace.json, if every field the Gantt reads has the type it uses:
    integer ``pid``/``tid``, finite ``ts``/``dur`` >= 0 on timed (``X``) events, string names.

    Raises
    ------
    ScenarioError
        One line naming ``source``, the event's field and what it must be; also when no event
        has a duration (nothing to draw).
    """
    from moesim.errors import ScenarioError
    from moesim.report.compare import (
        MISSING,
        expect,
        expect_list,
        expect_mapping,
        expect_number,
        expect_text,
        is_int,
    )

    trace = expect_mapping(data, source, None, "a Chrome trace (a JSON object with traceEvents)")
    events = expect_list(trace.get("traceEvents", MISSING), source, "traceEvents")
    timed = 0
    for i, event in enumerate(events):
        where = f"traceEvents[{i}]"
        event = expect_mapping(event, source, where)
        kind = event.get("ph")
        if kind != "X" and not (kind == "M" and event.get("name") in ("thread_name",
                                                                       "process_name")):
            continue                                   # the Gantt does not read other events
        for key in ("pid", "tid"):
            if (key == "pid" or key in event) and not is_int(event.get(key, MISSING)):
                expect("an integer", event.get(key, MISSING), source, f"{where}.{key}")
        if kind == "M":
            args = expect_mapping(event.get("args", MISSING), source, f"{where}.args")
            expect_text(args.get("name", MISSING), source, f"{where}.args.name")
            continue
        for key in ("ts", "dur"):
            expect_number(event.get(key, MISSING), source, f"{where}.{key}", low=0)
        category = expect_text(event.get("cat", "other"), source, f"{where}.cat")
        if category == "pipeline":
            expect_text(event.get("name", MISSING), source, f"{where}.name")
        timed += event["dur"] > 0
    if not timed:
        raise ScenarioError("no timed events (ph \"X\" with dur > 0) to draw", source=source,
                            field="traceEvents")
    return events
