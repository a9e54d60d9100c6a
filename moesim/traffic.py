"""Dispatch and combine traffic of one MoE layer inside one EP group.

From routing (which experts each source's tokens chose) and a placement (which device slots hold
which experts), build the byte flows of the two all-to-alls:

- ``direct``: every source sends each token once per chosen expert straight to the device holding
  it (Megatron-Core's all-to-all dispatcher);
- ``hierarchical``: a token crosses the network at most once per destination node, to the device
  on that node with the sender's local index, which forwards copies over NVLink to the devices
  holding its experts (DeepEP, Tutel's 2D all-to-all). Cross-node bytes shrink when a token's top-k
  experts share a node.

Combine is the same flows reversed, scaled from the dispatch dtype to the combine dtype (FP8
dispatch, BF16 combine as DeepEP does). Token counts are real tokens (sampled x weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim import routing
from moesim.placement.placement import Placement, ReplicaSplit

__all__ = ["LayerTraffic", "layer_traffic", "merge_flows"]


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
                  failed: np.ndarray | None = None) -> LayerTraffic:
    """Flows of one layer's dispatch and combine all-to-alls.

    ``device_node: int[ep]`` node of each device of the group. Tokens beyond an expert's per-source
    capacity are dropped before dispatch (GShard/Megatron-Core), and their count returned.
    ``failed: bool[ep]`` devices that send nothing and whose slots serve nothing: tokens for
    experts left with no live replica are dropped too.
    """
    ep, experts = placement.ep, placement.num_experts
    if failed is not None:   # failed devices produce no tokens
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
    split = placement.replica_split(layer, device_node, failed)
    tokens, per_device_expert = split.route(counts)               # [src, dst], [dst, experts]
    slots = placement.slot_expert[layer]                          # [dst, slots]
    same = (slots[:, :, None] == slots[:, None, :]).sum(axis=2)   # copies of the slot's expert
    slot_tokens = np.take_along_axis(per_device_expert, slots, axis=1) / same
    token_bytes = hidden * dispatch_bytes_per_elem
    # Step 3: flows.
    if algorithm == "direct":
        src, dst = np.nonzero(tokens)
        pairs, nbytes = merge_flows(src, dst, tokens[src, dst] * token_bytes, ep)
    elif algorithm == "hierarchical":
        pairs, nbytes = _hierarchical_flows(choices, counts, raw, split, tokens, device_node,
                                            token_bytes)
    else:
        raise ValueError(f"algorithm={algorithm!r} must be 'direct' or 'hierarchical'")
    cross = float(nbytes[device_node[pairs[:, 0]] != device_node[pairs[:, 1]]].sum())
    scale = combine_bytes_per_elem / dispatch_bytes_per_elem
    sources = ep if failed is None else int((~np.asarray(failed, dtype=bool)).sum())
    return LayerTraffic(pairs, nbytes, nbytes * scale, tokens, slot_tokens, counts,
                        float(dropped.sum()), cross, sources)


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
