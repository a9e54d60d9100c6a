"""Dispatch and combine all-to-alls of one EP group: flow-level, or the closed form for search.

The flow-level price (:func:`alltoall`) runs the max-min fair fluid simulation of
:func:`moesim.network.simulate_flows` over the group's flows; it is what ``moesim run`` charges.
When the combine is the dispatch mirrored (reversed pairs, bytes scaled by the dtype ratio) on a
topology whose reverse paths mirror the forward ones, one simulation prices both
(:func:`mirrored_alltoalls`). The closed form (:func:`alltoall_closed_form`: the busiest link's
bytes over its capacity plus the longest path latency) is a lower bound fast enough for planners.
:func:`layer_alltoalls` is the one entry point both the simulator and the planner use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from moesim import network
from moesim.kernels import comm_kernel_bandwidth
from moesim.pricing.context import PricingContext
from moesim.spec.hardware import HardwareProfile, LinkSpec
from moesim.topology import Topology
from moesim.traffic import LayerTraffic

__all__ = ["Collective", "EMPTY", "alltoall", "mirrored_alltoalls", "alltoall_closed_form",
           "layer_alltoalls", "layer_alltoall_times", "layer_ring_class", "ring_steps"]


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


def layer_alltoalls(ctx: PricingContext, traffic: LayerTraffic) -> tuple[Collective, Collective]:
    """The layer's dispatch and combine all-to-alls, flow-level (the combine mirrored when it
    can be): what ``moesim run`` charges and the planner's exact price.

    Real kernels are not the line rate: NCCL-style algorithms (direct, hierarchical) send each
    flow as one message, which reaches its links' size-dependent efficiency
    (:func:`moesim.network.wire_bytes` with the largest half-efficiency size on its path);
    GPU-initiated DeepEP kernels stream at the large-message rate. Every collective pays its
    links' fixed per-collective cost once (the largest over the classes it crosses). DeepEP's
    low-latency kernels send intra-node messages over NVLink, as DeepEP does by default
    (``allow_nvlink_for_low_latency_mode``). The ``allgather`` layer on one link class with
    measured ring regimes is an NCCL ring all-gather and reduce-scatter instead
    (:func:`layer_ring_class`): the flows' transfer time in the fastest regime.
    """
    if len(traffic.pairs) == 0:
        return EMPTY, EMPTY
    pairs, back = ctx.group[traffic.pairs], ctx.group[traffic.combine_pairs]
    paths = ctx.paths_csr(traffic.pairs)
    back_paths = ctx.paths_csr(traffic.combine_pairs)
    ring = layer_ring_class(ctx, traffic, paths)
    if ring is None:
        dispatch = _on_the_wire(ctx, traffic, traffic.dispatch_bytes, paths, traffic.pairs)
        combine = _on_the_wire(ctx, traffic, traffic.combine_bytes, back_paths,
                               traffic.combine_pairs)
        overhead = _fixed_cost(ctx, paths, traffic)
    else:   # the ring's protocols carry the fixed and per-step costs; no per-message curve
        dispatch, combine, overhead = traffic.dispatch_bytes, traffic.combine_bytes, 0.0
    collectives: tuple[Collective, Collective] | None = None
    if dispatch.sum() > 0 and np.allclose(combine, dispatch * (combine.sum() / dispatch.sum()),
                                          rtol=1e-12, atol=0.0):
        collectives = mirrored_alltoalls(ctx.topology, ctx.reverse_link, pairs, dispatch,
                                         combine.sum() / dispatch.sum(), ctx.rtol,
                                         paths=(*paths, *back_paths))
    if collectives is None:
        collectives = (alltoall(ctx.topology, pairs, dispatch, ctx.rtol, paths=paths),
                       alltoall(ctx.topology, back, combine, ctx.rtol, paths=back_paths))
    if ring is not None:
        collectives = tuple(_as_ring(ctx, traffic, c, ring, latency_of=rows)  # type: ignore
                            for c, rows in zip(collectives, (traffic.pairs,
                                                             traffic.combine_pairs)))
    return tuple(_priced(c, traffic_bytes, pairs_, overhead, ctx)   # type: ignore
                 for c, traffic_bytes, pairs_ in zip(
                     collectives, (traffic.dispatch_bytes, traffic.combine_bytes), (pairs, back)))


def layer_ring_class(ctx: PricingContext, traffic: LayerTraffic,
                     paths: tuple[np.ndarray, np.ndarray]) -> LinkSpec | None:
    """The link class whose measured ring protocols price this layer, or None.

    The ``allgather`` layer is an all-gather then a reduce-scatter, which NCCL runs as ring
    collectives: when every link its flows cross is of one class with ``ring_protocols``, each
    is priced as that ring (:func:`moesim.network.ring_protocol_time`) from its flows' transfer
    time; otherwise (mixed classes, no protocol table) like the other algorithms."""
    if traffic.algorithm != "allgather" or paths[1].size == 0:
        return None
    return network.ring_class(ctx.link_specs[i] for i in np.unique(paths[1]).tolist())


def ring_steps(traffic: LayerTraffic) -> int:
    """Steps of the ``allgather`` layer's rings over the group's live members (the devices that
    send: each sends to every other)."""
    return int(np.unique(traffic.pairs[:, 0]).size) - 1


def _as_ring(ctx: PricingContext, traffic: LayerTraffic, coll: Collective, link: LinkSpec, *,
             latency_of: np.ndarray) -> Collective:
    """The collective timed as a ring over its live members: its flows' transfer time (the
    flow-level makespan less the path latency) in the class's fastest protocol."""
    _, path_latency = ctx.padded_paths
    latency = float(path_latency[latency_of[:, 0] * ctx.ep + latency_of[:, 1]].max())
    transfer = max(coll.duration - latency, 0.0)
    return replace(coll, duration=network.ring_protocol_time(ring_steps(traffic), transfer, link))


