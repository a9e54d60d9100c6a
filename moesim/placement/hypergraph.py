"""Balanced partition of experts over nodes that keeps co-activated experts together.

Under hierarchical (DeepEP-style) dispatch a token crosses the network once per remote node that
holds one of its top-k experts. Summed over tokens this is the *connectivity* of the token
hypergraph (vertices: experts; one hyperedge per token, over its k experts) under the partition
of experts into nodes: the number of distinct parts each token's experts lie in. This module finds
partitions with low connectivity under two caps per part: total expert load (``max_load``) and
number of experts (``max_size``). Experts marked with part -1 (replicated on every node) are
local to every token and take no part in the hypergraph.

1. :func:`balanced_start`: longest-processing-time packing by load, a balanced starting point.
2. :func:`refine_graph`: moves and swaps on the clique expansion (pair co-activation counts),
   Kernighan-Lin style but greedy: the best feasible move or swap each step, vectorised.
3. :func:`refine_hypergraph`: moves with exact connectivity gains, Fiduccia-Mattheyses style,
   all gains recomputed per round from per-token part counts.

All functions are deterministic: ties go to the lowest expert, then the lowest part.
"""

from __future__ import annotations

import numpy as np

__all__ = ["coactivation", "connectivity", "balanced_start", "refine_graph",
           "refine_hypergraph"]

_EPS = 1e-9


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


def balanced_start(load: np.ndarray, num_parts: int, max_size: np.ndarray) -> np.ndarray:
    """Heaviest expert first, each to the lightest part with room: ``int[E]`` part of each expert.

    ``load: [E]``; ``max_size: int[num_parts]`` experts each part may hold (sum >= E).
    """
    part = np.empty(load.size, dtype=np.int64)
    weight = np.zeros(num_parts)
    size = np.zeros(num_parts, dtype=np.int64)
    for expert in np.argsort(-load, kind="stable"):
        target = int(np.argmin(np.where(size < max_size, weight, np.inf)))
        part[expert] = target
        weight[target] += load[expert]
        size[target] += 1
    return part


