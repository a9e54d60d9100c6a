"""One collective alone on a topology: time, algorithm bandwidth and bus bandwidth.

``moesim collective`` prices a single all-to-all, all-reduce, all-gather or reduce-scatter on the
topology of a scenario (or of a hardware profile and a node count) with the flow-level network
(:func:`moesim.network.simulate_flows`), so users can set moesim beside their own nccl-tests or
DeepEP measurements. The collective's time is

    ``collective_overhead`` (the largest over the link classes its flows use)
    + the flow-level makespan of its flows (max-min fair sharing; path latency once per flow).

NCCL-style algorithms (``direct``, ``hierarchical`` all-to-all, ring collectives) send each flow
as messages that pay the link's message-size curve (:func:`moesim.network.wire_bytes`); DeepEP's
GPU-initiated kernels (``deepep_normal``, ``deepep_ll``) stream at the large-message rate and pay
the fixed cost only (see :mod:`moesim.traffic`).
The ``allgather`` MoE layer (vLLM's ``allgather_reducescatter``, SGLang's DP attention) is an
NCCL all-gather of every rank's tokens then a reduce-scatter of the partial outputs: one message
per (source, destination) pair each way, with the message-size curve.

Reported figures follow their tools' definitions:

- nccl-tests (``doc/PERFORMANCE.md``): ``algbw = S / t`` with ``S`` the per-rank buffer
  (all-to-all, all-reduce) or the whole gathered/scattered buffer (all-gather, reduce-scatter:
  ``n x`` per-rank count); ``busbw = algbw x 2(n-1)/n`` for all-reduce and ``(n-1)/n`` for
  all-gather, reduce-scatter and all-to-all;
- the ``allgather`` MoE layer: ``S`` = the whole gathered buffer (ranks x tokens per rank x
  bytes per token), as nccl-tests' all-gather and reduce-scatter, so ``busbw`` is the bytes each
  rank receives (dispatch) or sends (combine) per second; the DeepEP-style figures do not apply;
- DeepEP (``tests/test_internode.py``, ``test_intranode.py``, ``test_low_latency.py``): normal
  kernels' "RDMA" GB/s = (token, destination node) copies *including the sender's own node* x
  bytes per copy / t, "NVL" GB/s = (token, destination rank) copies including the sender x bytes /
  t (logical bandwidths, not bytes on a wire); low-latency GB/s = (token, expert) messages x
  message bytes / t.

The ring collectives run ``devices_per_node`` rings (NCCL's channels), ring ``r`` entering every
node at local rank ``r``, so each NIC carries one ring; they are pipelined (all ring edges busy at
once), plus one path latency per ring step. Store-and-forward in ``hierarchical`` and
``deepep_normal`` is pipelined the same way (DeepEP forwards chunk by chunk).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np

from moesim import network, routing
from moesim.errors import ScenarioError
from moesim.kernels import comm_kernel_bandwidth
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import deepep_kernel_overhead
from moesim.pricing.alltoall import ring_steps as layer_ring_steps
from moesim.spec.cluster import ClusterSpec
from moesim.spec.fields import read_yaml
from moesim.spec.hardware import HardwareProfile, load_hardware
from moesim.spec.scenario import Scenario
from moesim.topology import Topology, build_topology
from moesim.traffic import ALGORITHMS, layer_traffic
from moesim.units import UnitError, parse_quantity

__all__ = ["CollectiveResult", "OPS", "BUSBW_FACTOR", "cluster_topology", "uniform_alltoall",
           "ring_collective", "token_alltoall", "deepep_choices", "scenario_layer_alltoall",
           "published_checks", "DEEPEP_NORMAL", "DEEPEP_LL", "H100_LL", "register"]

OPS = ("alltoall", "allreduce", "allgather", "reducescatter")
def BUSBW_FACTOR(op: str, n: int) -> float:  # noqa: N802 - a named constant table
    """nccl-tests' busbw / algbw: ``2(n-1)/n`` for all-reduce, ``(n-1)/n`` for the others."""
    return (2.0 if op == "allreduce" else 1.0) * (n - 1) / n if n > 1 else 0.0


