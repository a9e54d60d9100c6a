"""What a placement costs one MoE layer, priced with the simulator's own cost functions.

For each MoE layer the placement fixes where the layer's routed tokens go. The cost has two parts:

- the dispatch and combine all-to-alls: the flows that :func:`moesim.traffic.layer_traffic`
  builds (direct, or hierarchical with one network copy per destination node), priced either by
  the closed form (busiest link's bytes over its capacity, :func:`moesim.network.alltoall_bound`,
  plus the longest path latency), fast enough for search, or by the flow-level simulation
  (:func:`moesim.sim.costs.alltoall`), which is what ``moesim run`` charges;
- the expert compute: the slowest device's grouped GEMM over its slots' tokens
  (:meth:`moesim.compute.KernelTimer.experts`), which the others wait for.

Predicted MoE layer time = dispatch + combine + slowest device's expert compute (nothing
overlapped). Also reported: cross-node bytes of dispatch plus combine, and max/mean device load
(token-expert pairs each device computes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moesim import network, routing
from moesim.compute import KernelTimer
from moesim.placement.placement import Placement
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import Scenario
from moesim.topology import Topology
from moesim.traffic import LayerTraffic, layer_traffic

__all__ = ["CostContext", "LayerCost", "PlanCost", "layer_cost", "plan_cost", "layer_scorer",
           "trace_choices", "scenario_choices"]


@dataclass(frozen=True, eq=False)
class CostContext:
    """Everything besides routing and placement that prices one EP group's MoE layer."""

    topology: Topology
    group: np.ndarray                 # int[ep] global ranks of the EP group
    tokens_per_source: float          # real tokens each device routes per micro-batch
    hidden: int
    dispatch_bytes_per_elem: float
    combine_bytes_per_elem: float
    capacity_factor: float | None
    top_k: int
    algorithm: str                    # "direct" or "hierarchical"
    timer: KernelTimer
    max_tokens_per_source: int = 256  # sampling cap, as the scenario's routing

    @property
    def ep(self) -> int:
        return int(self.group.size)

    @property
    def device_node(self) -> np.ndarray:
        """int[ep] node of each device of the group."""
        return self.topology.device_node[self.group]

    @cached_property
    def group_paths(self) -> tuple[np.ndarray, np.ndarray]:
        """Paths between the group's devices, for the closed form: ``links: int[ep * ep, H]``
        (row ``i * ep + j``: the links from device i to device j, padded with -1) and
        ``latency: float[ep * ep]`` (each path's summed latency)."""
        ep = self.ep
        src, dst = np.divmod(np.arange(ep * ep), ep)
        ptr, links = self.topology.paths_csr(np.stack([self.group[src], self.group[dst]], 1))
        hops = np.diff(ptr)
        padded = np.full((ep * ep, max(int(hops.max(initial=0)), 1)), -1, dtype=np.int64)
        column = np.arange(links.size) - np.repeat(ptr[:-1], hops)
        padded[np.repeat(np.arange(ep * ep), hops), column] = links
        latency = np.bincount(np.repeat(np.arange(ep * ep), hops),
                              weights=self.topology.latency[links], minlength=ep * ep)
        return padded, latency

    @classmethod
    def from_scenario(cls, s: Scenario) -> CostContext:
        """The context ``moesim run`` prices with: EP group 0 of stage 0, the scenario's dtypes,
        all-to-all algorithm and tokens per micro-batch (halved under two-batch overlap)."""
        from moesim.layout import Layout
        from moesim.memory import tokens_per_microbatch
        from moesim.sim.simulate import scenario_topology

        layout = Layout(s.parallelism, s.model.num_layers, s.model.moe_layer_ids)
        tokens = tokens_per_microbatch(s)
        if s.communication.overlap == "two_batch":
            tokens /= 2
        tables = None
        if s.hardware.calibration:
            from moesim.calibration import MeasuredTables
            tables = MeasuredTables.from_profile(s.hardware)
        timer = KernelTimer(s.model, s.hardware.device, s.precision.compute, s.precision.weights,
                            s.precision.activations, s.parallelism.tp, tables)
        return cls(scenario_topology(s), layout.ep_group(0, 0), tokens, s.model.hidden_size,
                   dtype_bytes(s.precision.dispatch), dtype_bytes(s.precision.combine),
                   s.model.capacity_factor, s.model.effective_top_k, s.communication.alltoall,
                   timer, s.routing.max_tokens_per_source)


@dataclass(frozen=True)
class LayerCost:
    """Predicted cost of one MoE layer (seconds, bytes)."""

    dispatch: float
    combine: float
    compute: float            # slowest device's expert GEMM
    cross_node_bytes: float   # dispatch + combine
    max_over_mean: float      # device load (token-expert pairs computed), max / mean

    @property
    def alltoall(self) -> float:
        return self.dispatch + self.combine

    @property
    def layer_time(self) -> float:
        return self.dispatch + self.combine + self.compute


