"""Failover: re-home the experts of failed devices while moving as few expert weights as possible.

When devices of an EP group fail, every expert that still has a replica on a live device keeps
serving from there (the replica choice of :meth:`Placement.replica_split` simply stops seeing the
dead slots), so it need not move. Only an expert whose every copy sat on failed devices is lost;
it is copied into one live slot that now holds a *redundant* replica (an expert with at least two
live copies), which frees no other expert of its last copy. Each lost expert costs exactly one
copy of its weights, the fewest possible. Lost experts are re-homed hottest first, so when the
spare replicas run out the ones left behind (their tokens are dropped) are the coldest.

Which redundant replica gives way: the one on the failed device's node first (the copy travels
over the scale-up link and the node keeps the experts the plan grouped there), then the one whose
expert carries the lowest load per live replica (its other copies absorb the least extra load),
then the lowest slot index. (``moesim plan`` passes no ``device_node`` unless ``--same-node``: on
DeepSeek-V3 EP64 the node rule cost balance, docs/placement.md.) Failed devices keep their slots
in the array (the plan stays the same shape and still names every expert); they are treated as
dead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim.errors import InfeasiblePlacement
from moesim.placement.placement import Placement

__all__ = ["FailoverPlan", "replan_failed", "live_device_load"]


@dataclass(frozen=True, eq=False)
class FailoverPlan:
    """A placement re-planned around failed devices, and what it cost to get there."""

    placement: Placement              # same shape as before; failed devices' slots unchanged
    moved_slots: np.ndarray           # int[layers]: slots whose expert changed (one copy each)
    moved_bytes: float                # moved_slots.sum() x one expert's weight bytes
    lost_experts: list[list[int]]     # per layer: experts with no live copy (tokens dropped)
    failed: tuple[int, ...] = ()      # EP-local indices of the failed devices, ascending

    @property
    def total_moved_slots(self) -> int:
        return int(self.moved_slots.sum())


def replan_failed(placement: Placement, failed: Sequence[int], load: np.ndarray | None,
                  expert_bytes: float, device_node: np.ndarray | None = None) -> FailoverPlan:
    """Re-home the experts that lived only on ``failed`` devices into redundant live slots.

    Parameters
    ----------
    placement
        The placement running before the failure, ``slot_expert: [layers, ep, slots]``.
    failed
        EP-local indices (``0..ep-1``) of the failed devices; repeats are ignored.
    load
        ``float[layers, experts]`` tokens per expert (ranks the lost experts and the donor
        replicas); ``None`` treats every expert as equally loaded.
    expert_bytes
        Bytes of one expert's weights (params x weight dtype bytes): the cost of one moved slot.
    device_node
        ``int[ep]`` node of each device; when given, donors on a failed device's node win.

    Returns
    -------
    FailoverPlan
        Never raises for lack of spare replicas: experts that found no slot are listed in
        ``lost_experts``.

    Raises
    ------
    InfeasiblePlacement
        A failed index outside ``0..ep-1``, or ``load`` / ``device_node`` of the wrong shape.
    """
    dead = _dead_mask(placement.ep, failed)
    load = _check_load(placement, load)
    if device_node is not None:
        device_node = np.asarray(device_node).ravel()
        if device_node.shape != (placement.ep,):
            raise InfeasiblePlacement(f"device_node has shape {device_node.shape}; expected "
                                      f"({placement.ep},), one node per EP device")
    if not (np.isfinite(expert_bytes) and expert_bytes >= 0):
        raise InfeasiblePlacement(f"expert_bytes={expert_bytes} must be finite and >= 0")
    tables, moved, lost = [], [], []
    for layer in range(placement.num_layers):
        table, unplaced = _replan_layer(placement.slot_expert[layer], dead, load[layer],
                                        device_node)
        tables.append(table)
        moved.append(int((table != placement.slot_expert[layer]).sum()))
        lost.append(unplaced)
    new = Placement(np.stack(tables), placement.num_experts,
                    name=f"{placement.name}+failover" if placement.name else "failover")
    moved_slots = np.array(moved, dtype=np.int64)
    return FailoverPlan(new, moved_slots, float(moved_slots.sum()) * float(expert_bytes), lost,
                        tuple(int(d) for d in np.flatnonzero(dead)))


def _replan_layer(table: np.ndarray, dead: np.ndarray, load: np.ndarray,
                  device_node: np.ndarray | None) -> tuple[np.ndarray, list[int]]:
    """One layer: ``table: int[ep, slots]`` re-planned, and the experts left without a slot."""
    ep, slots = table.shape
    table = table.astype(np.int64).copy()
    flat = table.reshape(-1)                                  # view: writes land in ``table``
    slot_device = np.repeat(np.arange(ep), slots)
    live = ~dead[slot_device]                                 # bool[ep * slots]
    copies = np.bincount(flat[live], minlength=load.size)     # live replicas per expert
    # Step 1: the lost experts, hottest first (ties: lowest id), so the coldest are dropped.
    lost = np.flatnonzero(copies == 0)
    lost = lost[np.lexsort((lost, -load[lost]))]
    unplaced: list[int] = []
    for expert in lost.tolist():
        # Step 2: donors are live slots whose expert keeps another live copy.
        donors = np.flatnonzero(live & (copies[flat] >= 2))
        if donors.size == 0:
            unplaced.append(expert)
            continue
        # Step 3: same node as a failed holder first, then lowest load per replica, lowest slot.
        far = np.zeros(donors.size, dtype=bool)
        if device_node is not None:
            holders = dead & (table == expert).any(axis=1)
            far = ~np.isin(device_node[slot_device[donors]], device_node[holders])
        per_replica = load[flat[donors]] / copies[flat[donors]]
        best = donors[np.lexsort((donors, per_replica, far))[0]]
        copies[flat[best]] -= 1
        flat[best] = expert
        copies[expert] = 1
    return table, sorted(unplaced)


def live_device_load(placement: Placement, failed: Sequence[int], load: np.ndarray | None
                     ) -> np.ndarray:
    """``float[layers, ep]``: tokens each device computes, an expert's load split evenly over its
    live slots (failed devices: 0; experts without a live slot: dropped).

    A balance summary, not the simulator's routing (which prefers same-device and same-node
    replicas): ``max / mean`` over live devices says how evenly the survivors share the work.
    """
    dead = _dead_mask(placement.ep, failed)
    load = _check_load(placement, load)
    out = np.zeros((placement.num_layers, placement.ep))
    for layer in range(placement.num_layers):
        table = placement.slot_expert[layer]
        live_slots = np.where(dead[:, None], -1, table)            # -1: a dead slot
        copies = np.bincount(live_slots[live_slots >= 0], minlength=placement.num_experts)
        share = load[layer] / np.maximum(copies, 1)
        out[layer] = np.where(live_slots >= 0, share[table], 0.0).sum(axis=1)
    return out


def _dead_mask(ep: int, failed: Sequence[int]) -> np.ndarray:
    """bool[ep]: True for the failed devices (checked to be EP-local indices)."""
    dead = np.zeros(ep, dtype=bool)
    for device in failed:
        if isinstance(device, bool) or not isinstance(device, int | np.integer) \
                or not 0 <= device < ep:
            raise InfeasiblePlacement(f"failed device {device!r} is not an EP-local index in "
                                      f"0..{ep - 1}")
        dead[int(device)] = True
    return dead


def _check_load(placement: Placement, load: np.ndarray | None) -> np.ndarray:
    """``float[layers, experts]``: ``load`` checked, or all ones."""
    shape = (placement.num_layers, placement.num_experts)
    if load is None:
        return np.ones(shape)
    load = np.asarray(load, dtype=np.float64)
    if load.shape != shape:
        raise InfeasiblePlacement(f"load has shape {load.shape}; expected {shape} "
                                  "(layers, experts)")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise InfeasiblePlacement("load must be finite and >= 0")
    return load