@dataclass(frozen=True)
class CollectiveResult:
    """One collective's time and bandwidths (SI: seconds, bytes, bytes/s).

    ``nbytes`` is nccl-tests' ``S``; ``figures`` holds named extra bandwidths (DeepEP's
    definitions, see the module docstring) and byte counts.
    """

    op: str
    algorithm: str
    ranks: int
    nbytes: float
    seconds: float
    transfer: float
    overhead: float
    flows: int
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def algbw(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def busbw(self) -> float:
        return self.algbw * BUSBW_FACTOR("alltoall" if self.op in ("dispatch", "combine")
                                         else self.op, self.ranks)


# ----------------------------------------------------------------------------- topology


def cluster_topology(source: str, *, nodes: int | None = None, devices_per_node: int = 0,
                     topology: str | None = None
                     ) -> tuple[Topology, HardwareProfile, Scenario | None]:
    """The topology of a scenario file, or of a profile name/file with ``nodes`` nodes.

    Returns ``(topology, hardware profile, scenario or None)``. A profile gives an ``nvswitch``
    node when ``nodes == 1``, else a non-blocking ``fat_tree``.
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.exists():
        data = read_yaml(path)
        if isinstance(data, dict) and "cluster" in data:
            from moesim.pricing.context import scenario_topology
            from moesim.spec.scenario import load_scenario

            overrides = [f"cluster.nodes={nodes}"] if nodes else []
            s = load_scenario(str(path), overrides)
            return scenario_topology(s), s.hardware, s
    hardware = load_hardware(source)
    nodes = nodes or 1
    kind = topology or ("nvswitch" if nodes == 1 else "fat_tree")
    cluster = ClusterSpec(hardware=source, topology=kind,  # type: ignore[arg-type]
                          nodes=nodes, devices_per_node=devices_per_node)
    return build_topology(cluster, hardware), hardware, None


def _nic_path(topo: Topology, src: int, dst: int, cache: dict) -> np.ndarray:
    """Links from ``src`` to ``dst`` avoiding scale-up links (through the NICs), fewest hops."""
    if (src, dst) not in cache:
        if "no_nvlink" not in cache:
            g = nx.DiGraph()
            g.add_edges_from((u, v, a) for u, v, a in topo.graph.edges(data=True)
                             if a["link_class"] != "scale_up")
            cache["no_nvlink"] = g
        g = cache["no_nvlink"]
        try:
            nodes = nx.shortest_path(g, topo.devices[src], topo.devices[dst])
        except (nx.NetworkXNoPath, nx.NodeNotFound):
            raise ScenarioError(f"device {src} cannot reach device {dst} without NVLink: "
                                "deepep_ll through the NIC needs a scale-out network") from None
        cache[(src, dst)] = np.array([g.edges[u, v]["index"] for u, v in zip(nodes, nodes[1:])],
                                     dtype=np.int64)
    return cache[(src, dst)]


def _run(topo: Topology, hardware: HardwareProfile, pairs: np.ndarray, nbytes: np.ndarray, *,
         message_bytes: float | np.ndarray = 0.0, per_message_cost: bool = True,
         via_nic: bool = False, extra_latency: float = 0.0, sm_rate: float = 0.0,
         sm_link_efficiency: float = 1.0,
         min_overhead: float = 0.0, ring_steps: int = 0, rtol: float = 1e-2
         ) -> tuple[float, float, float]:
    """(seconds, transfer, overhead) of flows ``pairs: int[F, 2]`` (global ranks), ``nbytes``.

    ``sm_rate``: intra-node flows move at most this fast (an SM-driven kernel; 0: no limit),
    and at most ``sm_link_efficiency`` of their link's rate.
    ``ring_steps``: the flows are a ring collective of that many steps; when all their links
    are of one class with ``ring_protocols`` it is timed in the fastest protocol (as the
    simulator does, :func:`moesim.network.ring_protocol_time`)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    nbytes = np.asarray(nbytes, dtype=float)
    if via_nic:
        same = topo.device_node[pairs[:, 0]] == topo.device_node[pairs[:, 1]]
        cache: dict = {}
        paths = [list(_nic_path(topo, s, d, cache) if m else topo.path_links(s, d))
                 for (s, d), m in zip(pairs.tolist(), same.tolist())]
        ptr, links = network.paths_to_csr(paths)
    else:
        ptr, links = topo.paths_csr(pairs)
    specs = topo.profile_links(hardware)
    half = np.array([s.half_efficiency_size if s else 0.0 for s in specs])
    cost = np.array([s.collective_overhead if s else 0.0 for s in specs])
    flow_of_hop = np.repeat(np.arange(len(pairs)), np.diff(ptr))
    moving_links = np.unique(links[nbytes[flow_of_hop] > 0]).tolist()
    ring = network.ring_class(specs[i] for i in moving_links) if ring_steps else None
    if ring is not None:
        result = network.simulate_flows(nbytes, np.zeros(len(pairs)), ptr, links,
                                        topo.capacity, np.zeros_like(topo.latency), rtol=rtol)
        protocol, seconds = network.ring_protocol_choice(ring_steps, result.makespan, ring)
        fixed = protocol.fixed + ring_steps * protocol.per_step if protocol else 0.0
        return seconds, seconds - fixed, fixed
    sizes = nbytes
    if sm_rate > 0 or sm_link_efficiency < 1.0:
        same = topo.device_node[pairs[:, 0]] == topo.device_node[pairs[:, 1]]
        sizes = network.sm_limited_bytes(nbytes, same, ptr, links, topo.capacity, sm_rate,
                                         sm_link_efficiency)
    if per_message_cost and links.size:
        h = np.zeros(len(pairs))
        np.maximum.at(h, flow_of_hop, half[links])
        sizes = network.wire_bytes(nbytes, h, message_bytes)
    result = network.simulate_flows(sizes, np.zeros(len(pairs)), ptr, links, topo.capacity,
                                    topo.latency, rtol=rtol)
    moving = links[(nbytes[flow_of_hop] > 0)] if links.size else links
    overhead = max(float(cost[moving].max()), min_overhead) if moving.size else 0.0
    transfer = float(result.makespan) + (extra_latency if moving.size else 0.0)
    return overhead + transfer, transfer, overhead


# ----------------------------------------------------------------------------- NCCL-style


def uniform_alltoall(topo: Topology, hardware: HardwareProfile, nbytes: float, *,
                     algorithm: str = "direct", ranks: int | None = None,
                     rtol: float = 1e-2) -> CollectiveResult:
    """nccl-tests' all-to-all: each of ``ranks`` ranks sends ``nbytes / ranks`` to every rank.

    ``direct``: one message per (source, destination). ``hierarchical`` (Tutel 2D): one message
    per (source, destination node) to the rank of the source's local index there, which forwards
    ``nbytes / ranks`` to each rank of its node (the first phase's NVLink exchange).
    """
    n = ranks or topo.num_devices
    if algorithm not in ("direct", "hierarchical"):
        raise ScenarioError(f"a byte-size all-to-all runs direct or hierarchical, not "
                            f"{algorithm!r}; DeepEP kernels need --tokens (a routed layer)")
    node = topo.device_node[:n]
    piece = nbytes / n
    src, dst = np.divmod(np.arange(n * n), n)
    keep = src != dst
    if algorithm == "direct":
        pairs = np.stack([src[keep], dst[keep]], axis=1)
        sizes = np.full(len(pairs), piece)
        message: float | np.ndarray = piece
    else:
        per_node = np.bincount(node)
        local = np.arange(n) - np.repeat(np.cumsum(per_node) - per_node, per_node)
        first = {b: int(np.flatnonzero(node == b)[0]) for b in np.unique(node)}
        flows: dict[tuple[int, int], float] = {}
        for s in range(n):
            for b in np.unique(node):
                members = np.flatnonzero(node == b)
                relay = s if b == node[s] else int(first[b] + local[s] % per_node[b])
                if relay != s:
                    flows[(s, relay)] = flows.get((s, relay), 0.0) + piece * members.size
                for d in members.tolist():
                    if d != relay:
                        flows[(relay, d)] = flows.get((relay, d), 0.0) + piece
        pairs = np.array(list(flows), dtype=np.int64).reshape(-1, 2)
        sizes = np.array(list(flows.values()))
        message = np.where(node[pairs[:, 0]] != node[pairs[:, 1]], sizes, piece)
    seconds, transfer, overhead = _run(topo, hardware, pairs, sizes, message_bytes=message,
                                       rtol=rtol)
    return CollectiveResult("alltoall", algorithm, n, nbytes, seconds, transfer, overhead,
                            len(pairs))


def ring_collective(topo: Topology, hardware: HardwareProfile, op: str, nbytes: float, *,
                    ranks: int | None = None, rtol: float = 1e-2) -> CollectiveResult:
    """Ring all-reduce, all-gather or reduce-scatter of ``S = nbytes`` (nccl-tests' size).

    ``p = devices per node`` rings of ``S / p`` each; every rank sends ``steps x S / (n p)`` to its
    ring successor, ``steps = 2(n-1)`` for all-reduce and ``n-1`` otherwise, in messages of
    ``S / (n p)``; each ring step adds the slowest ring hop's path latency.
    """
    if op not in ("allreduce", "allgather", "reducescatter"):
        raise ScenarioError(f"ring collectives are allreduce, allgather, reducescatter; not {op!r}")
    n = ranks or topo.num_devices
    if n < 2:
        return CollectiveResult(op, "ring", n, nbytes, 0.0, 0.0, 0.0, 0)
    node = topo.device_node[:n]
    nodes = np.unique(node)
    members = [np.flatnonzero(node == b) for b in nodes]
    p = min(len(m) for m in members)
    steps = 2 * (n - 1) if op == "allreduce" else n - 1
    chunk = nbytes / (n * p)
    ring: list[tuple[int, int]] = []
    for r in range(p):
        order = np.concatenate([np.roll(m, -r) for m in members])
        ring += list(zip(order.tolist(), np.roll(order, -1).tolist()))
    pairs = np.array(ring, dtype=np.int64)
    sizes = np.full(len(pairs), steps * chunk)
    hop = max(float(topo.latency[topo.path_links(s, d)].sum()) for s, d in ring)
    seconds, transfer, overhead = _run(topo, hardware, pairs, sizes, message_bytes=chunk,
                                       extra_latency=(steps - 1) * hop, ring_steps=steps,
                                       rtol=rtol)
    return CollectiveResult(op, "ring", n, nbytes, seconds, transfer, overhead, len(pairs))


# ----------------------------------------------------------------------------- MoE all-to-all


def deepep_choices(ranks: int, tokens: int, num_experts: int, top_k: int, nodes: int,
                   groups: int, seed: int = 0) -> routing.LayerChoices:
    """Routing as DeepEP's tests draw it: scores ``|N(0,1)| + 1`` per (token, expert); the
    ``groups`` node groups (experts split evenly over ``nodes``) with the highest best score,
    then the top ``top_k`` experts inside them. ``tokens`` per rank."""
    rng = np.random.default_rng(seed)
    per_group = num_experts // nodes
    rows = []
    for _ in range(ranks):
        scores = np.abs(rng.standard_normal((tokens, num_experts), dtype=np.float32)) + 1
        if groups < nodes:
            best = scores.reshape(tokens, nodes, per_group).max(axis=2)
            chosen = np.argpartition(-best, groups - 1, axis=1)[:, :groups]
            mask = np.zeros((tokens, nodes), dtype=bool)
            np.put_along_axis(mask, chosen, True, axis=1)
            scores = np.where(np.repeat(mask, per_group, axis=1), scores, 0.0)
        rows.append(np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k])
    experts = np.concatenate(rows).astype(np.int32)
    source = np.repeat(np.arange(ranks, dtype=np.int32), tokens)
    return routing.LayerChoices(experts, source, 1.0)