def grow_partition(pairs: np.ndarray, load: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Grow all parts together, the lightest part taking its most co-activated free expert.

    Seeds: the heaviest expert, then repeatedly the heaviest among the free experts least
    co-activated with the seeds so far. Then, until every expert is placed, the lightest part
    with room takes the free expert with the largest pair weight to its members (heavier first
    among equals), so that loads stay level while co-activated experts gather.
    ``pairs: [E, E]``, ``load: [E]``, ``sizes: int[P]`` experts per part, summing to E.
    Returns ``int[E]``.
    """
    num_experts, num_parts = load.size, sizes.size
    part = np.full(num_experts, -1, dtype=np.int64)
    free = np.ones(num_experts, dtype=bool)
    inside = np.zeros((num_experts, num_parts))
    weight = np.zeros(num_parts)
    size = np.zeros(num_parts, dtype=np.int64)
    tie = load / (load.max() + 1.0) * 1e-6                      # heavier first among equals

    def place(expert: int, target: int) -> None:
        part[expert], free[expert] = target, False
        weight[target] += load[expert]
        size[target] += 1
        inside[:, target] += pairs[:, expert]

    for target in range(num_parts):                              # seeds
        if size[target] >= sizes[target]:
            continue
        near = inside.sum(axis=1)
        score = np.where(free, -near + tie, -np.inf)
        place(int(np.argmax(score)), target)
    while free.any():
        target = int(np.argmin(np.where(size < sizes, weight, np.inf)))
        score = np.where(free, inside[:, target] + tie, -np.inf)
        place(int(np.argmax(score)), target)
    return part


def refine_graph(pairs: np.ndarray, load: np.ndarray, part: np.ndarray, max_load: float,
                 max_size: np.ndarray, max_rounds: int = 400) -> np.ndarray:
    """Moves and swaps that first remove load above ``max_load``, then raise kept co-activation.

    Each round scores every move (expert to another part with room) and, when no move helps,
    every swap: primary key the change in total overload ``sum_p max(0, load_p - max_load)``,
    secondary the pair weight brought inside parts. It then applies the best ones greedily, at
    most one per part per round (so their gains do not interact).

    Parameters
    ----------
    pairs : float [E, E]
        Symmetric pair weights, zero diagonal.
    load : float [E]
    part : int [E]
        Starting partition (not modified).
    max_load : float
    max_size : int [P]
        Experts each part may hold.
    max_rounds : int

    Returns
    -------
    int [E]: the refined partition.
    """
    part = part.copy()
    num_parts = max_size.size
    inside = pairs @ np.eye(num_parts)[part]                     # [E, P] weight to each part
    weight = np.bincount(part, weights=load, minlength=num_parts)
    size = np.bincount(part, minlength=num_parts)
    # Lexicographic: one unit of overload outweighs all the pair weight there is.
    big = 4.0 * (pairs.sum() + 1.0) / max(float(load[load > 0].min(initial=1.0)), _EPS)
    for _ in range(max_rounds):
        changes = _moves(inside, load, part, weight, size, max_load, max_size, big)
        if not changes:
            changes = _swaps(pairs, inside, load, part, weight, max_load, big)
        if not changes:
            break
        for expert, target in changes:
            _move(expert, target, part, inside, pairs, weight, size, load)
    return part


def _over(weight: np.ndarray, max_load: float) -> np.ndarray:
    return np.maximum(weight - max_load, 0.0)


def _moves(inside, load, part, weight, size, max_load, max_size, big) -> list[tuple[int, int]]:
    """Best improving moves ``(expert, target part)``, each part used at most once."""
    num_experts, num_parts = inside.shape
    own = inside[np.arange(num_experts), part]
    src_w = weight[part]
    d_over = (_over(src_w - load, max_load) - _over(src_w, max_load))[:, None] + (
        _over(weight[None, :] + load[:, None], max_load) - _over(weight, max_load)[None, :])
    score = inside - own[:, None] - big * d_over
    ok = (size < max_size)[None, :] & (part[:, None] != np.arange(num_parts)[None, :])
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


def _swaps(pairs, inside, load, part, weight, max_load, big) -> list[tuple[int, int]]:
    """Best improving swaps, each part used at most once; returned as two moves each."""
    num_experts, num_parts = inside.shape
    own = inside[np.arange(num_experts), part]
    to_other = inside[:, part]                                   # [e, f]: e's weight to f's part
    gain = to_other - own[:, None] + to_other.T - own[None, :] - 2.0 * pairs
    w = weight[part]
    new_e = w[:, None] - load[:, None] + load[None, :]           # e's part after the swap
    before = _over(w, max_load)
    d_over = _over(new_e, max_load) + _over(new_e.T, max_load) - before[:, None] - before[None, :]
    upper = part[:, None] < part[None, :]                        # each unordered pair once
    score = np.where(upper, gain - big * d_over, -np.inf)
    chosen: list[tuple[int, int]] = []
    for _ in range(num_parts // 2):
        e, f = divmod(int(np.argmax(score)), num_experts)
        if not score[e, f] > _EPS:
            break
        a, b = int(part[e]), int(part[f])
        chosen += [(e, b), (f, a)]
        used = (part == a) | (part == b)
        score[used] = -np.inf
        score[:, used] = -np.inf
    return chosen


def _move(expert, target, part, inside, pairs, weight, size, load) -> None:
    source = part[expert]
    inside[:, source] -= pairs[:, expert]
    inside[:, target] += pairs[:, expert]
    weight[source] -= load[expert]
    weight[target] += load[expert]
    size[source] -= 1
    size[target] += 1
    part[expert] = target


def refine_hypergraph(tokens: np.ndarray, load: np.ndarray, part: np.ndarray, max_load: float,
                      max_size: np.ndarray, rounds: int = 8) -> np.ndarray:
    """Moves that lower the exact connectivity, in rounds of non-overlapping moves.

    ``tokens: int[T, k]``; ``part: int[E]`` (-1: held everywhere, never moved). Each round
    computes every expert's gain for every part from the per-token part counts, then applies
    the best feasible moves in order of gain, re-evaluating an expert whose tokens an earlier
    move of the round touched. Stops after ``rounds`` rounds or a round without a move.
    Returns the refined ``int[E]`` partition.
    """
    part = part.copy()
    num_parts = max_size.size
    movable = part >= 0
    tok_of, ptr = _tokens_by_expert(tokens, load.size)
    counts = _part_counts(tokens, part, num_parts)                # [T, P]
    weight = np.bincount(part[movable], weights=load[movable], minlength=num_parts)
    size = np.bincount(part[movable], minlength=num_parts)
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
            gain = np.where((weight + load[expert] <= max(max_load, 0) + _EPS)
                            & (size < max_size), gain, -np.inf)
            gain[part[expert]] = -np.inf
            target = int(np.argmax(gain))
            if gain[target] <= _EPS:
                continue
            source = part[expert]
            counts[rows, source] -= 1
            counts[rows, target] += 1
            weight[source] -= load[expert]
            weight[target] += load[expert]
            size[source] -= 1
            size[target] += 1
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
    counts = np.zeros((tokens.shape[0], num_parts + 1), dtype=np.int32)
    rows = np.repeat(np.arange(tokens.shape[0]), tokens.shape[1])
    np.add.at(counts, (rows, part[tokens].ravel()), 1)         # -1 lands in the spare column
    return counts[:, :num_parts].copy()


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
    enters = (rows == 0)
    starts = ptr[nonempty]
    gains[nonempty] = (np.add.reduceat(leaves.astype(np.float64), starts)[:, None]
                       - np.add.reduceat(enters.astype(np.float64), starts, axis=0))
    gains[np.arange(num_experts), np.maximum(part, 0)] = 0.0
    return gains


def _expert_gains(rows: np.ndarray, own: int) -> np.ndarray:
    """Gains ``[P]`` of moving one expert whose tokens' part counts are ``rows: [n, P]``."""
    return (rows[:, own] == 1).sum() - (rows == 0).sum(axis=0).astype(np.float64)
