"""The closed-form screen: one layout's step time from the pricing layer, without the simulator.

Per micro-batch and pipeline stage, forward and backward times are sums of the pricing layer's
block pieces (:func:`moesim.pricing.block.block_cost`'s kernels, the closed-form all-to-all of
:func:`moesim.pricing.alltoall.layer_alltoall_times`), with one representative MoE layer drawn for
the routing. Overlap is modelled simply: ``two_batch`` runs two half micro-batches so that one
half's all-to-alls hide behind the other's compute (``c + m + max(c, m)`` per block for per-half
compute ``c`` and communication ``m``); ``shared_expert`` hides the dispatch behind the shared
experts. The pipeline is 1F1B with the bubble formula: ``(micro_batches + (pp - 1) / vp) x
(F + B)`` of the slowest stage, plus pipeline sends; DualPipe's ``micro_batches x (F + B)`` of
the slowest device (half its two stages' work per micro-batch) plus ``(pp/2 - 1)(F + B/2)``;
forward-only for serving. Then the exposed
data-parallel gradient sync (hidden behind the last backward chunk when ``dp_overlap``) and the
optimizer step; under ZeRO-3, each chunk's wait for block parameters and gradient
reduce-scatters instead, as the simulator prices it. It ignores the overlapped-compute slowdown
and planner placements (priced as contiguous), so it ranks layouts; the simulator gives the
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moesim.layout import Layout
from moesim.memory import check_memory
from moesim.placement.baselines import contiguous
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import layer_alltoall_times
from moesim.pricing.block import (
    attention_part,
    cp_wait,
    ffn_tp_comm,
    recomputes,
    selective_recompute_time,
    shared_part,
)
from moesim.pricing.collectives import (
    dp_sync_time,
    p2p_time,
    sharded_block_times,
    sharded_chunk_wait,
)
from moesim.pricing.context import PricingContext
from moesim.pricing.moe_layer import expert_times, layer_traffic, permute_time
from moesim.pricing.step import heads_time, micro_batches, model_flops_per_token, optimizer_time
from moesim.routing import LayerChoices
from moesim.routing_draw import sample_routing
from moesim.spec.scenario import (
    Scenario,
    draft_passes,
    mtp_blocks,
    output_tokens_per_sequence,
    without_drafts,
)
from moesim.topology import Topology
from moesim.traffic import LayerTraffic

__all__ = ["Screened", "screen_layout", "block_times"]

# Tokens per source device the screen samples for a layer's routing (each stands for more real
# tokens; the simulator samples routing.max_tokens_per_source).
SCREEN_TOKENS = 64
# What the block prices depend on: the representative EP group is the same ranks whatever pp
# and dp are (0..ep-1, or etp apart), so layouts differing only there (or in vp, ZeRO) share
# them.
_BLOCK_KEY = (("parallelism", "tp"), ("parallelism", "cp"), ("parallelism", "ep"),
              ("parallelism", "etp"),
              ("parallelism", "sequence_parallel"),
              ("workload", "micro_batch"), ("communication", "overlap"),
              ("communication", "alltoall"),
              ("placement", "redundant_experts"), ("workload", "mode"), ("workload", "seq_len"),
              ("workload", "context_len"), ("workload", "speculative_tokens"))


@dataclass(frozen=True)
class Screened:
    """A layout's closed-form estimate (seconds, tokens/s, bytes)."""

    step_time: float
    tokens_per_s_per_device: float
    mfu: float
    memory_bytes: float             # fullest stage's busiest device
    memory_capacity: float
    forward: float                  # slowest stage's forward per micro-batch
    backward: float


@dataclass(frozen=True)
class BlockTimes:
    """Forward compute and communication of one block for one micro-batch (seconds)."""

    compute: float
    comm: float
    recompute: float               # selective recomputation before its backward