def token_alltoall(topo: Topology, hardware: HardwareProfile, choices: routing.LayerChoices,
                   placement: Placement, *, hidden: int, algorithm: str, tokens_per_source: float,
                   dispatch_bytes_per_elem: float = 1, combine_bytes_per_elem: float = 2,
                   ll_nvlink: bool = False, rtol: float = 1e-2
                   ) -> tuple[CollectiveResult, CollectiveResult]:
    """Dispatch and combine of one routed MoE layer over ranks ``0..ep-1`` under ``algorithm``.

    ``ll_nvlink``: deepep_ll sends intra-node messages over NVLink (DeepEP's
    ``allow_nvlink_for_low_latency_mode``) instead of through the NIC; a topology without NICs
    (one NVSwitch node) uses NVLink too, and ``figures["via_nic"]`` says which was used.
    """
    ep = placement.ep
    node = topo.device_node[:ep]
    traffic = layer_traffic(choices, placement, 0, device_node=node,
                            tokens_per_source=tokens_per_source, hidden=hidden,
                            dispatch_bytes_per_elem=dispatch_bytes_per_elem,
                            combine_bytes_per_elem=combine_bytes_per_elem, capacity_factor=None,
                            top_k=choices.top_k, algorithm=algorithm)
    via_nic = traffic.via_nic and not ll_nvlink and "scale_out" in topo.link_class
    figures = _deepep_counts(choices, placement, node)
    gather = algorithm == "allgather"
    # DeepEP's normal kernels copy over NVLink with their share of the SMs.
    normal = algorithm == "deepep_normal"
    sm_rate = comm_kernel_bandwidth(hardware.device) if normal else 0.0
    sm_link_efficiency = hardware.device.comm_link_efficiency if normal else 1.0
    # A DeepEP kernel pays its own fixed cost even when all its messages stay in the node.
    kernel_cost = deepep_kernel_overhead(hardware) if algorithm.startswith("deepep") else 0.0
    out = []
    for op, nbytes, pairs, copy in (
            ("dispatch", traffic.dispatch_bytes, traffic.pairs, traffic.dispatch_copy_bytes),
            ("combine", traffic.combine_bytes, traffic.combine_pairs, traffic.combine_copy_bytes)):
        seconds, transfer, overhead = _run(topo, hardware, pairs, nbytes, via_nic=via_nic,
                                           per_message_cost=traffic.per_message_cost,
                                           sm_rate=sm_rate, min_overhead=kernel_cost,
                                           sm_link_efficiency=sm_link_efficiency,
                                           ring_steps=layer_ring_steps(traffic) if gather else 0,
                                           rtol=rtol)
        named = {"bytes": float(nbytes.sum()), "copy_bytes": copy, "via_nic": float(via_nic)}
        if seconds > 0 and not gather:
            named.update({"rdma_gbps": figures["node_copies"] * copy / seconds,
                          "nvl_gbps": figures["rank_copies"] * copy / seconds,
                          "ll_gbps": figures["pairs"] * copy / seconds})
        # nccl-tests' S: all-gather / reduce-scatter the whole buffer, else bytes per rank.
        per_rank = ep * tokens_per_source * copy if gather else figures["pairs"] * copy
        out.append(CollectiveResult(op, algorithm, ep, per_rank, seconds, transfer, overhead,
                                    len(pairs), named))
    return out[0], out[1]


