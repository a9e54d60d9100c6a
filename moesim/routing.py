"""Routing: which experts each token of an MoE layer chooses.

A layer's router scores every expert for every token and sends the token to its top-k experts.
moesim runs no router; it draws the choices from a per-layer expert *popularity* (uniform, Zipf,
Dirichlet, a few hot experts) with the Gumbel-top-k trick, which samples k distinct experts with
probability proportional to popularity (sequential sampling without replacement). Two refinements
model real routers: *co-activation* (experts of a group tend to be chosen together) and
DeepSeek-V3's *node-limited* routing (each token's experts lie on at most M nodes). Choices can
also come from a recorded routing trace (formats in ``docs/trace_format.md``).

Sampling every real token is too slow at scale, so a layer samples at most
``max_tokens_per_source`` tokens per source device and each sampled token stands for ``weight``
real ones. The simulator turns choices plus a placement into traffic; this module only produces
choices and counts (:mod:`moesim.routing_draw` draws a whole scenario's layers, from a
distribution or a trace). Everything is seeded numpy: layer ``l`` of seed ``s`` always draws from
``np.random.default_rng([s, l])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.errors import InfeasiblePlacement, ScenarioError

__all__ = [
    "DISTRIBUTIONS", "GATINGS", "LayerChoices", "expert_popularity",
    "sample_layer", "balanced_layer", "coactivation_partition", "counts_from_choices",
    "node_fanout", "coactivation_counts", "apply_capacity", "effective_top_k",
    "sampled_per_source", "layer_rng",
]

DISTRIBUTIONS = ("uniform", "zipf", "dirichlet", "hot", "balanced", "balanced_random")
GATINGS = ("topk", "top1", "soft")

_CHUNK_TOKENS = 512     # tokens per sampling chunk: keeps the [chunk, E] working set in cache
_MIN_POPULARITY = 1e-30  # floor so zero-popularity experts get finite keys (below all others)


@dataclass(frozen=True)
class LayerChoices:
    """The sampled routing decisions of one MoE layer."""

    experts: np.ndarray  # int32[T, k]: expert ids chosen by each sampled token (distinct per row)
    source: np.ndarray   # int32[T]: source device of each sampled token
    weight: float        # real tokens one sampled token stands for (>= 1; 1 = not subsampled)

    @property
    def num_tokens(self) -> int:
        """Sampled tokens T."""
        return int(self.experts.shape[0])

    @property
    def top_k(self) -> int:
        """Experts per token k."""
        return int(self.experts.shape[1])


# ----------------------------------------------------------------------------- popularity


def expert_popularity(num_experts: int, distribution: str, rng: np.random.Generator, *,
                      zipf_s: float = 1.0, dirichlet_alpha: float = 1.0, hot_experts: int = 0,
                      hot_fraction: float = 0.5) -> np.ndarray:
    """Probability that a token's router prefers each expert, for one layer.

    Returns ``popularity: [E]`` (non-negative, sums to 1). ``zipf``: p_i ∝ 1/rank_i^s with ranks
    randomly permuted, so layers have different hot experts (s=0 is uniform). ``dirichlet``: one
    draw of Dirichlet(alpha); large alpha tends to uniform. ``hot``: ``hot_experts`` random experts
    share ``hot_fraction`` of the mass, the rest share the remainder. ``balanced`` is uniform (its
    sampler, :func:`balanced_layer`, deals experts out round-robin).

    Raises
    ------
    ScenarioError
        Unknown distribution (the message lists the valid ones) or a parameter out of range.
    """
    e = num_experts
    if e < 1:
        raise ScenarioError(f"num_experts={e} must be >= 1", field="num_experts")
    if distribution in ("uniform", "balanced", "balanced_random"):
        return np.full(e, 1.0 / e)
    if distribution == "zipf":
        if not zipf_s >= 0:
            raise ScenarioError(f"zipf_s={zipf_s} must be >= 0", field="routing.zipf_s")
        weights = (rng.permutation(e) + 1.0) ** -zipf_s
        return weights / weights.sum()
    if distribution == "dirichlet":
        if not dirichlet_alpha > 0:
            raise ScenarioError(f"dirichlet_alpha={dirichlet_alpha} must be > 0",
                                field="routing.dirichlet_alpha")
        p = rng.dirichlet(np.full(e, float(dirichlet_alpha)))
        return p / p.sum()
    if distribution == "hot":
        if not 1 <= hot_experts < e:
            raise ScenarioError(f"hot_experts={hot_experts} must be in 1..{e - 1} (num_experts-1)",
                                field="routing.hot_experts")
        if not 0.0 <= hot_fraction <= 1.0:
            raise ScenarioError(f"hot_fraction={hot_fraction} must be in [0, 1]",
                                field="routing.hot_fraction")
        p = np.full(e, (1.0 - hot_fraction) / (e - hot_experts))
        p[rng.choice(e, size=hot_experts, replace=False)] = hot_fraction / hot_experts
        return p
    raise ScenarioError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}",
                        field="routing.distribution")


# ----------------------------------------------------------------------------- sampling


def sample_layer(popularity: np.ndarray, *, num_sources: int, tokens_per_source: int, top_k: int,
                 rng: np.random.Generator, max_tokens_per_source: int = 256,
                 coactivation_groups: int = 0, coactivation_strength: float = 0.0,
                 expert_node: np.ndarray | None = None, max_nodes: int | None = None,
                 gating: str = "topk") -> LayerChoices:
    """Sample the experts chosen by the tokens of one layer.

    ``popularity: [E]``. Each source device sends ``tokens_per_source`` real tokens, of which
    ``n = min(tokens_per_source, max_tokens_per_source)`` are sampled (token t comes from source
    ``t // n``). Gumbel-top-k: a token takes the k largest ``log(p) + Gumbel`` logits. With
    co-activation, experts are split into ``coactivation_groups`` random groups; each token picks a
    group (probability ∝ its popularity) and adds ``coactivation_strength`` to its experts' logits.
    With ``expert_node: int[E]`` and ``max_nodes=M`` (DeepSeek-V3), a token keeps the M nodes whose
    top ``ceil(k/M)`` affinities (``exp(logit)``) sum highest and chooses only among their experts.
    ``gating``: "topk", "top1" (k=1) or "soft" (every token uses all E experts).

    Raises
    ------
    ScenarioError
        A size, k, gating or co-activation parameter out of range.
    InfeasiblePlacement
        ``expert_node`` malformed, or some M nodes hold fewer than k experts.
    """
    p = _check_popularity(popularity)
    e = p.size
    k = effective_top_k(gating, top_k, e)
    n = sampled_per_source(tokens_per_source, max_tokens_per_source, num_sources)
    t = num_sources * n
    source = np.repeat(np.arange(num_sources, dtype=np.int32), n)
    weight = tokens_per_source / n
    if gating == "soft":
        if max_nodes is not None:
            raise ScenarioError("node-limited routing (max_nodes) needs top-k gating, not 'soft'",
                                field="routing.node_limit")
        return LayerChoices(np.broadcast_to(np.arange(e, dtype=np.int32), (t, e)).copy(),
                            source, weight)
    node_limit = _node_limit(expert_node, max_nodes, e, k)
    # 1. Inverse popularity per token class: one class, or one per co-activation group.
    inv = 1.0 / np.maximum(p / p.sum(), _MIN_POPULARITY)
    inv_rows, token_class = inv[None, :], np.zeros(t, dtype=np.intp)
    if coactivation_strength or coactivation_groups < 0:
        inv_rows, token_class = _coactivation(p, inv, coactivation_groups, coactivation_strength,
                                              t, rng)
    # 2. Draw keys chunk by chunk, one row per expert (per-node reductions then run over long
    #    contiguous rows), and take each token's k largest.
    picker = _TopK(e, k)
    inv_cols = np.ascontiguousarray(picker.pad(inv_rows.astype(np.float32)).T)   # [E_pad, G]
    work = np.empty(inv_cols.shape[0] * min(t, _CHUNK_TOKENS), dtype=np.uint32)
    experts = np.empty((t, k), dtype=np.int32)
    for lo in range(0, t, _CHUNK_TOKENS):
        hi = min(t, lo + _CHUNK_TOKENS)
        cols = inv_cols if inv_cols.shape[1] == 1 else inv_cols[:, token_class[lo:hi]]
        keys = _race_keys(rng, cols, hi - lo, e, work)                           # [E_pad, chunk]
        if node_limit is not None:
            _mask_far_nodes_by_expert(keys, e, k, *node_limit)
        experts[lo:hi] = picker.by_expert(keys)
    return LayerChoices(experts, source, weight)


def balanced_layer(num_experts: int, *, num_sources: int, tokens_per_source: int, top_k: int,
                   max_tokens_per_source: int = 256,
                   rng: np.random.Generator | None = None,
                   expert_node: np.ndarray | None = None,
                   max_nodes: int | None = None) -> LayerChoices:
    """Perfectly balanced routing: sampled token t takes experts ``(t*k + j) % E`` for j < k.

    Deterministic; every expert receives the same load whenever T*k is a multiple of E. That
    pairs neighbouring experts (NeMo Automodel's fake balanced gate). With ``rng`` the experts
    are dealt from a deck reshuffled every E // k tokens instead: the same exact balance, but a
    token's experts are paired at random, as a real router's are (``balanced_random``); with
    ``max_nodes`` (node-limited routing, ``expert_node[e]`` each expert's node) too, each token
    takes ``max_nodes`` nodes dealt from a deck of the nodes and ``k / max_nodes`` experts from a
    deck of each (:func:`_node_limited_decks`; near-balanced streams where those do not divide).

    >>> balanced_layer(4, num_sources=1, tokens_per_source=2, top_k=2).experts.tolist()
    [[0, 1], [2, 3]]
    """
    k = effective_top_k("topk", top_k, num_experts)
    n = sampled_per_source(tokens_per_source, max_tokens_per_source, num_sources)
    t = num_sources * n
    experts = (np.arange(t)[:, None] * k + np.arange(k)[None, :]) % num_experts
    limited = (None if rng is None or expert_node is None or not max_nodes
               else _node_limited_decks(t, k, np.asarray(expert_node), max_nodes, rng))
    if limited is not None:
        experts = limited
    elif rng is not None:     # relabel each deck of E // k tokens with its own permutation
        per_deck = max(1, num_experts // k)
        decks = -(-t // per_deck)
        perm = np.argsort(rng.random((decks, num_experts)), axis=1)
        deck = np.arange(t) // per_deck
        experts = perm[deck[:, None], experts]
    source = np.repeat(np.arange(num_sources, dtype=np.int32), n)
    return LayerChoices(experts.astype(np.int32), source, tokens_per_source / n)


def _node_limited_decks(tokens: int, k: int, expert_node: np.ndarray, max_nodes: int,
                        rng: np.random.Generator) -> np.ndarray | None:
    """``int[tokens, k]``: each token's ``max_nodes`` nodes dealt from decks of the nodes (each
    deck one permutation, ``N / max_nodes`` tokens per deck) and ``k / max_nodes`` experts per
    chosen node from decks of that node's experts: every node and every expert equally loaded
    over whole decks, each token on exactly ``max_nodes`` nodes. Where the shapes do not divide
    (nodes by ``max_nodes``, ``k`` by ``max_nodes``, each node's experts by the share):
    :func:`_node_limited_streams`. None when no limit applies (``max_nodes`` >= the nodes)."""
    nodes = np.unique(expert_node)
    count = nodes.size
    if max_nodes >= count:
        return None
    members = [np.flatnonzero(expert_node == node) for node in nodes]
    share = k // max_nodes
    if (count % max_nodes or k % max_nodes or len({m.size for m in members}) != 1
            or members[0].size % share):
        return _node_limited_streams(tokens, k, members, max_nodes, rng)
    decks = -(-tokens * max_nodes // count)
    picks = np.argsort(rng.random((decks, count)), axis=1).ravel()[:tokens * max_nodes]
    picks = picks.reshape(tokens, max_nodes)
    out = np.empty((tokens, max_nodes, share), dtype=np.int64)
    for j, experts in enumerate(members):
        rows, cols = np.nonzero(picks == j)
        need = rows.size * share
        deals = -(-need // experts.size)
        dealt = experts[np.argsort(rng.random((deals, experts.size)), axis=1)].ravel()[:need]
        out[rows, cols] = dealt.reshape(rows.size, share)
    return out.reshape(tokens, k)


def _node_limited_streams(tokens: int, k: int, members: list[np.ndarray], max_nodes: int,
                          rng: np.random.Generator) -> np.ndarray | None:
    """:func:`_node_limited_decks` where the shapes do not divide: each token takes the next
    ``max_nodes`` distinct nodes of a stream of node permutations and ``k`` experts spread over
    them as evenly as they hold (one more on the first ``k % max_nodes``, never more than a node
    has), each node's experts from its own stream of permutations. The limit holds exactly;
    loads are balanced up to the streams' remainders. None if ``max_nodes`` nodes cannot hold
    ``k`` distinct experts."""
    sizes = np.array([m.size for m in members])
    if np.sort(sizes)[:max_nodes].sum() < k:
        return None
    count = len(members)
    node_stream = np.argsort(rng.random((-(-tokens * max_nodes // count) + 2, count)),
                             axis=1).ravel()
    pointers = [0] * count
    streams = [np.zeros(0, dtype=np.int64) for _ in range(count)]
    out = np.empty((tokens, k), dtype=np.int64)
    at = 0
    for t in range(tokens):
        chosen: list[int] = []
        while len(chosen) < max_nodes:
            if at >= node_stream.size:
                node_stream = np.concatenate([node_stream, rng.permutation(count)])
            node = int(node_stream[at])
            at += 1
            if node not in chosen:
                chosen.append(node)
        need = [k // max_nodes + (j < k % max_nodes) for j in range(max_nodes)]
        for j in range(max_nodes):            # move what a small node cannot hold
            over = need[j] - int(sizes[chosen[j]])
            if over > 0:
                need[j] -= over
                for i in range(max_nodes):
                    room = int(sizes[chosen[i]]) - need[i]
                    moved = min(room, over)
                    need[i] += moved
                    over -= moved
        col = 0
        for node, n in zip(chosen, need, strict=True):
            taken: list[int] = []
            while len(taken) < n:
                if pointers[node] >= streams[node].size:
                    streams[node] = np.concatenate([streams[node][pointers[node]:],
                                                    rng.permutation(members[node])])
                    pointers[node] = 0
                expert = int(streams[node][pointers[node]])
                pointers[node] += 1
                if expert not in taken:
                    taken.append(expert)
            out[t, col:col + n] = taken
            col += n
    return out


def _check_popularity(popularity: np.ndarray) -> np.ndarray:
    p = np.asarray(popularity, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ScenarioError(f"popularity has shape {p.shape}; expected [num_experts]")
    if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
        raise ScenarioError("popularity must be finite, >= 0 and not all zero")
    return p


def effective_top_k(gating: str, top_k: int, num_experts: int) -> int:
    if gating not in GATINGS:
        raise ScenarioError(f"unknown gating {gating!r}; valid: {', '.join(GATINGS)}",
                            field="model.gating")
    k = {"topk": top_k, "top1": 1, "soft": num_experts}[gating]
    if not 1 <= k <= num_experts:
        raise ScenarioError(f"top_k={k} must be in 1..num_experts={num_experts}",
                            field="model.top_k")
    return k


def sampled_per_source(tokens_per_source: int, max_tokens_per_source: int,
                        num_sources: int) -> int:
    for name, value in (("num_sources", num_sources), ("tokens_per_source", tokens_per_source),
                        ("max_tokens_per_source", max_tokens_per_source)):
        if int(value) != value or value < 1:
            raise ScenarioError(f"{name}={value} must be an integer >= 1", field=name)
    return int(min(tokens_per_source, max_tokens_per_source))


def coactivation_partition(num_experts: int, groups: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Group ``int[E]`` of each expert: a random partition into ``groups`` groups of equal size
    (±1). :func:`sample_layer` draws it first from its ``rng`` when co-activation is on."""
    if not 1 <= groups <= num_experts:
        raise ScenarioError(f"coactivation_groups={groups} must be in 1..num_experts="
                            f"{num_experts} when coactivation_strength is not 0",
                            field="routing.coactivation_groups")
    group_of = np.empty(num_experts, dtype=np.intp)
    group_of[rng.permutation(num_experts)] = np.arange(num_experts) % groups
    return group_of


def _coactivation(p: np.ndarray, inv: np.ndarray, groups: int, strength: float, t: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-group inverse popularity ``[G, E]`` (boosted experts divided by e^strength) and the
    group ``int[T]`` each token picked."""
    group_of = coactivation_partition(p.size, groups, rng)
    if not (math.isfinite(strength) and strength >= 0):
        raise ScenarioError(f"coactivation_strength={strength} must be finite and >= 0",
                            field="routing.coactivation_strength")
    group_mass = np.bincount(group_of, weights=p, minlength=groups)
    token_group = rng.choice(groups, size=t, p=group_mass / group_mass.sum())
    member = group_of[None, :] == np.arange(groups)[:, None]          # [G, E]
    return np.where(member, inv * math.exp(-strength), inv[None, :]), token_group


def _race_keys(rng: np.random.Generator, inv_cols: np.ndarray, t: int, e: int,
               work: np.ndarray) -> np.ndarray:
    """Keys ``[E_pad, t]`` (expert-major) whose per-token order is that of ``log(p) + Gumbel``
    (pads: -inf). ``inv_cols: [E_pad, 1 or t]`` inverse popularities; ``work: uint32[>= E_pad*t]``
    scratch that the keys are written into.

    With u ~ U(0,1), ``log(p) - log(-log u) = -log(-log(u)/p)`` is increasing in
    ``key = log(u) / p``, so the top-k of key is the Gumbel-top-k without the second log. The
    random words are drawn token-major (token i takes words ``i*E_pad ... (i+1)*E_pad - 1``), so
    the keys do not depend on the layout.
    """
    e_pad = inv_cols.shape[0]
    size = t * e_pad
    bits = rng.bit_generator.random_raw((size + 1) // 2).view(np.uint32)[:size]
    out = work[:size].reshape(e_pad, t)
    _transpose_shift(bits.reshape(t, e_pad), out)                     # 23 random mantissa bits
    out |= np.uint32(0x3F800000)                                       # ... of a float in [1, 2)
    keys = out.view(np.float32)
    keys -= np.float32(1 - 2.0**-24)            # exact: u in (0, 1), so log(u) < 0 and finite
    np.log(keys, out=keys)
    keys *= inv_cols
    keys[e:] = -np.inf
    return keys


def _transpose_shift(bits: np.ndarray, out: np.ndarray, block: int = 32) -> None:
    """``out = bits.T >> 9`` for ``bits: uint32[t, E]``, ``out: uint32[E, t]``; tile by tile when
    both sides divide into ``block``-square tiles, which keeps the strided reads in cache."""
    t, e = bits.shape
    if t % block or e % block:
        np.right_shift(bits.T, np.uint32(9), out=out)
        return
    tiles_in = bits.reshape(t // block, block, e // block, block).transpose(2, 0, 3, 1)
    tiles_out = out.reshape(e // block, block, t // block, block).transpose(0, 2, 1, 3)
    np.right_shift(tiles_in, np.uint32(9), out=tiles_out)


class _TopK:
    """Indices of the k largest keys per row, via block maxima (exact, ties included).

    Columns are split into ``nb`` strided blocks of ``b``. An element of the top k has at most
    k-1 larger elements, hence at most k-1 blocks with a larger maximum, so it lies in the k
    blocks with the largest maxima: partitioning ``nb + k*b`` candidates instead of E columns.
    """

    def __init__(self, num_experts: int, k: int):
        self.k = k
        # b ~ sqrt(E/k) balances the two partitions; above 4 the strided gathers cost more.
        self.b = min(4, max(1, int(math.sqrt(num_experts / k))))
        self.nb = -(-num_experts // self.b)
        if self.nb <= k or self.b < 2:      # too small to gain: plain argpartition
            self.b, self.nb = 1, num_experts

    def pad(self, rows: np.ndarray) -> np.ndarray:
        extra = self.b * self.nb - rows.shape[1]
        return np.pad(rows, ((0, 0), (0, extra)), constant_values=1.0) if extra else rows

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """``int[t, k]`` for token-major ``keys: [t, E_pad]``."""
        return self.by_expert(np.ascontiguousarray(keys.T))

    def by_expert(self, keys: np.ndarray) -> np.ndarray:
        """``int[t, k]`` for expert-major ``keys: [E_pad, t]``."""
        t, k, b, nb = keys.shape[1], self.k, self.b, self.nb
        if b == 1:
            return np.argpartition(keys.T, nb - k, axis=1)[:, nb - k:]
        block_max = np.ascontiguousarray(keys.reshape(b, nb, t).max(axis=0).T)   # [t, nb]
        top_blocks = np.argpartition(block_max, nb - k, axis=1)[:, nb - k:]    # [t, k]
        # candidate i*k + j of token r is key (i*nb + top_blocks[r, j], r): flat index below
        rows = np.arange(t)[:, None]
        offset = np.arange(0, b * nb * t, nb * t)[:, None] + rows[:, :, None]  # [t, b, 1]
        cand = np.take(keys, top_blocks[:, None, :] * t + offset).reshape(t, b * k)
        block, j = np.divmod(np.argpartition(cand, b * k - k, axis=1)[:, b * k - k:], k)
        return block * nb + np.take(top_blocks, rows * k + j)   # take reads top_blocks as [t*k]


def _node_limit(expert_node: np.ndarray | None, max_nodes: int | None, e: int,
                k: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Validate node-limited routing. Returns None when it changes nothing, else the node of each
    expert ``int[E]`` (ids compacted to 0..N-1), the experts of each node ``[N, maxper]`` (padded
    with E) and M."""
    if max_nodes is None:
        return None
    if expert_node is None:
        raise ScenarioError("max_nodes needs expert_node (the node of each expert)")
    node = np.asarray(expert_node)
    if node.shape != (e,) or not np.issubdtype(node.dtype, np.integer) or np.any(node < 0):
        raise InfeasiblePlacement(f"expert_node must be int[{e}] of node ids >= 0; "
                                  f"got shape {node.shape} dtype {node.dtype}")
    if max_nodes < 1:
        raise ScenarioError(f"max_nodes={max_nodes} must be >= 1", field="routing.node_limit")
    present, node = np.unique(node, return_inverse=True)
    sizes = np.bincount(node)
    if max_nodes >= present.size:
        return None                                              # every node allowed: no limit
    if np.sort(sizes)[:max_nodes].sum() < k:
        raise InfeasiblePlacement(f"node-limited routing to {max_nodes} nodes needs any "
                                  f"{max_nodes} nodes to hold >= top_k={k} experts; the smallest "
                                  f"hold {np.sort(sizes)[:max_nodes].sum()}")
    order = np.argsort(node, kind="stable")
    slots = np.full((present.size, sizes.max()), e, dtype=np.intp)
    slots[node[order], np.arange(e) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = order
    return node, slots, max_nodes


def _mask_far_nodes(keys: np.ndarray, e: int, k: int, node: np.ndarray, slots: np.ndarray,
                    max_nodes: int) -> None:
    """:func:`_mask_far_nodes_by_expert` for token-major ``keys: [t, E_pad]`` (in place)."""
    by_expert = np.ascontiguousarray(keys.T)
    _mask_far_nodes_by_expert(by_expert, e, k, node, slots, max_nodes)
    keys[...] = by_expert.T


def _mask_far_nodes_by_expert(keys: np.ndarray, e: int, k: int, node: np.ndarray,
                              slots: np.ndarray, max_nodes: int) -> None:
    """Set to -inf the keys of experts outside each token's best ``max_nodes`` nodes (in place).

    ``keys: [E_pad, t]`` expert-major. A node's score is the sum of its highest ceil(k/M)
    affinities ``exp(logit) = -1/key``, DeepSeek-V3's rule ("the sum of the highest K_r/M affinity
    scores ... on each node"); equal affinities count once, as in the rule's reference form
    :func:`_node_scores` (rounds of "take the max, then zero every copy of it").
    """
    t = keys.shape[1]
    n, per = slots.shape
    r = -(-k // max_nodes)
    contiguous = slots.size == e and np.array_equal(slots.ravel(), np.arange(e))
    if contiguous:                                  # node i holds experts i*per .. (i+1)*per - 1
        by_node = keys[:e].reshape(n, per, t)
    else:                                           # padding slots (index e) read -inf
        flat = slots.ravel()
        by_node = keys[np.minimum(flat, e - 1)]
        by_node[flat == e] = -np.inf
        by_node = by_node.reshape(n, per, t)
    score = _top_affinity_sums(by_node, r)
    if score is None:                               # two keys share an affinity: rare, exact path
        score = _node_scores(keys, e, slots, r)
    # Adding 0 or -inf (keys are finite or -inf) is exact and much faster than a masked copy.
    penalty = np.full((t, n), -np.inf, dtype=keys.dtype)
    np.put_along_axis(penalty, np.argpartition(score.T, n - max_nodes, axis=1)[:, n - max_nodes:],
                      0.0, axis=1)
    if contiguous:
        by_node += penalty.T[:, None, :]
    else:
        keys[:e] += penalty.T[node]


def _top_affinity_sums(by_node: np.ndarray, r: int) -> np.ndarray | None:
    """``float32[N, t]``: per node, the sum of its r highest distinct affinities ``-1/key``
    (fewer if it has fewer), from ``by_node: [N, per, t]``; None if two distinct keys of a node
    round to the same affinity among those, where :func:`_node_scores` must decide.

    ``-1/key`` is non-decreasing in the key, so the i-th highest distinct affinity is that of
    the i-th highest distinct key unless rounding merged two keys.
    """
    per = by_node.shape[1]
    with np.errstate(divide="ignore"):
        if r >= per:                                # every expert counts
            return np.divide(np.float32(-1.0), by_node).sum(axis=1)
        top = by_node.max(axis=1)                   # [N, t]
        score = np.zeros_like(top)
        scratch = np.empty_like(by_node)
        previous = None
        for i in range(r):
            if i:                                   # the next distinct key: hide the last one
                np.copyto(scratch, by_node)
                np.copyto(scratch, -np.inf, where=by_node >= top[:, None, :])
                top = scratch.max(axis=1)
            affinity = np.divide(np.float32(-1.0), top)
            if previous is not None and np.any((affinity == previous) & (top > -np.inf)):
                return None
            score += affinity
            previous = affinity
    return score


def _node_scores(keys: np.ndarray, e: int, slots: np.ndarray, r: int) -> np.ndarray:
    """Reference form of the node scores ``float32[N, t]`` for expert-major ``keys: [E_pad, t]``:
    r rounds of "take each node's highest affinity, then zero every copy of it"."""
    t = keys.shape[1]
    affinity = np.zeros((e + 1, t), dtype=np.float32)             # [E + padding row, t]
    with np.errstate(divide="ignore"):
        np.divide(-1.0, keys[:e], out=affinity[:e])
    per_node = affinity[slots.T]                                   # [maxper, N, t]
    score = np.zeros(per_node.shape[1:], dtype=np.float32)
    for _ in range(r):
        top = per_node.max(axis=0)
        score += top
        per_node[per_node == top] = 0.0
    return score


# ----------------------------------------------------------------------------- counts


def counts_from_choices(choices: LayerChoices, num_sources: int, num_experts: int) -> np.ndarray:
    """Real tokens each source sends to each expert: ``[num_sources, num_experts]``.

    Sums to ``T * k * weight``.
    """
    k = choices.top_k
    flat = choices.source.astype(np.int64).repeat(k) * num_experts + choices.experts.ravel()
    counts = np.bincount(flat, minlength=num_sources * num_experts)
    return counts.reshape(num_sources, num_experts) * choices.weight


def node_fanout(choices: LayerChoices, expert_node: np.ndarray, num_sources: int,
                num_nodes: int) -> np.ndarray:
    """Real tokens from each source with >= 1 chosen expert on each node: ``[sources, nodes]``.

    This is what a hierarchical (DeepEP-style) dispatch sends across the network: one copy per
    destination node, however many of the token's experts live there.
    """
    node_of = np.asarray(expert_node)
    if node_of.ndim != 1 or node_of.size <= choices.experts.max(initial=0) or (
            node_of.size and (node_of.min() < 0 or node_of.max() >= num_nodes)):
        raise InfeasiblePlacement(f"expert_node must be int[num_experts] of ids in "
                                  f"0..{num_nodes - 1}; got shape {node_of.shape}")
    t = choices.num_tokens
    hit = np.zeros((t, num_nodes), dtype=np.uint8)                 # 1: token has an expert there
    hit[np.arange(t)[:, None], node_of[choices.experts]] = 1
    flat = choices.source.astype(np.int64)[:, None] * num_nodes + np.arange(num_nodes)
    fanout = np.bincount(flat.ravel(), weights=hit.ravel(), minlength=num_sources * num_nodes)
    return fanout.reshape(num_sources, num_nodes) * choices.weight


def coactivation_counts(choices: LayerChoices, num_experts: int) -> np.ndarray:
    """Real tokens that chose both expert i and expert j: symmetric ``[E, E]``; diagonal = load."""
    onehot = np.zeros((choices.num_tokens, num_experts), dtype=np.float32)
    np.put_along_axis(onehot, choices.experts.astype(np.intp), 1.0, axis=1)
    return (onehot.T @ onehot).astype(np.float64) * choices.weight


def apply_capacity(counts: np.ndarray, tokens_per_source: float, top_k: int,
                   capacity_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Drop tokens over each expert's capacity (GShard / Megatron, per source).

    ``counts: [sources, E]`` real tokens. Each source may send an expert at most
    ``ceil(capacity_factor * tokens_per_source * top_k / E)`` tokens. Returns ``(kept, dropped)``,
    both ``[sources, E]``, with ``kept + dropped == counts``. ``capacity_factor=None``: dropless.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if capacity_factor is None:
        return counts.copy(), np.zeros_like(counts)
    if not capacity_factor > 0:
        raise ScenarioError(f"capacity_factor={capacity_factor} must be > 0 (or null = dropless)",
                            field="model.capacity_factor")
    # round() first so 1.1 * 4096 * 2 / 64 lands on its exact value, not one token above.
    capacity = math.ceil(round(capacity_factor * tokens_per_source * top_k / counts.shape[1], 9))
    kept = np.minimum(counts, capacity)
    return kept, counts - kept


def layer_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator of one layer: independent of how many other layers were drawn."""
    return np.random.default_rng([seed, layer])
