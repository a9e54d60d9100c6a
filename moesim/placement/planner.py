"""moesim's expert placement planner: co-activated experts on one node, loads level across GPUs.

Under hierarchical dispatch (DeepEP) a token crosses the network once per remote node holding one
of its top-k experts, so the network cost of a placement is the connectivity of the token
hypergraph over the node partition (:mod:`moesim.placement.hypergraph`); EPLB balances load only
and ignores which experts are chosen together. Per MoE layer, from the planning window's tokens:

1. Replicate everywhere: the ``f`` hottest experts get a slot on every node. Every source node
   then has a local copy (the simulator's replica choice prefers the same node), so these
   experts never cross the network, and each copy takes ``1 / N`` of the load.
2. Partition the other experts over the nodes: grow all parts together by co-activation, then
   refine with moves and swaps on pair counts and with moves on the exact connectivity, under a
   node load cap of ``(1 + balance_tolerance)`` times the mean.
3. Inside each node, EPLB's steps: replicate the node's hottest experts into its spare slots,
   then pack the replicas onto its GPUs by load, equal slots per GPU.

The candidates ``(f, balance_tolerance)`` are priced on a few probe layers with the objective
(:mod:`moesim.placement.objective`, closed form) when one is given; the cheapest is used for
every layer. Given a current placement and a migration budget, layers are relabelled to keep as
many slots as possible, and the layers with the best gain per byte moved are changed within the
budget. Deterministic for a seed; a time limit switches the remaining layers to step 2's growth
only (no refinement).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moesim import routing
from moesim.errors import InfeasiblePlacement
from moesim.placement import hypergraph
from moesim.placement.eplb import balanced_packing, replicate_experts
from moesim.placement.placement import Placement

__all__ = ["LayerRouting", "ClusterShape", "PlannerConfig", "plan", "plan_layer", "align_to",
           "moved_slots", "routing_from_trace", "routing_from_choices", "plan_for_scenario"]

Score = Callable[[int, np.ndarray], float]     # (layer, slot_expert [ep, slots]) -> seconds


@dataclass(frozen=True, eq=False)
class LayerRouting:
    """What the planner knows of one layer's routing."""

    load: np.ndarray                  # float[E] token-expert pairs per expert
    tokens: np.ndarray | None = None  # int[T, k] per-token choices, or None (counts only)
    pairs: np.ndarray | None = None   # float[E, E] co-activation counts, or None


