"""Simulate one step of a scenario for a given placement: price the blocks, run the pipeline in
SimPy, report.

The flow (see docs/architecture.md): the assembly (:mod:`moesim.assembly`) resolves the placement;
here the topology (damaged by faults) and the pricing context are built, memory is checked, every
block is priced once (:mod:`moesim.pricing`), each (stage, chunk, direction) runs on its EP group's
two streams with an engine from :data:`ENGINES`, the pipeline of stages runs as SimPy processes,
then the data-parallel gradient reduction and the optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from moesim.errors import ScenarioError
from moesim.kernels import overlapped_compute_slowdown
from moesim.layout import Layout
from moesim.memory import check_memory, tokens_per_microbatch
from moesim.placement.placement import Placement
from moesim.pricing.collectives import (
    dp_sync_time,
    p2p_time,
    sharded_block_times,
    sharded_chunk_wait,
)
from moesim.pricing.context import PricingContext, scenario_topology
from moesim.pricing.step import heads_time, micro_batches, optimizer_time
from moesim.results import Result
from moesim.sim.costs import CostModel
from moesim.sim.faults import device_faults, fault_summary, faulty_topology
from moesim.sim.full import run_ops_full
from moesim.sim.invariants import all_groups_link_load, check_invariants
from moesim.sim.pipeline import ChunkSpan, run_pipeline
from moesim.sim.report import build_result
from moesim.sim.schedule import dualpipe_plan, forward_only, one_f_one_b
from moesim.sim.simulation import Simulation, Timeline
from moesim.sim.streams import ChunkRun, Op, chunk_ops, merge_pair, run_ops
from moesim.spec.scenario import Scenario, draft_passes, mtp_blocks, without_drafts

__all__ = ["ENGINES", "simulate_step", "estimate_cost"]

Engine = Callable[[list[Op], CostModel, int], ChunkRun]

ENGINES: dict[str, Engine] = {
    # one EP group with numpy; every other group of the stage taken to be identical
    "aggregated": lambda ops, costs, stage: run_ops(ops, costs.ctx.ep),
    # every device of every EP group of the stage as SimPy processes
    "full": run_ops_full,
}


def estimate_cost(s: Scenario, engine: str) -> tuple[float, str]:
    """(estimated wall seconds, the dominant part) of simulating ``s``, before doing it.

    Rough per-unit costs measured on a 2-core machine: a flow-level all-to-all costs ~100 rate
    recomputations over its ep^2 flows; routing samples tokens x experts per layer; the pipeline
    costs one SimPy event per chunk; the full engine two processes per device per op.
    """
    m, par, wl = s.model, s.parallelism, s.workload
    layers = m.num_moe_layers
    flows = layers * 2 * par.ep * par.ep * 100
    sampled = min(tokens_per_microbatch(s), s.routing.max_tokens_per_source)
    samples = layers * par.ep * sampled * m.num_experts
    chunks = par.pp * micro_batches(s) * par.vp * (2 if wl.mode == "training" else 1)
    parts = {"all-to-all flows": 4e-7 * flows, "routing samples": 2.5e-8 * samples,
             "pipeline events": 3e-5 * chunks}
    if engine == "full":
        ops = 8 * m.num_layers / par.pp * 2
        parts["full-engine processes"] = 2e-5 * s.num_devices * ops * par.vp
    worst = max(parts, key=lambda part: parts[part])
    return sum(parts.values()), worst


def _check_size(s: Scenario, engine: str) -> None:
    seconds, worst = estimate_cost(s, engine)
    if seconds > s.simulation.max_seconds:
        hint = {"full-engine processes": "use simulation.mode: aggregated (equivalence classes)",
                "routing samples": "lower routing.max_tokens_per_source",
                "all-to-all flows": "raise simulation.network_rtol or lower ep",
                "pipeline events": "use fewer, larger micro-batches"}[worst]
        raise ScenarioError(
            f"this scenario would take about {seconds:,.0f} s to simulate (mostly {worst}), more "
            f"than simulation.max_seconds={s.simulation.max_seconds:g}; {hint}, or raise the "
            "limit", source=s.source, field="simulation")


def _validate_schedule(s: Scenario, mbs: int) -> None:
    par = s.parallelism
    if par.vp > 1 and mbs % par.pp:
        raise ScenarioError(f"interleaved 1F1B (vp={par.vp}) needs micro-batches per step "
                            f"({mbs}) to be a multiple of pp={par.pp}", source=s.source,
                            field="parallelism.vp")


def simulate_step(s: Scenario, placement: Placement, *, engine: str | None = None
                  ) -> Simulation:
    """Simulate one step of ``s`` with ``placement``; ``engine`` overrides ``simulation.mode``.

    With ``faults``, the healthy step is simulated too; chunks that start before a fault's ``at``
    time run at healthy speed, later ones on the damaged cluster, and the result reports both.
    """
    wall = time.perf_counter()
    engine = engine or s.simulation.mode
    if engine not in ENGINES:
        raise ScenarioError(f"unknown engine {engine!r} (allowed: {', '.join(ENGINES)})",
                            source=s.source, field="simulation.mode")
    par = s.parallelism
    _check_size(s, engine)
    damaged = faulty_topology(s, scenario_topology(s))   # bad link faults fail before any work
    healthy = simulate_step(replace(s, faults=()), placement, engine=engine) if s.faults else None
    strike = min((f.at for f in s.faults), default=0.0)
    if healthy is not None and strike >= healthy.result.step_time:   # after the step: no effect
        healthy.result.faults = fault_summary(s, healthy.result, healthy.result)
        healthy.result.notes.append(f"faults strike at {strike:g} s, after the step ends "
                                    f"({healthy.result.step_time:g} s): no effect")
        return healthy
    ctx = PricingContext.from_scenario(s, damaged)
    layout = ctx.layout
    memory = check_memory(s, layout)
    mbs = micro_batches(s)
    _validate_schedule(s, mbs)
    costs = CostModel(ctx, placement, device_faults(s, layout))
    runs = _chunk_runs(s, layout, costs, ENGINES[engine])
    plans = None
    if layout.dual:
        plans = [dualpipe_plan(st, par.pp, mbs) for st in range(par.pp)]
        orders = [plan.order for plan in plans]
    else:
        make_order = one_f_one_b if s.workload.mode == "training" else forward_only
        orders = [make_order(st, par.pp, par.vp, mbs) for st in range(par.pp)]

    def duration(stage: int, kind: str, chunk: int, now: float) -> float:
        chosen = healthy.runs if healthy is not None and now < strike else runs
        return chosen[(stage, kind, chunk)].makespan

    spans, events = run_pipeline(orders, par.vp, duration, p2p_time(ctx), plans=plans)
    stage_end, dp_exposed, optimizer = _finish_stages(ctx, spans)
    timeline = Timeline(s, ctx.topology, layout, placement, costs, runs, spans, stage_end)
    result = build_result(timeline, mbs, events, dp_exposed, optimizer, memory, engine)
    result.notes.extend(placement.notes)
    if healthy is not None:
        _no_faster_than_healthy(result, healthy.result)
        _count_lost_work(s, result, healthy.result)
        result.faults = fault_summary(s, healthy.result, result)
    sim = Simulation(**vars(timeline), result=result)
    check_invariants(sim)
    _note_shared_links(sim)
    sim.wall_seconds = time.perf_counter() - wall
    return sim


def _no_faster_than_healthy(result: Result, healthy: Result) -> None:
    """Faults never speed a step up: only the damaged EP group is simulated, and the step also
    waits for every healthy group (data-parallel replicas meet at the gradient reduction; a
    serving step ends when its last group does). A damaged group that finishes first (its failed
    devices do no work) leaves the step at the healthy groups' time, with its tokens lost."""
    if result.step_time >= healthy.step_time:
        return
    scale = result.step_time / healthy.step_time
    result.breakdown["imbalance_wait"] = (result.breakdown.get("imbalance_wait", 0.0)
                                          + healthy.step_time - result.step_time)
    result.notes.append("the damaged EP group finishes before the healthy ones; the step waits "
                        "for them (its lost tokens are counted as dropped)")
    result.step_time = healthy.step_time
    _scale_throughput(result, scale)