def block_times(ctx: PricingContext, moe: bool, choices: LayerChoices | None,
                placement: Placement, priced: tuple | None = None) -> BlockTimes:
    """One block's forward seconds on the busiest device, overlap applied (see module doc).

    ``priced``: the layer's ``(flows, dispatch, combine)`` already priced for this context's
    traffic (they do not depend on recomputation)."""
    s, t = ctx.scenario, ctx.timer
    tokens = ctx.held_tokens        # router, norms: this device's tokens between TP parts
    dense_tokens, attention, tp = attention_part(ctx, moe)
    # Context parallelism's wait: the ring's doubles in the backward as compute does (and the
    # all-gather's nearly: gathers again, then reduce-scatters), so the screen counts it there;
    # the all-to-all's does not, so it counts with the communication.
    cp_forward, _ = cp_wait(ctx, dense_tokens)
    if s.communication.cp_algorithm != "all_to_all":
        attention += cp_forward
    else:
        tp += cp_forward
    if not moe:
        ffn = t.dense_ffn(dense_tokens, s.model.dense_ffn_size or 4 * ctx.hidden)
        tp += ffn_tp_comm(ctx, dense_tokens, None)
        rec = selective_recompute_time(ctx, dense_tokens, tokens, None)
        halves = 2 if ctx.half_batch else 1
        return BlockTimes(halves * (attention + ffn), halves * tp, halves * rec)
    if priced is None:
        assert choices is not None   # an MoE block is priced from its routing
        priced = moe_traffic(ctx, choices, placement)
    flows, dispatch, combine = priced
    tp += ffn_tp_comm(ctx, dense_tokens, flows)
    shared = shared_part(ctx, dense_tokens)
    layer = (t.gate(tokens) + shared + float(expert_times(ctx, flows).max())
             + permute_time(ctx, flows))
    compute = attention + layer
    comm = tp + dispatch + combine
    rec = selective_recompute_time(ctx, dense_tokens, tokens, flows)
    if recomputes(ctx, "moe"):      # the MoE layer again, its all-to-alls included, in series
        rec += layer + dispatch + combine
    overlap = s.communication.overlap
    if overlap == "two_batch":      # two halves: compute of one hides the other's comm
        return BlockTimes(compute + max(compute, comm), comm, 2 * rec)
    if overlap == "shared_expert":
        hidden = min(shared, dispatch)
        return BlockTimes(compute, comm - hidden, rec)
    return BlockTimes(compute, comm, rec)


def moe_traffic(ctx: PricingContext, choices: LayerChoices, placement: Placement
                ) -> tuple[LayerTraffic, float, float]:
    """One MoE layer's flows and closed-form (dispatch, combine) seconds."""
    flows = layer_traffic(ctx, choices, placement, 0)
    dispatch, combine = layer_alltoall_times(ctx, flows, exact=False)
    return flows, dispatch, combine


def _lookup_keys(ctx: PricingContext) -> dict[str, tuple[int, ...]]:
    group = tuple(int(r) for r in ctx.group)   # its ranks: 0..ep-1, or etp apart under ETP x EP
    return {"group_paths": group, "padded_paths": group, "reverse_link": (),
            "link_curves": ()}


def _shared(ctx: PricingContext, cache: dict) -> PricingContext:
    """``ctx`` given the topology lookups of earlier contexts of the same search: the EP group's
    paths (the same ranks in every layout with that group, whatever pp and dp) and the per-link
    tables (one topology)."""
    for name, key in _lookup_keys(ctx).items():
        if ("lookup", name, key) in cache:
            ctx.__dict__[name] = cache["lookup", name, key]   # a cached_property's slot
    return ctx


def _remember(ctx: PricingContext, cache: dict) -> None:
    for name, key in _lookup_keys(ctx).items():
        if name in ctx.__dict__:
            cache["lookup", name, key] = ctx.__dict__[name]


def _placement(s: Scenario) -> Placement:
    """One layer's contiguous placement (redundant slots replicate experts in id order)."""
    e, ep = s.model.num_experts, s.parallelism.ep
    table = contiguous(1, e, ep, e + s.placement.redundant_experts)
    return Placement.from_physical(table, ep, e, "contiguous")


