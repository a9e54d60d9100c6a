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
4. :func:`level_touch`: moves and swaps that lower the busiest part's *touch* (tokens with an
   expert in it) plus the mean touch (:func:`touch_cost`). A node's network ingress under
   hierarchical dispatch is its touch (times the share of tokens from other nodes), and the
   all-to-all lasts as long as the busiest node's NICs; connectivity is only the sum of the
   touches, so a low-connectivity partition can still leave one node receiving far more.

All functions are deterministic: ties go to the lowest expert, then the lowest part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Limits", "coactivation", "connectivity", "touch", "touch_cost", "grow_partition",
           "refine_graph", "refine_hypergraph", "level_touch"]

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


def touch(tokens: np.ndarray, part: np.ndarray, num_parts: int) -> np.ndarray:
    """``float[P]``: tokens with at least one expert in each part (parts -1 ignored).

    Their sum is :func:`connectivity`.
    """
    if tokens.size == 0:
        return np.zeros(num_parts)
    return (_part_counts(tokens, part, num_parts) > 0).sum(axis=0).astype(np.float64)


def grow_partition(pairs: np.ndarray, load: np.ndarray, limits: Limits) -> np.ndarray:
    """Grow all parts together; returns ``int[E]`` part of each expert.

    Seeds: the heaviest expert, then repeatedly the heaviest among the free experts least
    co-activated with the seeds so far. Then, until every expert is placed, the lightest part
    with room takes the free expert (that fits its room) with the largest pair weight to its
    members, heavier first among equals. ``pairs: [E, E]``, ``load: [E]``. When no part has room
    for any free expert's demand, demands count as 1 from then on (each expert needs a slot).
    """
    num_experts, num_parts = load.size, limits.num_parts
    if num_experts == 0:
        return np.zeros(0, dtype=np.int64)
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
    """Best improving swaps, each part used at most once; returned as two moves each.

    A swap gains only if one of its experts gains by moving to the other's part (pair weights
    are >= 0), or if it relieves an overloaded part: only such experts are tried as the first.
    """
    num_experts = load.size
    own = inside[np.arange(num_experts), part]
    over = _over(weight, limits.max_load)
    rows = np.flatnonzero(((inside - own[:, None]).max(axis=1) > _EPS) | (over[part] > 0))
    if rows.size == 0:
        return []
    to_other = inside[:, part]                                   # [e, f]: e's weight to f's part
    gain = (to_other[rows] - own[rows, None] + to_other.T[rows] - own[None, :]
            - 2.0 * pairs[rows])
    w = weight[part]
    new_e = w[rows, None] - load[rows, None] + load[None, :]     # e's part after the swap
    new_f = w[None, :] - load[None, :] + load[rows, None]        # f's part after the swap
    d_over = (_over(new_e, limits.max_load) + _over(new_f, limits.max_load)
              - over[part][rows, None] - over[part][None, :])
    demand, room = limits.demand, np.maximum(limits.capacity, size)
    slots_e = size[part][rows, None] - demand[rows, None] + demand[None, :]
    slots_f = size[part][None, :] - demand[None, :] + demand[rows, None]
    ok = ((part[rows, None] != part[None, :]) & (slots_e <= room[part][rows, None])
          & (slots_f <= room[part][None, :]))
    score = np.where(ok, gain - big * d_over, -np.inf)
    chosen: list[tuple[int, int]] = []
    for _ in range(limits.num_parts // 2):
        i, f = divmod(int(np.argmax(score)), num_experts)
        if not score[i, f] > _EPS:
            break
        e = int(rows[i])
        a, b = int(part[e]), int(part[f])
        chosen += [(e, b), (f, a)]
        used = (part == a) | (part == b)
        score[used[rows]] = -np.inf
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
                      rounds: int = 8, swap_rounds: int = 4) -> np.ndarray:
    """Moves, then swaps, that lower the exact connectivity.

    ``tokens: int[T, k]``; ``part: int[E]`` (-1: held everywhere, never moved). Each move round
    computes every expert's gain for every part from the per-token part counts, then applies
    the best feasible moves in order of gain, re-evaluating an expert whose tokens an earlier
    move of the round touched; up to ``rounds`` rounds. Then up to ``swap_rounds`` rounds of
    swaps (full parts cannot take a move): the pairs whose summed move gains are highest, each
    applied if its exact gain is positive. Returns the refined ``int[E]`` partition.
    """
    state = _HyperState.build(tokens, load, part, limits)
    for _ in range(rounds):
        if state.move_round() == 0:
            break
    for _ in range(swap_rounds):
        if state.swap_round() == 0:
            break
    return state.part