def _distinct(a: np.ndarray) -> np.ndarray:
    """Distinct values in each row of ``a: int[T, k]``."""
    return (np.diff(np.sort(a, axis=1), axis=1) != 0).sum(axis=1) + 1


def _deepep_counts(choices: routing.LayerChoices, placement: Placement, node: np.ndarray
                   ) -> dict[str, float]:
    """Per-rank averages of DeepEP's counted copies: (token, node) incl. the own node, (token,
    rank) incl. the sender, and (token, expert) pairs; contiguous placements (no replicas)."""
    holder = np.empty(placement.num_experts, dtype=np.int64)
    holder[placement.slot_expert[0].ravel()] = np.repeat(np.arange(placement.ep),
                                                         placement.slots_per_device)
    ranks = holder[choices.experts]                                  # [T, k]
    nodes = node[ranks]
    ep = placement.ep
    w = choices.weight
    return {"node_copies": float(_distinct(nodes).sum()) * w / ep,
            "rank_copies": float(_distinct(ranks).sum()) * w / ep,
            "pairs": float(choices.experts.size) * w / ep}


def scenario_layer_alltoall(s, topo: Topology, *, algorithm: str | None = None,
                            ll_nvlink: bool = False, rtol: float = 1e-2
                            ) -> tuple[CollectiveResult, CollectiveResult]:
    """The first MoE layer of scenario ``s`` as the simulator routes it, on its first EP group
    (ranks ``0..ep-1``) with the scenario's placement policy, dispatch and combine dtypes."""
    from moesim.assembly import scenario_placement
    from moesim.pricing.context import PricingContext
    from moesim.routing_draw import scenario_routing
    from moesim.spec.hardware import dtype_bytes

    if s.parallelism.etp > 1 and s.parallelism.ep > 1:
        raise ScenarioError(f"{s.source or s.name}: --layer prices an EP group of consecutive "
                            "ranks; with expert tensor parallelism (etp > 1) the EP group's "
                            "ranks are etp apart: run moesim run, whose results break the "
                            "all-to-all down", field="parallelism.etp")
    ctx = PricingContext.from_scenario(s, topo)
    tokens = ctx.tokens_per_source
    placement = scenario_placement(s)
    expert_node = placement.expert_node(ctx.device_node) if s.routing.node_limit else None
    choices = scenario_routing(s, tokens_per_source=tokens, expert_node=expert_node)[0]
    return token_alltoall(topo, s.hardware, choices, placement, hidden=s.model.hidden_size,
                          algorithm=algorithm or s.communication.alltoall,
                          tokens_per_source=tokens,
                          dispatch_bytes_per_elem=dtype_bytes(s.precision.dispatch),
                          combine_bytes_per_elem=dtype_bytes(s.precision.combine),
                          ll_nvlink=ll_nvlink, rtol=rtol)


