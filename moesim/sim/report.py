"""Turn a finished simulation into a :class:`moesim.results.Result`."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from moesim.pricing.step import model_flops_per_token
from moesim.results import Result
from moesim.sim.streams import ChunkRun
from moesim.spec.scenario import draft_passes, output_tokens_per_sequence

__all__ = ["build_result", "compute_busy", "exposure", "rep_device"]

PRIORITY = ("compute", "alltoall", "tp_comm", "shard_comm")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _subtract(intervals, covered):
    """Parts of ``intervals`` (merged) not inside ``covered`` (merged)."""
    out = []
    for a, b in intervals:
        cur = a
        for c, d in covered:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def exposure(run: ChunkRun, device: int) -> dict[str, float]:
    """Seconds of the chunk that ``device`` spends per category, compute first, then exposed
    all-to-all, then exposed TP (and context-parallel ring) communication, then ZeRO-3
    parameter and gradient traffic, then idle (waiting at barriers)."""
    covered: list[tuple[float, float]] = []
    out = {}
    for category in PRIORITY:
        mine = _union([(run.start[i, device], run.end[i, device])
                       for i, op in enumerate(run.ops) if op.category == category])
        exposed = _subtract(mine, covered)
        out[category] = _length(exposed)
        covered = _union(covered + mine)
    out["idle"] = run.makespan - _length(covered)
    return out


def compute_busy(run: ChunkRun) -> np.ndarray:
    """float[ep]: seconds each device of the group spends on compute ops in ``run``."""
    busy = np.zeros(run.start.shape[1])
    for i, op in enumerate(run.ops):
        if op.category == "compute":
            busy += run.end[i] - run.start[i]
    return busy


def rep_device(runs: dict) -> int:
    """The device of the EP group with the most compute: the straggler the step waits for."""
    busy = [compute_busy(run) for run in runs.values() if run.ops]
    return int(np.argmax(np.sum(busy, axis=0))) if busy else 0


def build_result(sim, mbs: int, events: int, dp_exposed, optimizer, memory, engine) -> Result:
    s = sim.scenario
    par, wl = s.parallelism, s.workload
    sim.rep_device = rep = rep_device(sim.runs)
    step = max(sim.stage_end)
    # The bottleneck stage: the one with the most work of its own (the others wait for it).
    uses = Counter((sp.stage, sp.kind, sp.chunk) for sp in sim.spans)
    own = np.zeros(par.pp)
    for (stage, kind, chunk), n in uses.items():
        own[stage] += n * sim.runs[(stage, kind, chunk)].makespan
    critical = int(np.argmax(own))
    tokens_step = wl.global_batch * output_tokens_per_sequence(s)
    tps = tokens_step / step
    flops_tok = model_flops_per_token(s)
    peak = s.hardware.device.flops(s.precision.compute if s.precision.compute != "fp8" else "bf16")
    tflops = flops_tok * tps / s.num_devices
    # Breakdown of the bottleneck stage's straggler device.
    exposed: defaultdict[str, float] = defaultdict(float)
    for (stage, kind, chunk), n in uses.items():
        if stage != critical:
            continue
        for cat, secs in exposure(sim.runs[(stage, kind, chunk)], rep).items():
            exposed[cat] += n * secs
    exposed["compute"] += optimizer[critical]
    parts = {k: float(v) for k, v in exposed.items()}
    breakdown = {
        "compute": parts["compute"],
        "exposed_alltoall": parts["alltoall"],
        "exposed_other_comm": parts["tp_comm"] + parts["shard_comm"] + dp_exposed[critical],
        "imbalance_wait": parts["idle"],      # waiting at all-to-alls for the layer's straggler
        "pipeline_bubble": 0.0,           # warm-up/cool-down, waiting for other stages
    }
    breakdown["pipeline_bubble"] = max(0.0, step - sum(breakdown.values()))
    stages = _stage_rows(sim, uses, step)
    links, a2a = _link_rows(sim, uses, step)
    experts, dropped = _expert_rows(sim, mbs)
    tables = sim.costs.ctx.timer.tables  # MeasuredTables with per-kernel counters, or None
    source = tables.summary() if tables is not None else "kernel model (datasheet profile)"
    notes = []
    groups = sim.costs.ctx.layout.ep_groups
    if groups > 1:
        notes.append(f"{groups} EP groups per stage simulated as one "
                     "(same routing, disjoint links)" if engine == "aggregated" else
                     "all EP groups of stage 0 simulated per device")
    if draft_passes(s):
        notes.append(f"speculative decoding: {draft_passes(s)} MTP draft token(s) per "
                     f"step at acceptance {wl.acceptance_rate:g}, "
                     f"{output_tokens_per_sequence(s):.3g} tokens per sequence per step")
    return Result(
        scenario=s.name, mode=wl.mode, engine=engine, devices=s.num_devices, step_time=step,
        tokens_per_step=tokens_step, tokens_per_s=tps, tokens_per_s_per_device=tps / s.num_devices,
        model_flops_per_token=flops_tok, mfu=tflops / peak, tflops_per_device=tflops / 1e12,
        breakdown=breakdown, stages=stages, memory=[m.as_dict() for m in memory], links=links,
        experts=experts, alltoall=a2a, dropped_tokens=dropped, compute_source=source,
        events=events, notes=notes)


def _stage_rows(sim, uses, step) -> list[dict]:
    rows = []
    for stage in range(sim.scenario.parallelism.pp):
        busy = np.zeros(sim.scenario.parallelism.ep)
        for (st, kind, chunk), n in uses.items():
            if st == stage:
                busy += n * compute_busy(sim.runs[(st, kind, chunk)])
        rows.append({"stage": stage, "end": sim.stage_end[stage],
                     "compute_busy": busy.tolist(),
                     "utilisation": (busy / step).tolist(),
                     "layers": sim.layout.stage_layers(stage)})
    return rows


def _link_rows(sim, uses, step) -> tuple[dict, dict]:
    topo = sim.topology
    link_bytes = np.zeros(topo.num_links)
    total = cross = 0.0
    # Link accounting: the representative EP group of the first stage that runs an MoE layer
    # (a pipeline's first stages may hold only dense blocks and the embedding).
    moving = [key[0] for key in uses for op in sim.runs[key].ops
              if op.collective is not None and op.collective.total_bytes > 0]
    first = min(moving, default=0)
    for key, n in uses.items():
        if key[0] != first:
            continue
        for op in sim.runs[key].ops:
            coll = op.collective
            if coll is None or coll.total_bytes == 0:
                continue
            np.add.at(link_bytes, coll.link_index, n * coll.link_bytes)
            total += n * coll.total_bytes
            cross += n * coll.cross_node_bytes
    util = link_bytes / (topo.capacity * step)
    order = np.argsort(-util, kind="stable")[:20]
    busiest = [{"link": f"{topo.link_ends[i][0]}->{topo.link_ends[i][1]}",
                "class": topo.link_class[i], "bytes": float(link_bytes[i]),
                "utilisation": float(util[i])} for i in order if link_bytes[i] > 0]
    used_links = [{"link": f"{topo.link_ends[i][0]}->{topo.link_ends[i][1]}",
                   "class": topo.link_class[i], "bytes": float(link_bytes[i]),
                   "utilisation": float(util[i])} for i in np.flatnonzero(link_bytes > 0)]
    by_class = {}
    for cls in sorted(set(topo.link_class)):
        mask = np.array([c == cls for c in topo.link_class])
        used = mask & (link_bytes > 0)
        by_class[cls] = {"bytes": float(link_bytes[mask].sum()),
                         "max_utilisation": float(util[mask].max()) if mask.any() else 0.0,
                         "mean_utilisation_used": float(util[used].mean()) if used.any() else 0.0}
    a2a = {"bytes_per_step": total, "cross_node_bytes_per_step": cross,
           "cross_node_fraction": cross / total if total else 0.0}
    return {"busiest": busiest, "by_class": by_class, "all": used_links,
            "scope": f"EP group 0 of stage {first}"}, a2a


def _expert_rows(sim, mbs) -> tuple[dict, float]:
    s, costs = sim.scenario, sim.costs
    loads, device_ratio, dropped = [], [], 0.0
    groups = costs.ctx.layout.ep_groups
    halves = 2 if costs.ctx.half_batch else 1
    for layer in s.model.moe_layer_ids:
        block = costs.block(layer)
        tr = block.traffic
        per_expert = tr.counts.sum(axis=0)
        loads.append(per_expert.tolist())
        dev = tr.slot_tokens.sum(axis=1)
        device_ratio.append(float(dev.max() / dev.mean()) if dev.mean() > 0 else 1.0)
        dropped += tr.dropped * mbs * groups * halves
    arr = np.array(loads)
    ratios = arr.max(axis=1) / np.maximum(arr.mean(axis=1), 1e-30)
    return {"layers": list(s.model.moe_layer_ids), "tokens_per_expert": loads,
            "max_over_mean": float(arr.max() / arr.mean()) if arr.mean() > 0 else 1.0,
            "worst_layer_max_over_mean": float(ratios.max()),
            "device_max_over_mean": float(max(device_ratio)),
            "placement": sim.placement.slot_expert.tolist()}, dropped
