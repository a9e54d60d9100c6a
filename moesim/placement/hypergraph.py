"""Balanced partition of experts over nodes that keeps co-activated experts together.

Under hierarchical (DeepEP-style) dispatch a token crosses the network once per remote node that
holds one of its top-k experts. Summed over tokens this is the *connectivity* of the token
hypergraph (vertices: experts; one hyperedge per token, over its k experts) under the partition
of experts into nodes: the number of distinct parts each token's experts lie in. This module finds
partitions with low connectivity under two limits per part (:class:`Limits`): the total expert
load, and the slots its experts demand (an expert hotter than one GPU's share needs replicas
inside its node, hence several slots). Experts marked with part -1 (held on every node) are local
to every token and take no part in the hypergraph.

1. :func:`grow_partition`: all parts grow together, the lightest taking the free expert most
   co-activated with its members, so loads stay level while co-activated experts gather.
2. :func:`refine_graph`: moves and swaps on the clique expansion (pair co-activation counts),
   Kernighan-Lin style but greedy: first removing load above the cap, then raising the pair
   weight kept inside parts; the best feasible changes each round, vectorised.
3. :func:`refine_hypergraph`: moves with exact connectivity gains, Fiduccia-Mattheyses style,
   all gains recomputed per round from per-token part counts.

All functions are deterministic: ties go to the lowest expert, then the lowest part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Limits", "coactivation", "connectivity", "grow_partition", "refine_graph",
           "refine_hypergraph"]

_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class Limits:
    """What each part may hold: ``load <= max_load`` and ``sum(demand) <= capacity[part]``."""

    max_load: float
    capacity: np.ndarray   # int[P] slots of each part
    demand: np.ndarray     # int[E] slots each expert needs (>= 1)

    @property
    def num_parts(self) -> int:
        return int(self.capacity.size)


def coactivation(tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens that chose both i and j: symmetric ``float64[E, E]`` with a zero diagonal.

    ``tokens: int[T, k]`` distinct expert ids of each token.
    """
    k = tokens.shape[1]
    first, second = np.triu_indices(k, 1)
    flat = (tokens[:, first].astype(np.int64) * num_experts + tokens[:, second]).ravel()
    pairs = np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, -1)
    pairs = (pairs + pairs.T).astype(np.float64)
    np.fill_diagonal(pairs, 0.0)
    return pairs


def connectivity(tokens: np.ndarray, part: np.ndarray) -> float:
    """Sum over tokens of the number of distinct parts (>= 0) holding its experts.

    ``tokens: int[T, k]``; ``part: int[E]`` part of each expert, -1 for experts held everywhere.
    """
    if tokens.size == 0:
        return 0.0
    parts = np.sort(part[tokens], axis=1)
    distinct = (parts[:, 1:] != parts[:, :-1]) & (parts[:, 1:] >= 0)
    return float(distinct.sum() + (parts[:, 0] >= 0).sum())


def grow_partition(pairs: np.ndarray, load: np.ndarray, limits: Limits) -> np.ndarray:
    """Grow all parts together; returns ``int[E]`` part of each expert.

    Seeds: the heaviest expert, then repeatedly the heaviest among the free experts least
    co-activated with the seeds so far. Then, until every expert is placed, the lightest part
    with room takes the free expert (that fits its room) with the largest pair weight to its
    members, heavier first among equals. ``pairs: [E, E]``, ``load: [E]``. When no part has room
    for any free expert's demand, demands count as 1 from then on (each expert needs a slot).
    """
    num_experts, num_parts = load.size, limits.num_parts
    demand = limits.demand.copy()
    part = np.full(num_experts, -1, dtype=np.int64)
    free = np.ones(num_experts, dtype=bool)
    inside = np.zeros((num_experts, num_parts))
    weight = np.zeros(num_parts)
    size = np.zeros(num_parts, dtype=np.int64)
    tie = load / (load.max() + 1.0) * 1e-6                      # heavier first among equals

    def place(expert: int, target: int) -> None:
        part[expert], free[expert] = target, False
        weight[target] += load[expert]
        size[target] += demand[expert]
        inside[:, target] += pairs[:, expert]

    for target in range(min(num_parts, num_experts)):           # seeds
        near = inside.sum(axis=1)
        fits = free & (demand <= limits.capacity[target] - size[target])
        if fits.any():
            place(int(np.argmax(np.where(fits, -near + tie, -np.inf))), target)
    while free.any():
        room = limits.capacity - size
        smallest = demand[free].min()
        open_parts = room >= smallest
        if not open_parts.any():
            demand[free] = 1
            continue
        target = int(np.argmin(np.where(open_parts, weight, np.inf)))
        fits = free & (demand <= room[target])
        place(int(np.argmax(np.where(fits, inside[:, target] + tie, -np.inf))), target)
    return part


