"""Expert-parallel load balancing (EPLB), after DeepSeek's published algorithm.

An MoE layer has ``E`` logical experts but ``P >= E`` physical expert slots spread evenly over the
GPUs; the ``P - E`` redundant slots hold extra replicas of hot experts so that each replica serves
``load / replica_count`` of its expert's tokens. EPLB chooses, per layer, how many replicas each
expert gets and which slot (hence GPU) each replica lives on, so that GPU loads are balanced.

This is an independent numpy implementation of the algorithm in deepseek-ai/EPLB (``eplb.py``):

* hierarchical policy (when ``num_groups % num_nodes == 0``): pack expert groups onto nodes, so
  that all replicas of an expert stay inside one node (the inter-node network is slower), then
  replicate and pack onto the GPUs of each node;
* global policy (otherwise): replicate over all slots and pack onto all GPUs, as if one node.

Tie-breaking is deterministic: sorts are stable (equal weights keep ascending index order), the
lightest open pack is the lowest-numbered one among equals, and the expert chosen for a new
replica is the lowest-numbered among equal per-replica loads. Arithmetic is float64 (EPLB uses
float32; the two can differ only on near-ties that float32 rounds to equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InfeasiblePlacement

__all__ = ["EplbPlan", "eplb_rebalance", "balanced_packing", "replicate_experts"]


@dataclass(frozen=True, eq=False)
class EplbPlan:
    """The placement EPLB chooses for every MoE layer (arrays are read-only).

    Attributes
    ----------
    physical_to_logical : int64 [layers, num_physical]
        Logical expert held by each slot; slot ``s`` lives on GPU ``s // (num_physical // num_gpus)``.
    logical_to_physical : int64 [layers, num_logical, max_replicas]
        Slots holding each logical expert, padded with -1. Entry ``r`` is the ``r``-th replica
        created for that expert (``r = 0`` is the original), as in EPLB's ``log2phy``.
    replica_count : int64 [layers, num_logical]
        Number of slots holding each logical expert (>= 1; sums to ``num_physical`` per layer).
    """

    physical_to_logical: np.ndarray
    logical_to_physical: np.ndarray
    replica_count: np.ndarray


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    Greedy (longest-processing-time first with a cardinality cap): items in descending weight
    (stable, so equal weights go in ascending index order) each go to the lightest pack that still
    has room, the lowest-numbered among equally light packs. When every pack holds one item, item
    ``i`` goes to pack ``i`` (any assignment is equally balanced; this one moves nothing), as EPLB.

    Parameters
    ----------
    weight : float [X, n]
        Weight of each item, one packing problem per row.
    num_packs : int
        Number of packs; must divide ``n``.

    Returns
    -------
    pack_index : int64 [X, n]
        Pack of each item.
    rank_in_pack : int64 [X, n]
        Position of each item inside its pack (0 = first placed).
    """
    num_rows, num_items = weight.shape
    assert num_items % num_packs == 0, (num_items, num_packs)
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros(weight.shape, dtype=np.int64)

    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    heaviest_first = np.argsort(-weight, axis=-1, kind="stable")
    for row in range(num_rows):
        pack_weight = np.zeros(num_packs)
        pack_size = np.zeros(num_packs, dtype=np.int64)
        for item in heaviest_first[row]:
            # A full pack is never chosen; argmin returns the first of equally light packs.
            pack = int(np.argmin(np.where(pack_size < items_per_pack, pack_weight, np.inf)))
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_size[pack]
            pack_weight[pack] += weight[row, item]
            pack_size[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_physical: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spread ``num_logical`` experts over ``num_physical`` replicas to minimise the hottest replica.

    Slots ``0 .. num_logical - 1`` hold each expert's original; every further slot is a new replica
    of the expert whose per-replica load ``weight / replica_count`` is currently largest (the
    lowest-numbered among equals). This greedy is optimal for the max per-replica load.

    Parameters
    ----------
    weight : float [X, num_logical]
        Load of each logical expert, one problem per row.
    num_physical : int
        Total replicas per row, ``>= num_logical``.

    Returns
    -------
    physical_to_logical : int64 [X, num_physical]
        Logical expert of each replica.
    replica_rank : int64 [X, num_physical]
        How many replicas of the same expert were created before this one.
    replica_count : int64 [X, num_logical]
        Replicas of each logical expert.
    """
    num_rows, num_logical = weight.shape
    assert num_physical >= num_logical, (num_physical, num_logical)
    rows = np.arange(num_rows)
    physical_to_logical = np.zeros((num_rows, num_physical), dtype=np.int64)
    physical_to_logical[:, :num_logical] = np.arange(num_logical)
    replica_rank = np.zeros((num_rows, num_physical), dtype=np.int64)
    replica_count = np.ones((num_rows, num_logical), dtype=np.int64)
    for slot in range(num_logical, num_physical):
        hottest = np.argmax(weight / replica_count, axis=-1)
        physical_to_logical[:, slot] = hottest
        replica_rank[:, slot] = replica_count[rows, hottest]
        replica_count[rows, hottest] += 1
    return physical_to_logical, replica_rank, replica_count


def _inverse_permutation(permutation: np.ndarray) -> np.ndarray:
    """Row-wise inverse: ``result[x, permutation[x, i]] = i``. ``permutation: [X, n]``."""
    inverse = np.empty_like(permutation)
    np.put_along_axis(inverse, permutation, np.arange(permutation.shape[1]), axis=-1)
    return inverse


def _rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy; returns physical_to_logical, replica_rank [L, P], count [L, E].

    "Node order" below lists the logical experts node by node (node 0's groups first, each group's
    experts in their original order), so node ``k`` owns positions ``k * E/N .. (k+1) * E/N - 1``.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # Step 1: pack expert groups onto nodes by total group load, then list experts in node order.
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=-1)
    group_node, group_rank_in_node = balanced_packing(group_load, num_nodes)
    group_start = (group_node * groups_per_node + group_rank_in_node) * group_size  # [L, G]
    logical_to_node_order = (group_start[:, :, None] + np.arange(group_size)).reshape(
        num_layers, num_logical
    )
    node_order_to_logical = _inverse_permutation(logical_to_node_order)

    # Step 2: replicate experts within each node: one replication problem per (layer, node).
    local_load = np.take_along_axis(weight, node_order_to_logical, axis=-1).reshape(
        num_layers * num_nodes, experts_per_node
    )
    replica_to_local, replica_rank, local_count = replicate_experts(local_load, slots_per_node)

    # Step 3: pack each node's replicas onto its GPUs by per-replica load.
    replica_load = np.take_along_axis(local_load / local_count, replica_to_local, axis=-1)
    gpu_in_node, rank_on_gpu = balanced_packing(replica_load, num_gpus // num_nodes)
    replica_to_node_slot = gpu_in_node * slots_per_gpu + rank_on_gpu
    node_slot_to_replica = _inverse_permutation(replica_to_node_slot)

    # Step 4: map node-local slots and experts back to global slot and logical expert ids.
    slot_to_local = np.take_along_axis(replica_to_local, node_slot_to_replica, axis=-1)
    node_offset = (np.arange(num_nodes) * experts_per_node)[None, :, None]
    slot_to_node_order = (slot_to_local.reshape(num_layers, num_nodes, -1) + node_offset).reshape(
        num_layers, num_physical
    )
    physical_to_logical = np.take_along_axis(node_order_to_logical, slot_to_node_order, axis=-1)
    slot_rank = np.take_along_axis(replica_rank, node_slot_to_replica, axis=-1)
    replica_count = np.take_along_axis(
        local_count.reshape(num_layers, num_logical), logical_to_node_order, axis=-1
    )
    return physical_to_logical, slot_rank.reshape(num_layers, num_physical), replica_count


def _validate(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    """Raise InfeasiblePlacement naming the first bad argument."""
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise InfeasiblePlacement(f"weight must be a non-empty [layers, experts] array, got shape "
                                  f"{weight.shape}")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise InfeasiblePlacement("weight must be finite and >= 0")
    for name, value in [("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)]:
        if value < 1:
            raise InfeasiblePlacement(f"{name}={value} must be >= 1")
    num_logical = weight.shape[1]
    if num_physical < num_logical or num_physical % num_gpus != 0:
        raise InfeasiblePlacement(
            f"num_physical={num_physical} must be >= num_experts={num_logical} and a multiple "
            f"of num_gpus={num_gpus}"
        )
    if num_groups % num_nodes == 0:  # hierarchical policy's extra requirements
        if num_logical % num_groups != 0:
            raise InfeasiblePlacement(
                f"num_experts={num_logical} must be a multiple of num_groups={num_groups}"
            )
        if num_gpus % num_nodes != 0:
            raise InfeasiblePlacement(
                f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}"
            )


def eplb_rebalance(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> EplbPlan:
    """Choose replica counts and slots for every layer's experts (DeepSeek EPLB).

    Parameters
    ----------
    weight : float [layers, num_logical]
        Load statistics of each logical expert (e.g. tokens routed), finite and >= 0.
    num_physical : int
        Physical expert slots per layer, a multiple of ``num_gpus`` and ``>= num_logical``.
    num_groups : int
        Expert groups (group-limited routing); with the hierarchical policy a group never spans
        nodes, so ``num_logical`` must be a multiple of it.
    num_nodes : int
        Server nodes (fast intra-node network). ``num_groups % num_nodes == 0`` selects the
        hierarchical policy, which also needs ``num_gpus % num_nodes == 0``; otherwise global.
    num_gpus : int
        GPUs; slot ``s`` lives on GPU ``s // (num_physical // num_gpus)``.

    Returns
    -------
    EplbPlan

    Raises
    ------
    InfeasiblePlacement
        If the shapes or counts above do not hold.
    """
    weight = np.asarray(weight, dtype=np.float64)
    _validate(weight, num_physical, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes == 0:
        physical_to_logical, replica_rank, replica_count = _rebalance_hierarchical(
            weight, num_physical, num_groups, num_nodes, num_gpus
        )
    else:  # global policy: one group, one node
        physical_to_logical, replica_rank, replica_count = _rebalance_hierarchical(
            weight, num_physical, 1, 1, num_gpus
        )

    # logical_to_physical[l, e, r] = slot of the r-th replica of expert e, -1 past its count.
    num_layers, num_logical = weight.shape
    logical_to_physical = np.full(
        (num_layers, num_logical, int(replica_count.max())), -1, dtype=np.int64
    )
    layers = np.arange(num_layers)[:, None]
    logical_to_physical[layers, physical_to_logical, replica_rank] = np.arange(num_physical)
    for array in (physical_to_logical, logical_to_physical, replica_count):
        array.setflags(write=False)
    return EplbPlan(physical_to_logical, logical_to_physical, replica_count)
