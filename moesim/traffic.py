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
from moesim.placement.placement import Placement

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
                  capacity_factor: float | None, top_k: int, algorithm: str = "direct"
                  ) -> LayerTraffic:
    """Flows of one layer's dispatch and combine all-to-alls.

    ``device_node: int[ep]`` node of each device of the group. Tokens beyond an expert's per-source
    capacity are dropped before dispatch (GShard/Megatron-Core), and their count returned.
    """
    ep, experts = placement.ep, placement.num_experts
    # Step 1: token counts per (source, expert), after capacity dropping.
    raw = routing.counts_from_choices(choices, ep, experts)
    counts, dropped = routing.apply_capacity(raw, tokens_per_source, top_k, capacity_factor)
    # Step 2: send each expert's tokens to the replicas each source prefers.
    share = placement.replica_share(layer, device_node)           # [src, experts, dst]
    tokens = np.einsum("se,sed->sd", counts, share)               # [src, dst]
    per_device_expert = np.einsum("se,sed->de", counts, share)    # [dst, experts]
    slots = placement.slot_expert[layer]                          # [dst, slots]
    same = (slots[:, :, None] == slots[:, None, :]).sum(axis=2)   # copies of the slot's expert
    slot_tokens = np.take_along_axis(per_device_expert, slots, axis=1) / same
    token_bytes = hidden * dispatch_bytes_per_elem
    # Step 3: flows.
    if algorithm == "direct":
        src, dst = np.nonzero(tokens)
        pairs, nbytes = merge_flows(src, dst, tokens[src, dst] * token_bytes, ep)
    elif algorithm == "hierarchical":
        pairs, nbytes = _hierarchical_flows(choices, counts, raw, share, tokens, device_node,
                                            token_bytes)
    else:
        raise ValueError(f"algorithm={algorithm!r} must be 'direct' or 'hierarchical'")
    cross = float(nbytes[device_node[pairs[:, 0]] != device_node[pairs[:, 1]]].sum())
    scale = combine_bytes_per_elem / dispatch_bytes_per_elem
    return LayerTraffic(pairs, nbytes, nbytes * scale, tokens, slot_tokens, counts,
                        float(dropped.sum()), cross)


def _hierarchical_flows(choices, counts, raw, share, tokens, device_node, token_bytes):
    """Node-deduplicated dispatch: one network copy per (token, destination node), then NVLink."""
    ep = tokens.shape[0]
    nodes, local_index = np.unique(device_node, return_inverse=True)
    node_of = local_index  # node position 0..N-1 of each device
    num_nodes = len(nodes)
    # Which node serves expert e for sources on node n: where the largest share goes.
    src_parts, dst_parts, byte_parts = [], [], []
    rank_in_node = np.zeros(ep, dtype=int)
    members = [np.flatnonzero(node_of == n) for n in range(num_nodes)]
    for m in members:
        rank_in_node[m] = np.arange(len(m))
    kept = np.divide(counts, raw, out=np.ones_like(counts), where=raw > 0)
    for n in range(num_nodes):
        sources = members[n]
        expert_device = share[sources[0]].argmax(axis=1)          # [experts]
        expert_node = node_of[expert_device]
        fanout = routing.node_fanout(choices, expert_node, ep, num_nodes)   # [src, node]
        keep_frac = kept.mean(axis=1)                              # capacity drops shrink it
        for s in sources:
            for b in range(num_nodes):
                if b == n:
                    continue
                relay = members[b][rank_in_node[s] % len(members[b])]
                src_parts.append([s])
                dst_parts.append([relay])
                byte_parts.append([fanout[s, b] * keep_frac[s] * token_bytes])
                # relay forwards to each expert device on node b
                targets = members[b]
                src_parts.append(np.full(len(targets), relay))
                dst_parts.append(targets)
                byte_parts.append(tokens[s, targets] * token_bytes)
            local = members[n]
            src_parts.append(np.full(len(local), s))
            dst_parts.append(local)
            byte_parts.append(tokens[s, local] * token_bytes)
    src = np.concatenate(src_parts).astype(int)
    dst = np.concatenate(dst_parts).astype(int)
    return merge_flows(src, dst, np.concatenate(byte_parts), ep)