def refine_graph(pairs: np.ndarray, load: np.ndarray, part: np.ndarray, limits: Limits,
                 max_rounds: int = 400) -> np.ndarray:
    """Moves and swaps that first remove load above the cap, then raise kept co-activation.

    Each round scores every move (an expert to another part with room) and, when no move helps,
    every swap: primary key the change in total overload ``sum_p max(0, load_p - max_load)``,
    secondary the pair weight brought inside parts. It applies the best ones greedily, each part
    in at most one change per round (so that their gains do not interact). No change may push a
    part's demanded slots above its capacity (or above where they already are).

    ``pairs: [E, E]`` symmetric, zero diagonal; ``load: [E]``; ``part: int[E]`` the start (not
    modified). Returns the refined ``int[E]``.
    """
    part = part.copy()
    num_parts = limits.num_parts
    inside = pairs @ np.eye(num_parts)[part]                     # [E, P] weight to each part
    weight = np.bincount(part, weights=load, minlength=num_parts)
    size = np.bincount(part, weights=limits.demand, minlength=num_parts).astype(np.int64)
    # Lexicographic: one unit of overload outweighs all the pair weight there is.
    big = 4.0 * (pairs.sum() + 1.0) / max(float(load[load > 0].min(initial=1.0)), _EPS)
    state = (part, inside, pairs, weight, size, load, limits.demand)
    for _ in range(max_rounds):
        changes = _moves(inside, load, part, weight, size, limits, big)
        if not changes:
            changes = _swaps(pairs, inside, load, part, weight, size, limits, big)
        if not changes:
            break
        for expert, target in changes:
            _move(expert, target, *state)
    return part


def _over(weight: np.ndarray, max_load: float) -> np.ndarray:
    return np.maximum(weight - max_load, 0.0)


