"""Flow-level (fluid) network model: max-min fair sharing of directed links, and collective costs.

The network is ``L`` directed links, each with a capacity (bytes/s, one direction) and a latency
(seconds). A flow moves ``size`` bytes from its start time along a path of link indices; many paths
travel together in CSR form (``path_ptr: [F + 1]``, ``path_links: [nnz]``; flow ``f`` uses
``path_links[path_ptr[f]:path_ptr[f + 1]]``, links in a path are distinct).

Bandwidth is shared max-min fairly (Bertsekas & Gallager, *Data Networks*, 1992, sec. 6.5.2): no
flow can get more without taking from a flow that has no more. ``simulate_flows`` is an
event-driven fluid simulation: rates are piecewise constant and are recomputed at every flow start
and completion. A flow's latency is the sum of its links' latencies and is added once, after its
last byte leaves the source: store-and-forward and per-hop pipelining are not modelled, nor are
packets, congestion control or switch buffers.

The closed-form alpha-beta costs of collectives (ring, tree, hierarchical all-reduce, all-to-all,
point-to-point) live here too, so the simulator and the placement planner price traffic alike.

Message-size dependence (opt-in per link class, :class:`moesim.spec.hardware.LinkSpec`): a message
of ``s`` bytes reaches ``efficiency * s / (s + h)`` of line rate, ``h`` the link's
``half_efficiency_size``: the alpha-beta law ``t = (s + h) / B_eff`` of nccl-tests size sweeps with
its per-message alpha written as ``h`` bytes of wire time. :func:`link_time` and
:func:`effective_bandwidth` price one message; :func:`wire_bytes` turns flows made of messages
into the bytes a link at the large-message rate ``B_eff`` would carry in the same time, so
:func:`simulate_flows` charges the size curve unchanged. :func:`simulate_concurrent` runs several
collectives' flows together on one network (contention) and reports each one's finish.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from moesim.errors import InternalError
from moesim.spec.hardware import LinkSpec, RingProtocol

__all__ = [
    "FlowResult",
    "paths_to_csr",
    "max_min_rates",
    "simulate_flows",
    "alltoall_bound",
    "ring_all_reduce",
    "ring_reduce_scatter",
    "ring_all_gather",
    "tree_all_reduce",
    "hierarchical_all_reduce",
    "all_to_all_alpha_beta",
    "p2p",
    "message_efficiency",
    "effective_bandwidth",
    "link_time",
    "wire_bytes",
    "RING_OPS",
    "ring_shape",
    "ring_protocol_time",
    "ring_protocol_choice",
    "ring_class",
    "ring_time",
    "FlowGroup",
    "ConcurrentResult",
    "simulate_concurrent",
]

# Two fair shares within this relative distance are the same water level: float noise from
# summing rates must not split one bottleneck into two filling rounds.
_TIE = 1e-12
# The warm start keeps flows whose rate is below the cutoff by more than float noise.
_BELOW = 1.0 - 1e-9


@dataclass(frozen=True, eq=False)
class FlowResult:
    """Outcome of :func:`simulate_flows`.

    Attributes
    ----------
    finish : float[F]
        Time each flow's last byte arrives (seconds, same clock as ``starts``).
    link_bytes : float[L]
        Bytes each link carried.
    link_busy : float[L]
        Seconds during which each link carried a positive rate.
    makespan : float
        ``max(finish) - min(starts)``; 0 when there are no flows.
    events : int
        Number of max-min rate recomputations.
    """

    finish: np.ndarray
    link_bytes: np.ndarray
    link_busy: np.ndarray
    makespan: float
    events: int


def paths_to_csr(paths: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Pack a list of paths (lists of link indices) into ``(path_ptr: [F + 1], path_links: [nnz])``.

    Example
    -------
    >>> ptr, links = paths_to_csr([[0, 2], [], [1]])
    >>> ptr.tolist(), links.tolist()
    ([0, 2, 2, 3], [0, 2, 1])
    """
    lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    path_ptr = np.zeros(len(paths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=path_ptr[1:])
    path_links = np.fromiter(
        (link for p in paths for link in p), dtype=np.int64, count=int(path_ptr[-1])
    )
    return path_ptr, path_links


def max_min_rates(
    path_ptr: np.ndarray,
    path_links: np.ndarray,
    capacity: np.ndarray,
    active: np.ndarray | None = None,
) -> np.ndarray:
    """Max-min fair rates of flows sharing links, by progressive filling.

    Parameters
    ----------
    path_ptr, path_links : int[F + 1], int[nnz]
        Flow paths in CSR form.
    capacity : float[L]
        Link capacities, bytes/s, finite and > 0.
    active : bool[F], optional
        Flows that compete for bandwidth; inactive flows get rate 0. Default: all.

    Returns
    -------
    rates : float[F]
        Bytes/s. An active flow with an empty path (same device) gets ``inf``.

    Raises
    ------
    InternalError
        Malformed paths, a non-positive capacity or an ``active`` mask of the wrong shape.

    Example
    -------
    >>> ptr, links = paths_to_csr([[0], [0, 1], [1]])
    >>> max_min_rates(ptr, links, np.array([10.0, 4.0])).tolist()
    [8.0, 2.0, 2.0]
    """
    net = _Net.build(path_ptr, path_links, capacity)
    n_flows = net.lengths.size
    if active is None:
        active = np.ones(n_flows, dtype=bool)
    active = np.asarray(active, dtype=bool)
    if active.shape != (n_flows,):
        raise InternalError(f"active has shape {active.shape}, expected ({n_flows},)")
    rates = np.zeros(n_flows)
    _water_fill(np.flatnonzero(active & (net.lengths > 0)), np.zeros(0, np.intp), rates, net)
    rates[active & (net.lengths == 0)] = np.inf
    return rates


def simulate_flows(
    sizes: np.ndarray,
    starts: np.ndarray,
    path_ptr: np.ndarray,
    path_links: np.ndarray,
    capacity: np.ndarray,
    latency: np.ndarray,
    *,
    rtol: float = 1e-12,
) -> FlowResult:
    """Event-driven fluid simulation of flows under max-min fair sharing.

    At every flow start and completion the active flows' rates are recomputed; between events
    they are constant. A flow finishes when its last byte is sent plus the sum of its path's link
    latencies (added once; no store-and-forward). Zero-size flows and flows with an empty path
    finish at their start, without latency.

    Events closer together than ``rtol`` times the elapsed simulated time are merged into one:
    flows whose completion falls in the window finish together at its end (their last bytes go a
    little slower than their fair rate, so rates stay feasible and bytes are conserved) and starts
    in the window are admitted at its end. The default merges only float-equal events.

    Cost: one progressive filling per event, over the flows at or above the slowest departed
    flow's rate, in a few rounds (each freezes every locally tightest link, see
    :func:`_water_fill`), on the links some path uses only. A 64-device all-to-all (4,032 flows
    on 144 links, 8 nodes) with equal sizes takes 2 events and ~3 ms; with random sizes every
    completion is an event: 4,032 events, ~2 s. ``rtol=1e-2`` cuts that to ~100 events and
    ~0.07 s, moving finish times by up to ~2% of the makespan (the makespan by ~1%, upwards).
    DeepSeek-V3's hierarchical all-to-all over 64 of 2,048 GPUs (896 flows on 256 of 8,448
    links, sizes spread 3x) takes ~54 events and ~10 ms at ``rtol=1e-2``.

    Parameters
    ----------
    sizes, starts : float[F]
        Bytes (>= 0) and start times (seconds) of the flows.
    path_ptr, path_links : int[F + 1], int[nnz]
        Flow paths in CSR form.
    capacity, latency : float[L]
        Per-link bytes/s (> 0) and seconds (>= 0).
    rtol : float
        Relative event-merging window, >= 0.

    Returns
    -------
    FlowResult

    Raises
    ------
    InternalError
        Negative or non-finite sizes, starts, latencies or capacities, or malformed paths.
    """
    net = _Net.build(path_ptr, path_links, capacity)
    n_flows, n_links, n_used = net.lengths.size, np.size(capacity), net.used.size
    sizes = _as_vector(sizes, "sizes", n_flows, lowest=0.0)
    starts = _as_vector(starts, "starts", n_flows, lowest=-np.inf)
    latency = _as_vector(latency, "latency", n_links, lowest=0.0)
    if not rtol >= 0.0:
        raise InternalError(f"rtol={rtol} must be >= 0")
    finish = starts.copy()
    used_bytes = np.zeros(n_used + 1)
    used_busy = np.zeros(n_used + 1)
    # Flows that move no bytes over any link finish where they start.
    moving = np.flatnonzero((sizes > 0) & (net.lengths > 0))
    moving = moving[np.argsort(starts[moving], kind="stable")]
    events = _run_events(moving, sizes, starts, net, rtol, finish, used_bytes, used_busy)
    finish[moving] += np.append(latency[net.used], 0.0)[net.padded[:, moving]].sum(axis=0)
    makespan = float(finish.max() - starts.min()) if n_flows else 0.0
    link_bytes, link_busy = np.zeros(n_links), np.zeros(n_links)
    link_bytes[net.used] = used_bytes[:n_used]
    link_busy[net.used] = used_busy[:n_used]
    return FlowResult(finish, link_bytes, link_busy, makespan, events)


def alltoall_bound(link_bytes: np.ndarray, capacity: np.ndarray) -> float:
    """Lower bound on the time to move ``link_bytes: [L]``: ``max_l link_bytes[l] / capacity[l]``.

    No schedule beats the busiest link; the fluid model meets the bound exactly for a symmetric
    uniform all-to-all (latency aside). 0 for no links.
    """
    capacity = _as_capacity(capacity)
    link_bytes = _as_vector(link_bytes, "link_bytes", capacity.size, lowest=0.0)
    return float((link_bytes / capacity).max()) if capacity.size else 0.0


# --- Collective costs (alpha-beta: time = hops * latency + bytes on the busiest port / bw) ---
# Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH",
# IJHPCA 2005; NCCL docs "Collective Operations" and the NCCL 2.4 double-binary-tree note
# (Sanders, Speck & Traeff 2009 two-tree algorithms). ``bw`` is the per-direction bandwidth of
# the bottleneck link of one rank; ``nbytes`` is one rank's whole buffer. One rank costs 0.


def ring_all_reduce(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring all-reduce: ``2(n-1)*lat + 2(n-1)/n * nbytes/bw`` (reduce-scatter then all-gather)."""
    _check_collective(nbytes, n, bw, lat)
    return 2.0 * ring_reduce_scatter(nbytes, n, bw, lat)


def ring_reduce_scatter(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring reduce-scatter of a full buffer of ``nbytes``: ``(n-1)*lat + (n-1)/n * nbytes/bw``."""
    _check_collective(nbytes, n, bw, lat)
    return (n - 1) * lat + (n - 1) / n * nbytes / bw


def ring_all_gather(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring all-gather into a full buffer of ``nbytes``: same cost as the reduce-scatter."""
    return ring_reduce_scatter(nbytes, n, bw, lat)


_ALPHA_BETA = {"allreduce": ring_all_reduce, "allgather": ring_all_gather,
               "reducescatter": ring_reduce_scatter}


def tree_all_reduce(nbytes: float, n: int, bw: float, lat: float) -> float:
    """NCCL double-binary-tree all-reduce: ``2*ceil(log2 n)*lat + 2*nbytes/bw``.

    Reduce up and broadcast down a tree of depth ``ceil(log2 n)``, pipelined; each tree carries
    half the buffer and every rank is inner in one tree and a leaf in the other, so each rank
    sends and receives ``2 * nbytes`` in all (pipeline fill is neglected).
    """
    _check_collective(nbytes, n, bw, lat)
    if n == 1:
        return 0.0
    return 2.0 * math.ceil(math.log2(n)) * lat + 2.0 * nbytes / bw


def hierarchical_all_reduce(
    nbytes: float,
    nodes: int,
    per_node: int,
    intra_bw: float,
    intra_lat: float,
    inter_bw: float,
    inter_lat: float,
    *,
    intra_regimes: LinkSpec | None = None,
) -> float:
    """Two-level all-reduce over ``nodes * per_node`` ranks.

    Ring reduce-scatter inside each node, then ``per_node`` parallel inter-node ring all-reduces
    (one per local rank, i.e. per rail) on ``nbytes / per_node`` each, then an intra-node ring
    all-gather. ``inter_bw`` is one rank's (rail's) share of the node's network bandwidth;
    ``intra_regimes``: the intra-node link class whose measured ring regimes time the two
    intra-node phases (:func:`ring_time`).
    """
    _check_collective(nbytes, nodes, inter_bw, inter_lat)
    _check_collective(nbytes, per_node, intra_bw, intra_lat)
    return (
        ring_time("reducescatter", nbytes, per_node, intra_bw, intra_lat, intra_regimes)
        + ring_all_reduce(nbytes / per_node, nodes, inter_bw, inter_lat)
        + ring_time("allgather", nbytes, per_node, intra_bw, intra_lat, intra_regimes)
    )


def all_to_all_alpha_beta(nbytes_per_rank: float, n: int, bw: float, lat: float) -> float:
    """Pairwise-exchange all-to-all: ``(n-1)*lat + (n-1)/n * nbytes_per_rank/bw``.

    Each rank sends ``1/n`` of its ``nbytes_per_rank`` buffer to each of the ``n - 1`` others.
    """
    _check_collective(nbytes_per_rank, n, bw, lat)
    return (n - 1) * lat + (n - 1) / n * nbytes_per_rank / bw


def p2p(nbytes: float, bw: float, lat: float) -> float:
    """Point-to-point send: ``lat + nbytes/bw``; 0 for an empty message, as in the flow model."""
    _check_collective(nbytes, 1, bw, lat)
    return lat + nbytes / bw if nbytes > 0 else 0.0


# --- Ring collectives with measured protocol regimes ---
# NCCL runs a ring collective in one of several protocols (LL, LL128, Simple) and picks the
# fastest for the size: the low-latency ones pay little per step but reach a fraction of the link
# (LL128 ~ 120/128 of the payload per line, synchronised per line), Simple pipelines big chunks at
# nearly line rate behind a larger fixed cost. A link class that lists ``ring_protocols`` prices
# its ring collectives as the fastest regime (:func:`ring_protocol_time`); one without keeps the
# alpha-beta forms above.

RING_OPS = ("allreduce", "allgather", "reducescatter")


def ring_shape(op: str, n: int) -> tuple[int, float]:
    """(steps, share) of a ring ``op`` over ``n`` ranks: sequential ring steps, and the fraction
    of the ``S``-byte buffer each rank sends (``(n-1)/n``; twice both for an all-reduce).

    >>> ring_shape("allgather", 8), ring_shape("allreduce", 4)
    ((7, 0.875), (6, 1.5))
    """
    if op not in RING_OPS:
        raise InternalError(f"ring collectives are {', '.join(RING_OPS)}; not {op!r}")
    if n < 1:
        raise InternalError(f"a ring needs >= 1 rank, got {n}")
    steps = (2 if op == "allreduce" else 1) * (n - 1)
    return steps, steps / n


def ring_protocol_time(steps: int, transfer: float, link: LinkSpec) -> float:
    """Seconds of a ring collective of ``steps`` steps whose bytes take ``transfer`` seconds at
    the class's large-message rate (``link.effective_bandwidth``), in the fastest of the class's
    ``ring_protocols``: ``fixed + steps * per_step + transfer * efficiency / p.efficiency``.
    0 when nothing moves (``transfer == 0``).

    >>> from moesim.spec.hardware import RingProtocol
    >>> link = LinkSpec(kind="nvlink", bandwidth=100e9, efficiency=0.8, ring_protocols=(
    ...     RingProtocol(name="LL", fixed=5e-6, per_step=1e-6, efficiency=0.4),
    ...     RingProtocol(name="Simple", fixed=20e-6, efficiency=0.8)))
    >>> round(ring_protocol_time(3, 1e-6, link) * 1e6, 3)    # LL: 5 + 3 + 1 x 2
    10.0
    >>> round(ring_protocol_time(3, 1e-3, link) * 1e6, 3)    # Simple: 20 + 1000
    1020.0
    """
    return ring_protocol_choice(steps, transfer, link)[1]


def ring_protocol_choice(steps: int, transfer: float, link: LinkSpec
                         ) -> tuple[RingProtocol | None, float]:
    """(fastest protocol, its seconds) for :func:`ring_protocol_time`; (None, 0) when nothing
    moves."""
    if not link.ring_protocols:
        raise InternalError(f"link class {link.kind!r} has no ring_protocols")
    if not (math.isfinite(transfer) and transfer >= 0 and steps >= 0):
        raise InternalError(f"ring_protocol_time: bad steps {steps} or transfer {transfer}")
    if transfer == 0:
        return None, 0.0
    times = [p.fixed + steps * p.per_step + transfer * link.efficiency / p.efficiency
             for p in link.ring_protocols]
    best = int(np.argmin(times))
    return link.ring_protocols[best], times[best]


def ring_class(specs: Iterable[LinkSpec | None]) -> LinkSpec | None:
    """The link class of a ring collective's links (``specs``: one per link it crosses) when
    they all belong to one class that has ``ring_protocols``, else None (mixed classes keep the
    alpha-beta forms)."""
    distinct = {id(spec): spec for spec in specs}
    if len(distinct) != 1:
        return None
    (spec,) = distinct.values()
    return spec if spec is not None and spec.ring_protocols else None


def ring_time(op: str, nbytes: float, n: int, bw: float, lat: float,
              regimes: LinkSpec | None = None) -> float:
    """Ring ``op`` (all-reduce, all-gather, reduce-scatter) of an ``nbytes`` buffer over ``n``
    ranks whose bottleneck link moves ``bw`` bytes/s at ``lat`` seconds per step: in the fastest
    of ``regimes.ring_protocols`` (the link class's measured regimes, scaled to ``bw``) when
    given, else the alpha-beta forms above. 0 for one rank or nothing to move."""
    _check_collective(nbytes, n, bw, lat)
    if n == 1 or nbytes == 0:
        return 0.0
    if regimes is None:
        return _ALPHA_BETA[op](nbytes, n, bw, lat)
    steps, share = ring_shape(op, n)
    return ring_protocol_time(steps, share * nbytes / bw, regimes)


# --- Message-size dependent link cost ---


def message_efficiency(nbytes: float | np.ndarray, link: LinkSpec) -> float | np.ndarray:
    """Fraction of line rate one message of ``nbytes`` reaches: ``eff * s / (s + h)``.

    ``eff`` is ``link.efficiency`` (the large-message ceiling) and ``h`` its
    ``half_efficiency_size``; with ``h = 0`` (the default) every size gets ``eff``. An empty
    message gets 0 when ``h > 0``.
    """
    s = np.asarray(nbytes, dtype=float)
    if np.any(~np.isfinite(s) | (s < 0)):
        raise InternalError(f"message sizes must be finite and >= 0, got {nbytes!r}")
    h = link.half_efficiency_size
    out = np.full(s.shape, link.efficiency) if h == 0 else link.efficiency * s / (s + h)
    return float(out) if out.ndim == 0 else out


def effective_bandwidth(nbytes: float | np.ndarray, link: LinkSpec) -> float | np.ndarray:
    """Bytes/s one message of ``nbytes`` moves at on ``link``: ``bandwidth * eff * s / (s + h)``.

    Tends to ``eff * bandwidth`` for huge messages and to ``eff * bandwidth * s / h`` (a fixed
    per-message time) for tiny ones.
    """
    return link.bandwidth * message_efficiency(nbytes, link)


def link_time(nbytes: float | np.ndarray, link: LinkSpec) -> float | np.ndarray:
    """Seconds to deliver one message of ``nbytes`` over ``link``, 0 for an empty message.

    ``latency + (s + h) / (eff * bandwidth)``: latency-bound (``latency + h / B_eff``) for tiny
    messages, bandwidth-bound (``s / B_eff``) for huge ones. The collective's fixed cost
    (``collective_overhead``) is not included: it is paid once per collective, not per message.
    """
    s = np.asarray(nbytes, dtype=float)
    message_efficiency(s, link)  # validates sizes
    out = np.where(s > 0, link.latency + (s + link.half_efficiency_size)
                   / (link.bandwidth * link.efficiency), 0.0)
    return float(out) if out.ndim == 0 else out


def sm_limited_bytes(nbytes: np.ndarray, limited: np.ndarray, ptr: np.ndarray,
                     links: np.ndarray, capacity: np.ndarray, kernel_rate: float,
                     link_efficiency: float = 1.0) -> np.ndarray:
    """Wire-equivalent bytes of flows an SM-driven kernel moves at
    ``min(kernel_rate, link_efficiency x link rate)`` bytes/s.

    Flow ``f`` (path ``links[ptr[f]:ptr[f + 1]]``) with ``limited[f]`` would move at its slowest
    link's ``capacity`` ``c``; at the kernel's rate ``r`` it costs ``nbytes[f] * c / r`` (never
    fewer than its bytes). The other flows and flows without links keep their bytes; a
    ``kernel_rate`` of 0 sets no SM limit.

    Example
    -------
    >>> sm_limited_bytes(np.array([100.0, 100.0]), np.array([True, False]), np.array([0, 1, 2]),
    ...                  np.array([0, 0]), np.array([200.0]), 100.0).tolist()
    [200.0, 100.0]
    >>> sm_limited_bytes(np.array([100.0]), np.array([True]), np.array([0, 1]), np.array([0]),
    ...                  np.array([200.0]), 0.0, link_efficiency=0.8).tolist()   # 160 of 200
    [125.0]
    """
    size = np.asarray(nbytes, dtype=float)
    if (kernel_rate <= 0 and link_efficiency >= 1.0) or size.size == 0:
        return size
    rate = np.full(size.size, np.inf)
    if links.size:
        np.minimum.at(rate, np.repeat(np.arange(size.size), np.diff(ptr)), capacity[links])
    kernel = np.minimum(kernel_rate if kernel_rate > 0 else np.inf, link_efficiency * rate)
    factor = np.where(np.isfinite(rate), np.maximum(rate / kernel, 1.0), 1.0)
    return np.where(limited, size * factor, size)


def wire_bytes(nbytes: np.ndarray, half_size: float | np.ndarray,
               message_bytes: float | np.ndarray = 0.0) -> np.ndarray:
    """Wire-equivalent bytes of flows: what moves at the large-message rate in the same time.

    Flow ``f`` moves ``nbytes[f]`` in messages of ``message_bytes[f]`` (0 or >= the flow: one
    message) over a link whose size curve has half-size ``half_size[f]``. Each message of ``m``
    bytes costs ``(m + h) / B_eff`` seconds, so the flow costs ``nbytes * (m + h) / m`` bytes at
    ``B_eff``, i.e. ``nbytes / efficiency(m) * eff``: the flow-level simulation, whose link
    capacities are ``B_eff``, then charges the size curve without change. A flow crossing link
    classes with different curves should be given the largest ``h`` on its path (a bound).

    Example
    -------
    >>> wire_bytes(np.array([1000.0, 0.0]), 500.0, 250.0).tolist()   # 4 messages of 250 B
    [3000.0, 0.0]
    """
    size = np.asarray(nbytes, dtype=float)
    h = np.broadcast_to(np.asarray(half_size, dtype=float), size.shape)
    m = np.broadcast_to(np.asarray(message_bytes, dtype=float), size.shape)
    if np.any(~np.isfinite(size) | (size < 0)) or np.any(h < 0) or np.any(m < 0):
        raise InternalError("wire_bytes: sizes, half sizes and message sizes must be >= 0")
    msg = np.where((m > 0) & (m < size), m, size)
    out = size + np.divide(size * h, msg, out=np.zeros_like(size), where=msg > 0)
    return out


# --- Contention between collectives that run at the same time ---


@dataclass(frozen=True, eq=False)
class FlowGroup:
    """The flows of one collective: ``sizes, starts: float[F]`` and CSR paths on the network."""

    name: str
    sizes: np.ndarray
    starts: np.ndarray
    path_ptr: np.ndarray
    path_links: np.ndarray


@dataclass(frozen=True, eq=False)
class ConcurrentResult:
    """Outcome of :func:`simulate_concurrent`.

    ``finish[g]``: each group's last-arrival time (its start if it moves nothing);
    ``alone[g]``: the same group's finish with the network to itself; ``result``: the joint
    :class:`FlowResult` over all groups' flows, concatenated in group order.
    """

    names: tuple[str, ...]
    finish: np.ndarray
    alone: np.ndarray
    result: FlowResult

    @property
    def slowdown(self) -> np.ndarray:
        """``finish / alone`` per group (1 = contention cost nothing); nan for empty groups."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.alone > 0, self.finish / self.alone, np.nan)


def simulate_concurrent(groups: Sequence[FlowGroup], capacity: np.ndarray, latency: np.ndarray,
                        *, rtol: float = 1e-12) -> ConcurrentResult:
    """Simulate several collectives' flows together on one network, and each alone.

    All flows share links max-min fairly (:func:`simulate_flows` on the concatenated flows), so
    groups that cross a common link (e.g. EP groups on one oversubscribed leaf uplink, or data-
    parallel gradient traffic during an all-to-all) slow each other down exactly where the
    topology makes them share; groups on disjoint links do not interact.
    """
    if not groups:
        raise InternalError("simulate_concurrent needs at least one group")
    sizes = np.concatenate([np.asarray(g.sizes, dtype=float) for g in groups])
    starts = np.concatenate([np.asarray(g.starts, dtype=float) for g in groups])
    ptrs, links, offset = [np.zeros(1, dtype=np.int64)], [], 0
    for g in groups:
        ptr = np.asarray(g.path_ptr, dtype=np.int64)
        ptrs.append(ptr[1:] + offset)
        links.append(np.asarray(g.path_links, dtype=np.int64))
        offset += int(ptr[-1])
    result = simulate_flows(sizes, starts, np.concatenate(ptrs), np.concatenate(links),
                            capacity, latency, rtol=rtol)
    bounds = np.cumsum([0] + [np.size(g.sizes) for g in groups])
    finish, alone = np.zeros(len(groups)), np.zeros(len(groups))
    for i, g in enumerate(groups):
        lo, hi = bounds[i], bounds[i + 1]
        own = simulate_flows(g.sizes, g.starts, g.path_ptr, g.path_links, capacity, latency,
                             rtol=rtol)
        finish[i] = result.finish[lo:hi].max() if hi > lo else 0.0
        alone[i] = own.finish.max() if hi > lo else 0.0
    return ConcurrentResult(tuple(g.name for g in groups), finish, alone, result)


# --- Internals ---


@dataclass(frozen=True, eq=False)
class _Net:
    """Validated paths in both directions, with a dummy last link of infinite capacity.

    ``padded: int[K, F]`` lists each flow's links (K = longest path, short paths padded with the
    dummy); ``link_flows[link_ptr[l]:link_ptr[l + 1]]`` are the flows crossing link ``l``.
    """

    lengths: np.ndarray  # int[F], links per path
    padded: np.ndarray  # int[K, F]
    link_ptr: np.ndarray  # int[L + 2]
    link_flows: np.ndarray  # int[nnz]
    capacity: np.ndarray  # float[U + 1], inf on the dummy
    used: np.ndarray  # int[U], the caller's index of each internal link

    @staticmethod
    def build(path_ptr: np.ndarray, path_links: np.ndarray, capacity: np.ndarray) -> _Net:
        capacity = _as_capacity(capacity)
        path_ptr, path_links = _as_paths(path_ptr, path_links, capacity.size)
        # Only the links some path uses take part: per-round work scales with them, not with
        # the whole topology (a 64-device group uses 256 of a 2,048-GPU cluster's 8,448 links).
        used, path_links = np.unique(path_links, return_inverse=True)
        n_links = used.size
        lengths = np.diff(path_ptr)
        flow_of_hop = np.repeat(np.arange(lengths.size), lengths)
        padded = np.full((max(int(lengths.max(initial=0)), 1), lengths.size), n_links, np.intp)
        padded[np.arange(path_links.size) - path_ptr[flow_of_hop], flow_of_hop] = path_links
        link_ptr = np.zeros(n_links + 2, dtype=np.intp)
        np.cumsum(np.bincount(path_links, minlength=n_links + 1), out=link_ptr[1:])
        link_flows = flow_of_hop[np.argsort(path_links, kind="stable")]
        return _Net(lengths, padded, link_ptr, link_flows, np.append(capacity[used], np.inf),
                    used)


def _link_sums(hops: np.ndarray, per_flow: np.ndarray, n_slots: int) -> np.ndarray:
    """Sum ``per_flow: [n]`` onto the links of the flows ``hops: int[K, n]``; ``[n_slots]``."""
    weights = per_flow[None, :].repeat(hops.shape[0], axis=0).ravel()
    # bincount of no hops is int; the callers add floats to the result
    return np.bincount(hops.ravel(), weights=weights, minlength=n_slots).astype(float)


def _water_fill(todo: np.ndarray, fixed: np.ndarray, rates: np.ndarray, net: _Net) -> np.ndarray:
    """Progressive filling: set ``rates[todo]`` while the flows ``fixed`` keep their rates.

    ``todo, fixed: int[n]`` flow ids (disjoint; non-empty paths), ``rates: float[F]`` (written
    in place). Returns the load (rate sum) of todo and fixed flows on each link, ``[U + 1]``,
    dummy last.

    Raising all unfrozen flows together, link ``l`` alone would saturate at ``share[l] =
    residual / unfrozen flows``, and a flow is held at ``fmin``, the least share on its path.
    Filling freezes the flows of the link with the least share, which only raises the others'
    shares; so a link none of whose flows has a smaller ``fmin`` (a local minimum) saturates at
    its current share whatever is frozen before it. Each round freezes the flows of every local
    minimum at once: a handful of rounds instead of one per distinct rate.
    """
    n_slots = net.capacity.size
    load = _link_sums(net.padded[:, fixed], rates[fixed], n_slots)
    ids, hops = todo, net.padded[:, todo]                      # hops: [K, n] unfrozen flows' links
    count = np.bincount(hops.ravel(), minlength=n_slots)
    residual = np.maximum(net.capacity - load, 0.0)            # dummy: inf
    lowest = np.empty(n_slots)
    with np.errstate(divide="ignore", invalid="ignore"):
        while ids.size:
            # Step 1: link shares (links no unfrozen flow crosses may read nan: never used),
            # and each unfrozen flow's tightest share.
            share = residual / count
            fmin = np.minimum.reduce(share[hops], axis=0)      # [n]
            # Step 2: local minima (float ties within _TIE count as equal) freeze their flows.
            lowest.fill(np.inf)
            np.minimum.at(lowest, hops.ravel(), fmin[None, :].repeat(hops.shape[0], axis=0).ravel())
            local = lowest * (1.0 + _TIE) >= share
            local[-1] = False                                  # the dummy never limits
            frozen = np.logical_or.reduce(local[hops], axis=0)
            assert frozen.any(), "no link is a local minimum"
            level = fmin[frozen]
            rates[ids[frozen]] = level
            # Step 3: frozen flows keep their rate on their other links, which fill on.
            frozen_hops = hops[:, frozen]
            added = _link_sums(frozen_hops, level, n_slots)
            count -= np.bincount(frozen_hops.ravel(), minlength=n_slots)
            load += added
            np.maximum(residual - added, 0.0, out=residual)    # float noise: never below 0
            keep = ~frozen
            ids, hops = ids[keep], hops[:, keep]
    return load


def _run_events(
    order: np.ndarray,
    sizes: np.ndarray,
    starts: np.ndarray,
    net: _Net,
    rtol: float,
    finish: np.ndarray,
    link_bytes: np.ndarray,
    link_busy: np.ndarray,
) -> int:
    """Event loop of :func:`simulate_flows` over the flows ``order`` (sorted by start).

    Writes last-byte times into ``finish`` and adds into ``link_bytes`` and ``link_busy``
    (``[U + 1]``, dummy last). Returns the number of rate recomputations.
    """
    if order.size == 0:
        return 0
    start_at = starts[order]
    t0 = t = float(start_at[0])
    ids = np.zeros(0, dtype=np.intp)  # active flows, ascending
    rates = np.zeros(sizes.size)
    rem = sizes.copy()
    admitted, events, tol = 0, 0, 0.0
    cutoff = -1.0  # < 0: recompute every rate
    while True:
        # Step 1: admit the flows that have started (within the merge window).
        upto = int(np.searchsorted(start_at, t + tol, side="right"))
        if upto > admitted:
            ids = np.sort(np.concatenate([ids, order[admitted:upto]]))
            admitted, cutoff = upto, -1.0
        if ids.size == 0:
            if admitted == order.size:
                return events
            t = float(start_at[admitted])
            continue
        # Step 2: rates. Warm start: after departures of flows of rate >= cutoff, and no
        # arrivals, every flow slower than the cutoff keeps its rate, because progressive
        # filling below that level never saw the departed flows' links saturate.
        kept = rates[ids] < cutoff * _BELOW
        load = _water_fill(ids[~kept], ids[kept], rates, net)
        rate = rates[ids]
        if cutoff >= 0 and not np.all(rate > 0):
            # Float noise put a flow at the cutoff on a link filled by kept flows: refill all.
            load = _water_fill(ids, ids[:0], rates, net)
            rate = rates[ids]
        events += 1
        # Step 3: the next event: a completion or a start, merged within the window.
        left = rem[ids]
        to_finish = left / rate
        next_start = start_at[admitted] - t if admitted < order.size else np.inf
        first = min(float(to_finish.min()), next_start)
        tol = rtol * (t - t0 + first)
        done = to_finish <= first + tol
        # Step 4: advance; finishing flows send just their remainder within the step.
        if done.any():
            step = float(to_finish[done].max())
            gone = ids[done]
            slack = left[done] - rate[done] * step
            link_bytes += _link_sums(net.padded[:, gone], slack, link_bytes.size)
            t += step
            finish[gone] = t
            cutoff = float(rate[done].min())
            rates[gone] = 0.0
            kept_ids = ~done
            ids, left, rate = ids[kept_ids], left[kept_ids], rate[kept_ids]
        else:
            step = first
            t = float(start_at[admitted])  # exact, so that the start is admitted
        link_bytes += load * step
        link_busy[load > 0] += step
        rem[ids] = left - rate * step


def _as_paths(
    path_ptr: np.ndarray, path_links: np.ndarray, n_links: int
) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.asarray(path_ptr)
    links = np.asarray(path_links)
    if ptr.ndim != 1 or ptr.size == 0 or links.ndim != 1:
        raise InternalError(
            f"path_ptr (shape {ptr.shape}) and path_links (shape {links.shape}) must be 1-D, "
            "path_ptr non-empty"
        )
    if ptr.size > 1 and not (
        np.issubdtype(ptr.dtype, np.integer) and np.issubdtype(links.dtype, np.integer)
    ):
        raise InternalError(f"path arrays must be integer, got {ptr.dtype} and {links.dtype}")
    if ptr[0] != 0 or ptr[-1] != links.size or np.any(np.diff(ptr) < 0):
        raise InternalError(
            f"path_ptr must rise from 0 to len(path_links)={links.size}, got {ptr.tolist()[:8]}..."
        )
    if links.size and (links.min() < 0 or links.max() >= n_links):
        raise InternalError(
            f"path_links must lie in [0, {n_links}), got range [{links.min()}, {links.max()}]"
        )
    return ptr.astype(np.int64), links.astype(np.intp)


def _as_capacity(capacity: np.ndarray) -> np.ndarray:
    cap = np.asarray(capacity, dtype=float)
    if cap.ndim != 1 or not np.all(np.isfinite(cap) & (cap > 0)):
        bad = cap[~(np.isfinite(cap) & (cap > 0))] if cap.ndim == 1 else cap.shape
        raise InternalError(f"capacity must be a 1-D array of finite values > 0, got {bad}")
    return cap


def _as_vector(values: np.ndarray, name: str, n: int, *, lowest: float) -> np.ndarray:
    vec = np.asarray(values, dtype=float)
    if vec.shape != (n,):
        raise InternalError(f"{name} has shape {vec.shape}, expected ({n},)")
    bad = ~np.isfinite(vec) | (vec < lowest)
    if bad.any():
        allowed = "finite" if lowest == -np.inf else f"finite and >= {lowest}"
        raise InternalError(f"{name} must be {allowed}, got {vec[bad][:4]}")
    return vec


def _check_collective(nbytes: float, n: int, bw: float, lat: float) -> None:
    if not (isinstance(n, int | np.integer) and n >= 1):
        raise InternalError(f"rank count n={n!r} must be an integer >= 1")
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise InternalError(f"nbytes={nbytes} must be finite and >= 0")
    if not (bw > 0 and math.isfinite(bw)):
        raise InternalError(f"bandwidth bw={bw} must be finite and > 0")
    if not (math.isfinite(lat) and lat >= 0):
        raise InternalError(f"latency lat={lat} must be finite and >= 0")
