"""Simulate one step of a scenario: build the cost model, run the pipeline in SimPy, report.

The flow (see DESIGN.md): topology and layout from the scenario; memory checked; placement
resolved; per-block costs (compute, routing, traffic, flow-level all-to-all) computed once per
block; each (stage, chunk, direction) run on its EP group's two streams; the pipeline of stages run
as SimPy processes; then the data-parallel gradient reduction and the optimizer step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moesim import network
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import check_memory, stage_params, tokens_per_microbatch
from moesim.placement.placement import Placement
from moesim.placement.policies import resolve_placement
from moesim.results import Result
from moesim.sim.costs import CostModel
from moesim.sim.faults import device_faults, fault_summary, faulty_topology
from moesim.sim.invariants import check_invariants
from moesim.sim.pipeline import ChunkSpan, run_pipeline
from moesim.sim.schedule import forward_only, one_f_one_b
from moesim.sim.streams import ChunkRun, Op, chunk_ops, run_ops
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import Scenario
from moesim.topology import Topology, build_topology

__all__ = ["Simulation", "simulate", "model_flops_per_token", "micro_batches"]


@dataclass
class Simulation:
    """A finished simulation: the result and what the trace and plots need."""

    scenario: Scenario
    result: Result
    topology: Topology
    layout: Layout
    placement: Placement
    costs: CostModel
    runs: dict[tuple[int, str, int], ChunkRun]
    spans: list[ChunkSpan]
    stage_end: list[float]
    rep_device: int
    wall_seconds: float


def scenario_topology(s: Scenario) -> Topology:
    """The scenario's topology; topology errors are reported against the scenario file."""
    from moesim.errors import TopologyError
    from moesim.spec.hardware import load_hardware

    base = Path(s.source).parent if s.source else None
    try:
        profiles = {d.hardware: load_hardware(d.hardware, relative_to=base)
                    for d in s.cluster.devices if d.hardware}
        return build_topology(s.cluster, s.hardware, profiles)
    except TopologyError as exc:
        raise TopologyError(f"{s.source or s.name}: cluster: {exc}") from None


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
    worst = max(parts, key=parts.get)
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


def micro_batches(s: Scenario) -> int:
    wl, par = s.workload, s.parallelism
    return wl.global_batch // par.dp // wl.micro_batch


def model_flops_per_token(s: Scenario) -> float:
    """Model FLOPs per token: 2 per active weight per token forward (x3 for training), plus
    attention scores (QK^T and AV over the average causal context), excluding the input embedding
    lookup. This is the PaLM/Megatron MFU convention (6N + attention for training)."""
    m, wl = s.model, s.workload
    counts = m.param_counts()
    input_embedding = m.vocab_size * m.hidden_size
    dense = 2.0 * (counts.active - input_embedding)
    context = wl.context_len + 1 if wl.mode == "decode" else wl.seq_len / 2
    attn_proj = 2.0 * (m.attention_params - 2 * m.hidden_size)
    scores = (m.attention_flops_per_token(context) - attn_proj) * m.num_layers
    forward = dense + scores
    return 3.0 * forward if wl.mode == "training" else forward


def _validate_schedule(s: Scenario, mbs: int) -> None:
    par = s.parallelism
    if par.vp > 1 and mbs % par.pp:
        raise ScenarioError(f"interleaved 1F1B (vp={par.vp}) needs micro-batches per step "
                            f"({mbs}) to be a multiple of pp={par.pp}", source=s.source,
                            field="parallelism.vp")


def simulate(s: Scenario, *, engine: str | None = None,
             placement: Placement | None = None) -> Simulation:
    """Simulate one step of ``s``; ``engine`` overrides ``simulation.mode``.

    With ``faults``, the healthy step is simulated too; chunks that start before a fault's ``at``
    time run at healthy speed, later ones on the damaged cluster, and the result reports both.
    """
    wall = time.perf_counter()
    engine = engine or s.simulation.mode
    par = s.parallelism
    _check_size(s, engine)
    healthy = None
    if s.faults:
        healthy = simulate(replace(s, faults=()), engine=engine, placement=placement)
        placement = placement or healthy.placement
    topology = faulty_topology(s, scenario_topology(s))
    layout = Layout(par, s.model.num_layers, s.model.moe_layer_ids)
    memory = check_memory(s, layout)
    mbs = micro_batches(s)
    _validate_schedule(s, mbs)
    group = layout.ep_group(0, 0)
    tokens = tokens_per_microbatch(s)
    if placement is None:
        placement = resolve_placement(s, tokens, topology.device_node[group])
    costs = CostModel(s, topology, layout, placement,
                      half_batch=s.communication.overlap == "two_batch",
                      device_faults=device_faults(s, layout))
    runs = _chunk_runs(s, layout, costs, engine)
    training = s.workload.mode == "training"
    make_order = one_f_one_b if training else forward_only
    orders = [make_order(st, par.pp, par.vp, mbs) for st in range(par.pp)]
    p2p = _p2p_time(s, topology, layout, tokens)
    strike = min((f.at for f in s.faults), default=0.0)

    def duration(stage: int, kind: str, chunk: int, now: float) -> float:
        chosen = healthy.runs if healthy is not None and now < strike else runs
        return chosen[(stage, kind, chunk)].makespan

    spans, events = run_pipeline(orders, par.vp, duration, p2p)
    stage_end, dp_exposed, optimizer = _finish_stages(s, layout, topology, spans, runs)
    sim = Simulation(s, None, topology, layout, placement, costs, runs, spans,  # type: ignore
                     stage_end, 0, 0.0)
    from moesim.sim.report import build_result
    sim.result = build_result(sim, mbs, events, dp_exposed, optimizer, memory, engine)
    if healthy is not None:
        sim.result.faults = fault_summary(s, healthy.result, sim.result)
    check_invariants(sim)
    sim.wall_seconds = time.perf_counter() - wall
    return sim