def _choices(ctx: PricingContext, placement: Placement):  # noqa: ANN202
    s = ctx.scenario
    if s.model.num_moe_layers == 0:
        return None
    whole = max(1, round(ctx.tokens_per_source))
    expert_node = placement.expert_node(ctx.device_node)[:1] if s.routing.node_limit else None
    choices = next(iter(sample_routing(
        s.routing, num_experts=s.model.num_experts, num_layers=1, num_sources=s.parallelism.ep,
        tokens_per_source=whole,
        top_k=s.model.top_k, seed=s.seed, gating=s.model.gating, expert_node=expert_node)))
    if whole != ctx.tokens_per_source:
        choices = replace(choices, weight=choices.weight * ctx.tokens_per_source / whole)
    return choices


def _blocks(s: Scenario, topology: Topology, cache: dict | None
            ) -> tuple[BlockTimes | None, BlockTimes]:
    """(MoE block, dense block) times, shared by layouts with the same :data:`_BLOCK_KEY`."""
    cache = {} if cache is None else cache
    traffic_key = tuple(getattr(getattr(s, a), b) for a, b in _BLOCK_KEY)
    key = (*traffic_key, s.memory.recompute == "selective")   # none and full price alike
    if key in cache:
        return cache[key]
    s = replace(s, routing=replace(s.routing, max_tokens_per_source=min(
        SCREEN_TOKENS, s.routing.max_tokens_per_source)))
    ctx = _shared(PricingContext.from_scenario(s, topology), cache)
    if ("traffic", traffic_key) not in cache:
        placement = _placement(s)
        choices = _choices(ctx, placement)
        priced = None if choices is None else moe_traffic(ctx, choices, placement)
        _remember(ctx, cache)
        cache["traffic", traffic_key] = placement, choices, priced
    placement, choices, priced = cache["traffic", traffic_key]
    moe = None if choices is None else block_times(ctx, True, choices, placement, priced)
    found = cache[key] = moe, block_times(ctx, False, None, placement)
    return found


def _sharded_waits(ctx: PricingContext, layout: Layout, stage: int, moe: BlockTimes | None,
                   dense: BlockTimes, full: bool, heads: float, embedding: float,
                   cache: dict) -> tuple[float, float]:
    """ZeRO-3: seconds a micro-batch's forward and backward chunks of ``stage`` wait for block
    parameters and gradient reduce-scatters beyond their compute, priced as the simulator
    prices them (:func:`~moesim.pricing.collectives.sharded_chunk_wait`) on the blocks'
    screened times."""
    par = ctx.scenario.parallelism
    waits = [0.0, 0.0]
    for c, chunk in enumerate(layout.chunk_layers()[stage]):
        first, last = layout.chunk_ends(stage, c)
        keys: list[int | str] = (["embedding"] if first else []) + list(chunk) + (
            ["lm_head"] if last else [])
        times, forward, backward = [], [], []
        for key in keys:
            kind = key if isinstance(key, str) else (
                "moe" if layout.moe_index(key) is not None else "dense")
            ck = ("zero3", par.tp, par.cp, par.pp, par.ep, par.etp, par.dp, stage, kind)
            if ck not in cache:
                cache[ck] = sharded_block_times(ctx, stage, key)
            times.append(cache[ck])
            if isinstance(key, str):
                fwd = embedding if key == "embedding" else heads
                forward.append(fwd)
                backward.append(2 * fwd)
                continue
            bt = moe if kind == "moe" and moe is not None else dense
            forward.append(bt.compute + bt.comm)
            backward.append(2 * bt.compute + bt.comm + (bt.compute if full else bt.recompute))
        waits[0] += sharded_chunk_wait(ctx, times, forward, backward=False)
        waits[1] += sharded_chunk_wait(ctx, times[::-1], backward[::-1], backward=True)
    return waits[0], waits[1]