@dataclass(frozen=True)
class PlanCost:
    """Per-layer costs of a placement, and their means over layers."""

    layers: tuple[LayerCost, ...]

    def _mean(self, name: str) -> float:
        return float(np.mean([getattr(c, name) for c in self.layers])) if self.layers else 0.0

    @property
    def layer_time(self) -> float:
        return self._mean("layer_time")

    @property
    def alltoall(self) -> float:
        return self._mean("alltoall")

    @property
    def compute(self) -> float:
        return self._mean("compute")

    @property
    def cross_node_bytes(self) -> float:
        return self._mean("cross_node_bytes")

    @property
    def max_over_mean(self) -> float:
        return self._mean("max_over_mean")

    def as_dict(self) -> dict[str, float]:
        return {"layer_time": self.layer_time, "alltoall": self.alltoall,
                "compute": self.compute, "cross_node_bytes": self.cross_node_bytes,
                "max_over_mean": self.max_over_mean}


def layer_cost(ctx: CostContext, choices: routing.LayerChoices, placement: Placement,
               layer: int, *, exact: bool = False) -> LayerCost:
    """Cost of MoE layer ``layer`` of ``placement`` for the tokens ``choices``.

    ``exact=False`` prices the all-to-alls by the closed form, ``True`` by the flow simulation.
    """
    traffic = layer_traffic(
        choices, placement, layer, device_node=ctx.device_node,
        tokens_per_source=ctx.tokens_per_source, hidden=ctx.hidden,
        dispatch_bytes_per_elem=ctx.dispatch_bytes_per_elem,
        combine_bytes_per_elem=ctx.combine_bytes_per_elem,
        capacity_factor=ctx.capacity_factor, top_k=ctx.top_k, algorithm=ctx.algorithm)
    dispatch = _alltoall_time(ctx, traffic.pairs, traffic.dispatch_bytes, exact)
    combine = _alltoall_time(ctx, traffic.combine_pairs, traffic.combine_bytes, exact)
    return LayerCost(dispatch, combine, _compute_time(ctx, traffic),
                     traffic.cross_node_dispatch_bytes
                     * (1.0 + ctx.combine_bytes_per_elem / ctx.dispatch_bytes_per_elem),
                     _max_over_mean(traffic.slot_tokens.sum(axis=1)))


def plan_cost(ctx: CostContext, choices: Sequence[routing.LayerChoices], placement: Placement,
              *, exact: bool = False, layers: Sequence[int] | None = None) -> PlanCost:
    """:func:`layer_cost` of every layer (or of ``layers``); ``choices[l]`` is layer l's."""
    chosen = range(placement.num_layers) if layers is None else layers
    return PlanCost(tuple(layer_cost(ctx, choices[layer], placement, layer, exact=exact)
                          for layer in chosen))


def layer_scorer(ctx: CostContext, choices: Sequence[routing.LayerChoices], num_experts: int
                 ) -> Callable[[int, np.ndarray], float]:
    """``score(layer, slot_expert: int[ep, slots]) -> predicted layer time`` (closed form), for
    planners that build one layer at a time."""
    def score(layer: int, slot_expert: np.ndarray) -> float:
        placement = Placement(np.asarray(slot_expert)[None], num_experts)
        return layer_cost(ctx, choices[layer], placement, 0).layer_time
    return score


def trace_choices(ctx: CostContext, trace: routing.RoutingTrace, *, seed: int = 0
                  ) -> list[routing.LayerChoices]:
    """The tokens the group's devices route in each layer when the routing is ``trace``.

    Per-token traces are dealt out in order as :func:`moesim.routing.choices_from_trace` does;
    counts-only traces are sampled (seeded per layer, as the simulator seeds them).
    """
    return [routing.choices_from_trace(
        trace, layer, num_sources=ctx.ep, tokens_per_source=max(1, round(ctx.tokens_per_source)),
        rng=routing.layer_rng(seed, layer), max_tokens_per_source=ctx.max_tokens_per_source,
        top_k=ctx.top_k) for layer in range(trace.num_layers)]


def scenario_choices(s: Scenario, ctx: CostContext) -> list[routing.LayerChoices]:
    """The scenario's routing sample for one EP group, as the simulator draws it but with
    node-limited routing off (that limit depends on the placement being chosen)."""
    return routing.scenario_routing(s, tokens_per_source=ctx.tokens_per_source,
                                    node_limited=False)


def _alltoall_time(ctx: CostContext, pairs: np.ndarray, nbytes: np.ndarray, exact: bool) -> float:
    if len(pairs) == 0:
        return 0.0
    if exact:
        from moesim.sim.costs import alltoall
        return alltoall(ctx.topology, ctx.group[pairs], nbytes).duration
    topo = ctx.topology
    paths, path_latency = ctx.group_paths
    row = pairs[:, 0] * ctx.ep + pairs[:, 1]
    links = paths[row]                                          # [F, H], -1 padded
    used = links >= 0
    link_bytes = np.bincount(links[used], weights=np.broadcast_to(nbytes[:, None],
                                                                  links.shape)[used],
                             minlength=topo.num_links)
    moving = (nbytes > 0) & used[:, 0]
    latency = float(path_latency[row][moving].max()) if moving.any() else 0.0
    return network.alltoall_bound(link_bytes, topo.capacity) + latency


def _compute_time(ctx: CostContext, traffic: LayerTraffic) -> float:
    return max(ctx.timer.experts(tokens) for tokens in traffic.slot_tokens)


def _max_over_mean(device_load: np.ndarray) -> float:
    mean = float(device_load.mean())
    return float(device_load.max()) / mean if mean > 0 else 1.0