# ----------------------------------------------------------------------------- published checks

# DeepEP's README (V1 tables, now deepseek-ai/DeepEP docs/legacy.md): H800, ~160 GB/s NVLink, one
# CX-7 400 Gb/s NIC per GPU. Normal kernels: 4,096 tokens per rank, hidden 7,168, top-4 groups,
# top-8 of 256 experts, FP8 dispatch, BF16 combine; (EP, dispatch GB/s, combine GB/s), NVLink
# bandwidth at EP 8, RDMA at EP >= 16 (DeepEP's logical definitions, module docstring).
DEEPEP_NORMAL = ((8, 153e9, 158e9), (16, 43e9, 43e9), (32, 58e9, 57e9), (64, 51e9, 50e9))
# Low-latency kernels: 128 tokens per rank, same model; (EP, dispatch s, combine s).
DEEPEP_LL = ((8, 77e-6, 114e-6), (16, 118e-6, 195e-6), (32, 155e-6, 273e-6),
             (64, 173e-6, 314e-6), (128, 192e-6, 369e-6), (256, 194e-6, 360e-6))
# DeepEP low-latency kernels measured on H100 SXM under SGLang 0.5.6.post2 (NVLink allowed inside
# a node), aiconfigurator 0.12.0 table systems/data/h100_sxm/comm/sglang/0.5.6.post2/
# wideep_deepep_ll_perf.parquet (Apache-2.0): (nodes, tokens per rank, dispatch s, combine s),
# hidden 7,168, top-8 of 256 experts.
H100_LL = ((2, 8, 23.6e-6, 36.2e-6), (2, 64, 58.1e-6, 102.2e-6), (2, 128, 102.1e-6, 186.2e-6),
           (4, 8, 32.0e-6, 41.8e-6), (4, 64, 82.9e-6, 151.7e-6), (4, 128, 143.0e-6, 263.3e-6),
           (8, 8, 35.2e-6, 42.8e-6), (8, 64, 94.0e-6, 160.3e-6), (8, 128, 166.8e-6, 304.7e-6))

