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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim.errors import InternalError

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
]

# Two fair shares within this relative distance are the same water level: float noise from
# summing rates must not split one bottleneck into two filling rounds.
_TIE = 1e-12
# Warm start keeps flows whose rate is below the cutoff by more than float noise (see _rates).
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
    capacity = _as_capacity(capacity)
    path_ptr, path_links = _as_paths(path_ptr, path_links, capacity.size)
    n_flows = path_ptr.size - 1
    if active is None:
        active = np.ones(n_flows, dtype=bool)
    active = np.asarray(active, dtype=bool)
    if active.shape != (n_flows,):
        raise InternalError(f"active has shape {active.shape}, expected ({n_flows},)")
    empty = np.diff(path_ptr) == 0
    rates = np.zeros(n_flows)
    rates[active & empty] = np.inf
    sharing = active & ~empty
    links = _padded(path_ptr, path_links, capacity.size)[:, sharing]
    load = np.zeros(capacity.size + 1)
    rates[sharing] = _water_fill(links, np.append(capacity, np.inf), load)
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
    in the window are admitted at its end. The default merges only float-equal events; a coarse
    ``rtol`` (say 1e-3) trades finish-time error of that order for far fewer events.

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
    capacity = _as_capacity(capacity)
    n_links = capacity.size
    path_ptr, path_links = _as_paths(path_ptr, path_links, n_links)
    n_flows = path_ptr.size - 1
    sizes = _as_vector(sizes, "sizes", n_flows, lowest=0.0)
    starts = _as_vector(starts, "starts", n_flows, lowest=-np.inf)
    latency = _as_vector(latency, "latency", n_links, lowest=0.0)
    if not rtol >= 0.0:
        raise InternalError(f"rtol={rtol} must be >= 0")
    lengths = np.diff(path_ptr)
    flow_of_entry = np.repeat(np.arange(n_flows), lengths)
    path_latency = np.bincount(flow_of_entry, weights=latency[path_links], minlength=n_flows)
    # Flows that move no bytes over any link finish where they start.
    moving = np.flatnonzero((sizes > 0) & (lengths > 0))
    finish = starts.copy()
    link_bytes = np.zeros(n_links + 1)
    link_busy = np.zeros(n_links + 1)
    events = 0
    if moving.size:
        moving = moving[np.argsort(starts[moving], kind="stable")]
        events = _run_events(
            moving, sizes, starts, _padded(path_ptr, path_links, n_links),
            np.append(capacity, np.inf), rtol, finish, link_bytes, link_busy,
        )
        finish[moving] += path_latency[moving]
    makespan = float(finish.max() - starts.min()) if n_flows else 0.0
    return FlowResult(finish, link_bytes[:n_links], link_busy[:n_links], makespan, events)


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
) -> float:
    """Two-level all-reduce over ``nodes * per_node`` ranks.

    Ring reduce-scatter inside each node, then ``per_node`` parallel inter-node ring all-reduces
    (one per local rank, i.e. per rail) on ``nbytes / per_node`` each, then an intra-node ring
    all-gather. ``inter_bw`` is one rank's (rail's) share of the node's network bandwidth.
    """
    _check_collective(nbytes, nodes, inter_bw, inter_lat)
    _check_collective(nbytes, per_node, intra_bw, intra_lat)
    return (
        ring_reduce_scatter(nbytes, per_node, intra_bw, intra_lat)
        + ring_all_reduce(nbytes / per_node, nodes, inter_bw, inter_lat)
        + ring_all_gather(nbytes, per_node, intra_bw, intra_lat)
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


# --- Internals ---


def _water_fill(links: np.ndarray, residual: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Progressive filling of the flows ``links: int[K, n]`` (padded with the dummy last link).

    ``residual: float[L + 1]`` is the capacity left by flows already fixed (``inf`` on the dummy)
    and ``load: float[L + 1]`` their rate sum; both are updated in place. Every flow must cross
    a real link. Returns ``rates: float[n]``.
    """
    n_slots, n_hops = residual.size, links.shape[0]
    rates = np.empty(links.shape[1])
    todo = np.arange(links.shape[1])
    count = np.bincount(links.ravel(), minlength=n_slots)
    while todo.size:
        # Step 1: the level at which each link saturates if its unfrozen flows rise together.
        share = np.full(n_slots, np.inf)
        np.divide(residual, count, out=share, where=count > 0)
        # Step 2: each flow is limited by its tightest link.
        link_share = share[links]
        flow_share = np.minimum.reduce(link_share, axis=0)
        # Step 3: a link is a bottleneck when none of its flows is limited more tightly elsewhere.
        # The lowest-share link always qualifies; others qualify too, since shares only rise as
        # flows freeze below them (the parallel form of progressive filling).
        elsewhere = link_share > flow_share * (1.0 + _TIE)
        blocked = np.bincount(links.ravel(), weights=elsewhere.ravel(), minlength=n_slots)
        bottleneck = (blocked == 0) & (count > 0)
        bottleneck[-1] = False
        # Step 4: freeze every flow that crosses a bottleneck, at its tightest share.
        frozen = np.logical_or.reduce(bottleneck[links], axis=0)
        assert frozen.any(), "progressive filling made no progress"
        rate = flow_share[frozen]
        rates[todo[frozen]] = rate
        hops = links[:, frozen].ravel()
        added = np.bincount(
            hops, weights=np.broadcast_to(rate, (n_hops, rate.size)).ravel(), minlength=n_slots
        )
        load += added
        residual -= added
        residual[bottleneck] = 0.0
        np.maximum(residual, 0.0, out=residual)
        count -= np.bincount(hops, minlength=n_slots)
        keep = ~frozen
        links, todo = links[:, keep], todo[keep]
    return rates


def _rates(
    links: np.ndarray, capacity: np.ndarray, old: np.ndarray | None, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Max-min rates of the active flows ``links: int[K, a]`` and the link loads ``[L + 1]``.

    Warm start: when flows of rate >= ``cutoff`` have just left (and none arrived), every flow
    slower than the cutoff keeps its rate, because progressive filling below that water level
    never saw the departed flows' links saturate. Only the others are refilled.
    """
    if old is None:
        old, fixed = np.zeros(links.shape[1]), np.zeros(links.shape[1], dtype=bool)
    else:
        fixed = old < cutoff * _BELOW
    rates = old.copy()
    kept = links[:, fixed]
    weights = np.broadcast_to(rates[fixed], kept.shape).ravel()
    load = np.bincount(kept.ravel(), weights=weights, minlength=capacity.size).astype(float)
    residual = np.maximum(capacity - load, 0.0)
    rates[~fixed] = _water_fill(links[:, ~fixed], residual, load)
    return rates, load


def _run_events(
    order: np.ndarray,
    sizes: np.ndarray,
    starts: np.ndarray,
    padded: np.ndarray,
    capacity: np.ndarray,
    rtol: float,
    finish: np.ndarray,
    link_bytes: np.ndarray,
    link_busy: np.ndarray,
) -> int:
    """Event loop of :func:`simulate_flows` over the flows ``order`` (sorted by start).

    Writes last-byte times into ``finish`` and accumulates ``link_bytes``/``link_busy`` (both
    ``[L + 1]``, dummy last); returns the number of rate recomputations.
    """
    start_at = starts[order]
    t0 = t = float(start_at[0])
    admitted, events, tol = 0, 0, 0.0
    active = order[:0]
    rem = np.empty(0)
    rates: np.ndarray | None = None
    cutoff = np.inf
    while True:
        # Step 1: admit the flows that have started (within the merge window).
        upto = int(np.searchsorted(start_at, t + tol, side="right"))
        if upto > admitted:
            active = np.concatenate([active, order[admitted:upto]])
            rem = np.concatenate([rem, sizes[order[admitted:upto]]])
            admitted, rates = upto, None
        if active.size == 0:
            if admitted == order.size:
                return events
            t = float(start_at[admitted])
            continue
        # Step 2: rates, then the next event: a completion or a start, merged within the window.
        links = padded[:, active]
        rates, load = _rates(links, capacity, rates, cutoff)
        events += 1
        to_finish = rem / rates
        next_start = start_at[admitted] - t if admitted < order.size else np.inf
        first = min(float(to_finish.min()), next_start)
        tol = rtol * (t - t0 + first)
        done = to_finish <= first + tol
        step = float(to_finish[done].max()) if done.any() else first
        # Step 3: advance; finishing flows send their remainder within the step.
        link_bytes += load * step
        link_busy[load > 0] += step
        if done.any():
            slack = rem[done] - rates[done] * step
            hops = links[:, done]
            weights = np.broadcast_to(slack, hops.shape).ravel()
            link_bytes += np.bincount(hops.ravel(), weights=weights, minlength=capacity.size)
        # A pure start event lands exactly on the start time, so the start is admitted.
        t = t + step if done.any() else float(start_at[admitted])
        finish[active[done]] = t
        cutoff = float(rates[done].min()) if done.any() else np.inf
        keep = ~done
        active, rem, rates = active[keep], rem[keep] - rates[keep] * step, rates[keep]


def _padded(path_ptr: np.ndarray, path_links: np.ndarray, n_links: int) -> np.ndarray:
    """Paths as ``int[K, F]`` (K = longest path), short paths padded with the dummy link ``L``."""
    lengths = np.diff(path_ptr)
    n_flows = lengths.size
    padded = np.full((max(int(lengths.max(initial=0)), 1), n_flows), n_links, dtype=np.intp)
    position = np.arange(path_links.size) - np.repeat(path_ptr[:-1], lengths)
    padded[position, np.repeat(np.arange(n_flows), lengths)] = path_links
    return padded


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
