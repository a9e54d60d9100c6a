"""Dense-model communication: tensor-parallel all-reduce, pipeline sends, data-parallel gradient
reduction. Each is a named pure function of the pricing context, priced with the alpha-beta
collectives of :mod:`moesim.network` on the bottleneck link between the ranks involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from moesim import network
from moesim.compute import kv_heads_per_rank
from moesim.errors import ScenarioError
from moesim.memory import block_params, stage_params, zero3_regathers
from moesim.pricing.context import PricingContext
from moesim.spec.hardware import LinkSpec, dtype_bytes
from moesim.spec.model import ModelSpec
from moesim.topology import Topology

__all__ = ["DP_ALGORITHMS", "link_between", "tp_all_reduce_time", "expert_tp_gather_time",
           "p2p_time", "dp_sync_time",
           "cp_kv_bytes_per_token", "cp_ring_step_time", "cp_exchange_time",
           "cp_all_to_all_bytes", "cp_all_to_all_time", "cp_gathered_kv_bytes",
           "cp_all_gather_time",
           "gradient_bytes_per_param", "sharded_block_times", "sharded_chunk_wait",
           "prefetched_makespan"]


def link_between(topology: Topology, a: int, b: int) -> tuple[float, float]:
    """(bandwidth, latency) of the bottleneck on the path from rank a to rank b."""
    links = topology.path_links(a, b)
    if len(links) == 0:
        return float("inf"), 0.0
    return float(topology.capacity[links].min()), float(topology.latency[links].sum())


def _scale_up_ring(ctx: PricingContext, op: str, nbytes: float, ranks: int) -> float:
    """Ring ``op`` of an ``nbytes`` buffer over ``ranks`` ranks of a node, on the scale-up link
    (ICI on TPUs), in its measured ring regimes when the profile has them."""
    link = ctx.scenario.hardware.links.get("scale_up") or ctx.scenario.hardware.link("ici")
    return network.ring_time(op, nbytes, ranks, link.effective_bandwidth, link.latency,
                             link if link.ring_protocols else None)


def tp_all_reduce_time(ctx: PricingContext, tokens: float) -> float:
    """One forward all-reduce of ``tokens`` tokens' tensor-parallel activations (a sub-layer's
    output: the attention's, or a dense FFN's), ring over the scale-up link."""
    tp = ctx.scenario.parallelism.tp
    if tp <= 1:
        return 0.0
    return _scale_up_ring(ctx, "allreduce", tokens * ctx.hidden * ctx.activation_bytes, tp)


def expert_tp_gather_time(ctx: PricingContext, copies: float) -> float:
    """Forward seconds of the expert-tensor-parallel exchange of an MoE layer with expert
    parallelism (``etp`` > 1; 0 without): after the dispatch all-to-all the ``etp`` ranks
    that split the experts all-gather the ``copies`` token copies they received (each rank
    then runs its slice of the experts on all of them), and before the combine reduce-scatter
    their outputs (Megatron-Core's all-to-all dispatcher with ETP); rings over the scale-up
    link, in the dispatch and the combine dtype. They take the place of the FFN's
    tensor-parallel all-reduce."""
    etp = ctx.scenario.parallelism.etp
    if etp <= 1 or copies <= 0:
        return 0.0
    return (_scale_up_ring(ctx, "allgather", copies * ctx.hidden * ctx.dispatch_bytes_per_elem,
                           etp)
            + _scale_up_ring(ctx, "reducescatter",
                             copies * ctx.hidden * ctx.combine_bytes_per_elem, etp))


def p2p_time(ctx: PricingContext) -> float:
    """Send of one micro-batch's activations between consecutive pipeline stages."""
    s = ctx.scenario
    if s.parallelism.pp == 1:
        return 0.0
    # each rank sends 1 / tp of its TP group's activations (its sequence-parallel shard, or
    # Megatron's scatter of the replicated tensor, gathered again on the next stage)
    nbytes = ctx.group_microbatch_tokens * ctx.hidden * ctx.activation_bytes
    a, b = ctx.layout.stage_ranks(0)[0], ctx.layout.stage_ranks(1)[0]
    bw, lat = link_between(ctx.topology, int(a), int(b))
    return network.p2p(nbytes / s.parallelism.tp, bw, lat)


def cp_kv_bytes_per_token(model: ModelSpec, act_bytes: float, tp: int = 1) -> float:
    """Bytes of one token's keys and values one tensor-parallel rank passes on per layer in a
    context-parallel ring: its key/value heads (GQA/MHA: ``kv_heads / tp``, at least one) times
    key and value widths; for MLA the up-projected per-head keys (nope + rope) and values of its
    ``num_heads / tp`` query heads, which is what ring attention over MLA exchanges (not the
    latent a decode cache holds).

    >>> from moesim.spec.model import AttentionSpec, ModelSpec
    >>> m = ModelSpec(name="m", hidden_size=1024, num_layers=1, vocab_size=8, num_experts=1,
    ...               top_k=1, expert_ffn_size=8,
    ...               attention=AttentionSpec(num_heads=8, num_kv_heads=2, kind="gqa"))
    >>> cp_kv_bytes_per_token(m, 2), cp_kv_bytes_per_token(m, 2, tp=4)   # 2 x 2 x 128 x 2 B
    (1024.0, 512.0)
    """
    a = model.attention
    if a.kind == "mla":
        width = model.head_dim + a.qk_rope_head_dim + (a.v_head_dim or model.head_dim)
        return a.num_heads / tp * width * act_bytes
    return kv_heads_per_rank(model, tp) * 2 * model.head_dim * act_bytes


def cp_ring_step_time(ctx: PricingContext, dense_tokens: float) -> float:
    """Seconds of one forward step of the context-parallel ring: each rank sends the keys and
    values it holds (``dense_tokens`` tokens, :func:`cp_kv_bytes_per_token`) to the next rank
    of its group while receiving the previous rank's, all at once, so the step takes one
    point-to-point send on the group's slowest hop. 0 without context parallelism."""
    s = ctx.scenario
    par = s.parallelism
    if par.cp <= 1 or dense_tokens <= 0:
        return 0.0
    nbytes = dense_tokens * cp_kv_bytes_per_token(s.model, ctx.activation_bytes, par.tp)
    return network.p2p(nbytes, *_cp_bottleneck(ctx))


def _cp_bottleneck(ctx: PricingContext) -> tuple[float, float]:
    """(bandwidth, latency) of the slowest hop around the representative CP group's ring."""
    members = ctx.layout.cp_group(0)
    return _bottleneck(ctx.topology, np.append(members, members[0]))


def cp_exchange_time(ctx: PricingContext, dense_tokens: float, core: float
                     ) -> tuple[float, float]:
    """(forward, backward) seconds a block's attention waits on context parallelism beyond its
    own compute, for ``communication.cp_algorithm``; (0, 0) without context parallelism.

    ``ring`` (Megatron-Core / Transformer Engine ``cp_comm_type: p2p``): the sequence is split
    over ``cp`` ranks; in each of ``cp`` steps a rank attends its queries to one block of keys
    and values (``core / cp`` of the attention core's ``core`` seconds) while the block for the
    next step is in flight, so each of the ``cp - 1`` exchanges is hidden up to that step's
    compute: ``(cp - 1) * max(0, step_send - core / cp)``. The backward moves the keys and
    values and their gradients (twice the bytes) beside twice the compute: twice the wait.
    Derived for a made-up 2-rank ring: 1 MB at 100 GB/s with 1 us latency is 11 us a step; an
    attention core of 10 us leaves 5 us per step hidden, so 1 x (11 - 5) = 6 us wait.

    ``all_to_all`` (:func:`cp_all_to_all_time`): nothing overlaps; the backward's two
    all-to-alls (output gradient in, query/key/value gradients out) move the forward's bytes.

    ``all_gather`` (:func:`cp_all_gather_time`): nothing overlaps; the forward all-gathers the
    keys and values, the backward gathers them again and reduce-scatters their gradients.
    """
    par = ctx.scenario.parallelism
    if par.cp <= 1:
        return 0.0, 0.0
    algorithm = ctx.scenario.communication.cp_algorithm
    if algorithm == "all_to_all":
        wait = cp_all_to_all_time(ctx, dense_tokens)
        return wait, wait
    if algorithm == "all_gather":
        gather = cp_all_gather_time(ctx, dense_tokens)
        return gather, gather + cp_all_gather_time(ctx, dense_tokens, "reducescatter")
    wait = (par.cp - 1) * max(0.0, cp_ring_step_time(ctx, dense_tokens) - core / par.cp)
    return wait, 2 * wait


def cp_all_to_all_bytes(model: ModelSpec, act_bytes: float, tp: int, cp: int
                        ) -> tuple[float, float]:
    """(before, after) bytes per token one rank sends in the two all-to-alls of Ulysses-style
    context parallelism: before the attention core, the queries of the other ranks' heads
    (``(cp - 1) / cp`` of its ``num_heads / tp`` heads) and the keys and values those heads
    read (each other rank gets ``kv_heads / tp / cp`` key/value heads, at least one, a copy
    when there are fewer than ``cp``; MLA: one up-projected key and value per query head);
    after it, the other ranks' share of the output.

    >>> from moesim.spec.model import AttentionSpec, ModelSpec
    >>> m = ModelSpec(name="m", hidden_size=1024, num_layers=1, vocab_size=8, num_experts=1,
    ...               top_k=1, expert_ffn_size=8,
    ...               attention=AttentionSpec(num_heads=8, num_kv_heads=2, kind="gqa"))
    >>> # cp 4: q 3/4 x 8 x 128; kv: 3 ranks x 1 copied head x (128 + 128); o 3/4 x 8 x 128; BF16
    >>> cp_all_to_all_bytes(m, 2, tp=1, cp=4)
    (3072.0, 1536.0)
    """
    a = model.attention
    heads = a.num_heads / tp
    qk = model.head_dim + a.qk_rope_head_dim
    v = a.v_head_dim or model.head_dim
    share = (cp - 1) / cp
    kv_heads = heads if a.kind == "mla" else kv_heads_per_rank(model, tp)
    kv = (cp - 1) * max(kv_heads / cp, 1.0) * ((qk if a.kind == "mla" else model.head_dim) + v)
    return (share * heads * qk + kv) * act_bytes, share * heads * v * act_bytes


def cp_all_to_all_time(ctx: PricingContext, dense_tokens: float) -> float:
    """Forward seconds of Ulysses-style context parallelism's two all-to-alls over the CP
    group (:func:`cp_all_to_all_bytes` of ``dense_tokens`` tokens), each ``(cp - 1)``
    messages on the group's slowest hop: ``2 (cp - 1) lat + bytes / bw``."""
    s = ctx.scenario
    par = s.parallelism
    before, after = cp_all_to_all_bytes(s.model, ctx.activation_bytes, par.tp, par.cp)
    bw, lat = _cp_bottleneck(ctx)
    return 2 * (par.cp - 1) * lat + dense_tokens * (before + after) / bw


def cp_gathered_kv_bytes(ctx: PricingContext, dense_tokens: float) -> float:
    """Bytes of the keys and values of the whole sequence that all-gather context parallelism
    gathers on each rank: ``cp`` times those of the rank's ``dense_tokens`` tokens
    (:func:`cp_kv_bytes_per_token`)."""
    s = ctx.scenario
    par = s.parallelism
    return par.cp * dense_tokens * cp_kv_bytes_per_token(s.model, ctx.activation_bytes, par.tp)


def cp_all_gather_time(ctx: PricingContext, dense_tokens: float, op: str = "allgather"
                       ) -> float:
    """Seconds of the keys' and the values' ring all-gathers (``op`` "allgather"; or their
    gradients' reduce-scatters, "reducescatter") over the CP group, Transformer Engine's
    ``cp_comm_type: all_gather`` (the Llama 3 scheme): each rank contributes the keys and
    values of its ``dense_tokens`` tokens (:func:`cp_kv_bytes_per_token`), half of them keys,
    and every rank ends with (or reduces) those of the whole sequence, two collectives of
    ``cp`` times its half each, on the group's bottleneck link."""
    if ctx.scenario.parallelism.cp <= 1 or dense_tokens <= 0:
        return 0.0
    return 2 * _ring(ctx, cp_gathered_kv_bytes(ctx, dense_tokens) / 2, ctx.layout.cp_group(0), op)


def gradient_bytes_per_param(ctx: PricingContext) -> float:
    """Bytes per gradient element the data-parallel reduction moves: the gradient dtype, as
    memory charges it (FP32 main gradients are reduced in FP32, Megatron's default for BF16
    training; set ``precision.gradients: bf16`` for a BF16 reduction)."""
    return dtype_bytes(ctx.scenario.precision.gradients)


def _ring(ctx: PricingContext, nbytes: float, members: np.ndarray,
          op: str = "allreduce") -> float:
    """Ring ``op`` (all-reduce by default) of an ``nbytes`` buffer over ``members`` on their
    bottleneck link, in the measured regimes of its link class when every hop is of one class
    that has them (scaled to the topology's capacity, which bandwidth overrides may change)."""
    bw, lat = _bottleneck(ctx.topology, members)
    return network.ring_time(op, nbytes, int(members.size), bw, lat, _ring_class(ctx, members))


def _ring_class(ctx: PricingContext, members: np.ndarray) -> LinkSpec | None:
    """The one link class every hop between consecutive members (and back to the first) uses,
    if it has ``ring_protocols``; else None."""
    hops = [ctx.topology.path_links(int(a), int(b))
            for a, b in zip(members.tolist(), np.roll(members, -1).tolist()) if a != b]
    if not hops:
        return None
    return network.ring_class(ctx.link_specs[i]
                              for i in np.unique(np.concatenate(hops)).tolist())


def _tree(ctx: PricingContext, nbytes: float, members: np.ndarray) -> float:
    bw, lat = _bottleneck(ctx.topology, members)
    return network.tree_all_reduce(nbytes, members.size, bw, lat)


def _hierarchical(ctx: PricingContext, nbytes: float, members: np.ndarray) -> float:
    """Reduce-scatter inside each node, all-reduce across nodes per rail, all-gather inside;
    a ring when the group sits on one node, has one member per node or uneven nodes."""
    node = ctx.topology.device_node[members]
    nodes, per = np.unique(node, return_counts=True)
    if nodes.size == 1 or per[0] == 1 or np.any(per != per[0]):
        return _ring(ctx, nbytes, members)
    first = members[node == nodes[0]]
    across = np.array([members[node == n][0] for n in nodes])
    intra_bw, intra_lat = _bottleneck(ctx.topology, first)
    inter_bw, inter_lat = _bottleneck(ctx.topology, across)
    return network.hierarchical_all_reduce(nbytes, int(nodes.size), int(per[0]), intra_bw,
                                           intra_lat, inter_bw, inter_lat,
                                           intra_regimes=_ring_class(ctx, first))


DP_ALGORITHMS: dict[str, Callable[[PricingContext, float, np.ndarray], float]] = {
    "ring": _ring, "tree": _tree, "hierarchical": _hierarchical}


def _bottleneck(topology: Topology, members: np.ndarray) -> tuple[float, float]:
    """Slowest (bandwidth, latency) between consecutive members (the first 8 hops of the ring)."""
    return min(link_between(topology, int(members[i]), int(members[i + 1]))
               for i in range(min(len(members) - 1, 8)))


def dp_sync_time(ctx: PricingContext, stage: int) -> float:
    """Gradient reduction of one stage: dense parameters over dp, expert parameters over the
    expert-data-parallel group, with ``communication.dp_algorithm``. Nothing is left to
    reduce at the end of a ZeRO-3 step: each block's gradients were reduce-scattered in its
    backward (:func:`sharded_block_times`), so 0."""
    s, layout = ctx.scenario, ctx.layout
    par = s.parallelism
    if par.zero_stage >= 3:
        return 0.0
    name = s.communication.dp_algorithm
    if name not in DP_ALGORITHMS:
        raise ScenarioError(f"unknown dp_algorithm {name!r} (allowed: "
                            f"{', '.join(DP_ALGORITHMS)})", source=s.source,
                            field="communication.dp_algorithm")
    algorithm = DP_ALGORITHMS[name]
    per_param = gradient_bytes_per_param(ctx)
    return sum(algorithm(ctx, params * per_param, members)
               for params, members in _shard_groups(ctx, stage, *stage_params(s, layout, stage)))


def _shard_groups(ctx: PricingContext, stage: int, dense: float, experts: float
                  ) -> list[tuple[float, np.ndarray]]:
    """``(params, members)`` that data parallelism reduces (or ZeRO-3 shards) on ``stage``: this
    TP rank's ``dense`` parameters over the dp group, the device's ``experts`` parameters over
    the expert-data-parallel group; groups of one or without parameters left out."""
    par, layout = ctx.scenario.parallelism, ctx.layout
    ranks = layout.stage_ranks(stage)
    return [(params, ranks[::stride][:size])
            for params, size, stride in ((dense, par.dense_dp, par.tp),
                                         (experts, layout.expert_dp, par.ep * par.etp))
            if size > 1 and params]


# --- ZeRO-3 / FSDP: parameters gathered per block, gradients reduce-scattered per block ---


def sharded_block_times(ctx: PricingContext, stage: int, block: int | str
                        ) -> tuple[float, float]:
    """(all-gather, reduce-scatter) seconds of ``block`` (a layer id, ``"embedding"`` or
    ``"lm_head"``: :func:`moesim.memory.block_params`) on a device of ``stage`` under ZeRO-3 /
    FSDP, its parameters sharded over the groups :func:`dp_sync_time` reduces over. The
    all-gather moves the parameters in the weight dtype before a pass over the block, the
    reduce-scatter the gradients in the gradient dtype after its backward; both are NCCL rings
    (the measured regimes of the link class where it has them)."""
    s = ctx.scenario
    dense, experts = block_params(s, ctx.layout, block)
    weight, grad = dtype_bytes(s.precision.weights), gradient_bytes_per_param(ctx)
    gather = scatter = 0.0
    for params, members in _shard_groups(ctx, stage, dense / s.parallelism.tp, experts):
        gather += _ring(ctx, params * weight, members, "allgather")
        scatter += _ring(ctx, params * grad, members, "reducescatter")
    return gather, scatter


def sharded_chunk_wait(ctx: PricingContext, times: Sequence[tuple[float, float]],
                       spans: Sequence[float], *, backward: bool) -> float:
    """Seconds a ZeRO-3 chunk waits beyond its blocks' own spans: :func:`prefetched_makespan`
    of the blocks in execution order (``times``: each block's :func:`sharded_block_times`,
    ``spans``: its seconds) less their sum. A forward gathers every block; a backward gathers
    them again only where :func:`moesim.memory.zero3_regathers` says so, and reduce-scatters
    each block's gradients. The simulator and the search's screen both price ZeRO-3 here."""
    regather = not backward or zero3_regathers(ctx.scenario)
    gathers = [g if regather else 0.0 for g, _ in times]
    scatters = [r for _, r in times] if backward else None
    return max(0.0, prefetched_makespan(gathers, spans, scatters) - float(sum(spans)))


def prefetched_makespan(gathers: Sequence[float], compute: Sequence[float],
                        scatters: Sequence[float] | None = None) -> float:
    """Seconds of a chunk of blocks whose parameters stream in ahead of their compute.

    Block ``i`` computes for ``compute[i]`` once its parameters are gathered (``gathers[i]``)
    and the previous block is done. One communication stream runs, in issue order: block 0's
    gather at the start, block ``i + 1``'s gather when block ``i`` starts (FSDP's one-block
    prefetch), block ``i``'s gradient reduce-scatter (``scatters[i]``) when it ends. Returns
    when the last compute and the last reduce-scatter are done.

    >>> prefetched_makespan([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])   # communication-bound: 2+2+2+1
    7.0
    >>> prefetched_makespan([1.0, 1.0], [3.0, 3.0], [1.0, 1.0])   # hidden but the ends: 1+3+3+1
    8.0
    """
    n = len(compute)
    if n == 0:
        return 0.0
    scatters = [0.0] * n if scatters is None else scatters
    gathered = [0.0] * n
    stream = gathered[0] = gathers[0]
    done = 0.0
    for i in range(n):
        start = max(done, gathered[i])
        if i + 1 < n:
            stream = gathered[i + 1] = max(stream, start) + gathers[i + 1]
        done = start + compute[i]
        stream = max(stream, done) + scatters[i]
    return max(done, stream)