def _count_lost_work(s: Scenario, result: Result, healthy: Result) -> None:
    """Tokens lost to faults did no useful work: scale throughput and MFU by the share of
    routed token copies that still reached an expert."""
    routed = result.tokens_per_step * s.model.effective_top_k * s.model.num_moe_layers
    lost = max(0.0, result.dropped_tokens - healthy.dropped_tokens)
    if routed <= 0 or lost <= 0:
        return
    _scale_throughput(result, max(0.0, 1.0 - lost / routed))


def _scale_throughput(result: Result, factor: float) -> None:
    """Scale every throughput figure of ``result`` (tokens/s, MFU, TFLOPS) by ``factor``."""
    for name in ("tokens_per_s", "tokens_per_s_per_device", "mfu", "tflops_per_device"):
        setattr(result, name, getattr(result, name) * factor)


def _note_shared_links(sim: Simulation) -> None:
    """Record how loaded links get when every EP group moves its traffic at once; the
    all-to-alls are priced one group at a time, so above 1 they are optimistic."""
    load = all_groups_link_load(sim)
    sim.result.links["all_groups"] = load
    ratio = float(load["worst_link_load"])
    if ratio > 1.0 + 1e-6:
        sim.result.notes.append(
            f"all {load['groups']} EP groups moving the busiest layer's dispatch at once would "
            f"load link {load['link']} to {ratio:.2f}x its capacity over the simulated "
            "all-to-all: groups share links, and the all-to-all time is optimistic")