def _on_the_wire(ctx: PricingContext, traffic: LayerTraffic, nbytes: np.ndarray,
                 paths: tuple[np.ndarray, np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """Wire-equivalent bytes of each flow (its own bytes where no size curve applies): the
    NCCL message-size curve, or the SM-limited NVLink rate of DeepEP's normal kernels."""
    nbytes = _sm_limited(ctx, traffic, nbytes, paths, pairs)
    half, _ = ctx.link_curves
    if not traffic.per_message_cost or not half.any():
        return nbytes
    ptr, links = paths
    hops = np.diff(ptr)
    flow_half = np.zeros(len(nbytes))
    if links.size:
        np.maximum.at(flow_half, np.repeat(np.arange(len(nbytes)), hops), half[links])
    return network.wire_bytes(nbytes, flow_half)


def _sm_limited(ctx: PricingContext, traffic: LayerTraffic, nbytes: np.ndarray,
                paths: tuple[np.ndarray, np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """DeepEP's normal kernels copy over NVLink with their share of the SMs: intra-node flows
    move at :func:`moesim.kernels.comm_kernel_bandwidth` or the profile's
    ``comm_link_efficiency`` of the link rate, whichever is lower."""
    if traffic.algorithm != "deepep_normal" or len(pairs) == 0:
        return nbytes
    device = ctx.scenario.hardware.device
    node, (ptr, links) = ctx.device_node, paths
    return network.sm_limited_bytes(nbytes, node[pairs[:, 0]] == node[pairs[:, 1]], ptr, links,
                                    ctx.topology.capacity, comm_kernel_bandwidth(device),
                                    device.comm_link_efficiency)


def _fixed_cost(ctx: PricingContext, paths: tuple[np.ndarray, np.ndarray],
                traffic: LayerTraffic | None = None) -> float:
    """The collective's fixed cost: the largest of its links' classes' per-collective costs.
    A DeepEP kernel pays its own (launch, GPU-side signalling; the scale-out class's figure,
    fitted on DeepEP's kernels) even when every message stays inside the node."""
    _, overhead = ctx.link_curves
    links = paths[1]
    cost = float(overhead[links].max()) if links.size else 0.0
    if links.size and traffic is not None and traffic.algorithm.startswith("deepep"):
        cost = max(cost, deepep_kernel_overhead(ctx.scenario.hardware))
    return cost


def deepep_kernel_overhead(hardware: HardwareProfile) -> float:
    """The fixed cost of one DeepEP kernel (dispatch or combine): the scale-out link class's
    ``collective_overhead``, which the profiles fit on DeepEP's low-latency kernels; 0 for a
    profile without a scale-out class."""
    link = hardware.links.get("scale_out")
    return link.collective_overhead if link is not None else 0.0


def _priced(coll: Collective, real_bytes: np.ndarray, pairs: np.ndarray, overhead: float,
            ctx: PricingContext) -> Collective:
    """The collective with its fixed cost added and its byte totals the real (not wire) bytes;
    link bytes stay wire-equivalent (they are what occupies each link)."""
    cross = ctx.topology.device_node[pairs[:, 0]] != ctx.topology.device_node[pairs[:, 1]]
    return replace(coll, duration=coll.duration + overhead if coll.duration > 0 else 0.0,
                   total_bytes=float(real_bytes.sum()),
                   cross_node_bytes=float(real_bytes[cross].sum()), nbytes=real_bytes)


def layer_alltoall_times(ctx: PricingContext, traffic: LayerTraffic, *, exact: bool
                         ) -> tuple[float, float]:
    """(dispatch, combine) seconds: flow-level when ``exact``, else the closed form."""
    if exact:
        dispatch, combine = layer_alltoalls(ctx, traffic)
        return dispatch.duration, combine.duration
    if len(traffic.pairs) == 0:
        return 0.0, 0.0
    paths = ctx.paths_csr(traffic.pairs)
    back = ctx.paths_csr(traffic.combine_pairs)
    ring = layer_ring_class(ctx, traffic, paths)
    if ring is not None:
        steps = ring_steps(traffic)
        return tuple(network.ring_protocol_time(steps, alltoall_closed_form(  # type: ignore
            ctx, pairs_, nbytes, latency=False), ring) for pairs_, nbytes in (
                (traffic.pairs, traffic.dispatch_bytes),
                (traffic.combine_pairs, traffic.combine_bytes)))
    overhead = _fixed_cost(ctx, paths, traffic)
    wire = _on_the_wire(ctx, traffic, traffic.dispatch_bytes, paths, traffic.pairs)
    wire_back = _on_the_wire(ctx, traffic, traffic.combine_bytes, back, traffic.combine_pairs)
    return (alltoall_closed_form(ctx, traffic.pairs, wire) + overhead,
            alltoall_closed_form(ctx, traffic.combine_pairs, wire_back) + overhead)


def alltoall_closed_form(ctx: PricingContext, pairs: np.ndarray, nbytes: np.ndarray, *,
                         latency: bool = True) -> float:
    """Busiest link's bytes over its capacity plus the longest moving path's latency (without
    it when ``latency`` is False).

    ``pairs: int[F, 2]`` group-local (src, dst), ``nbytes: float[F]``. A lower bound of the
    flow-level time (:func:`moesim.network.alltoall_bound`).
    """
    if len(pairs) == 0:
        return 0.0
    topo = ctx.topology
    paths, path_latency = ctx.padded_paths
    row = pairs[:, 0] * ctx.ep + pairs[:, 1]
    links = paths[row]                                          # [F, H], -1 padded
    used = links >= 0
    link_bytes = np.bincount(links[used], weights=np.broadcast_to(nbytes[:, None],
                                                                  links.shape)[used],
                             minlength=topo.num_links)
    moving = (nbytes > 0) & used[:, 0]
    slowest = float(path_latency[row][moving].max()) if moving.any() and latency else 0.0
    return network.alltoall_bound(link_bytes, topo.capacity) + slowest
