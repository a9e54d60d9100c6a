"""Balance under the simulator's replica choice, and local search on the objective.

:func:`expected_device_loads` is the load each device computes when every device routes the
same share of each expert's tokens and picks replicas as the simulator does (same device, then
same node, then all); :func:`balance` is its max/mean, the planner's balance measure, and
:func:`eplb_balance` EPLB's, the bar the planner must not fall below.

:func:`regroup_devices` moves whole devices' contents between nodes so that co-activated experts
share nodes (the planner's fallback improves EPLB's plan this way: device loads stay as they
are). :func:`polish_layer` is the planner's last step: iterated local search on the objective
itself (predicted layer time, closed form) with slot swaps between devices, within a budget
of objective evaluations.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from moesim.placement import hypergraph
from moesim.placement.eplb import eplb_rebalance
from moesim.placement.problem import ClusterShape, LayerRouting, subsample_tokens

__all__ = ["expected_device_loads", "balance", "eplb_tables", "eplb_best", "eplb_balance",
           "regroup_devices", "polish_layer"]

Score = Callable[[int, np.ndarray], float]     # (layer, slot_expert [ep, slots]) -> seconds


def expected_device_loads(load: np.ndarray, table: np.ndarray, shape: ClusterShape,
                          pairs_per_device: float | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation ``([ep], [ep])`` of each device's load for one layer's slots
    ``table: [ep, slots]``.

    Every device routes ``pairs_per_device`` token-expert pairs per batch, expert ``e`` taking
    a Poisson number of them with mean ``pairs_per_device * load[e] / sum(load)``, and picks
    replicas as the simulator does (:meth:`Placement.replica_share`: the copy on the device,
    else those on its node by slot count, else all). ``pairs_per_device=None``: loads in units
    of ``load / ep`` per device and no spread.
    """
    load = np.asarray(load, dtype=float)
    ep, experts = table.shape[0], shape.num_experts
    scale = load / ep if pairs_per_device is None else pairs_per_device * load / load.sum()
    holds = np.zeros((experts, ep))
    np.add.at(holds, (table, np.arange(ep)[:, None]), 1.0)
    own = holds > 0                                                   # [E, src]: keeps its own
    mean = (own * scale[:, None]).sum(axis=0)
    var = mean.copy()
    everywhere = holds / holds.sum(axis=1, keepdims=True)             # [E, dst]
    for node in range(shape.num_nodes):
        members = shape.node_devices(node)
        local = np.zeros_like(holds)
        local[:, members] = holds[:, members]
        on_node = local.sum(axis=1, keepdims=True)
        split = np.where(on_node > 0, local / np.maximum(on_node, 1.0), everywhere)
        senders = (~own[:, members]).sum(axis=1) * scale              # [E] pairs sent off-device
        mean += senders @ split
        var += senders @ split**2
    return mean, (np.zeros(ep) if pairs_per_device is None else np.sqrt(var))


def balance(load: np.ndarray, table: np.ndarray, shape: ClusterShape,
            pairs_per_device: float | None = None) -> float:
    """Expected max/mean device load of one layer's slots: ``max(mean + z * std) / mean`` of
    :func:`expected_device_loads`, with ``z = sqrt(2 ln ep)`` (about the largest of ``ep``
    standard normal draws): small batches make node-local copies noisier than spread ones."""
    mean, std = expected_device_loads(load, table, shape, pairs_per_device)
    z = np.sqrt(2.0 * np.log(max(table.shape[0], 2)))
    return float((mean + z * std).max() / mean.mean()) if mean.mean() > 0 else 1.0


def eplb_tables(load: np.ndarray, shape: ClusterShape) -> list[np.ndarray]:
    """EPLB's plans of one layer (``load: [E]``) as ``slot_expert [ep, slots]``: its
    hierarchical policy (groups packed to nodes when the experts divide evenly), then its
    global one."""
    nodes, ep = shape.num_nodes, shape.device_node.size
    physical = ep * shape.slots_per_device
    groups = nodes if shape.num_experts % nodes == 0 else 1
    # EPLB numbers GPUs node by node; our devices of node k are shape.node_devices(k).
    order = np.concatenate([shape.node_devices(k) for k in range(nodes)])
    out = []
    for g, n in ((groups, nodes), (1, 1)):
        flat = eplb_rebalance(np.asarray(load, dtype=float)[None], physical, g, n, ep)
        table = np.empty((ep, shape.slots_per_device), dtype=np.int64)
        table[order] = flat.physical_to_logical.reshape(ep, -1)
        out.append(table)
    return out


def eplb_best(load: np.ndarray, shape: ClusterShape, pairs_per_device: float | None = None
              ) -> tuple[np.ndarray, float]:
    """EPLB's plan of one layer (``load: [E]``), the better balanced of its hierarchical and
    global policies (:func:`eplb_tables`): ``(slot_expert [ep, slots], its balance)``."""
    spread = [(table, balance(load, table, shape, pairs_per_device))
              for table in eplb_tables(load, shape)]
    return min(spread, key=lambda option: option[1])


def eplb_balance(loads: list[np.ndarray], shape: ClusterShape,
                 pairs_per_device: float | None = None) -> float:
    """Mean over layers (``loads``: one ``[E]`` each) of :func:`eplb_best`'s balance."""
    return float(np.mean([eplb_best(load, shape, pairs_per_device)[1] for load in loads]))