def _chunk_runs(s: Scenario, layout: Layout, costs: CostModel, engine: Engine
                ) -> dict[tuple[int, str, int], ChunkRun]:
    par = s.parallelism
    recompute = s.memory.recompute == "full"
    slowdown = overlapped_compute_slowdown(s.hardware.device)
    runs = {}
    mtp = mtp_blocks(s)
    drafts = draft_passes(s)
    # Speculative decoding: the MTP module drafts at one token per sequence, so its block is
    # priced by a context of the same step without drafts (same placement, faults and links).
    draft_costs = CostModel(PricingContext.from_scenario(without_drafts(s), costs.ctx.topology),
                            costs.placement, costs.device_faults) if drafts else None
    sharded = s.workload.mode == "training" and par.zero_stage >= 3
    for stage, chunks in enumerate(layout.chunk_layers()):
        ops_of: dict[tuple[str, int], list[Op]] = {}
        for c, layers in enumerate(chunks):
            blocks = [costs.block(layer) for layer in layers]
            if mtp and layout.chunk_ends(stage, c)[1]:   # MTP: one more MoE block each
                blocks += [costs.block(s.model.moe_layer_ids[-1])] * mtp
            if draft_costs is not None and layout.chunk_ends(stage, c)[1]:
                blocks += [draft_costs.block(s.model.moe_layer_ids[-1])] * drafts
            kinds = [("F", blocks, False)]
            if s.workload.mode == "training":
                kinds.append(("B", blocks[::-1], True))
            for kind, seq, backward in kinds:
                ops = chunk_ops(seq, par.ep, backward=backward, recompute=recompute,
                                overlap=s.communication.overlap, comm_slowdown=slowdown)
                ops = _with_ends(ops, costs, stage, c, backward)
                ops = _slowed(ops, costs, stage)
                run = engine(ops, costs, stage)
                if sharded:
                    wait = _sharded_params_wait(run, costs.ctx, stage, backward)
                    if wait > 0:
                        run = engine(_chain(ops, Op("sharded_params", "comm", "shard_comm",
                                                    np.full(par.ep, wait), (), -1),
                                            at_end=False), costs, stage)
                runs[(stage, kind, c)] = run
                if backward and layout.dual:
                    split, weights = _zero_bubble_split(ops)
                    runs[(stage, "b", c)] = engine(split, costs, stage)
                    runs[(stage, "W", c)] = engine(weights, costs, stage)
                ops_of[(kind, c)] = ops
        if layout.dual:   # DualPipe's pairs: forward of chunk c with backward of the other
            for c in range(2):
                merged = merge_pair(ops_of[("F", c)], ops_of[("B", 1 - c)], par.ep)
                runs[(stage, "f", c)] = engine(merged, costs, stage)
                runs[(stage, "x", 1 - c)] = ChunkRun([], np.zeros((0, par.ep)),
                                                     np.zeros((0, par.ep)))
    return runs


def _zero_bubble_split(ops: list[Op]) -> tuple[list[Op], list[Op]]:
    """A backward chunk's ops as zero-bubble schedules split them: the input-gradient pass
    (every op, compute at half its time: the gradients of the inputs) and the weight-gradient
    pass (the other half of each compute op, back to back, no communication). First order: a
    backward's matmuls are half input and half weight gradients, and its collectives carry
    input gradients only."""
    half = [replace(op, duration=op.duration * 0.5) if op.stream == "compute" else op
            for op in ops]
    compute = [op for op in half if op.stream == "compute"]
    weights = [replace(op, deps=(i - 1,) if i else (), barrier=False, collective=None)
               for i, op in enumerate(compute)]
    return half, weights


