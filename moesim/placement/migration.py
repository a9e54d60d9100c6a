"""Migration budget: change only the layers worth the expert weights they move.

Moving a plan onto a running cluster copies, for every slot whose expert changes, one expert's
weights over the network. :func:`align_to` first relabels a new layer plan (nodes, GPUs of a
node and slots of a GPU are interchangeable) to keep as many slots as possible; then
:func:`within_budget` changes the layers with the best gain per byte moved until the budget is
spent, keeping the current slots of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from moesim.errors import InfeasiblePlacement
from moesim.placement import hypergraph
from moesim.placement.baselines import device_loads
from moesim.placement.placement import Placement
from moesim.placement.problem import ClusterShape, LayerRouting

__all__ = ["within_budget", "align_to", "moved_slots"]

Score = Callable[[int, np.ndarray], float]     # (layer, slot_expert [ep, slots]) -> seconds


def within_budget(table: np.ndarray, current: Placement, layers: Sequence[LayerRouting],
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