def _chunk_runs(s: Scenario, layout: Layout, costs: CostModel, engine: str
                ) -> dict[tuple[int, str, int], ChunkRun]:
    par = s.parallelism
    recompute = s.memory.recompute == "full"
    runs = {}
    if engine == "full":
        from moesim.sim.full import run_ops_full
    for stage, chunks in enumerate(layout.chunk_layers()):
        for c, layers in enumerate(chunks):
            blocks = [costs.block(layer) for layer in layers]
            kinds = [("F", blocks, False)]
            if s.workload.mode == "training":
                kinds.append(("B", blocks[::-1], True))
            for kind, seq, backward in kinds:
                ops = chunk_ops(seq, par.ep, backward=backward, recompute=recompute,
                                overlap=s.communication.overlap)
                ops = _with_ends(ops, costs, stage, c, backward)
                ops = _slowed(ops, costs, stage)
                if engine == "full":
                    runs[(stage, kind, c)] = run_ops_full(ops, costs, stage)
                else:
                    runs[(stage, kind, c)] = run_ops(ops, par.ep)
    return runs


def _with_ends(ops: list[Op], costs: CostModel, stage: int, chunk: int,
               backward: bool) -> list[Op]:
    """Add the embedding (first virtual stage) and the LM head + loss (last virtual stage)."""
    par = costs.scenario.parallelism
    scale = 2.0 if backward else 1.0
    ep = par.ep
    tokens = costs.tokens * (2 if costs.half_batch else 1)
    first, last = stage == 0 and chunk == 0, stage == par.pp - 1 and chunk == par.vp - 1
    if last:
        head = Op("lm_head", "compute", "compute", np.full(ep, scale * costs.timer.lm_head(tokens)),
                  (), -1)
        ops = _chain(ops, head, at_end=not backward)
    if first:
        emb = Op("embedding", "compute", "compute", np.full(ep, scale * costs.timer.embedding(
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


def _link_between(s: Scenario, topology: Topology, a: int, b: int) -> tuple[float, float]:
    """(bandwidth, latency) of the bottleneck on the path from rank a to rank b."""
    links = topology.path_links(a, b)
    if len(links) == 0:
        return float("inf"), 0.0
    return float(topology.capacity[links].min()), float(topology.latency[links].sum())


def _p2p_time(s: Scenario, topology: Topology, layout: Layout, tokens: float) -> float:
    """Send of one micro-batch's activations between consecutive pipeline stages."""
    if s.parallelism.pp == 1:
        return 0.0
    nbytes = tokens * s.model.hidden_size * dtype_bytes(s.precision.activations)
    a, b = layout.stage_ranks(0)[0], layout.stage_ranks(1)[0]
    bw, lat = _link_between(s, topology, int(a), int(b))
    return network.p2p(nbytes / s.parallelism.tp, bw, lat)


def dp_sync_time(s: Scenario, layout: Layout, topology: Topology, stage: int) -> float:
    """Gradient reduction of one stage: dense over dp, experts over the expert-DP group (ring)."""
    par = s.parallelism
    dense, experts = stage_params(s, layout, stage)
    gb = dtype_bytes(s.precision.gradients if s.precision.gradients != "fp32" else "bf16")
    total = 0.0
    ranks = layout.stage_ranks(stage)
    for params, group_size, stride in ((dense, par.dp, par.tp), (experts, layout.expert_dp,
                                                                 par.ep)):
        if group_size <= 1 or params == 0:
            continue
        members = ranks[::stride][:group_size]
        bw, lat = min(_link_between(s, topology, int(members[i]), int(members[i + 1]))
                      for i in range(min(len(members) - 1, 8)))
        algorithm = {"ring": network.ring_all_reduce, "tree": network.tree_all_reduce}.get(
            s.communication.dp_algorithm, network.ring_all_reduce)
        total += algorithm(params * gb, group_size, bw, lat)
    return total


def _finish_stages(s: Scenario, layout: Layout, topology: Topology, spans: list[ChunkSpan],
                   runs: dict) -> tuple[list[float], list[float], list[float]]:
    """Per stage: end time after gradient sync and optimizer; exposed DP time; optimizer time."""
    par = s.parallelism
    ends, exposed, opt = [], [], []
    for stage in range(par.pp):
        last = max(sp.end for sp in spans if sp.stage == stage)
        dp = opt_t = 0.0
        if s.workload.mode == "training":
            sync = dp_sync_time(s, layout, topology, stage)
            window = 0.0
            if s.communication.dp_overlap:  # gradients reduce during the last backward chunk
                last_b = max((sp for sp in spans if sp.stage == stage and sp.kind == "B"),
                             key=lambda sp: sp.end)
                window = last_b.end - last_b.start
            dp = max(0.0, sync - window)
            dense, experts = stage_params(s, layout, stage)
            shard = par.dp if par.zero_stage >= 1 else 1
            eshard = layout.expert_dp if par.zero_stage >= 1 else 1
            per_param = 2 * (4 + s.precision.optimizer_state_bytes) + 4 + 2
            dev = s.hardware.device
            opt_t = (dense / shard + experts / eshard) * per_param / (
                dev.memory_bandwidth * dev.memory_efficiency)
        ends.append(last + dp + opt_t)
        exposed.append(dp)
        opt.append(opt_t)
    return ends, exposed, opt