# DeepEP normal kernels measured on one H100 SXM node (EP 8) under SGLang 0.5.12 with 24 SMs,
# aiconfigurator 0.12.0 table systems/data/h100_sxm/comm/sglang/0.5.12/
# wideep_deepep_normal_perf.parquet (Apache-2.0): (tokens per rank, dispatch s, combine s),
# hidden 7,168, top-8 of 256 experts, FP8 dispatch, BF16 combine.
H100_NORMAL = ((1024, 154.2e-6, 296.0e-6), (4096, 498.4e-6, 960.6e-6),
               (8192, 971.8e-6, 1839.0e-6))


def _layer(profile: str, nodes: int, tokens: int, algorithm: str, ll_nvlink: bool,
           groups: int = 4) -> tuple[CollectiveResult, CollectiveResult]:
    topo, hw, _ = cluster_topology(profile, nodes=nodes,
                                   topology="fat_tree" if algorithm == "deepep_ll" else None)
    ranks = topo.num_devices
    choices = deepep_choices(ranks, tokens, 256, 8, nodes, min(groups, nodes))
    placement = Placement(np.arange(256).reshape(1, ranks, -1), 256)
    return token_alltoall(topo, hw, choices, placement, hidden=7168, algorithm=algorithm,
                          tokens_per_source=tokens, ll_nvlink=ll_nvlink)


