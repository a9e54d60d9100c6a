"""Dispatch and combine traffic of one MoE layer inside one EP group.

From routing (which experts each source's tokens chose) and a placement (which device slots hold
which experts), build the byte flows of the two all-to-alls:

- ``direct``: every source sends each token once per chosen expert straight to the device holding
  it (Megatron-Core's all-to-all dispatcher);
- ``hierarchical``: a token crosses the network at most once per destination node, to the device
  on that node with the sender's local index, which forwards copies over NVLink to the devices
  holding its experts (Tutel's 2D all-to-all). Cross-node bytes shrink when a token's top-k
  experts share a node;
- ``deepep_normal``: DeepEP's normal (high-throughput) kernels. Inside a node one copy per
  (token, destination RANK), however many of the rank's experts the token chose; across nodes one
  RDMA copy per (token, destination NODE) to the rank of the sender's local index there, which
  forwards one copy per (token, destination rank) over NVLink. With FP8 dispatch each copy carries
  one FP32 scale per 128 elements (``hidden / 128 * 4`` bytes); combine (BF16) carries none;
- ``deepep_ll``: DeepEP's low-latency kernels. One message per (token, expert) pair written by
  RDMA straight to the rank holding the expert, through the NIC even inside the node
  (``via_nic``); an FP8 message is ``hidden + hidden / 128 * 4 + 16`` bytes (payload, scales,
  metadata: 7,408 bytes at hidden 7,168, as DeepEP's ``tests/test_low_latency.py`` counts it);
  combine sends ``hidden * 2`` BF16 bytes per pair back. A copy to the sender itself is local;
- ``allgather``: no all-to-all at all. Data-parallel attention with expert parallelism and no
  DeepEP (vLLM's default ``--all2all-backend allgather_reducescatter``, SGLang's DP-attention
  ``dp_gather`` / ``dp_scatter``) ALL-GATHERS every token's hidden state of the EP group to every
  rank; each rank runs its local experts on the tokens routed to them (the others contribute
  zero), and a REDUCE-SCATTER returns each rank its own tokens' sums. Every live device sends its
  ``T = tokens_per_source`` real tokens once each (not once per routed copy; tokens later dropped
  by the capacity factor travel too, since the gather precedes routing) to every other live
  device: ``T * hidden * dispatch bytes`` per pair, ``(live - 1) * T * hidden * bytes`` sent and
  received per device, whatever top-k and the routing are. The combine is the same pairs reversed
  with combine bytes (a ring or a direct reduce-scatter moves the same bytes per rank). A copy is
  ``hidden * bytes per element``: NCCL gathers the activations as they are (BF16 in both stacks);
  a scenario with an FP8 dispatch is priced at 1 byte per element without per-block scales
  (moesim does not model the quantised-gather variants' scale tensors). The routed ``tokens`` and
  the slots' ``slot_tokens`` stay what routing gives: the expert compute is unchanged.

- ``replicated``: nothing moves. With attention under tensor parallelism and the EP group inside
  the TP group (``ep`` divides ``tp``, no sequence parallelism: vLLM's ``--tensor-parallel-size N
  --enable-expert-parallel`` without data-parallel attention, SGLang's and TensorRT-LLM's EP over
  the TP ranks), every rank already holds every token of its group after the attention's
  all-reduce; each runs its local experts on the copies routed to them, and a tensor-parallel
  all-reduce of the MoE output (``moesim.pricing.block.ffn_tp_comm``) sums the partial
  results. No flows; tokens and slots as routing gives them.

Combine is the same flows reversed, scaled from the dispatch bytes per copy to the combine bytes
per copy (the dtype ratio for ``direct``/``hierarchical``/``allgather``; FP8 + scales -> BF16 for
DeepEP). Token counts are real tokens (sampled x weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim import routing
from moesim.placement.placement import Placement, ReplicaSplit

__all__ = ["LayerTraffic", "layer_traffic", "merge_flows", "ALGORITHMS", "LAYER_ALGORITHMS",
           "copy_bytes",
           "SCALE_BLOCK", "SCALE_BYTES", "LL_META_BYTES"]

ALGORITHMS = ("direct", "hierarchical", "deepep_normal", "deepep_ll", "allgather")
# What a layer's dispatch can be: a network algorithm above, or no movement at all.
LAYER_ALGORITHMS = (*ALGORITHMS, "replicated")
# FP8 payloads carry one FP32 scale per 128 elements (DeepSeek-V3 report sec. 3.3; DeepEP's
# per_token_cast_to_fp8), and a DeepEP low-latency message 16 bytes of metadata on top
# (deepseek-ai/DeepEP tests/test_low_latency.py: num_fp8_bytes = hidden + hidden / 128 * 4 + 16).
SCALE_BLOCK = 128
SCALE_BYTES = 4
LL_META_BYTES = 16


@dataclass(frozen=True, eq=False)
class LayerTraffic:
    """Traffic of one MoE layer in one EP group (device indices local to the group).

    pairs: int[F, 2] (src, dst) of each dispatch flow; dispatch_bytes / combine_bytes: float[F].
    tokens: float[src, dst] tokens (token-expert pairs) each device sends to each device.
    slot_tokens: float[devices, slots] tokens each expert slot computes.
    counts: float[src, experts] kept tokens; dropped: tokens dropped by the capacity factor.
    """

    pairs: np.ndarray
    dispatch_bytes: np.ndarray
    combine_bytes: np.ndarray
    tokens: np.ndarray
    slot_tokens: np.ndarray
    counts: np.ndarray
    dropped: float
    cross_node_dispatch_bytes: float
    live_sources: int = -1          # devices that sent tokens (-1: all of the group)
    algorithm: str = "direct"       # which all-to-all algorithm these flows follow
    # Bytes of one dispatch / combine copy (a token, or a token-expert message for deepep_ll).
    dispatch_copy_bytes: float = 0.0
    combine_copy_bytes: float = 0.0
    # True: intra-node flows go through the NIC (deepep_ll's pure-RDMA kernels), not NVLink.
    via_nic: bool = False
    # True: every flow is one NCCL send/recv message, so the link's message-size curve applies
    # (direct, hierarchical, allgather). False: GPU-initiated streaming (DeepEP) that runs at the
    # large-message rate and pays the per-collective cost only.
    per_message_cost: bool = True
    # bool[ep] devices of the group that failed (send and receive nothing); None: all live.
    failed: np.ndarray | None = None

    @property
    def combine_pairs(self) -> np.ndarray:
        return self.pairs[:, ::-1]


def merge_flows(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sum flows between the same (src, dst) pair; drop empty and self flows.

    Returns pairs int[F, 2] in (src, dst) order and bytes float[F].
    """
    matrix = np.zeros((n, n))
    np.add.at(matrix, (src, dst), nbytes)
    np.fill_diagonal(matrix, 0.0)
    s, d = np.nonzero(matrix > 0)
    return np.stack([s, d], axis=1).astype(np.int64), matrix[s, d]