def screen_layout(s: Scenario, topology: Topology, cache: dict | None = None) -> Screened:
    """Closed-form step estimate of ``s`` on ``topology``; raises OutOfMemory if it does not fit.

    Memory is checked first (:func:`moesim.memory.check_memory`), so an infeasible layout costs
    no pricing. ``cache`` (a dict kept across calls for one topology) shares block prices
    between layouts that differ only in pp, dp, vp or ZeRO.
    """
    cache = {} if cache is None else cache
    layout = Layout.for_scenario(s)
    memory = check_memory(s, layout)
    fullest = max(memory, key=lambda m: m.total / m.capacity)
    moe, dense = _blocks(s, topology, cache)
    ctx = PricingContext.from_scenario(s, topology)
    par, wl = s.parallelism, s.workload
    train = wl.mode == "training"
    full = s.memory.recompute == "full"
    mtp = mtp_blocks(s)
    drafts = draft_passes(s)   # speculative decoding: MTP blocks at one token per sequence
    draft = _blocks(without_drafts(s), topology, cache)[0] if drafts else None
    heads = heads_time(ctx)
    embedding = ctx.timer.embedding(ctx.group_microbatch_tokens)
    fwd_stage, bwd_stage = [], []
    sharded = train and par.zero_stage >= 3
    for stage in range(par.pp):
        f = b = 0.0
        layers = layout.stage_layers(stage)
        has_embedding, has_head = layout.holds_ends(stage)
        extra = mtp if has_head else 0
        n_moe = sum(layout.moe_index(x) is not None for x in layers) + extra
        for count, bt in ((n_moe, moe), (len(layers) + extra - n_moe, dense)):
            if count == 0 or bt is None:
                continue
            f += count * (bt.compute + bt.comm)
            b += count * (2 * bt.compute + bt.comm + (bt.compute if full else bt.recompute))
        if has_head and draft is not None:
            f += drafts * (draft.compute + draft.comm)
        ends = (heads if has_head else 0.0) + (embedding if has_embedding else 0.0)
        f, b = f + ends, b + 2 * ends
        if sharded:
            waits = _sharded_waits(ctx, layout, stage, moe, dense, full, heads, embedding, cache)
            f, b = f + waits[0], b + waits[1]
        if layout.dual:   # each micro-batch passes one of the device's two chunks: per
            f, b = f / 2, b / 2   # micro-batch, half of both
        fwd_stage.append(f)
        bwd_stage.append(b if train else 0.0)
    mbs = micro_batches(s)
    per_mb = np.array(fwd_stage) + np.array(bwd_stage)
    worst = int(np.argmax(per_mb))
    vp = par.vp if train else 1
    p2p = p2p_time(ctx)
    if layout.dual:
        # DualPipe's bubble, (PP/2 - 1)(F&B + B - 3W) per chunk with F&B = F + B back to back
        # and W half the backward: (PP/2 - 1)(F + B / 2).
        bubble = (par.pp / 2 - 1) * (fwd_stage[worst] + bwd_stage[worst] / 2)
        pipeline = mbs * per_mb[worst] + bubble + (par.pp - 1) * p2p * 2
    else:
        pipeline = ((mbs + (par.pp - 1) / vp) * per_mb[worst]
                    + (par.pp - 1) * p2p * (2 if train else 1))
    tail = 0.0
    if train:
        for stage in range(par.pp):
            window = bwd_stage[stage] / vp if s.communication.dp_overlap else 0.0
            key = ("dp", par.tp, par.cp, par.pp, par.ep, par.etp, par.dp, stage)
            if key not in cache:
                cache[key] = dp_sync_time(ctx, stage)
            exposed = max(0.0, cache[key] - window)
            tail = max(tail, exposed + optimizer_time(ctx, stage))
    step = float(pipeline + tail)
    tokens = wl.global_batch * output_tokens_per_sequence(s)
    tps_dev = tokens / step / s.num_devices
    peak = s.hardware.device.flops(s.precision.compute if s.precision.compute != "fp8" else "bf16")
    mfu = model_flops_per_token(s) * tps_dev / peak
    return Screened(step, tps_dev, mfu, fullest.total, fullest.capacity,
                    fwd_stage[worst], bwd_stage[worst])