def published_checks(*, ll_nvlink: bool, h800: str = "h800-sxm", h100: str = "h100-sxm"
                     ) -> list[tuple[str, str, float, float]]:
    """(case, unit, published, predicted) for DeepEP's README tables on ``h800`` and the H100
    normal and low-latency measurements on ``h100`` (8 GPUs per node in both)."""
    rows = []
    for ep, d_pub, c_pub in DEEPEP_NORMAL:
        d, c = _layer(h800, ep // 8, 4096, "deepep_normal", ll_nvlink)
        key = "nvl_gbps" if ep == 8 else "rdma_gbps"
        rows += [(f"DeepEP normal EP{ep} dispatch", key[:-5].upper() + " GB/s", d_pub,
                  d.figures[key]),
                 (f"DeepEP normal EP{ep} combine", key[:-5].upper() + " GB/s", c_pub,
                  c.figures[key])]
    for ep, d_pub, c_pub in DEEPEP_LL:
        d, c = _layer(h800, ep // 8, 128, "deepep_ll", ll_nvlink)
        rows += [(f"DeepEP LL EP{ep} dispatch", "us", d_pub, d.seconds),
                 (f"DeepEP LL EP{ep} combine", "us", c_pub, c.seconds)]
    for tokens, d_pub, c_pub in H100_NORMAL:
        d, c = _layer(h100, 1, tokens, "deepep_normal", ll_nvlink)
        rows += [(f"H100 normal 1x8 {tokens} tok dispatch", "us", d_pub, d.seconds),
                 (f"H100 normal 1x8 {tokens} tok combine", "us", c_pub, c.seconds)]
    for nodes, tokens, d_pub, c_pub in H100_LL:
        d, c = _layer(h100, nodes, tokens, "deepep_ll", ll_nvlink)
        rows += [(f"H100 LL {nodes}x8 {tokens} tok dispatch", "us", d_pub, d.seconds),
                 (f"H100 LL {nodes}x8 {tokens} tok combine", "us", c_pub, c.seconds)]
    return rows


def _print_checks(rows: list[tuple[str, str, float, float]]) -> None:
    print(f"{'case':<34} {'unit':<9} {'published':>9} {'moesim':>9} {'error %':>8}")
    for case, unit, pub, pred in rows:
        scale = 1e6 if unit == "us" else 1e-9
        print(f"{case:<34} {unit:<9} {pub * scale:>9.1f} {pred * scale:>9.1f} "
              f"{(pred / pub - 1) * 100:>+8.1f}")


# ----------------------------------------------------------------------------- CLI


def _gb(x: float) -> str:
    return f"{x / 1e9:8.1f}"


def _print(results: list[CollectiveResult]) -> None:
    print(f"{'op':<13} {'algorithm':<14} {'ranks':>5} {'size':>10} {'time us':>10} "
          f"{'fixed us':>8} {'algbw':>8} {'busbw':>8}  DeepEP-style GB/s")
    for r in results:
        extra = ""
        if r.algorithm == "allgather":
            extra = "(all-gather)" if r.op == "dispatch" else "(reduce-scatter)"
        elif r.figures.get("copy_bytes"):
            f = r.figures
            extra = (f"RDMA {f.get('rdma_gbps', 0) / 1e9:6.1f}  NVL {f.get('nvl_gbps', 0) / 1e9:6.1f}"
                     f"  LL {f.get('ll_gbps', 0) / 1e9:6.1f}")
            if r.algorithm == "deepep_ll":
                extra += "  (intra-node via NIC)" if f["via_nic"] else "  (intra-node via NVLink)"
        print(f"{r.op:<13} {r.algorithm:<14} {r.ranks:>5} {r.nbytes / 1e6:>8.2f}MB "
              f"{r.seconds * 1e6:>10.1f} {r.overhead * 1e6:>8.1f} {_gb(r.algbw)} {_gb(r.busbw)}"
              f"  {extra}")


# Largest all-to-all `moesim collective` prices: its flows (ranks x (ranks - 1)) and their paths
# take ~1 GB and ~10 s per million on one core (2,048 ranks: 4.2 M flows, ~30 s, 3.5 GB).
MAX_ALLTOALL_RANKS = 4096
MAX_SIZE = float(1 << 50)   # --size: 1 PiB per rank, far beyond any device's memory


def _checked_args(args: argparse.Namespace) -> list[float]:
    """Refuse out-of-range options with one message naming the option and what is allowed;
    return the ``--size`` values in bytes (default 1 GiB)."""
    for flag, value, least in (("--nodes", args.nodes, 1), ("--ranks", args.ranks, 1),
                               ("--tokens", args.tokens, 1), ("--hidden", args.hidden, 1),
                               ("--experts", args.experts, 1), ("--top-k", args.top_k, 1),
                               ("--groups", args.groups, 1), ("--seed", args.seed, 0)):
        if value is not None and value < least:
            raise ScenarioError(f"{flag}={value} must be >= {least}")
    if args.top_k > args.experts:
        raise ScenarioError(f"--top-k={args.top_k} must be <= --experts={args.experts}")
    sizes = []
    for text in args.size or ["1 GiB"]:
        try:
            size = parse_quantity(text, "bytes", require_unit=True)
        except UnitError as exc:
            raise ScenarioError(f"--size {text!r}: {exc} (allowed: a byte size > 0, e.g. "
                                "'64 MiB')") from None
        if not 0 < size <= MAX_SIZE:
            raise ScenarioError(f"--size {text!r} must be > 0 bytes and at most 1 PiB, e.g. "
                                "'64 MiB'")
        sizes.append(size)
    return sizes


def _cmd_collective(args: argparse.Namespace) -> int:
    if args.published:
        _print_checks(published_checks(ll_nvlink=args.ll_nvlink))
        return 0
    sizes = _checked_args(args)
    topo, hardware, scenario = cluster_topology(args.source, nodes=args.nodes,
                                                topology=args.topology)
    ranks = args.ranks or topo.num_devices
    if not 1 <= ranks <= topo.num_devices:
        raise ScenarioError(f"--ranks={ranks} must be in 1..{topo.num_devices} (the topology's "
                            "devices)")
    if args.op == "alltoall" and ranks > MAX_ALLTOALL_RANKS:
        raise ScenarioError(f"{ranks} ranks: an all-to-all is priced flow by flow, ranks x "
                            f"(ranks - 1) of them; at most {MAX_ALLTOALL_RANKS} ranks (fewer "
                            "--nodes, or --ranks N for the first N devices)")
    if args.algorithm is None:   # a scenario's own MoE layer runs its own algorithm
        args.algorithm = (scenario.communication.alltoall if args.layer and scenario is not None
                          else "direct")
    algorithms = list(ALGORITHMS) if args.algorithm == "all" else [args.algorithm]
    if args.op == "alltoall" and not (args.tokens or args.layer) and args.algorithm not in (
            "all", "direct", "hierarchical"):
        raise ScenarioError(f"--algorithm {args.algorithm} prices a routed MoE layer: add "
                            "--tokens N or --layer (byte sizes run direct or hierarchical)")
    results: list[CollectiveResult] = []
    if args.op != "alltoall":
        for size in sizes:
            results.append(ring_collective(topo, hardware, args.op, size, ranks=ranks))
    elif args.tokens or args.layer:
        for algorithm in algorithms:
            if args.layer:
                if scenario is None:
                    raise ScenarioError("--layer needs a scenario file, not a hardware profile")
                pair = scenario_layer_alltoall(scenario, topo, algorithm=algorithm,
                                               ll_nvlink=args.ll_nvlink)
            else:
                nodes = int(np.unique(topo.device_node[:ranks]).size)
                if args.experts % ranks or args.experts % nodes:
                    raise ScenarioError(f"--experts={args.experts} must split evenly over "
                                        f"{ranks} ranks and {nodes} nodes")
                choices = deepep_choices(ranks, args.tokens, args.experts, args.top_k, nodes,
                                         min(args.groups or nodes, nodes), seed=args.seed)
                slots = np.arange(args.experts).reshape(1, ranks, -1)
                pair = token_alltoall(topo, hardware, choices, Placement(slots, args.experts),
                                      hidden=args.hidden, algorithm=algorithm,
                                      tokens_per_source=args.tokens, ll_nvlink=args.ll_nvlink)
            results += list(pair)
    else:
        for algorithm in [a for a in algorithms if a in ("direct", "hierarchical")]:
            for size in sizes:
                results.append(uniform_alltoall(topo, hardware, size, algorithm=algorithm,
                                                ranks=ranks))
    print(f"{args.source}: {ranks} ranks on {int(np.unique(topo.device_node[:ranks]).size)} "
          f"node(s), {hardware.name}")
    _print(results)
    return 0


def register(sub, commands: dict) -> None:
    """Add ``moesim collective`` to the CLI."""
    p = sub.add_parser("collective", help="time one collective alone on a topology")
    p.add_argument("source", nargs="?", default="h800-sxm",
                   help="scenario .yaml, or a hardware profile name/file")
    p.add_argument("--op", choices=OPS, default="alltoall")
    p.add_argument("--algorithm", choices=(*ALGORITHMS, "all"),
                   help="all-to-all algorithm (ring collectives ignore it; default: the "
                        "scenario's own with --layer, else direct)")
    p.add_argument("--size", action="append", metavar="BYTES",
                   help="nccl-tests size S per rank, e.g. '64 MiB' (repeatable; default 1 GiB)")
    p.add_argument("--nodes", type=int, help="nodes (profile: default 1; scenario: override)")
    p.add_argument("--topology", choices=("nvswitch", "fat_tree", "rail_optimized"),
                   help="topology for a profile (default nvswitch for 1 node, else fat_tree)")
    p.add_argument("--ranks", type=int, help="ranks taking part (default: all devices)")
    p.add_argument("--tokens", type=int, help="routed MoE layer, DeepEP-test style: tokens/rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--groups", type=int, default=4, help="node groups per token (DeepEP test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", action="store_true",
                   help="the scenario's first MoE layer as the simulator routes it")
    ll = p.add_mutually_exclusive_group()
    ll.add_argument("--ll-nvlink", action="store_true", default=True,
                    help="deepep_ll: intra-node messages over NVLink (the default, as DeepEP's "
                         "allow_nvlink_for_low_latency_mode and the simulator)")
    ll.add_argument("--ll-nic", dest="ll_nvlink", action="store_false",
                   help="deepep_ll: intra-node messages through the NIC (pure RDMA)")
    p.add_argument("--published", action="store_true",
                   help="compare with DeepEP's README tables (H800) and H100 measurements")
    commands["collective"] = _cmd_collective