def layer_traffic(choices: routing.LayerChoices, placement: Placement, layer: int, *,
                  device_node: np.ndarray, tokens_per_source: float, hidden: int,
                  dispatch_bytes_per_elem: float, combine_bytes_per_elem: float,
                  capacity_factor: float | None, top_k: int, algorithm: str = "direct",
                  failed: np.ndarray | None = None, copy_share: float = 1.0) -> LayerTraffic:
    """Flows of one layer's dispatch and combine all-to-alls.

    ``copy_share``: the share of each routed copy's bytes this group's flows carry (1; under
    expert tensor parallelism with EP, ``1 / etp``: the group stands for its TP groups' tokens,
    whose ``etp`` ranks each send their own share of them over their own links).

    ``device_node: int[ep]`` node of each device of the group. Tokens beyond an expert's per-source
    capacity are dropped before dispatch (GShard/Megatron-Core), and their count returned.
    ``failed: bool[ep]`` devices that send nothing and whose slots serve nothing: tokens for
    experts left with no live replica are dropped too. ``algorithm="allgather"`` sends every live
    device's ``tokens_per_source`` tokens to every other live device whatever the routing.
    """
    ep, experts = placement.ep, placement.num_experts
    lost = 0.0
    if failed is not None:   # failed devices produce no tokens: their token copies are lost
        lost = tokens_per_source * top_k * float(np.asarray(failed, dtype=bool).sum())
        alive_rows = ~np.asarray(failed, dtype=bool)[choices.source]
        choices = routing.LayerChoices(choices.experts[alive_rows], choices.source[alive_rows],
                                       choices.weight)
    # Step 1: token counts per (source, expert), after capacity dropping.
    raw = routing.counts_from_choices(choices, ep, experts)
    counts, dropped = routing.apply_capacity(raw, tokens_per_source, top_k, capacity_factor)
    if failed is not None:   # experts with no live slot: their tokens are dropped
        dead = ~placement.live_experts(layer, failed)
        dropped = dropped + np.where(dead[None, :], counts, 0.0)
        counts = np.where(dead[None, :], 0.0, counts)
    # Step 2: send each expert's tokens to the replicas each source prefers.
    split = placement.replica_split(layer, device_node, failed, counts=counts)
    tokens, per_device_expert = split.route(counts)               # [src, dst], [dst, experts]
    slots = placement.slot_expert[layer]                          # [dst, slots]
    same = (slots[:, :, None] == slots[:, None, :]).sum(axis=2)   # copies of the slot's expert
    slot_tokens = np.take_along_axis(per_device_expert, slots, axis=1) / same
    token_bytes = hidden * dispatch_bytes_per_elem
    # Step 3: flows, and the bytes of one dispatch and one combine copy.
    if algorithm not in LAYER_ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} must be one of {', '.join(LAYER_ALGORITHMS)}")
    token_bytes, combine_copy = copy_bytes(algorithm, hidden, dispatch_bytes_per_elem,
                                           combine_bytes_per_elem)
    token_bytes, combine_copy = token_bytes * copy_share, combine_copy * copy_share
    if algorithm in ("direct", "deepep_ll"):
        src, dst = np.nonzero(tokens)
        pairs, nbytes = merge_flows(src, dst, tokens[src, dst] * token_bytes, ep)
    elif algorithm == "hierarchical":
        pairs, nbytes = _hierarchical_flows(choices, counts, raw, split, tokens, device_node,
                                            token_bytes)
    elif algorithm == "allgather":
        pairs, nbytes = _allgather_flows(ep, tokens_per_source * token_bytes, failed)
    elif algorithm == "replicated":   # every rank holds the tokens already: nothing moves
        pairs, nbytes = np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    else:   # deepep_normal: the hierarchical route with one copy per destination rank
        per_rank = _rank_fanout(choices, split, counts, raw)
        pairs, nbytes = _hierarchical_flows(choices, counts, raw, split, per_rank, device_node,
                                            token_bytes)
    cross = float(nbytes[device_node[pairs[:, 0]] != device_node[pairs[:, 1]]].sum())
    scale = combine_copy / token_bytes
    sources = ep if failed is None else int((~np.asarray(failed, dtype=bool)).sum())
    deepep = algorithm.startswith("deepep")
    return LayerTraffic(pairs, nbytes, nbytes * scale, tokens, slot_tokens, counts,
                        float(dropped.sum()) + lost, cross, sources, algorithm, token_bytes,
                        combine_copy, algorithm == "deepep_ll", not deepep,
                        None if failed is None else np.asarray(failed, dtype=bool).copy())