def touch_cost(tokens: np.ndarray, part: np.ndarray, num_parts: int) -> float:
    """The busiest part's touch plus the mean touch: the partition objective of
    :func:`level_touch`. The busiest node's ingress sets the all-to-all time; the mean keeps
    the peak from being bought with much more traffic everywhere else."""
    return _peak_plus_mean(touch(tokens, part, num_parts))


def _peak_plus_mean(touches: np.ndarray) -> float:
    return float(touches.max(initial=0.0) + touches.sum() / touches.size)


def level_touch(tokens: np.ndarray, load: np.ndarray, part: np.ndarray, limits: Limits,
                rounds: int = 64) -> np.ndarray:
    """Moves, else swaps, of an expert out of the part with the highest touch (:func:`touch`),
    while that lowers :func:`touch_cost`.

    Load and slot limits hold as in :func:`refine_hypergraph`; experts of part -1 never move.
    Up to ``rounds`` changes. Returns the new ``int[E]`` partition.
    """
    state = _HyperState.build(tokens, load, part, limits)
    for _ in range(rounds):
        if not state.level_round():
            break
    return state.part


@dataclass(eq=False)
class _HyperState:
    """Per-token part counts and per-part totals of a partition being refined."""

    tokens: np.ndarray
    load: np.ndarray
    part: np.ndarray
    limits: Limits
    tok_of: np.ndarray      # CSR of each expert's tokens
    ptr: np.ndarray
    counts: np.ndarray      # int32[T, P]
    weight: np.ndarray      # float[P]
    size: np.ndarray        # float[P] demanded slots

    @classmethod
    def build(cls, tokens, load, part, limits) -> _HyperState:
        part = part.copy()
        movable = part >= 0
        tok_of, ptr = _tokens_by_expert(tokens, load.size)
        return cls(tokens, load, part, limits, tok_of, ptr,
                   _part_counts(tokens, part, limits.num_parts),
                   np.bincount(part[movable], weights=load[movable], minlength=limits.num_parts),
                   np.bincount(part[movable], weights=limits.demand[movable],
                               minlength=limits.num_parts))

    def rows(self, expert: int) -> np.ndarray:
        return self.tok_of[self.ptr[expert]:self.ptr[expert + 1]]

    def gains(self) -> np.ndarray:
        gains = _all_gains(self.counts, self.tok_of, self.ptr, self.part, self.limits.num_parts)
        gains[self.part < 0] = -np.inf
        return gains

    def move(self, expert: int, target: int) -> None:
        source, rows = self.part[expert], self.rows(expert)
        self.counts[rows, source] -= 1
        self.counts[rows, target] += 1
        self.weight[source] -= self.load[expert]
        self.weight[target] += self.load[expert]
        self.size[source] -= self.limits.demand[expert]
        self.size[target] += self.limits.demand[expert]
        self.part[expert] = target

    def move_round(self) -> int:
        gains = self.gains()
        best = gains.max(axis=1)
        touched = np.zeros(self.tokens.shape[0], dtype=bool)
        moved = 0
        for expert in np.argsort(-best, kind="stable"):
            if best[expert] <= _EPS:
                break
            rows = self.rows(expert)
            gain = gains[expert]
            if touched[rows].any():
                gain = _expert_gains(self.counts[rows], self.part[expert])
            fits = (self.weight + self.load[expert] <= self.limits.max_load + _EPS) & (
                self.size + self.limits.demand[expert] <= self.limits.capacity)
            gain = np.where(fits, gain, -np.inf)
            gain[self.part[expert]] = -np.inf
            target = int(np.argmax(gain))
            if gain[target] > _EPS:
                self.move(int(expert), target)
                touched[rows] = True
                moved += 1
        return moved

    def level_round(self, candidates: int = 32) -> bool:
        """One change out of the busiest part that lowers :func:`touch_cost` (see
        :func:`level_touch`): the best move if one helps, else the first of the ``candidates``
        swaps with the best estimates that does, checked exactly."""
        num_parts = self.limits.num_parts
        touch = (self.counts > 0).sum(axis=0).astype(np.float64)
        hot = int(np.argmax(touch))
        mine = np.flatnonzero(self.part == hot)
        if num_parts < 2 or mine.size == 0:
            return False
        leaves, enters = _leave_enter(self.counts, self.tok_of, self.ptr, self.part, num_parts)
        now = _peak_plus_mean(touch)

        def cost(hot_after, b, b_after):
            """touch_cost after a change that leaves the hot part at ``hot_after`` and part(s)
            ``b`` at ``b_after`` (arrays broadcast)."""
            rest = np.where((np.arange(num_parts)[None, :] == hot)
                            | (np.arange(num_parts)[None, :] == np.asarray(b)[..., None]),
                            -np.inf, touch[None, :]).max(axis=-1)
            peak = np.maximum(np.maximum(hot_after, b_after), rest)
            return peak + (touch.sum() - touch[hot] - touch[b] + hot_after + b_after) / num_parts

        # Moves: e from the hot part to part b.
        parts = np.arange(num_parts)
        score = cost((touch[hot] - leaves[mine])[:, None], parts[None, :],
                     touch[None, :] + enters[mine])
        fits = ((self.weight[None, :] + self.load[mine, None] <= self.limits.max_load + _EPS)
                & (self.size[None, :] + self.limits.demand[mine, None] <= self.limits.capacity))
        fits[:, hot] = False
        score = np.where(fits, score, np.inf)
        i, b = divmod(int(np.argmin(score)), num_parts)
        if score[i, b] < now - _EPS:
            self.move(int(mine[i]), b)
            return True
        # Swaps: e (hot part) with f (part b).
        others = np.flatnonzero((self.part >= 0) & (self.part != hot))
        if others.size == 0:
            return False
        nodes = self.part[others]
        estimate = cost(touch[hot] - leaves[mine, None] + enters[others, hot][None, :],
                        nodes[None, :],
                        touch[nodes][None, :] - leaves[others][None, :] + enters[mine][:, nodes])
        for flat in np.argsort(estimate, axis=None, kind="stable")[:candidates]:
            i, j = divmod(int(flat), others.size)
            e, f = int(mine[i]), int(others[j])
            if not np.isfinite(estimate[i, j]) or not self._fits_swap(e, f):
                continue
            d_hot, d_b = self._swap_touch(e, f)
            b_now = int(self.part[f])
            exact = float(cost(np.array([touch[hot] + d_hot]), np.array([b_now]),
                               np.array([touch[b_now] + d_b]))[0])
            if exact < now - _EPS:
                self.move(e, b_now)
                self.move(f, hot)
                return True
        return False

    def _swap_touch(self, e: int, f: int) -> tuple[float, float]:
        """Exact touch changes of e's part a and f's part b if e and f swap parts. Tokens with
        both keep their parts; a token with e only leaves a if e was a's only expert there and
        enters b if b held none of its experts (f only: the other way round)."""
        a, b = self.part[e], self.part[f]
        rows_e, rows_f = self.rows(e), self.rows(f)
        both = np.intersect1d(rows_e, rows_f, assume_unique=True)
        only_e = np.setdiff1d(rows_e, both, assume_unique=True)
        only_f = np.setdiff1d(rows_f, both, assume_unique=True)
        c = self.counts
        d_a = float((c[only_f, a] == 0).sum() - (c[only_e, a] == 1).sum())
        d_b = float((c[only_e, b] == 0).sum() - (c[only_f, b] == 1).sum())
        return d_a, d_b

    def swap_round(self, candidates: int = 64) -> int:
        """Try the ``candidates`` swaps with the best estimated gains (sum of the two move
        gains), each checked for room and applied if its exact gain is positive; an expert
        moves at most once per round. Returns the number of swaps applied."""
        gains, part, load = self.gains(), self.part, self.load
        movable = np.flatnonzero(part >= 0)
        p = part[movable]
        to_other = gains[movable][:, p]                       # g_e(part of f)
        estimate = np.where(p[:, None] < p[None, :], to_other + to_other.T, -np.inf)
        order = np.argsort(-estimate, axis=None, kind="stable")[:candidates]
        moved = np.zeros(load.size, dtype=bool)
        applied = 0
        for flat in order:
            i, j = divmod(int(flat), movable.size)
            if not estimate[i, j] > _EPS:
                break
            e, f = int(movable[i]), int(movable[j])
            if moved[e] or moved[f] or not self._fits_swap(e, f):
                continue
            if self._swap_gain(e, f) > _EPS:
                a, b = int(part[e]), int(part[f])
                self.move(e, b)
                self.move(f, a)
                moved[[e, f]] = True
                applied += 1
        return applied

    def _fits_swap(self, e: int, f: int) -> bool:
        a, b = self.part[e], self.part[f]
        delta, slots = self.load[e] - self.load[f], self.limits.demand[e] - self.limits.demand[f]
        cap = self.limits.max_load + _EPS
        for side, change, extra in ((a, -delta, -slots), (b, delta, slots)):
            if change > 0 and self.weight[side] + change > max(cap, self.weight[side]):
                return False
            if extra > 0 and self.size[side] + extra > max(self.limits.capacity[side],
                                                            self.size[side]):
                return False
        return True

    def _swap_gain(self, e: int, f: int) -> float:
        """Exact connectivity drop of swapping experts e (part a) and f (part b): minus the
        two parts' touch changes (tokens with both experts keep their parts)."""
        d_a, d_b = self._swap_touch(e, f)
        return -(d_a + d_b)


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