def _sharded_params_wait(run: ChunkRun, ctx: PricingContext, stage: int,
                         backward: bool) -> float:
    """Seconds a ZeRO-3 chunk waits for block parameters and gradient reduce-scatters beyond
    its own run (:func:`moesim.pricing.collectives.sharded_chunk_wait`): the chunk's blocks in
    execution order, each spanning until its last op ends on the slowest device; the embedding
    and the LM head are blocks of their own, other ops outside blocks gather nothing."""
    order: list[int | str] = []
    ends: dict[int | str, float] = {}
    for i, op in enumerate(run.ops):
        key: int | str = op.layer if op.layer >= 0 else op.name   # embedding, lm_head
        if key not in ends:
            order.append(key)
        ends[key] = max(ends.get(key, 0.0), float(run.end[i].max()))
    if not order:
        return 0.0
    marks = [ends[key] for key in order]
    marks[-1] = run.makespan
    spans = np.diff([0.0, *marks]).clip(min=0.0).tolist()
    times = [sharded_block_times(ctx, stage, key) if isinstance(key, int)
             or key in ("embedding", "lm_head") else (0.0, 0.0) for key in order]
    return sharded_chunk_wait(ctx, times, spans, backward=backward)


def _with_ends(ops: list[Op], costs: CostModel, stage: int, chunk: int,
               backward: bool) -> list[Op]:
    """Add the embedding (first virtual stage) and the LM head + loss (last virtual stage)."""
    ctx = costs.ctx
    scale = 2.0 if backward else 1.0
    ep = ctx.scenario.parallelism.ep
    tokens = ctx.group_microbatch_tokens   # a vocabulary-parallel lookup of the group's tokens
    first, last = ctx.layout.chunk_ends(stage, chunk)
    if last:
        head = Op("lm_head", "compute", "compute",
                  np.full(ep, scale * heads_time(ctx)), (), -1)
        ops = _chain(ops, head, at_end=not backward)
    if first:
        emb = Op("embedding", "compute", "compute", np.full(ep, scale * ctx.timer.embedding(
            tokens)), (), -1)
        ops = _chain(ops, emb, at_end=backward)
    return ops


def _slowed(ops: list[Op], costs: CostModel, stage: int) -> list[Op]:
    """Scale compute ops of slowed (or zero those of failed) devices of ``stage``."""
    if costs.device_faults is None or stage not in costs.device_faults.stage_local:
        return ops
    factor = costs.device_faults.slow_vector(stage)
    return [Op(op.name, op.stream, op.category, op.duration * factor, op.deps, op.layer,
               op.barrier, op.collective) if op.stream == "compute" else op for op in ops]


def _chain(ops: list[Op], extra: Op, at_end: bool) -> list[Op]:
    """Put ``extra`` before the first op or after the last one, keeping dependencies valid."""
    if at_end:
        deps = (len(ops) - 1,) if ops else ()
        return [*ops, Op(extra.name, extra.stream, extra.category, extra.duration, deps,
                         extra.layer)]
    shifted = [Op(op.name, op.stream, op.category, op.duration,
                  tuple(d + 1 for d in op.deps) or ((0,) if i == 0 else ()), op.layer,
                  op.barrier, op.collective) for i, op in enumerate(ops)]
    return [extra, *shifted]


def _finish_stages(ctx: PricingContext, spans: list[ChunkSpan]
                   ) -> tuple[list[float], list[float], list[float]]:
    """Per stage: end time after gradient sync and optimizer; exposed DP time; optimizer time."""
    s = ctx.scenario
    ends, exposed, opt = [], [], []
    for stage in range(s.parallelism.pp):
        last = max(sp.end for sp in spans if sp.stage == stage)
        dp = opt_t = 0.0
        if s.workload.mode == "training":
            sync = dp_sync_time(ctx, stage)
            window = 0.0
            if s.communication.dp_overlap:  # gradients reduce during the last backward chunk
                last_b = max((sp for sp in spans if sp.stage == stage and sp.kind != "F"),
                             key=lambda sp: sp.end)
                window = last_b.end - last_b.start
            dp = max(0.0, sync - window)
            opt_t = optimizer_time(ctx, stage)
        ends.append(last + dp + opt_t)
        exposed.append(dp)
        opt.append(opt_t)
    return ends, exposed, opt
