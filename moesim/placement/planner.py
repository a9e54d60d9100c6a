"""moesim's expert placement planner: co-activated experts on one node, loads level across GPUs.

Under hierarchical dispatch (DeepEP) a token crosses the network once per remote node holding one
of its top-k experts, so the network cost of a placement is the connectivity of the token
hypergraph over the node partition (:mod:`moesim.placement.hypergraph`); EPLB balances load only
and ignores which experts are chosen together. Per MoE layer, from the planning window's tokens:

1. Replicate everywhere: the ``f`` hottest experts get a slot on every node. Every source node
   then has a local copy (the simulator's replica choice prefers the same node), so these
   experts never cross the network, and each copy takes ``1 / N`` of the load.
2. Partition the other experts over the nodes: grow all parts together by co-activation, then
   refine with moves and swaps on pair counts and on the exact connectivity, then level the
   nodes' network ingress (the busiest node's touched tokens, :func:`hypergraph.level_touch`),
   under a node load cap of ``(1 + balance_tolerance)`` times the mean and a slot budget per
   node (hot experts demand slots for their replicas); several starts when experts are few.
3. Inside each node, EPLB's steps: replicate the node's hottest experts into its spare slots,
   pack the replicas onto its GPUs by load (equal slots per GPU), then swap to level the GPUs.
4. Polish: local search on the objective itself (:mod:`moesim.placement.local_search`).

The knobs ``(f, balance_tolerance)`` are ranked on a few probe layers by the objective
(:mod:`moesim.placement.objective`, closed form), those no less balanced than EPLB first. Each
layer gets candidates: moesim's plan with the best knobs that pass on the probes and with the
cheapest knobs overall; a plan whose replicas are spread over nodes instead of held everywhere
(:func:`plan_layer_spread`: EPLB's replica counts, each expert's copies on distinct nodes, so
load can move between nodes at run time); EPLB's plan with whole devices regrouped by
co-activation; EPLB's own plan. Each layer takes its cheapest candidate, then the cheapest
switches to better balanced ones are made until the plan's mean balance over layers is no worse
than EPLB's (:func:`_choose`). Given a current placement and a migration budget, only the layers
worth their moved bytes change (:mod:`moesim.placement.migration`). Deterministic for a seed and
of the machine's speed: the work is bounded in objective evaluations, never seconds.
Past ``max_evaluations`` the remaining layers get EPLB's plan, and the placement says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from moesim import routing, routing_trace
from moesim.placement import hypergraph
from moesim.placement.eplb import balanced_packing, replicate_experts
from moesim.placement.local_search import (
    balance,
    eplb_balance,
    eplb_best,
    expected_device_loads,
    polish_layer,
    regroup_devices,
)
from moesim.placement.migration import align_to, moved_slots, within_budget
from moesim.placement.placement import Placement
from moesim.placement.problem import ClusterShape, LayerRouting, subsample_tokens

__all__ = ["LayerRouting", "ClusterShape", "PlannerConfig", "plan", "plan_layer", "fill_nodes",
           "regroup_devices", "align_to",
           "moved_slots", "expected_device_loads", "routing_from_trace", "routing_from_choices"]

Score = Callable[[int, np.ndarray], float]     # (layer, slot_expert [ep, slots]) -> seconds
MIN_POLISH = 16   # evaluations per layer below which the polish is skipped (too few for a pass)


@dataclass(frozen=True)
class PlannerConfig:
    """Knobs of :func:`plan`; a ``None`` knob is chosen per plan (see :func:`_rank_knobs`)."""

    replicate_everywhere: int | None = None  # experts with a copy on every node
    balance_tolerance: float | None = None   # node load cap above the mean
    max_tokens: int = 4096                   # tokens per layer the partition looks at
    probe_layers: int = 2                    # layers the candidates are priced on
    seed: int = 0
    max_evaluations: int = 100_000           # objective calls; then EPLB's plan for the rest
    polish_evaluations: int = 256            # objective evaluations of step 4, all layers
                                             # (skipped under MIN_POLISH per layer)
    batch_pairs: float | None = None         # pairs a device routes per batch: count noise
    migration_budget: float | None = None    # bytes of expert weights that may move
    balance_windows: int = 1                 # time windows a candidate's balance is checked
                                             # on (1 = the whole planning window only)
    drift_fraction: float = 0.0              # share of load that may move to other experts
    drift_samples: int = 3                   # drifted loads a candidate's balance is checked on


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
    counted = None if score is None else _Counted(score)
    score = counted
    ranked = _rank_knobs(layers, shape, config, score)
    regroup = _regroup_helps(layers, shape, config, score)
    options: list[list[Option]] = []
    fallback = 0
    for layer, info in enumerate(layers):
        if counted is not None and counted.calls >= config.max_evaluations:   # out of budget
            options.append([Option(*eplb_best(info.load, shape, config.batch_pairs))])
            fallback += 1
        else:
            options.append(_layer_options(layer, info, shape, ranked, config, regroup, score))
        if progress is not None:
            progress(layer + 1, len(layers))
    table = np.stack([layer_options[pick].table for layer_options, pick
                      in zip(options, _choose(options, score is not None), strict=True)])
    share = config.polish_evaluations // max(len(layers), 1)
    if score is not None and share >= MIN_POLISH:
        # Step 4: each layer's local search, within its chosen plan's balance.
        for layer, info in enumerate(layers):
            if counted is not None and counted.calls >= config.max_evaluations:
                break
            table[layer] = polish_layer(table[layer], layer, info, shape, score, share,
                                        seed=[config.seed, layer],
                                        pairs_per_device=config.batch_pairs)
    if current is not None and config.migration_budget is not None:
        table = within_budget(table, current, layers, shape, config.migration_budget,
                              expert_bytes, score)
    notes = () if not fallback else (
        f"planner budget of {config.max_evaluations:,} objective evaluations reached: the last "
        f"{fallback} of {len(layers)} layers use EPLB's plan",)
    return Placement(table, shape.num_experts, name="moesim", notes=notes)


class _Counted:
    """An objective that counts its calls (the planner's deterministic budget)."""

    def __init__(self, score: Score):
        self.score, self.calls = score, 0

    def __call__(self, layer: int, slot_expert: np.ndarray) -> float:
        self.calls += 1
        return self.score(layer, slot_expert)


class Option(NamedTuple):
    """One candidate plan of a layer: its slots, balance and predicted time (0 without an
    objective)."""

    table: np.ndarray
    balance: float
    cost: float = 0.0


def _layer_options(layer: int, info: LayerRouting, shape: ClusterShape,
                   ranked: list[tuple[int, float]], config: PlannerConfig,
                   regroup: bool, score: Score | None) -> list[Option]:
    """Candidate plans of one layer, preferred first, EPLB's own plan last: moesim's plan with
    the first two knobs and with replicas spread over nodes (:func:`plan_layer_spread`), EPLB's
    plan with its devices regrouped by co-activation (``regroup``; device loads unchanged).
    Each priced by ``score`` when given."""
    seed = [config.seed, layer]
    eplb_table, reference = eplb_best(info.load, shape, config.batch_pairs)
    tables = [plan_layer(info, shape, *knobs, max_tokens=config.max_tokens, seed=seed)
              for knobs in ranked[:2]]
    tables.append(plan_layer_spread(info, shape, ranked[0][1], max_tokens=config.max_tokens,
                                    seed=seed))
    if regroup:
        tables.append(regroup_devices(eplb_table, info, shape, max_tokens=config.max_tokens,
                                      seed=seed))
    loads = _window_loads(info, shape.num_experts, config.balance_windows)
    loads += _drifted_loads(info.load, config.drift_fraction, config.drift_samples, seed)
    if len(loads) > 1:    # robust to drift: mean balance over the loads it may see
        tables.append(eplb_table)
        out = [Option(t, float(np.mean([balance(w, t, shape, config.batch_pairs)
                                        for w in loads]))) for t in tables]
    else:
        out = [Option(t, balance(info.load, t, shape, config.batch_pairs)) for t in tables]
        out.append(Option(eplb_table, reference))
    if score is not None:
        out = [o._replace(cost=score(layer, o.table)) for o in out]
    return out


def _window_loads(info: LayerRouting, num_experts: int, windows: int) -> list[np.ndarray]:
    """The layer's expert loads over the whole planning window, then over each of ``windows``
    consecutive time windows of its tokens (scaled to the whole; none without tokens)."""
    out = [np.asarray(info.load, dtype=float)]
    if info.tokens is None or windows < 2 or len(info.tokens) < windows:
        return out
    total = out[0].sum()
    for chunk in np.array_split(np.asarray(info.tokens), windows):
        counts = np.bincount(chunk.ravel(), minlength=num_experts).astype(float)
        out.append(counts * total / max(counts.sum(), 1e-12))
    return out


def _drifted_loads(load: np.ndarray, fraction: float, samples: int, seed: list[int]
                   ) -> list[np.ndarray]:
    """Loads the layer may see after drift: ``(1 - fraction) * load + fraction * load[perm]``
    for ``samples`` seeded random permutations (popular experts change, the popularity profile
    stays)."""
    if fraction <= 0 or samples < 1:
        return []
    rng = np.random.default_rng([*seed, 0xD21F7])
    load = np.asarray(load, dtype=float)
    return [(1.0 - fraction) * load + fraction * load[rng.permutation(load.size)]
            for _ in range(samples)]


def _choose(options: Sequence[Sequence[Option]], priced: bool) -> list[int]:
    """Which option each layer takes, keeping the plan no less balanced than EPLB's.

    Not ``priced`` (no objective): per layer the first option no less balanced than EPLB's (its
    last). Priced: per layer the cheapest option, then, while the mean balance over layers
    exceeds EPLB's, the switch to a better balanced option that costs the least time per unit
    of balance regained (a layer may trade a little balance for a shorter all-to-all when
    another layer is better balanced than EPLB's).
    """
    if not priced:
        return [next(i for i, o in enumerate(opts) if o.balance <= opts[-1].balance + 1e-12)
                for opts in options]
    pick = [int(np.argmin([o.cost for o in opts])) for opts in options]
    budget = sum(opts[-1].balance for opts in options) + 1e-9
    spread = sum(opts[p].balance for opts, p in zip(options, pick, strict=True))
    while spread > budget:
        best: tuple[float, int, int] | None = None
        for layer, opts in enumerate(options):
            now = opts[pick[layer]]
            for i, o in enumerate(opts):
                if o.balance < now.balance - 1e-12:
                    rate = (o.cost - now.cost) / (now.balance - o.balance)
                    if best is None or rate < best[0]:
                        best = (rate, layer, i)
        if best is None:
            break
        _, layer, i = best
        spread += options[layer][i].balance - options[layer][pick[layer]].balance
        pick[layer] = i
    return pick


def _regroup_helps(layers: Sequence[LayerRouting], shape: ClusterShape, config: PlannerConfig,
                   score: Score | None) -> bool:
    """Whether regrouping EPLB's devices beats EPLB's plan on the probe layers (by the
    objective; without one, yes)."""
    if score is None:
        return True
    probes = _probes(len(layers), config)
    gain = 0.0
    for p in probes:
        table = eplb_best(layers[p].load, shape, config.batch_pairs)[0]
        gain += score(int(p), table) - score(int(p), regroup_devices(
            table, layers[p], shape, max_tokens=config.max_tokens, seed=[config.seed, int(p)]))
    return gain > 0


def _probes(num_layers: int, config: PlannerConfig) -> np.ndarray:
    """Layers the knobs are tried on: ``probe_layers`` evenly spread ones."""
    return np.unique(np.linspace(0, num_layers - 1, min(config.probe_layers, num_layers))
                     .round().astype(int))


def _rank_knobs(layers: Sequence[LayerRouting], shape: ClusterShape, config: PlannerConfig,
                score: Score | None) -> list[tuple[int, float]]:
    """Candidate knobs ``(replicate_everywhere, balance_tolerance)`` best first; fixed knobs are
    kept. Those that balanced the probe layers no worse than EPLB (per layer its better policy)
    come first, cheapest by the objective first (without one: most replication, then tightest
    tolerance); the others follow, most balanced first.
    With an objective, the cheapest knobs overall move to second place when they are not
    first: the layers' candidates are the first two, and :func:`_choose` settles the balance
    across layers (on 64-GPU DeepSeek-V3 this let decode replicate more on every node)."""
    most = shape.max_everywhere()
    everywhere = ([config.replicate_everywhere] if config.replicate_everywhere is not None
                  else sorted({0, most // 2, most}))
    tolerance = ([config.balance_tolerance] if config.balance_tolerance is not None
                 else [0.0, 0.03])
    candidates = [(min(f, most), t) for f in everywhere for t in tolerance]
    probes = _probes(len(layers), config)
    tables = {c: [plan_layer(layers[p], shape, *c, max_tokens=config.max_tokens,
                             seed=[config.seed, int(p)]) for p in probes] for c in candidates}
    spread = {c: np.mean([balance(layers[p].load, t, shape, config.batch_pairs)
                          for p, t in zip(probes, tables[c], strict=True)]) for c in candidates}
    reference = eplb_balance([layers[p].load for p in probes], shape,
                             config.batch_pairs) + 1e-12
    passing = [c for c in candidates if spread[c] <= reference]
    others = sorted((c for c in candidates if c not in passing), key=lambda c: (spread[c], c))
    if score is None:
        passing.sort(key=lambda c: (-c[0], c[1]))
        return passing + others
    cost = {c: sum(score(int(p), t) for p, t in zip(probes, tables[c], strict=True))
            for c in candidates}
    passing.sort(key=lambda c: (cost[c], c))
    ranked = passing + others
    # The cheapest knobs overall come second: the balance is settled across layers later.
    cheapest = min(candidates, key=lambda c: (cost[c], c))
    if ranked[0] != cheapest:
        ranked.remove(cheapest)
        ranked.insert(1, cheapest)
    return ranked


def plan_layer(info: LayerRouting, shape: ClusterShape, replicate_everywhere: int,
               balance_tolerance: float, *, max_tokens: int = 4096, seed: Sequence[int] = (0,),
               refine: bool = True) -> np.ndarray:
    """Slots of one layer: ``int64[ep, slots_per_device]`` logical expert of each slot.

    Step 2 is a multi-start local search when experts are few (``256 // E - 1`` random starts
    besides the grown one, at most 8); the start whose refined partition has the lowest
    :func:`hypergraph.touch_cost` (busiest node's network ingress plus the mean; then the lowest
    node load) wins.
    """
    load = np.asarray(info.load, dtype=np.float64)
    f = min(int(replicate_everywhere), shape.max_everywhere())
    # Step 1: the f hottest experts go everywhere (part -1).
    order = np.argsort(-load, kind="stable")
    everywhere, rest = order[:f], np.sort(order[f:])
    limits = _limits(load, everywhere, rest, shape, balance_tolerance)
    # Step 2: partition the rest over the nodes, from several starts.
    part = _partition(info, shape, load, rest, limits, max_tokens=max_tokens, seed=seed,
                      refine=refine)
    # Step 3: EPLB inside each node.
    return fill_nodes(part, load, shape)


def plan_layer_spread(info: LayerRouting, shape: ClusterShape, balance_tolerance: float, *,
                      max_tokens: int = 4096, seed: Sequence[int] = (0,)) -> np.ndarray:
    """Slots of one layer with every expert's replicas on distinct nodes.

    :func:`plan_layer` gives its hottest experts a copy on every node and replicates the others
    inside their node: no copy sends anything across the network, but a token always takes its
    own node's copy, so no load can move between nodes at run time. Here the copies are counted
    as EPLB counts them (each spare slot to the expert with the highest load per copy) and put
    on ``min(copies, N)`` different nodes: tokens from a node holding the expert stay there, the
    others take the least loaded copy, so every GPU holding a replicated expert can shed load
    to another node when routing drifts (what EPLB's global policy gets by scattering replicas),
    while the single-copy experts are still partitioned by co-activation.

    A copy weighs ``load / copies``. Experts with ``N`` copies are held everywhere; the others'
    first copies are partitioned as in :func:`plan_layer` (node load cap ``1 + tolerance`` times
    the mean, slots left for the extra copies), their extra copies go, hottest expert first, to
    the least loaded nodes with a free slot that do not hold the expert yet; then EPLB inside
    each node (:func:`fill_holders`).
    """
    load = np.asarray(info.load, dtype=np.float64)
    num_nodes = shape.num_nodes
    total = shape.device_node.size * shape.slots_per_device
    copies = np.minimum(replicate_experts(load[None, :] + 1e-12, total)[2][0], num_nodes)
    rest = np.flatnonzero(copies < num_nodes)
    weight = load / copies
    extra = int((copies[rest] - 1).sum())
    holders = np.zeros((shape.num_experts, num_nodes), dtype=bool)
    holders[copies >= num_nodes] = True
    # Slots for the first copies: what the everywhere experts and the extra copies leave,
    # spread evenly over the nodes (never fewer than the first copies: the counts fill the slots).
    slots_left = num_nodes * (shape.slots_per_node - (shape.num_experts - rest.size)) - extra
    capacity = slots_left // num_nodes + (np.arange(num_nodes) < slots_left % num_nodes)
    limits = hypergraph.Limits(weight[rest].sum() / num_nodes * (1.0 + balance_tolerance),
                               capacity.astype(np.int64),
                               np.ones(shape.num_experts, dtype=np.int64))
    part = _partition(info, shape, weight, rest, limits, max_tokens=max_tokens, seed=seed)
    holders[rest, part[rest]] = True
    node_load = holders.T.astype(float) @ weight
    room = shape.slots_per_node - holders.sum(axis=0)
    for expert in rest[np.argsort(-load[rest], kind="stable")]:
        for _ in range(int(copies[expert]) - 1):
            free = np.flatnonzero((room > 0) & ~holders[expert])
            if free.size == 0:
                if not _make_room(expert, holders, room, node_load, weight):
                    break          # no room anywhere else: the copy stays inside its nodes
                free = np.flatnonzero((room > 0) & ~holders[expert])
            node = free[np.argmin(node_load[free])]
            holders[expert, node] = True
            node_load[node] += weight[expert]
            room[node] -= 1
    return fill_holders(holders, load, shape)


def _make_room(expert: int, holders: np.ndarray, room: np.ndarray, node_load: np.ndarray,
               weight: np.ndarray) -> bool:
    """Free a slot for another copy of ``expert`` when only nodes holding it have room: the
    lightest single-copy expert on a node without ``expert`` moves to a node with room (updates
    the arrays in place). False if no such move exists."""
    single = holders.sum(axis=1) == 1
    best: tuple[float, int, int, int] | None = None
    for target in np.flatnonzero(room > 0):
        for source in np.flatnonzero(~holders[expert]):
            movable = np.flatnonzero(single & holders[:, source] & ~holders[:, target])
            if movable.size:
                pick = int(movable[np.argmin(weight[movable])])
                if best is None or weight[pick] < best[0]:
                    best = (float(weight[pick]), pick, int(source), int(target))
    if best is None:
        return False
    w, x, leave, enter = best
    holders[x, leave], holders[x, enter] = False, True
    room[leave] += 1
    room[enter] -= 1
    node_load[leave] -= w
    node_load[enter] += w
    return True


def _partition(info: LayerRouting, shape: ClusterShape, weight: np.ndarray, rest: np.ndarray,
               limits: hypergraph.Limits, *, max_tokens: int, seed: Sequence[int],
               refine: bool = True) -> np.ndarray:
    """Step 2: node ``int[E]`` of each expert in ``rest`` (-1 for the others, held on every
    node), experts weighing ``weight``, under ``limits`` (demands of all experts). Several
    starts when experts are few; the refined partition with the least node load over the cap,
    then the lowest :func:`hypergraph.touch_cost`, then the lightest busiest node wins."""
    tokens = subsample_tokens(info.tokens, max_tokens, seed)
    pairs = _pairs(info, tokens, rest, shape.num_experts)
    sub = hypergraph.Limits(limits.max_load, limits.capacity, limits.demand[rest])
    rng = np.random.default_rng(list(seed))
    starts = 1 + (min(8, max(0, 256 // shape.num_experts - 1)) if refine else 0)
    best: tuple[tuple[float, float, float], np.ndarray] | None = None
    for start in range(starts if shape.num_nodes > 1 else 1):
        part = np.full(shape.num_experts, -1, dtype=np.int64)
        part[rest] = (hypergraph.grow_partition(pairs, weight[rest], sub) if start == 0
                      else _random_start(sub, rng))
        if refine and shape.num_nodes > 1 and rest.size:
            part[rest] = hypergraph.refine_graph(pairs, weight[rest], part[rest], sub)
            if tokens is not None:
                part = hypergraph.refine_hypergraph(tokens, weight, part, limits)
                part = hypergraph.level_touch(tokens, weight, part, limits)
        node_load = np.bincount(part[rest], weights=weight[rest], minlength=shape.num_nodes)
        key = (float(np.maximum(node_load - limits.max_load, 0.0).sum()),
               _cut(tokens, pairs, part, rest, shape.num_nodes), float(node_load.max(initial=0.0)))
        if best is None or key < best[0]:
            best = (key, part)
    assert best is not None
    return best[1]


def _random_start(limits: hypergraph.Limits, rng: np.random.Generator) -> np.ndarray:
    """A random partition that respects the slot limits: each expert, in random order, to the
    part with the most room left."""
    part = np.empty(limits.demand.size, dtype=np.int64)
    room = limits.capacity.astype(np.int64).copy()
    for expert in rng.permutation(limits.demand.size):
        target = int(np.argmax(room))
        part[expert] = target
        room[target] -= limits.demand[expert]
    return part


def _cut(tokens: np.ndarray | None, pairs: np.ndarray, part: np.ndarray, rest: np.ndarray,
         num_parts: int) -> float:
    """:func:`hypergraph.touch_cost` of the tokens, or (no tokens) the pair weight between
    parts."""
    if tokens is not None:
        return hypergraph.touch_cost(tokens, part, num_parts)
    sub = part[rest]
    return float(pairs[sub[:, None] != sub[None, :]].sum())


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


def fill_nodes(part: np.ndarray, load: np.ndarray, shape: ClusterShape) -> np.ndarray:
    """Step 3 for a given node partition ``part: int[E]`` (-1: a copy on each node): EPLB's
    replicate-and-pack inside every node. Returns the layer's ``int64[ep, slots]``."""
    part = np.asarray(part)
    holders = (part[:, None] < 0) | (part[:, None] == np.arange(shape.num_nodes)[None, :])
    return fill_holders(holders, load, shape)


def fill_holders(holders: np.ndarray, load: np.ndarray, shape: ClusterShape) -> np.ndarray:
    """EPLB's replicate-and-pack inside every node, given which nodes hold a copy of each expert
    (``holders: bool[E, N]``; every expert on at least one node, at most the node's slots on
    each). A copy weighs ``load / copies`` (the share the least-loaded rule gives it when the
    copies' other loads are level); a node's spare slots replicate its heaviest copies, then its
    replicas are packed onto its GPUs by weight (equal slots per GPU) and swapped to level them.
    Returns the layer's ``int64[ep, slots]``."""
    num_nodes, gpus, slots = shape.num_nodes, shape.devices_per_node, shape.slots_per_device
    copies = np.maximum(holders.sum(axis=1), 1)
    table = np.empty((shape.device_node.size, slots), dtype=np.int64)
    for node in range(num_nodes):
        local = np.flatnonzero(holders[:, node])
        if local.size == 0:   # fewer experts than nodes: copies of the hottest serve this one
            local = np.argsort(-load, kind="stable")[:1]
        # Zero loads still need a slot each; a tiny weight keeps the greedy deterministic.
        local_load = load[local] / copies[local] + 1e-12
        to_local, _, count = replicate_experts(local_load[None, :], shape.slots_per_node)
        replica_load = (local_load / count[0])[to_local[0]]
        gpu = _improve_packing(replica_load, to_local[0],
                               balanced_packing(replica_load[None, :], gpus)[0][0], gpus)
        rank = np.zeros_like(gpu)
        for g in range(gpus):
            rank[gpu == g] = np.arange(slots)
        devices = shape.node_devices(node)
        table[devices[gpu], rank] = local[to_local[0]]
    return table


def _improve_packing(weight: np.ndarray, item: np.ndarray, gpu: np.ndarray, gpus: int,
                     max_swaps: int = 64) -> np.ndarray:
    """Swap replicas between the hottest GPU and another while that lowers the hotter of the
    two; never two copies of one expert on a GPU. ``weight, item, gpu: [replicas]`` (load,
    expert, GPU of each replica). Returns the new ``gpu``."""
    gpu = gpu.copy()
    loads = np.bincount(gpu, weights=weight, minlength=gpus)
    for _ in range(max_swaps):
        hot = int(np.argmax(loads))
        mine, other = np.flatnonzero(gpu == hot), np.flatnonzero(gpu != hot)
        if other.size == 0:
            break
        delta = weight[mine][:, None] - weight[other][None, :]              # [a, b]
        worse = np.maximum(loads[hot] - delta, loads[gpu[other]][None, :] + delta)
        holds = np.zeros((gpus, int(item.max()) + 1), dtype=bool)
        holds[gpu, item] = True
        clash = holds[hot][item[other]][None, :] | holds[gpu[other][None, :],
                                                         item[mine][:, None]]
        worse = np.where((delta > 0) & ~clash, worse, np.inf)
        a, b = divmod(int(np.argmin(worse)), other.size)
        if not worse[a, b] < loads[hot] * (1.0 - 1e-9):
            break
        i, j = mine[a], other[b]
        loads[hot] -= delta[a, b]
        loads[gpu[j]] += delta[a, b]
        gpu[i], gpu[j] = gpu[j], hot
    return gpu


# ----------------------------------------------------------------------------- inputs


def routing_from_trace(trace: routing_trace.RoutingTrace) -> list[LayerRouting]:
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