def _leave_enter(counts, tok_of, ptr, part, num_parts) -> tuple[np.ndarray, np.ndarray]:
    """Per expert: ``leaves: [E]`` its tokens whose only expert in its part it is (the part's
    touch drops by this if it leaves), ``enters: [E, P]`` its tokens with no expert in each part
    (that part's touch rises by this if it joins; own part: 0)."""
    num_experts = ptr.size - 1
    leaves, enters = np.zeros(num_experts), np.zeros((num_experts, num_parts))
    nonempty = np.flatnonzero(np.diff(ptr) > 0)
    if nonempty.size == 0:
        return leaves, enters
    expert_of = np.repeat(np.arange(num_experts), np.diff(ptr))
    rows = counts[tok_of]                                        # [nnz, P]
    own = part[expert_of]
    alone = (rows[np.arange(rows.shape[0]), np.maximum(own, 0)] == 1) & (own >= 0)
    starts = ptr[nonempty]
    leaves[nonempty] = np.add.reduceat(alone.astype(np.float64), starts)
    enters[nonempty] = np.add.reduceat((rows == 0).astype(np.float64), starts, axis=0)
    enters[np.arange(num_experts), np.maximum(part, 0)] = 0.0
    return leaves, enters


def _all_gains(counts, tok_of, ptr, part, num_parts) -> np.ndarray:
    """Connectivity gain of moving each expert to each part: ``[E, P]`` (own part: 0)."""
    leaves, enters = _leave_enter(counts, tok_of, ptr, part, num_parts)
    gains = leaves[:, None] - enters
    gains[np.arange(part.size), np.maximum(part, 0)] = 0.0
    return gains


def _expert_gains(rows: np.ndarray, own: int) -> np.ndarray:
    """Gains ``[P]`` of moving one expert whose tokens' part counts are ``rows: [n, P]``."""
    return (rows[:, own] == 1).sum() - (rows == 0).sum(axis=0).astype(np.float64)