def _allgather_flows(ep: int, source_bytes: float, failed: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """All-gather dispatch: ``source_bytes`` from every live device to every other live device
    (:func:`merge_flows` drops the self and empty flows)."""
    live = np.ones(ep, dtype=bool) if failed is None else ~np.asarray(failed, dtype=bool)
    src, dst = np.nonzero(live[:, None] & live[None, :])
    return merge_flows(src, dst, np.full(src.size, float(source_bytes)), ep)


def copy_bytes(algorithm: str, hidden: int, dispatch_bytes_per_elem: float,
               combine_bytes_per_elem: float) -> tuple[float, float]:
    """Bytes of one dispatch copy and one combine copy of a token under ``algorithm``.

    ``direct``/``hierarchical``/``allgather``: ``hidden * bytes per element`` each way (the
    all-gather moves the activations as NCCL gets them, BF16 in vLLM and SGLang; an FP8 dispatch
    is counted at 1 byte per element without scales). DeepEP: a dispatch in a 1-byte format (FP8)
    adds one 4-byte scale per 128 elements; ``deepep_ll`` adds 16 bytes of metadata per dispatch
    message; combine is ``hidden * combine bytes`` without scales.

    Example
    -------
    >>> copy_bytes("deepep_ll", 7168, 1, 2)
    (7408.0, 14336.0)
    """
    dispatch = float(hidden * dispatch_bytes_per_elem)
    if algorithm.startswith("deepep") and dispatch_bytes_per_elem <= 1:
        dispatch += math.ceil(hidden / SCALE_BLOCK) * SCALE_BYTES
    if algorithm == "deepep_ll":
        dispatch += LL_META_BYTES
    return dispatch, float(hidden * combine_bytes_per_elem)


def _rank_fanout(choices: routing.LayerChoices, split: ReplicaSplit, counts: np.ndarray,
                 raw: np.ndarray) -> np.ndarray:
    """``[src, dst]`` expected real tokens of each source with at least one expert on each device.

    A source on node ``n`` sends expert ``e``'s copy to device ``d`` with probability
    ``q[e, d] = split.by_node[n][e, d]`` (to itself if it holds ``e``); a token reaches ``d``
    unless all its experts go elsewhere: ``1 - prod_k (1 - q[e_k, d])``. Capacity drops shrink
    each source's row by its kept fraction, as for the hierarchical network copies.

    ``q[e, :]`` is nonzero only on the devices holding ``e``, so the product runs over those
    entries alone, as a sum of ``log(1 - q)`` per (token, device); the work grows with the
    tokens' replicas, not with ``tokens x k x devices``.
    """
    ep, num_experts = split.node_of.size, split.by_node.shape[1]
    node, expert, device = np.nonzero(split.by_node)            # sorted by (node, expert)
    share = split.by_node[node, expert, device]
    per_key = np.bincount(node * num_experts + expert, minlength=split.by_node.shape[0]
                          * num_experts)
    first = np.concatenate(([0], np.cumsum(per_key)[:-1]))
    fanout = np.zeros((ep, ep))
    k = choices.top_k
    block = max(1, (1 << 22) // max(1, k * ep))           # rows per block, as the memory allows
    for start in range(0, choices.num_tokens, block):
        rows = np.arange(start, min(start + block, choices.num_tokens))
        src, experts = choices.source[rows], choices.experts[rows]
        token = np.repeat(np.arange(rows.size), k)
        src_k, exp_k = np.repeat(src, k), experts.ravel()
        own = split.own[src_k, exp_k]
        key = split.node_of[src_k] * num_experts + exp_k
        size = np.where(own, 0, per_key[key])                 # replicas of each sent copy
        at = np.repeat(first[key] - np.cumsum(size) + size, size) + np.arange(size.sum())
        to = np.concatenate([device[at], src_k[own]])
        q = np.concatenate([share[at], np.ones(int(own.sum()))])
        who = np.concatenate([np.repeat(token, size), token[own]])
        with np.errstate(divide="ignore"):
            miss = np.bincount(who * ep + to, weights=np.log1p(-np.minimum(q, 1.0)),
                               minlength=rows.size * ep)
        hit = np.flatnonzero(miss)                            # (token, device) reached
        fanout += np.bincount(src[hit // ep] * ep + hit % ep, weights=1.0 - np.exp(miss[hit]),
                              minlength=ep * ep).reshape(ep, ep)
    kept = np.divide(counts, raw, out=np.ones_like(counts), where=raw > 0).mean(axis=1)
    return fanout * choices.weight * kept[:, None]


def _hierarchical_flows(choices: routing.LayerChoices, counts: np.ndarray, raw: np.ndarray,
                        split: ReplicaSplit, tokens: np.ndarray, device_node: np.ndarray,
                        token_bytes: float) -> tuple[np.ndarray, np.ndarray]:
    """Node-deduplicated dispatch: one network copy per (token, destination node), then NVLink.

    A source ``s`` on node ``n`` sends, for every other node ``b``, one copy of each token with an
    expert on ``b`` to its relay there (the device of ``b`` with ``s``'s local index, modulo the
    size of ``b``); the relay forwards ``tokens[s, d]`` to every device ``d`` of ``b``. Its own
    node's devices it reaches directly. Returns merged ``(pairs int[F, 2], bytes float[F])``.
    """
    # Step 1: the group's nodes, each device's local index, and each (source, node) relay.
    _, node_of = np.unique(device_node, return_inverse=True)        # node position 0..N-1
    node_of = node_of.ravel()
    sizes = np.bincount(node_of)
    num_nodes = sizes.size
    node_order = np.argsort(node_of, kind="stable")                   # devices, node by node
    first = np.cumsum(sizes) - sizes
    rank_in_node = np.empty_like(node_of)
    rank_in_node[node_order] = np.arange(node_of.size) - np.repeat(first, sizes)
    members = np.zeros((num_nodes, sizes.max()), dtype=np.intp)       # [N, widest node]
    members[node_of[node_order], rank_in_node[node_order]] = node_order
    relay = members[np.arange(num_nodes), rank_in_node[:, None] % sizes]   # [src, N]
    # Step 2: bytes of each network copy, from the node fanout of the source's expert map.
    kept = np.divide(counts, raw, out=np.ones_like(counts), where=raw > 0)
    keep_frac = kept.mean(axis=1)                                     # capacity drops shrink it
    cross = _fanout_by_source(choices, split, node_of, members[:, 0], num_nodes)
    cross = cross * keep_frac[:, None] * token_bytes                  # [src, N]
    # Step 3: one row of flows per source, in the order the reference loop emits them
    # (merge_flows sums repeated pairs in that order): per other node b its relay copy, then
    # the relay's forwards; then the source's own node.
    src_cols, dst_cols, byte_cols, valid_cols = [], [], [], []
    sources = np.arange(node_of.size)
    for b in range(num_nodes):
        targets = members[b, : sizes[b]]
        src_cols += [sources[:, None], np.repeat(relay[:, b : b + 1], sizes[b], axis=1)]
        dst_cols += [relay[:, b : b + 1], np.broadcast_to(targets, (node_of.size, sizes[b]))]
        byte_cols += [cross[:, b : b + 1], tokens[:, targets] * token_bytes]
        valid_cols.append(np.broadcast_to((node_of != b)[:, None], (node_of.size, 1 + sizes[b])))
    local = members[node_of]                                          # [src, widest node]
    src_cols.append(np.broadcast_to(sources[:, None], local.shape))
    dst_cols.append(local)
    byte_cols.append(np.take_along_axis(tokens, local, axis=1) * token_bytes)
    valid_cols.append(np.arange(local.shape[1]) < sizes[node_of][:, None])
    order = node_order                                                # sources node by node
    valid = np.concatenate(valid_cols, axis=1)[order]
    src, dst, nbytes = (np.concatenate(cols, axis=1)[order][valid]
                        for cols in (src_cols, dst_cols, byte_cols))
    return merge_flows(src, dst, nbytes, node_of.size)


def _fanout_by_source(choices: routing.LayerChoices, split: ReplicaSplit, node_of: np.ndarray,
                      first_member: np.ndarray, num_nodes: int) -> np.ndarray:
    """``[src, N]`` expected real tokens of each source that reach each node.

    A token of a source on node ``n`` sends expert ``e``'s copy to node ``b`` with probability
    ``q[e, b]``: the share of ``e``'s tokens from node ``n`` that replicas on ``b`` take (0 or 1 when
    all of them sit on one node, as without replicas). It reaches ``b`` unless every one of its
    experts goes elsewhere: ``1 - prod_k (1 - q[e_k, b])``. A source holding an expert keeps its
    tokens on its own node, where ``q`` already sends them (a replica there takes all of ``n``'s
    share), so ``first_member`` is not needed.
    """
    del first_member
    on_node = (node_of[:, None] == np.arange(num_nodes)[None, :]).astype(float)   # [dst, N]
    source_node = node_of[choices.source]                                         # [T]
    fanout = np.zeros((node_of.size, num_nodes))
    for n in range(num_nodes):
        rows = np.flatnonzero(source_node == n)
        if rows.size == 0:
            continue
        q = split.by_node[n] @ on_node                                            # [E, N]
        miss = np.prod(1.0 - q[choices.experts[rows]], axis=1)                    # [rows, N]
        np.add.at(fanout, choices.source[rows], 1.0 - miss)
    return fanout * choices.weight