def _moves(inside, load, part, weight, size, limits, big) -> list[tuple[int, int]]:
    """Best improving moves ``(expert, target part)``, each part used at most once."""
    num_experts, num_parts = inside.shape
    cap = limits.max_load
    own = inside[np.arange(num_experts), part]
    src_w = weight[part]
    d_over = (_over(src_w - load, cap) - _over(src_w, cap))[:, None] + (
        _over(weight[None, :] + load[:, None], cap) - _over(weight, cap)[None, :])
    score = inside - own[:, None] - big * d_over
    ok = (size[None, :] + limits.demand[:, None] <= limits.capacity[None, :]) & (
        part[:, None] != np.arange(num_parts)[None, :])
    score = np.where(ok, score, -np.inf)
    chosen: list[tuple[int, int]] = []
    for _ in range(num_parts // 2):
        e, b = divmod(int(np.argmax(score)), num_parts)
        if not score[e, b] > _EPS:
            break
        a = int(part[e])
        chosen.append((e, b))
        score[(part == a) | (part == b)] = -np.inf
        score[:, [a, b]] = -np.inf
    return chosen


def _swaps(pairs, inside, load, part, weight, size, limits, big) -> list[tuple[int, int]]:
    """Best improving swaps, each part used at most once; returned as two moves each."""
    num_experts = load.size
    own = inside[np.arange(num_experts), part]
    to_other = inside[:, part]                                   # [e, f]: e's weight to f's part
    gain = to_other - own[:, None] + to_other.T - own[None, :] - 2.0 * pairs
    w = weight[part]
    new_e = w[:, None] - load[:, None] + load[None, :]           # e's part after the swap
    before = _over(w, limits.max_load)
    d_over = (_over(new_e, limits.max_load) + _over(new_e.T, limits.max_load)
              - before[:, None] - before[None, :])
    demand = limits.demand
    slots = size[part][:, None] - demand[:, None] + demand[None, :]  # e's part's slots after
    room = np.maximum(limits.capacity[part], size[part])[:, None]
    ok = (part[:, None] < part[None, :]) & (slots <= room) & (slots.T <= room.T)
    score = np.where(ok, gain - big * d_over, -np.inf)
    chosen: list[tuple[int, int]] = []
    for _ in range(limits.num_parts // 2):
        e, f = divmod(int(np.argmax(score)), num_experts)
        if not score[e, f] > _EPS:
            break
        a, b = int(part[e]), int(part[f])
        chosen += [(e, b), (f, a)]
        used = (part == a) | (part == b)
        score[used] = -np.inf
        score[:, used] = -np.inf
    return chosen


def _move(expert, target, part, inside, pairs, weight, size, load, demand) -> None:
    source = part[expert]
    inside[:, source] -= pairs[:, expert]
    inside[:, target] += pairs[:, expert]
    weight[source] -= load[expert]
    weight[target] += load[expert]
    size[source] -= demand[expert]
    size[target] += demand[expert]
    part[expert] = target


def refine_hypergraph(tokens: np.ndarray, load: np.ndarray, part: np.ndarray, limits: Limits,
                      rounds: int = 8) -> np.ndarray:
    """Moves that lower the exact connectivity, in rounds.

    ``tokens: int[T, k]``; ``part: int[E]`` (-1: held everywhere, never moved). Each round
    computes every expert's gain for every part from the per-token part counts, then applies
    the best feasible moves in order of gain, re-evaluating an expert whose tokens an earlier
    move of the round touched. Stops after ``rounds`` rounds or a round without a move.
    Returns the refined ``int[E]`` partition.
    """
    part = part.copy()
    num_parts = limits.num_parts
    movable = part >= 0
    tok_of, ptr = _tokens_by_expert(tokens, load.size)
    counts = _part_counts(tokens, part, num_parts)                # [T, P]
    weight = np.bincount(part[movable], weights=load[movable], minlength=num_parts)
    size = np.bincount(part[movable], weights=limits.demand[movable], minlength=num_parts)
    for _ in range(rounds):
        gains = _all_gains(counts, tok_of, ptr, part, num_parts)   # [E, P]
        gains[~movable] = -np.inf
        best = gains.max(axis=1)
        touched = np.zeros(tokens.shape[0], dtype=bool)
        moved = 0
        for expert in np.argsort(-best, kind="stable"):
            if best[expert] <= _EPS:
                break
            rows = tok_of[ptr[expert]:ptr[expert + 1]]
            gain = gains[expert]
            if touched[rows].any():
                gain = _expert_gains(counts[rows], part[expert])
            fits = (weight + load[expert] <= limits.max_load + _EPS) & (
                size + limits.demand[expert] <= limits.capacity)
            gain = np.where(fits, gain, -np.inf)
            gain[part[expert]] = -np.inf
            target = int(np.argmax(gain))
            if gain[target] <= _EPS:
                continue
            source = part[expert]
            counts[rows, source] -= 1
            counts[rows, target] += 1
            weight[source] -= load[expert]
            weight[target] += load[expert]
            size[source] -= limits.demand[expert]
            size[target] += limits.demand[expert]
            part[expert] = target
            touched[rows] = True
            moved += 1
        if moved == 0:
            break
    return part


def _tokens_by_expert(tokens: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the tokens of each expert: rows ``tok_of[ptr[e]:ptr[e + 1]]``."""
    flat = tokens.ravel()
    order = np.argsort(flat, kind="stable")
    tok_of = order // tokens.shape[1]
    ptr = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_experts), out=ptr[1:])
    return tok_of, ptr


def _part_counts(tokens: np.ndarray, part: np.ndarray, num_parts: int) -> np.ndarray:
    """``int32[T, P]``: experts of each token in each part (parts -1 ignored)."""
    flat = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1]) * (num_parts + 1)
    flat += part[tokens].ravel() % (num_parts + 1)               # -1 lands in the spare column
    counts = np.bincount(flat, minlength=tokens.shape[0] * (num_parts + 1))
    return counts.reshape(tokens.shape[0], num_parts + 1)[:, :num_parts].astype(np.int32)


def _all_gains(counts, tok_of, ptr, part, num_parts) -> np.ndarray:
    """Connectivity gain of moving each expert to each part: ``[E, P]`` (own part: 0)."""
    num_experts = ptr.size - 1
    gains = np.zeros((num_experts, num_parts))
    nonempty = np.flatnonzero(np.diff(ptr) > 0)
    if nonempty.size == 0:
        return gains
    expert_of = np.repeat(np.arange(num_experts), np.diff(ptr))
    rows = counts[tok_of]                                        # [nnz, P]
    own = part[expert_of]
    leaves = (rows[np.arange(rows.shape[0]), np.maximum(own, 0)] == 1) & (own >= 0)
    starts = ptr[nonempty]
    gains[nonempty] = (np.add.reduceat(leaves.astype(np.float64), starts)[:, None]
                       - np.add.reduceat((rows == 0).astype(np.float64), starts, axis=0))
    gains[np.arange(num_experts), np.maximum(part, 0)] = 0.0
    return gains


def _expert_gains(rows: np.ndarray, own: int) -> np.ndarray:
    """Gains ``[P]`` of moving one expert whose tokens' part counts are ``rows: [n, P]``."""
    return (rows[:, own] == 1).sum() - (rows == 0).sum(axis=0).astype(np.float64)