def regroup_devices(table: np.ndarray, info: LayerRouting, shape: ClusterShape, *,
                    max_tokens: int = 4096, seed: Sequence[int] = (0,)) -> np.ndarray:
    """``table: [ep, slots]`` with whole devices' contents swapped between nodes so that
    co-activated experts share nodes, no node's load rising above the most loaded node's
    (step 2's refinement on devices instead of experts: each device's load stays as it is).
    An expert counts on the device of its first copy."""

    tokens = subsample_tokens(info.tokens, max_tokens, seed)
    if tokens is None or shape.num_nodes == 1:
        return table
    ep = table.shape[0]
    device_of = np.full(shape.num_experts, -1, dtype=np.int64)
    for device in range(ep - 1, -1, -1):
        device_of[table[device]] = device
    device_tokens = device_of[tokens]
    load = expected_device_loads(info.load, table, shape)[0]
    part = shape.device_node.astype(np.int64)
    cap = np.bincount(part, weights=load).max()
    limits = hypergraph.Limits(cap, np.full(shape.num_nodes, shape.devices_per_node),
                               np.ones(ep, dtype=np.int64))
    part = hypergraph.refine_graph(hypergraph.coactivation(device_tokens, ep), load, part,
                                   limits)
    part = hypergraph.refine_hypergraph(device_tokens, load, part, limits)
    out = np.empty_like(table)
    for node in range(shape.num_nodes):
        out[shape.node_devices(node)] = table[np.flatnonzero(part == node)]
    return out


def polish_layer(table: np.ndarray, layer: int, info: LayerRouting, shape: ClusterShape,
                 score: Score, evaluations: int, *, seed: Sequence[int],
                 pairs_per_device: float | None = None) -> np.ndarray:
    """:func:`_polish` with ``evaluations`` objective evaluations, kept only if its expected
    balance is no worse than the table's own: polish may not buy time with balance. A budget
    in evaluations, not seconds, keeps the plan the same on a fast or a busy machine."""
    if evaluations <= 0:
        return table
    polished = _polish(table, layer, info, shape, score, evaluations, seed=seed)
    if np.array_equal(polished, table):
        return table
    limit = balance(info.load, table, shape, pairs_per_device)
    return polished if balance(info.load, polished, shape, pairs_per_device) <= limit + 1e-12 \
        else table


def _polish(table: np.ndarray, layer: int, info: LayerRouting, shape: ClusterShape,
            score: Score, evaluations: int, seed: Sequence[int] = (0,), kicks: int = 16
            ) -> np.ndarray:
    """Iterated local search on the objective: swap the experts of two slots on different
    devices while that helps (first improvement, the most loaded devices' slots first), then
    up to ``kicks`` times restart from the best with two random swaps; at most
    ``evaluations`` calls of ``score``. ``table: [ep, slots]``; returns the best found."""
    rng = np.random.default_rng([*seed, 1])
    best_table = table.copy()
    left = [evaluations]
    best = _climb(best_table, layer, info, shape, score, left)
    for _ in range(kicks):
        if left[0] <= 0:
            break
        trial = best_table.copy()
        for _ in range(2):
            i, j = _random_swap(trial, shape, rng)
            trial.reshape(-1)[[i, j]] = trial.reshape(-1)[[j, i]]
        cost = _climb(trial, layer, info, shape, score, left)
        if cost < best * (1.0 - 1e-12):
            best, best_table = cost, trial
    return best_table


def _climb(table: np.ndarray, layer: int, info: LayerRouting, shape: ClusterShape,
           score: Score, left: list[int]) -> float:
    """First-improvement slot swaps on ``table`` (in place) until none helps or the
    evaluations ``left[0]`` (decremented) run out; its cost."""
    flat = table.reshape(-1)
    device = np.arange(flat.size) // shape.slots_per_device
    best = score(layer, table)
    left[0] -= 1
    improved = True
    while improved and left[0] > 0:
        improved = False
        hot = np.argsort(-expected_device_loads(info.load, table, shape)[0], kind="stable")
        order = np.concatenate([np.flatnonzero(device == d) for d in hot])
        for i, j in itertools.combinations(order, 2):
            if left[0] <= 0:
                break
            if not _swappable(table, device, i, j):
                continue
            flat[i], flat[j] = flat[j], flat[i]
            cost = score(layer, table)
            left[0] -= 1
            if cost < best * (1.0 - 1e-12):
                best, improved = cost, True
                break
            flat[i], flat[j] = flat[j], flat[i]
    return best


def _swappable(table: np.ndarray, device: np.ndarray, i: int, j: int) -> bool:
    """Slots i and j (flat) hold different experts on different devices, and swapping them
    puts no second copy of an expert on a device."""
    flat = table.reshape(-1)
    return bool(device[i] != device[j] and flat[i] != flat[j]
                and flat[j] not in table[device[i]] and flat[i] not in table[device[j]])


def _random_swap(table: np.ndarray, shape: ClusterShape, rng: np.random.Generator
                 ) -> tuple[int, int]:
    device = np.arange(table.size) // shape.slots_per_device
    for _ in range(64):
        i, j = (int(x) for x in rng.choice(table.size, 2, replace=False))
        if _swappable(table, device, i, j):
            return i, j
    return 0, 0