@dataclass(frozen=True, eq=False)
class ClusterShape:
    """The EP group: ``device_node: int[ep]`` node of each device, equal slots per device."""

    num_experts: int
    device_node: np.ndarray
    slots_per_device: int

    def __post_init__(self) -> None:
        nodes, index = np.unique(np.asarray(self.device_node), return_inverse=True)
        per_node = np.bincount(index)
        if np.any(per_node != per_node[0]):
            raise InfeasiblePlacement(f"the moesim planner needs the same number of EP devices on "
                                      f"every node; got {per_node.tolist()} (use policy eplb)")
        slots = index.size * self.slots_per_device
        if self.slots_per_device < 1 or slots < self.num_experts:
            raise InfeasiblePlacement(f"{index.size} devices x {self.slots_per_device} slots = "
                                      f"{slots} slots cannot hold {self.num_experts} experts")
        object.__setattr__(self, "device_node", index)

    @property
    def num_nodes(self) -> int:
        return int(self.device_node.max()) + 1

    @property
    def devices_per_node(self) -> int:
        return self.device_node.size // self.num_nodes

    @property
    def slots_per_node(self) -> int:
        return self.devices_per_node * self.slots_per_device

    def node_devices(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.device_node == node)

    def max_everywhere(self) -> int:
        """Most experts that can hold a slot on every node (one spare slot each elsewhere)."""
        if self.num_nodes == 1:
            return 0
        spare = self.num_nodes * self.slots_per_node - self.num_experts
        return min(spare // (self.num_nodes - 1), self.slots_per_node - 1, self.num_experts)


@dataclass(frozen=True)
class PlannerConfig:
    """Knobs of :func:`plan`; a ``None`` knob is chosen per plan by the objective."""

    replicate_everywhere: int | None = None  # experts with a copy on every node
    balance_tolerance: float | None = None   # node load cap above the mean
    max_tokens: int = 4096                   # tokens per layer the partition looks at
    probe_layers: int = 2                    # layers the candidates are priced on
    seed: int = 0
    time_limit: float = 10.0                 # seconds; then growth-only for the rest
    migration_budget: float | None = None    # bytes of expert weights that may move


def plan(layers: Sequence[LayerRouting], shape: ClusterShape,
         config: PlannerConfig = PlannerConfig(), *, score: Score | None = None,
         current: Placement | None = None, expert_bytes: float = 0.0,
         progress: Callable[[int, int], None] | None = None) -> Placement:
    """Plan every layer; see the module docstring.

    Parameters
    ----------
    layers : one LayerRouting per MoE layer (planning window).
    shape : the EP group.
    config : knobs.
    score : optional objective of one layer's slots (lower is better), to choose knobs and to
        rank layers under a migration budget.
    current, expert_bytes : the placement now running and one expert's weight bytes, for the
        migration budget.
    progress : called with (layers done, layers) after each layer.

    Returns
    -------
    Placement named "moesim".
    """
    start = time.perf_counter()
    rng_seed = [config.seed]
    knobs = _choose_knobs(layers, shape, config, score)
    table = np.empty((len(layers), shape.device_node.size, shape.slots_per_device), np.int64)
    for layer, info in enumerate(layers):
        fast = time.perf_counter() - start > config.time_limit
        table[layer] = plan_layer(info, shape, *knobs, max_tokens=config.max_tokens,
                                  seed=rng_seed + [layer], refine=not fast)
        if progress is not None:
            progress(layer + 1, len(layers))
    if current is not None and config.migration_budget is not None:
        table = _within_budget(table, current, layers, shape, config.migration_budget,
                               expert_bytes, score)
    return Placement(table, shape.num_experts, name="moesim")


def _choose_knobs(layers: Sequence[LayerRouting], shape: ClusterShape, config: PlannerConfig,
                  score: Score | None) -> tuple[int, float]:
    """(replicate_everywhere, balance_tolerance): fixed ones kept, the others priced."""
    most = shape.max_everywhere()
    everywhere = ([config.replicate_everywhere] if config.replicate_everywhere is not None
                  else sorted({0, most // 2, most}))
    tolerance = ([config.balance_tolerance] if config.balance_tolerance is not None
                 else [0.02, 0.08])
    candidates = [(min(f, most), t) for f in everywhere for t in tolerance]
    if score is None or len(candidates) == 1:
        return candidates[-1] if score is None else candidates[0]
    probes = np.unique(np.linspace(0, len(layers) - 1, min(config.probe_layers, len(layers)))
                       .round().astype(int))
    costs = [sum(score(int(p), plan_layer(layers[p], shape, f, t, max_tokens=config.max_tokens,
                                           seed=[config.seed, int(p)])) for p in probes)
             for f, t in candidates]
    return candidates[int(np.argmin(costs))]


def plan_layer(info: LayerRouting, shape: ClusterShape, replicate_everywhere: int,
               balance_tolerance: float, *, max_tokens: int = 4096, seed: Sequence[int] = (0,),
               refine: bool = True) -> np.ndarray:
    """Slots of one layer: ``int64[ep, slots_per_device]`` logical expert of each slot."""
    load = np.asarray(info.load, dtype=np.float64)
    f = min(int(replicate_everywhere), shape.max_everywhere())
    # Step 1: the f hottest experts go everywhere (part -1).
    order = np.argsort(-load, kind="stable")
    everywhere, rest = order[:f], np.sort(order[f:])
    limits = _limits(load, everywhere, rest, shape, balance_tolerance)
    tokens = _subsample(info.tokens, max_tokens, seed)
    # Step 2: partition the rest over the nodes.
    part = np.full(shape.num_experts, -1, dtype=np.int64)
    pairs = _pairs(info, tokens, rest, shape.num_experts)
    sub = hypergraph.Limits(limits.max_load, limits.capacity, limits.demand[rest])
    part[rest] = hypergraph.grow_partition(pairs, load[rest], sub)
    if refine and shape.num_nodes > 1:
        part[rest] = hypergraph.refine_graph(pairs, load[rest], part[rest], sub)
        if tokens is not None:
            part = hypergraph.refine_hypergraph(tokens, load, part, limits)
    # Step 3: EPLB inside each node.
    return _fill_nodes(part, load, shape)


def _limits(load: np.ndarray, everywhere: np.ndarray, rest: np.ndarray, shape: ClusterShape,
            tolerance: float) -> hypergraph.Limits:
    """Node load cap and slot demands: an expert hotter than a GPU's share needs replicas.

    Demand = ceil(load / target) slots with target = (1 + tolerance) x the mean GPU load,
    raised until the demands fit the nodes' slots. ``demand: int[E]`` (1 for ``everywhere``).
    """
    num_nodes = shape.num_nodes
    target = max(load.sum() / shape.device_node.size, 1e-12) * (1.0 + tolerance)
    while True:
        demand = np.maximum(1, np.ceil(load / target - 1e-9)).astype(np.int64)
        copies = np.maximum(1, np.ceil(load[everywhere] / num_nodes / target - 1e-9))
        capacity = shape.slots_per_node - int(copies.sum())
        if capacity >= 1 and demand[rest].sum() <= num_nodes * capacity:
            break
        target *= 1.25
    demand[everywhere] = 1
    max_load = load[rest].sum() / num_nodes * (1.0 + tolerance)
    return hypergraph.Limits(max_load, np.full(num_nodes, capacity), demand)


def _subsample(tokens: np.ndarray | None, max_tokens: int, seed: Sequence[int]
               ) -> np.ndarray | None:
    if tokens is None or tokens.shape[0] <= max_tokens:
        return None if tokens is None else tokens.astype(np.int64)
    rows = np.random.default_rng(list(seed)).choice(tokens.shape[0], max_tokens, replace=False)
    return tokens[np.sort(rows)].astype(np.int64)


def _pairs(info: LayerRouting, tokens: np.ndarray | None, rest: np.ndarray,
           num_experts: int) -> np.ndarray:
    """Co-activation among ``rest``: ``[len(rest), len(rest)]``, zero diagonal (zeros if
    the routing has neither tokens nor a co-activation matrix)."""
    if info.pairs is not None:
        pairs = np.asarray(info.pairs, dtype=np.float64)[np.ix_(rest, rest)].copy()
        np.fill_diagonal(pairs, 0.0)
        return pairs
    if tokens is not None:
        return hypergraph.coactivation(tokens, num_experts)[np.ix_(rest, rest)]
    return np.zeros((rest.size, rest.size))


def _fill_nodes(part: np.ndarray, load: np.ndarray, shape: ClusterShape) -> np.ndarray:
    """EPLB's replicate-and-pack inside every node; -1 experts get a copy on each node."""
    num_nodes, gpus, slots = shape.num_nodes, shape.devices_per_node, shape.slots_per_device
    everywhere = np.flatnonzero(part < 0)
    table = np.empty((shape.device_node.size, slots), dtype=np.int64)
    for node in range(num_nodes):
        local = np.concatenate([everywhere, np.flatnonzero(part == node)])
        local_load = np.where(part[local] < 0, load[local] / num_nodes, load[local])
        # Zero loads still need a slot each; a tiny weight keeps the greedy deterministic.
        local_load = local_load + 1e-12
        to_local, _, count = replicate_experts(local_load[None, :], shape.slots_per_node)
        replica_load = (local_load / count[0])[to_local[0]]
        gpu, rank = balanced_packing(replica_load[None, :], gpus)
        devices = shape.node_devices(node)
        table[devices[gpu[0]], rank[0]] = local[to_local[0]]
    return table


# ----------------------------------------------------------------------------- migration


def _within_budget(table: np.ndarray, current: Placement, layers: Sequence[LayerRouting],
                   shape: ClusterShape, budget: float, expert_bytes: float,
                   score: Score | None) -> np.ndarray:
    """Keep the current slots of the layers whose change is worth least per byte moved."""
    old = np.asarray(current.slot_expert, dtype=np.int64)
    if old.shape != table.shape:
        raise InfeasiblePlacement(f"current placement has shape {old.shape}; the plan has "
                                  f"{table.shape} (layers, devices, slots)")
    table = np.stack([align_to(table[i], old[i], shape.device_node) for i in range(len(table))])
    cost = np.array([moved_slots(table[i], old[i]) for i in range(len(table))]) * expert_bytes
    gain = np.array([_gain(i, table[i], old[i], layers[i], shape, score)
                     for i in range(len(table))])
    order = sorted(range(len(table)), key=lambda i: (-(gain[i] / cost[i]) if cost[i] > 0
                                                     else -np.inf, i))
    spent = 0.0
    result = old.copy()
    for i in order:
        if gain[i] > 0 and spent + cost[i] <= budget:
            result[i] = table[i]
            spent += cost[i]
    return result


def align_to(new: np.ndarray, old: np.ndarray, device_node: np.ndarray) -> np.ndarray:
    """``new`` relabelled to keep most slots of ``old`` (both ``int[ep, slots]``; the cost is
    the same: nodes, the GPUs of a node and the slots of a GPU are interchangeable).

    Nodes are matched, then GPUs inside matched nodes, by the largest common multiset of experts
    (assignment problem); inside a GPU an expert keeps its old slot when it stays.
    """
    from scipy.optimize import linear_sum_assignment

    num_experts = int(max(new.max(), old.max())) + 1
    nodes = [np.flatnonzero(device_node == n) for n in range(int(device_node.max()) + 1)]
    count = lambda rows: np.stack([np.bincount(r.ravel(), minlength=num_experts)  # noqa: E731
                                   for r in rows])
    out = np.empty_like(new)
    node_new = count([new[d] for d in nodes])
    node_old = count([old[d] for d in nodes])
    _, node_match = linear_sum_assignment(-np.minimum(node_new[:, None], node_old[None]).sum(-1))
    for n, m in enumerate(node_match):
        dev_new, dev_old = count(new[nodes[n]]), count(old[nodes[m]])
        _, dev_match = linear_sum_assignment(-np.minimum(dev_new[:, None], dev_old[None]).sum(-1))
        for g, h in enumerate(dev_match):
            out[nodes[m][h]] = _keep_slots(new[nodes[n][g]], old[nodes[m][h]])
    return out


def _keep_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The experts of ``new`` (one GPU) in an order that leaves old ones in their old slot."""
    left = list(new)
    out = np.full_like(new, -1)
    for slot, expert in enumerate(old):
        if expert in left:
            out[slot] = expert
            left.remove(expert)
    out[out < 0] = left
    return out


def moved_slots(new: np.ndarray, old: np.ndarray) -> int:
    """Slots whose expert changes (each costs one expert's weights over the network)."""
    return int((np.asarray(new) != np.asarray(old)).sum())


def _gain(layer: int, new: np.ndarray, old: np.ndarray, info: LayerRouting, shape: ClusterShape,
          score: Score | None) -> float:
    """How much better ``new`` is than ``old`` (objective, or a token-count proxy)."""
    if score is not None:
        return score(layer, old) - score(layer, new)
    return _proxy(old, info, shape) - _proxy(new, info, shape)


def _proxy(table: np.ndarray, info: LayerRouting, shape: ClusterShape) -> float:
    """Remote node touches per token plus the hottest device's share of tokens (no objective)."""
    from moesim.placement.baselines import device_loads

    ep = table.shape[0]
    loads = device_loads(info.load[None, :], table.reshape(1, -1), ep)[0]
    cost = loads.max() / max(info.load.sum(), 1e-12) * ep
    if info.tokens is not None and info.tokens.size:
        node_of = np.full(shape.num_experts, -1)
        holders = np.zeros((shape.num_experts, shape.num_nodes), dtype=bool)
        holders[table, shape.device_node[:, None]] = True
        only = holders.sum(axis=1) == 1
        node_of[only] = np.argmax(holders[only], axis=1)
        cost += hypergraph.connectivity(info.tokens.astype(np.int64), node_of) / len(info.tokens)
    return float(cost)


# ----------------------------------------------------------------------------- inputs


def routing_from_trace(trace: routing.RoutingTrace) -> list[LayerRouting]:
    """Per-layer planning inputs from a trace (per-token, or counts with optional co-activation)."""
    loads = trace.layer_counts()
    out = []
    for layer in range(trace.num_layers):
        tokens = None if trace.expert_ids is None else trace.expert_ids[layer]
        pairs = None if trace.coactivation is None else trace.coactivation[layer]
        out.append(LayerRouting(loads[layer], tokens, pairs))
    return out


def routing_from_choices(choices: Sequence[routing.LayerChoices], num_experts: int
                         ) -> list[LayerRouting]:
    """Per-layer planning inputs from sampled choices (the scenario's routing)."""
    return [LayerRouting(np.bincount(c.experts.ravel(), minlength=num_experts) * c.weight,
                         c.experts) for c in choices]


def plan_for_scenario(scenario, load: np.ndarray, device_node: np.ndarray) -> Placement:
    """The placement of policy "moesim" for one EP group whose devices sit on ``device_node``.

    Plans on the scenario's own routing (its trace, or a sample of its distribution drawn with
    node limiting off, as :func:`moesim.placement.policies.expected_load`), priced by the
    scenario's objective. ``load: [moe_layers, experts]`` is used when routing has no tokens.
    """
    from moesim.placement.objective import CostContext, layer_scorer, scenario_choices

    s = scenario
    slots = (s.model.num_experts + s.placement.redundant_experts) // s.parallelism.ep
    shape = ClusterShape(s.model.num_experts, np.asarray(device_node), slots)
    ctx = CostContext.from_scenario(s)
    choices = scenario_choices(s, ctx)
    layers = routing_from_choices(choices, s.model.num_experts)
    if all(c.top_k == s.model.num_experts for c in choices):     # soft gating: no structure
        layers = [LayerRouting(np.asarray(row, dtype=float)) for row in load]
    return plan(layers, shape, PlannerConfig(seed=s.seed), score=layer_scorer(ctx, choices, s.model.num_experts))
