"""What one transformer block costs one EP group for one micro-batch: the pieces the engine schedules.

For a block, every device of the group runs attention (and its tensor-parallel all-reduce), then
either a dense FFN or an MoE layer: gate, dispatch all-to-all, its expert slots' grouped GEMM (the
work differs per device with the routing), shared experts, combine all-to-all. This module computes
those durations with the pure cost models (compute, traffic, network) and caches them per block:
all micro-batches of a step reuse their block's routing sample (the expected load of that layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from moesim import network, routing
from moesim.compute import KernelTimer
from moesim.layout import Layout
from moesim.memory import tokens_per_microbatch
from moesim.placement.placement import Placement
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import Scenario
from moesim.topology import Topology
from moesim.traffic import LayerTraffic, layer_traffic

__all__ = ["Collective", "BlockCost", "CostModel"]


@dataclass(frozen=True, eq=False)
class Collective:
    """One all-to-all of one EP group: duration, and bytes per topology link."""

    duration: float
    link_index: np.ndarray   # int[n] links carrying bytes
    link_bytes: np.ndarray   # float[n]
    total_bytes: float
    cross_node_bytes: float
    link_busy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float[n] seconds
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=int))  # global ranks
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float[F]


EMPTY = Collective(0.0, np.zeros(0, dtype=int), np.zeros(0), 0.0, 0.0)


@dataclass(frozen=True, eq=False)
class BlockCost:
    """Forward costs of one block for one micro-batch on one EP group (seconds)."""

    layer: int
    attention: float
    tp_comm: float
    gate: float
    ffn: float                       # dense FFN or shared experts (same on every device)
    experts: np.ndarray              # float[ep] routed-expert grouped GEMM per device
    permute: float                   # token permute/unpermute (memory-bound)
    dispatch: Collective = EMPTY
    combine: Collective = EMPTY
    traffic: LayerTraffic | None = None

    @property
    def is_moe(self) -> bool:
        return self.traffic is not None


@dataclass
class CostModel:
    """Per-block costs of a scenario, computed lazily and cached."""

    scenario: Scenario
    topology: Topology
    layout: Layout
    placement: Placement
    half_batch: bool = False           # two-batch overlap runs each half separately
    device_faults: object | None = None  # moesim.sim.faults.DeviceFaults
    _cache: dict[int, BlockCost] = field(default_factory=dict)

    @cached_property
    def timer(self) -> KernelTimer:
        s = self.scenario
        tables = None
        if s.hardware.calibration:
            from moesim.calibration import MeasuredTables
            tables = MeasuredTables.from_profile(s.hardware)
        return KernelTimer(s.model, s.hardware.device, s.precision.compute, s.precision.weights,
                           s.precision.activations, s.parallelism.tp, tables)

    @property
    def tokens(self) -> float:
        """Tokens per device per micro-batch (halved under two-batch overlap)."""
        t = tokens_per_microbatch(self.scenario)
        return t / 2 if self.half_batch else t

    @cached_property
    def group(self) -> np.ndarray:
        """Global ranks of the representative EP group (stage 0, group 0)."""
        return self.layout.ep_group(0, 0)

    @cached_property
    def group_nodes(self) -> np.ndarray:
        return self.topology.device_node[self.group]

    @cached_property
    def choices(self) -> list[routing.LayerChoices]:
        """Routing of the representative EP group, every MoE layer (node-limited if asked)."""
        expert_node = None
        if self.scenario.routing.node_limit:
            expert_node = self.placement.expert_node(self.group_nodes)
        return routing.scenario_routing(self.scenario, tokens_per_source=self.tokens,
                                        expert_node=expert_node)

    def context(self) -> tuple[float, float]:
        """(average attended context per token, KV tokens read per device) for the workload."""
        wl = self.scenario.workload
        if wl.mode == "decode":
            ctx = wl.context_len + 1
            return ctx, self.tokens * ctx
        return wl.seq_len / 2, 0.0

    def block(self, layer: int) -> BlockCost:
        if layer not in self._cache:
            self._cache[layer] = self._block(layer)
        return self._cache[layer]

    def _block(self, layer: int) -> BlockCost:
        s, t = self.scenario, self.timer
        tokens = self.tokens   # per device: the MoE layer's share (split by TP under SP)
        # Tensor-parallel parts (attention, dense FFN, shared experts) see the whole sequence
        # and split their weights/heads over TP; KernelTimer divides their work by tp.
        par = s.parallelism
        dense_tokens = tokens * par.tp if par.sequence_parallel else tokens
        ctx, kv = self.context()
        attention = t.attention(dense_tokens, ctx, kv)
        h = s.model.hidden_size
        tp_comm = 0.0
        if par.tp > 1:
            link = s.hardware.links.get("scale_up") or s.hardware.link("ici")
            nbytes = dense_tokens * h * dtype_bytes(s.precision.activations)
            tp_comm = 2 * network.ring_all_reduce(nbytes, par.tp,
                                                  link.effective_bandwidth, link.latency)
        moe_index = self.layout.moe_index(layer)
        ep = par.ep
        if moe_index is None:
            ffn = t.dense_ffn(dense_tokens, s.model.dense_ffn_size or 4 * h)
            return BlockCost(layer, attention, tp_comm, 0.0, ffn, np.zeros(ep), 0.0)
        traffic = layer_traffic(
            self.choices[moe_index], self.placement, moe_index, device_node=self.group_nodes,
            tokens_per_source=tokens, hidden=h,
            dispatch_bytes_per_elem=dtype_bytes(s.precision.dispatch),
            combine_bytes_per_elem=dtype_bytes(s.precision.combine),
            capacity_factor=s.model.capacity_factor, top_k=s.model.effective_top_k,
            algorithm=s.communication.alltoall, failed=self._failed(layer))
        experts = np.array([t.experts(traffic.slot_tokens[d]) for d in range(ep)])
        routed = traffic.tokens.sum(axis=1)  # token copies each device permutes
        permute = t.elementwise(4 * routed.max() * h * dtype_bytes(s.precision.activations))
        dispatch, combine = self._collectives(traffic)
        return BlockCost(layer, attention, tp_comm, t.gate(tokens), t.shared_experts(dense_tokens),
                         experts, permute, dispatch, combine, traffic)

    @cached_property
    def reverse_link(self) -> np.ndarray:
        """int[L]: index of each topology link's opposite direction, -1 where there is none."""
        index = {ends: i for i, ends in enumerate(self.topology.link_ends)}
        return np.array([index.get((v, u), -1) for u, v in self.topology.link_ends],
                        dtype=np.int64)

    @cached_property
    def group_paths(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR paths between every ordered pair of the representative group's devices: pair
        ``(i, j)`` of local indices is path ``i * ep + j`` (looked up once, not per layer)."""
        src, dst = np.divmod(np.arange(len(self.group) ** 2), len(self.group))
        return self.topology.paths_csr(np.stack([self.group[src], self.group[dst]], axis=1))

    def paths_csr(self, local_pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paths of ``local_pairs: int[F, 2]`` (group-local indices) as CSR ``(ptr, links)``."""
        all_ptr, all_links = self.group_paths
        rows = local_pairs[:, 0] * len(self.group) + local_pairs[:, 1]
        first = all_ptr[rows]
        lengths = all_ptr[rows + 1] - first
        ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        return ptr, all_links[np.repeat(first - ptr[:-1], lengths) + np.arange(ptr[-1])]

    def _failed(self, layer: int) -> np.ndarray | None:
        """bool[ep] failed devices of the EP group running ``layer``, or None."""
        faults = self.device_faults
        if faults is None:
            return None
        for stage in faults.stage_local:
            if layer in self.layout.stage_layers(stage):
                mask = faults.failed(stage)
                return mask if mask.any() else None
        return None

    def _collectives(self, traffic: LayerTraffic) -> tuple[Collective, Collective]:
        """The layer's dispatch and combine all-to-alls (the combine mirrored when it can be)."""
        if len(traffic.pairs) == 0:
            return EMPTY, EMPTY
        s = self.scenario
        scale = dtype_bytes(s.precision.combine) / dtype_bytes(s.precision.dispatch)
        rtol = s.simulation.network_rtol
        pairs, back = self.group[traffic.pairs], self.group[traffic.combine_pairs]
        paths = self.paths_csr(traffic.pairs)
        back_paths = self.paths_csr(traffic.combine_pairs)
        if np.array_equal(traffic.combine_bytes, traffic.dispatch_bytes * scale):
            both = mirrored_alltoalls(self.topology, self.reverse_link, pairs,
                                      traffic.dispatch_bytes, scale, rtol,
                                      paths=(*paths, *back_paths))
            if both is not None:
                return both
        return (alltoall(self.topology, pairs, traffic.dispatch_bytes, rtol, paths=paths),
                alltoall(self.topology, back, traffic.combine_bytes, rtol, paths=back_paths))


def alltoall(topology: Topology, pairs: np.ndarray, nbytes: np.ndarray,
             rtol: float = 0.0, *, paths: tuple[np.ndarray, np.ndarray] | None = None
             ) -> Collective:
    """Flow-level time of one all-to-all: all flows start together, max-min fair sharing.

    ``pairs: int[F, 2]`` global (src, dst) ranks, ``nbytes: float[F]``; ``paths``: their CSR
    paths when the caller has them (else looked up).
    """
    ptr, links = topology.paths_csr(pairs) if paths is None else paths
    result = network.simulate_flows(nbytes, np.zeros(len(nbytes)), ptr, links,
                                    topology.capacity, topology.latency, rtol=max(rtol, 1e-12))
    used = np.flatnonzero(result.link_bytes)
    cross = topology.device_node[pairs[:, 0]] != topology.device_node[pairs[:, 1]]
    return Collective(float(result.makespan), used, result.link_bytes[used], float(nbytes.sum()),
                      float(nbytes[cross].sum()), result.link_busy[used], pairs, nbytes)


def mirrored_alltoalls(topology: Topology, reverse_link: np.ndarray, pairs: np.ndarray,
                       nbytes: np.ndarray, scale: float, rtol: float = 0.0, *,
                       paths: tuple[np.ndarray, ...] | None = None
                       ) -> tuple[Collective, Collective] | None:
    """An all-to-all and its mirror image (reversed pairs, ``scale`` times the bytes) from one
    fluid simulation; None when the mirror is not exact on this topology.

    If every reversed pair's path is the forward path reversed, link by link onto links of equal
    capacity, the two flow sets cross isomorphic networks, so max-min fair rates agree at every
    instant and, with all flows starting at 0, the mirror's transfer times are ``scale`` times
    the forward ones (event merging is relative, hence scale-free too). Only the per-path latency
    differs, and is added per flow. ``reverse_link: int[L]`` is each link's opposite direction
    (-1: none); ``pairs: int[F, 2]`` global ranks, ``nbytes: float[F]``; ``paths``: the CSR
    paths ``(ptr, links, back_ptr, back_links)`` of the pairs and reversed pairs, if known.
    """
    if paths is None:
        paths = (*topology.paths_csr(pairs), *topology.paths_csr(pairs[:, ::-1]))
    ptr, links, back_ptr, back_links = paths
    flow_of_hop = np.repeat(np.arange(len(pairs)), np.diff(ptr))
    if not np.array_equal(ptr, back_ptr):
        return None
    mirror = reverse_link[links]
    hop_back = ptr[flow_of_hop] + ptr[flow_of_hop + 1] - 1 - np.arange(links.size)
    if np.any(mirror < 0) or not (np.array_equal(back_links[hop_back], mirror) and np.array_equal(
            topology.capacity[mirror], topology.capacity[links])):
        return None
    # Step 1: transfer times without latency, then each direction's path latency per flow.
    result = network.simulate_flows(nbytes, np.zeros(len(nbytes)), ptr, links, topology.capacity,
                                    np.zeros_like(topology.latency), rtol=max(rtol, 1e-12))
    moving = (nbytes > 0) & (np.diff(ptr) > 0)
    latencies = (np.bincount(flow_of_hop, weights=topology.latency[path], minlength=len(pairs))
                 for path in (links, back_links))
    forward_finish, back_finish = (times + np.where(moving, latency, 0.0) for times, latency in
                                   zip((result.finish, result.finish * scale), latencies))
    # Step 2: the mirror's links carry scale times the bytes for scale times as long.
    used = np.flatnonzero(result.link_bytes)
    back_bytes = np.zeros(topology.capacity.size)
    back_busy = np.zeros(topology.capacity.size)
    back_bytes[reverse_link[used]] = result.link_bytes[used] * scale
    back_busy[reverse_link[used]] = result.link_busy[used] * scale
    back_used = np.flatnonzero(back_bytes)
    cross = topology.device_node[pairs[:, 0]] != topology.device_node[pairs[:, 1]]
    back_nbytes = nbytes * scale
    forward = Collective(float(forward_finish.max()), used, result.link_bytes[used],
                         float(nbytes.sum()), float(nbytes[cross].sum()), result.link_busy[used],
                         pairs, nbytes)
    back = Collective(float(back_finish.max()), back_used, back_bytes[back_used],
                      float(back_nbytes.sum()), float(back_nbytes[cross].sum()),
                      back_busy[back_used], pairs[:, ::-1], back_nbytes)
    return forward, back
