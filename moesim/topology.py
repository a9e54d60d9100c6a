"""Cluster topology: devices, switches, directed links, and the path every transfer takes.

A :class:`Topology` is a ``networkx.DiGraph`` whose nodes are devices (``kind="device"``) and
switches (``kind="switch"``) and whose edges are links, one per direction, each with a link index
into flat arrays (``capacity``, ``latency``) that the flow-level network model uses. Builders follow
:class:`moesim.spec.cluster.ClusterSpec`:

- ``nvswitch``: device -> NVSwitch -> device edges at the scale-up rate, so an intra-node transfer
  uses the sender's egress and the receiver's ingress NVLink;
- ``fat_tree``: plus one NIC per device on a leaf switch of ``leaf_nodes`` nodes. The spine layer is
  aggregated into ONE core switch; each leaf's uplink (one edge each way) carries
  ``devices under the leaf x NIC rate / oversubscription``. This equals a spine with ECMP and
  perfect hashing: what it ignores is hash collisions;
- ``rail_optimized``: NIC ``r`` of every node sits on rail switch ``r`` (per leaf group of
  ``leaf_nodes`` nodes, as in a DGX SuperPOD); a core joins the rail switches. A cross-rail
  transfer first crosses NVLink to the source node's GPU on the destination's rail (NCCL PXN);
- ``torus``: chips with ICI edges to their +-1 neighbours per dimension; dimension-order routing,
  the shorter way round (ties go +); hosts group ``devices_per_node`` consecutive ranks;
- ``explicit``: the listed devices and links; fewest hops, then least latency.

Bandwidths: ``capacity`` = line rate x the profile's ``efficiency`` for that link class (what
collectives achieve); edge attr ``line_rate`` keeps the datasheet figure. Latency: a switched
class's latency is the end-to-end figure the profile quotes, so it sits on the device's egress edge
only (switch-side edges have 0) and a path's summed latency is NVLink + NIC latency at most; ICI
latency is per hop. Built-in paths are computed from the known shape, not by graph search, so
2048-device topologies build and route fast.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import networkx as nx
import numpy as np

from moesim.errors import TopologyError
from moesim.spec.cluster import ClusterSpec
from moesim.spec.hardware import HardwareProfile
from moesim.spec.limits import MAX_DEVICES

__all__ = ["Topology", "build_topology", "LINK_CLASSES"]

LINK_CLASSES = ("scale_up", "scale_out", "ici", "fabric")
# The profile link class whose efficiency applies to each topology link class.
_PROFILE_CLASS = {"scale_up": "scale_up", "scale_out": "scale_out", "ici": "ici",
                  "fabric": "scale_out"}

Router = Callable[[int, int], Sequence[int]]


# Profile link class that prices each topology link class (switch fabric links are NIC-class).
PROFILE_LINK_CLASS = {"fabric": "scale_out"}


@dataclass(frozen=True, eq=False)
class Topology:
    """Devices, switches and directed links of a cluster (arrays are per rank / per link index).

    Attributes
    ----------
    graph : nx.DiGraph
        Device nodes (attrs ``kind="device"``, ``rank``, ``node``, ``hardware``: the
        HardwareProfile) and switch nodes (``kind="switch"``, ``role``); edges with ``bandwidth``
        (effective bytes/s), ``line_rate``, ``latency`` (s), ``link_class``, ``medium``, ``index``.
    devices : device node names in rank order, e.g. ``"n0.gpu3"``.
    device_node : int [D] host index of each rank.
    capacity : float [L] effective bytes/s per link index.
    latency : float [L] seconds per link index.
    link_ends : (u, v) per link index.
    link_class : "scale_up" | "scale_out" | "ici" | "fabric" per link index.
    """

    graph: nx.DiGraph
    devices: tuple[str, ...]
    device_node: np.ndarray
    capacity: np.ndarray
    latency: np.ndarray
    link_ends: tuple[tuple[str, str], ...]
    link_class: tuple[str, ...]
    _router: Router = field(repr=False)
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_nodes(self) -> int:
        return int(np.unique(self.device_node).size)

    @property
    def num_links(self) -> int:
        return len(self.link_ends)

    def device_hardware(self, rank: int) -> HardwareProfile:
        """The hardware profile of device ``rank`` (differs per device only in explicit ones)."""
        return self.graph.nodes[self.devices[self._rank(rank)]]["hardware"]

    def path_links(self, src: int, dst: int) -> np.ndarray:
        """Link indices (int64, read-only) from rank ``src`` to rank ``dst``; empty if equal."""
        key = (self._rank(src), self._rank(dst))
        links = self._cache.get(key)
        if links is None:
            links = np.asarray(self._router(*key) if key[0] != key[1] else (), dtype=np.int64)
            links.flags.writeable = False
            self._cache[key] = links
        return links

    def paths_csr(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paths of ``pairs: int [F, 2]`` (src, dst ranks) as CSR: ``ptr int [F+1]``, ``links``."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        paths = [self.path_links(s, d) for s, d in pairs.tolist()]
        ptr = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in paths], out=ptr[1:])
        links = np.concatenate(paths) if paths else np.zeros(0, dtype=np.int64)
        return ptr, links.astype(np.int64, copy=False)

    def profile_links(self, hardware: HardwareProfile) -> list:
        """The profile's LinkSpec of every link (``fabric`` switch links count as
        ``scale_out``; None where the profile has no such class)."""
        return [hardware.links.get(PROFILE_LINK_CLASS.get(c, c)) for c in self.link_class]

    def without(self, *, links: Iterable[tuple[str, str]] = (),
                devices: Iterable[int] = ()) -> Topology:
        """A copy with failed links and/or devices removed, for fault scenarios.

        A link given as ``(u, v)`` fails in BOTH directions (a cable or port fails as a whole).
        Removed devices drop out and the others are renumbered ``0..`` in their old order (names
        are kept, so callers map by name). Paths that survive are kept; broken ones re-route by
        graph search (fewest hops, then least latency), e.g. via a peer GPU's NIC.

        Raises
        ------
        TopologyError
            A named link or rank does not exist, or a device can no longer reach another.
        """
        graph = self.graph.copy()
        for u, v in links:
            if not (graph.has_edge(u, v) or graph.has_edge(v, u)):
                raise TopologyError(f"cannot fail link {u!r} - {v!r}: there is no such link")
            graph.remove_edges_from([(u, v), (v, u)])
        dropped = {self._rank(r) for r in devices}
        kept = [r for r in range(self.num_devices) if r not in dropped]
        if not kept:
            raise TopologyError("removing every device leaves an empty topology")
        graph.remove_nodes_from(self.devices[r] for r in dropped)
        names = tuple(self.devices[r] for r in kept)
        for new, name in enumerate(names):
            graph.nodes[name]["rank"] = new
        old_to_new = np.full(self.num_links, -1, dtype=np.int64)
        survivors = [i for i, (u, v) in enumerate(self.link_ends) if graph.has_edge(u, v)]
        for new, old in enumerate(survivors):
            old_to_new[old] = new
            graph.edges[self.link_ends[old]]["index"] = new
        _check_connected(graph, names)
        search = _SearchRouter(graph, names)

        def route(src: int, dst: int) -> Sequence[int]:
            mapped = old_to_new[self.path_links(kept[src], kept[dst])]
            return mapped if bool((mapped >= 0).all()) else search(src, dst)

        return Topology(graph, names, self.device_node[kept], self.capacity[survivors],
                        self.latency[survivors], tuple(self.link_ends[i] for i in survivors),
                        tuple(self.link_class[i] for i in survivors), route)

    def summary(self) -> dict:
        """Counts by kind and class, per-device egress bandwidth, and a half/half bisection cut.

        ``bisection_bandwidth`` is the min cut (bytes/s, one direction) separating ranks
        ``[0, D/2)`` from ``[D/2, D)``: a rank-order split, not the worst-case bisection.
        """
        classes = Counter(self.link_class)
        egress: dict[str, list[float]] = {}
        for i, name in enumerate(self.devices):
            for _, _, a in self.graph.out_edges(name, data=True):
                egress.setdefault(a["link_class"], [0.0] * self.num_devices)[i] += a["bandwidth"]
        return {
            "devices": self.num_devices,
            "nodes": self.num_nodes,
            "switches": self.graph.number_of_nodes() - self.num_devices,
            "links": self.num_links,
            "links_by_class": dict(sorted(classes.items())),
            "capacity_by_class": {c: float(sum(self.capacity[i] for i, k in
                                               enumerate(self.link_class) if k == c))
                                  for c in sorted(classes)},
            "min_device_egress_by_class": {c: min(v) for c, v in sorted(egress.items())},
            "bisection_bandwidth": self._half_split_cut(),
        }

    def _half_split_cut(self) -> float:
        if self.num_devices < 2:
            return 0.0
        flow = nx.DiGraph()
        flow.add_edges_from((u, v, {"capacity": a["bandwidth"]})
                            for u, v, a in self.graph.edges(data=True))
        half = self.num_devices // 2
        flow.add_edges_from(("__source__", name) for name in self.devices[:half])
        flow.add_edges_from((name, "__sink__") for name in self.devices[half:])
        return float(nx.minimum_cut_value(flow, "__source__", "__sink__"))

    def _rank(self, rank: int) -> int:
        rank = int(rank)
        if not 0 <= rank < len(self.devices):
            raise TopologyError(f"device rank {rank} is out of range 0..{len(self.devices) - 1}")
        return rank


def build_topology(cluster: ClusterSpec, hardware: HardwareProfile,
                   profiles: dict[str, HardwareProfile] | None = None) -> Topology:
    """Build the topology ``cluster.topology`` names (see the module docstring).

    ``profiles`` maps the names used by explicit devices' ``hardware`` to loaded profiles.

    Raises
    ------
    TopologyError
        A profile lacks a link class the topology needs, a link has bandwidth <= 0, an explicit
        link names an unknown device, a device's profile was not given, or a device cannot reach
        another.
    """
    count = _device_count(cluster, hardware)
    if count > MAX_DEVICES:
        raise TopologyError(f"{count:,} devices is more than the {MAX_DEVICES:,} moesim simulates")
    builders = {"nvswitch": _build_switched, "fat_tree": _build_switched,
                "rail_optimized": _build_switched, "torus": _build_torus,
                "explicit": _build_explicit}
    return builders[cluster.topology](cluster, hardware, profiles or {})


class _Link(NamedTuple):
    rate: float        # line rate, bytes/s per direction
    efficiency: float  # fraction of line rate collectives achieve
    latency: float     # seconds
    medium: str        # nvlink, infiniband, ici, ...


class _Builder:
    """Accumulates devices, switches and directed links; :meth:`finish` validates and freezes."""

    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self.devices: list[str] = []
        self.device_node: list[int] = []
        self.ends: list[tuple[str, str]] = []
        self.capacity: list[float] = []
        self.latency: list[float] = []
        self.classes: list[str] = []

    def device(self, name: str, node: int, hardware: HardwareProfile) -> int:
        if name in self.graph:
            raise TopologyError(f"device name {name!r} is used twice")
        self.graph.add_node(name, kind="device", rank=len(self.devices), node=node,
                            hardware=hardware)
        self.devices.append(name)
        self.device_node.append(node)
        return len(self.devices) - 1

    def switch(self, name: str, role: str) -> None:
        self.graph.add_node(name, kind="switch", role=role)

    def link(self, u: str, v: str, spec: _Link, cls: str, latency: float | None = None) -> int:
        if not spec.rate > 0:
            raise TopologyError(f"link {u} -> {v} has bandwidth {spec.rate} B/s; it must be > 0")
        if self.graph.has_edge(u, v):
            raise TopologyError(f"link {u} -> {v} is given twice")
        index = len(self.ends)
        lat = spec.latency if latency is None else latency
        self.graph.add_edge(u, v, bandwidth=spec.rate * spec.efficiency, line_rate=spec.rate,
                            latency=lat, link_class=cls, medium=spec.medium, index=index)
        self.ends.append((u, v))
        self.capacity.append(spec.rate * spec.efficiency)
        self.latency.append(lat)
        self.classes.append(cls)
        return index

    def pair(self, device: str, switch: str, spec: _Link, cls: str) -> tuple[int, int]:
        """Device egress (carries the latency) and ingress edges; returns (out, in) indices."""
        return self.link(device, switch, spec, cls), self.link(switch, device, spec, cls, 0.0)

    def finish(self, router: Router) -> Topology:
        _check_connected(self.graph, self.devices)
        return Topology(self.graph, tuple(self.devices), np.asarray(self.device_node, np.int64),
                        np.asarray(self.capacity, float), np.asarray(self.latency, float),
                        tuple(self.ends), tuple(self.classes), router)


def _device_count(cluster: ClusterSpec, hardware: HardwareProfile) -> int:
    """Devices the cluster will have, from its sizes alone (nothing is built)."""
    if cluster.topology == "explicit":
        return len(cluster.devices)
    if cluster.topology == "torus":
        return math.prod(cluster.torus_dims)
    return cluster.nodes * _devices_per_node(cluster, hardware)


def _link_spec(cluster: ClusterSpec, hardware: HardwareProfile, cls: str) -> _Link:
    """The profile's link of class ``cls`` with the cluster's bandwidth override applied."""
    if cls not in hardware.links:
        raise TopologyError(f"a {cluster.topology} topology needs a {cls!r} link, but hardware "
                            f"profile {hardware.name!r} has {sorted(hardware.links) or 'none'}")
    spec = hardware.links[cls]
    override = cluster.scale_out_bandwidth if cls == "scale_out" else cluster.scale_up_bandwidth
    return _Link(override or spec.bandwidth, spec.efficiency, spec.latency, spec.kind)


def _devices_per_node(cluster: ClusterSpec, hardware: HardwareProfile) -> int:
    return cluster.devices_per_node or hardware.node.devices_per_node


def _build_switched(cluster: ClusterSpec, hardware: HardwareProfile,
                    profiles: dict[str, HardwareProfile]) -> Topology:
    """nvswitch, fat_tree and rail_optimized: NVSwitch nodes, plus NICs on leaf or rail switches."""
    per_node, nodes = _devices_per_node(cluster, hardware), cluster.nodes
    b = _Builder()
    # Step 1: devices, and one NVSwitch per node when a node has more than one device.
    nvlink = _link_spec(cluster, hardware, "scale_up") if per_node > 1 else None
    up_out, up_in = [-1] * (nodes * per_node), [-1] * (nodes * per_node)
    for node in range(nodes):
        if nvlink:
            b.switch(f"n{node}.nvsw", "nvswitch")
        for local in range(per_node):
            rank = b.device(f"n{node}.{hardware.device.kind}{local}", node, hardware)
            if nvlink:
                up_out[rank], up_in[rank] = b.pair(b.devices[rank], f"n{node}.nvsw", nvlink,
                                                   "scale_up")
    if cluster.topology == "nvswitch":
        return b.finish(lambda s, d: (up_out[s], up_in[d]))
    # Step 2: NICs on edge switches: leaf l holds nodes [l*leaf_nodes, (l+1)*leaf_nodes); with
    # rails, each leaf group has one switch per rail (local index).
    nic = _link_spec(cluster, hardware, "scale_out")
    rails = per_node if cluster.topology == "rail_optimized" else 1
    group = [node // cluster.leaf_nodes for node in range(nodes)]
    names = [f"g{g}.rail{r}" if rails > 1 else f"leaf{g}"
             for g in range(group[-1] + 1) for r in range(rails)]
    for name in names:
        b.switch(name, "rail" if rails > 1 else "leaf")
    nic_out, nic_in = [-1] * len(b.devices), [-1] * len(b.devices)
    under = [0] * len(names)
    for rank, name in enumerate(b.devices):
        edge = group[rank // per_node] * rails + (rank % per_node) % rails
        under[edge] += 1
        nic_out[rank], nic_in[rank] = b.pair(name, names[edge], nic, "scale_out")
    # Step 3: one aggregated core; uplinks carry the devices below / oversubscription.
    uplink, downlink = [-1] * len(names), [-1] * len(names)
    if len(names) > 1:
        b.switch("core", "core")
        for i, name in enumerate(names):
            spec = nic._replace(rate=under[i] * nic.rate / cluster.oversubscription)
            uplink[i] = b.link(name, "core", spec, "fabric", 0.0)
            downlink[i] = b.link("core", name, spec, "fabric", 0.0)

    def route(src: int, dst: int) -> Sequence[int]:
        node_s, node_d = src // per_node, dst // per_node
        if node_s == node_d:
            return up_out[src], up_in[dst]
        path: list[int] = []
        rail = (dst % per_node) % rails
        if (src % per_node) % rails != rail:  # PXN: NVLink to the local GPU on dst's rail
            proxy = node_s * per_node + dst % per_node
            path += (up_out[src], up_in[proxy])
            src = proxy
        edge_s, edge_d = group[node_s] * rails + rail, group[node_d] * rails + rail
        if edge_s == edge_d:
            return (*path, nic_out[src], nic_in[dst])
        return (*path, nic_out[src], uplink[edge_s], downlink[edge_d], nic_in[dst])

    return b.finish(route)


def _build_torus(cluster: ClusterSpec, hardware: HardwareProfile,
                 profiles: dict[str, HardwareProfile]) -> Topology:
    """Chips on a 1-3D torus (or mesh without wraparound), dimension-order routed."""
    dims, wrap = cluster.torus_dims, cluster.wraparound
    count, per_node = math.prod(dims), _devices_per_node(cluster, hardware)
    hosts = -(-count // per_node)
    if cluster.nodes not in (1, hosts):
        raise TopologyError(f"nodes={cluster.nodes} but a {'x'.join(map(str, dims))} torus with "
                            f"{per_node} chips per host has {hosts} hosts (give nodes: {hosts})")
    ici = _link_spec(cluster, hardware, "ici")
    b = _Builder()
    for rank in range(count):
        b.device(f"n{rank // per_node}.{hardware.device.kind}{rank % per_node}",
                 rank // per_node, hardware)
    strides = [math.prod(dims[k + 1:]) for k in range(len(dims))]
    coords = [tuple(int(c) for c in np.unravel_index(r, dims)) for r in range(count)]
    edge: dict[tuple[int, int], int] = {}
    for rank in range(count):
        for k, size in enumerate(dims):
            c = coords[rank][k]
            # The +1 link of each chip; a size-2 ring has one link pair, not two.
            if c + 1 < size or (wrap and size > 2):
                nxt = rank + ((c + 1) % size - c) * strides[k]
                u, v = b.devices[rank], b.devices[nxt]
                edge[rank, nxt] = b.link(u, v, ici, "ici")
                edge[nxt, rank] = b.link(v, u, ici, "ici")

    def route(src: int, dst: int) -> Sequence[int]:
        path, cur = [], src
        for k, size in enumerate(dims):
            c, delta = coords[src][k], coords[dst][k] - coords[src][k]
            if delta == 0:
                continue
            if wrap:
                ahead = delta % size
                step, hops = (1, ahead) if ahead <= size - ahead else (-1, size - ahead)
            else:
                step, hops = (1 if delta > 0 else -1), abs(delta)
            for _ in range(hops):
                nc = (c + step) % size
                nxt = cur + (nc - c) * strides[k]
                path.append(edge[cur, nxt])
                cur, c = nxt, nc
        return path

    return b.finish(route)


def _build_explicit(cluster: ClusterSpec, hardware: HardwareProfile,
                    profiles: dict[str, HardwareProfile]) -> Topology:
    """Listed devices and links; any other link endpoint is a switch joining >= 2 neighbours."""
    b = _Builder()
    for dev in cluster.devices:
        b.device(dev.name, dev.node, _profile_for(dev.name, dev.hardware, hardware, profiles))
    known = set(b.devices)
    neighbours: dict[str, set[str]] = {}
    for i, link in enumerate(cluster.links):
        if link.kind not in LINK_CLASSES:
            raise TopologyError(f"cluster.links[{i}]: kind {link.kind!r} is not a link class "
                                f"(allowed: {', '.join(LINK_CLASSES)})")
        if link.a == link.b:
            raise TopologyError(f"cluster.links[{i}]: link joins {link.a!r} to itself")
        for x, y in ((link.a, link.b), (link.b, link.a)):
            if x not in known:
                neighbours.setdefault(x, set()).add(y)
    for name, peers in neighbours.items():
        if len(peers) < 2:
            raise TopologyError(f"link endpoint {name!r} is not a listed device ("
                                f"{', '.join(sorted(known))}), and as a switch it would join "
                                "only one neighbour: a misspelt device name?")
        b.switch(name, "switch")
    for link in cluster.links:
        profile_link = hardware.links.get(_PROFILE_CLASS[link.kind])
        spec = _Link(link.bandwidth, profile_link.efficiency if profile_link else 1.0,
                     link.latency, profile_link.kind if profile_link else link.kind)
        b.link(link.a, link.b, spec, link.kind)
        if link.bidirectional:
            b.link(link.b, link.a, spec, link.kind)
    return b.finish(_SearchRouter(b.graph, tuple(b.devices)))


def _profile_for(device: str, name: str, default: HardwareProfile,
                 profiles: dict[str, HardwareProfile]) -> HardwareProfile:
    if not name or name == default.name:
        return default
    if name not in profiles:
        raise TopologyError(f"device {device!r} uses hardware profile {name!r}, which was not "
                            f"loaded (given: {', '.join(sorted(profiles)) or 'none'})")
    return profiles[name]


class _SearchRouter:
    """Graph-search paths: fewest hops, then least summed latency.

    The weight ``1 + latency / (2 x total latency)`` makes every path's latency term < 1/2, so hop
    count decides first. Remaining ties follow networkx's Dijkstra, which is deterministic for a
    graph built in a fixed order. Paths from one source are computed once, on first use.
    """

    def __init__(self, graph: nx.DiGraph, devices: tuple[str, ...]) -> None:
        self._graph, self._devices = graph, devices
        total = sum(a["latency"] for _, _, a in graph.edges(data=True))
        scale = 0.5 / total if total > 0 else 0.0
        self._weight = lambda u, v, a: 1.0 + a["latency"] * scale
        self._paths: dict[int, dict[str, list[str]]] = {}

    def __call__(self, src: int, dst: int) -> Sequence[int]:
        if src not in self._paths:
            self._paths[src] = nx.single_source_dijkstra_path(
                self._graph, self._devices[src], weight=self._weight)
        path = self._paths[src].get(self._devices[dst])
        if path is None:
            raise TopologyError(f"device {self._devices[src]!r} cannot reach device "
                                f"{self._devices[dst]!r}")
        return [self._graph.edges[u, v]["index"] for u, v in zip(path, path[1:])]


def _check_connected(graph: nx.DiGraph, devices: Sequence[str]) -> None:
    """Every device reaches every other iff all reach devices[0] and it reaches all."""
    if len(devices) < 2:
        return
    first = devices[0]
    for name in devices:
        if graph.degree(name) == 0:
            other = devices[1] if name == first else first
            raise TopologyError(f"device {name!r} has no links, so it cannot reach device "
                                f"{other!r} or any other")
    reached, reaching = nx.descendants(graph, first), nx.ancestors(graph, first)
    for name in devices[1:]:
        if name not in reached:
            raise TopologyError(f"device {first!r} cannot reach device {name!r}: no path over "
                                "the links")
        if name not in reaching:
            raise TopologyError(f"device {name!r} cannot reach device {first!r}: no path over "
                                "the links")
