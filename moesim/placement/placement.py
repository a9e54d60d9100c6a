"""A placement: for every MoE layer, the logical expert held by each physical slot of an EP group.

Every device of an EP group has the same number of slots. A logical expert may hold several slots
(replicas); each source device sends an expert's tokens to the replicas that :meth:`replica_share`
picks: the replica on the same device, else those on the same node, else all replicas evenly (as
DeepSeek's EPLB and SGLang do). All EP groups of the cluster use the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InfeasiblePlacement

__all__ = ["Placement"]


@dataclass(frozen=True, eq=False)
class Placement:
    """``slot_expert: int[moe_layers, ep, slots_per_device]`` logical expert of each slot."""

    slot_expert: np.ndarray
    num_experts: int
    name: str = ""

    def __post_init__(self) -> None:
        arr = np.asarray(self.slot_expert)
        if arr.ndim != 3:
            raise InfeasiblePlacement(f"slot_expert must be [layers, devices, slots], got shape "
                                      f"{arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_experts):
            raise InfeasiblePlacement(f"expert ids must be in 0..{self.num_experts - 1}, got "
                                      f"{arr.min()}..{arr.max()}")
        for layer in range(arr.shape[0]):
            missing = np.setdiff1d(np.arange(self.num_experts), arr[layer])
            if missing.size:
                raise InfeasiblePlacement(f"layer {layer}: experts {missing[:8].tolist()} have no "
                                          "slot (every expert needs at least one)")
        object.__setattr__(self, "slot_expert", arr.astype(np.int32))

    @property
    def num_layers(self) -> int:
        return self.slot_expert.shape[0]

    @property
    def ep(self) -> int:
        return self.slot_expert.shape[1]

    @property
    def slots_per_device(self) -> int:
        return self.slot_expert.shape[2]

    @property
    def physical_to_logical(self) -> np.ndarray:
        """int[layers, ep * slots]: slot s lives on device s // slots_per_device."""
        return self.slot_expert.reshape(self.num_layers, -1)

    @classmethod
    def from_physical(cls, physical_to_logical: np.ndarray, ep: int, num_experts: int,
                      name: str = "") -> Placement:
        arr = np.asarray(physical_to_logical)
        if arr.ndim != 2 or arr.shape[1] % ep:
            raise InfeasiblePlacement(f"{arr.shape[1] if arr.ndim == 2 else arr.shape} physical "
                                      f"slots do not split evenly over {ep} devices")
        return cls(arr.reshape(arr.shape[0], ep, -1), num_experts, name)

    def replica_count(self, layer: int) -> np.ndarray:
        """int[experts]: slots holding each expert."""
        return np.bincount(self.slot_expert[layer].ravel(), minlength=self.num_experts)

    def replica_share(self, layer: int, device_node: np.ndarray) -> np.ndarray:
        """float[src, experts, dst]: fraction of src's tokens for an expert sent to each device.

        ``device_node: int[ep]`` node of each device of the group. Replicas on the same device win,
        then replicas on the same node, then all replicas evenly; a device with two replicas of
        an expert takes twice the share.
        """
        ep, experts = self.ep, self.num_experts
        holds = np.zeros((experts, ep))  # holds[e, d] = slots of expert e on device d
        np.add.at(holds, (self.slot_expert[layer], np.arange(ep)[:, None]), 1.0)
        share = np.empty((ep, experts, ep))
        same_node = device_node[:, None] == device_node[None, :]  # [src, dst]
        for src in range(ep):
            on_device = np.zeros(ep)
            on_device[src] = 1.0
            chosen = holds.copy()  # fall back to every replica
            for preferred in (holds * same_node[src], holds * on_device):  # narrower wins
                has = preferred.sum(axis=1) > 0
                chosen[has] = preferred[has]
            share[src] = chosen / chosen.sum(axis=1, keepdims=True)
        return share

    def memory_slots(self) -> int:
        return self.slots_per_device
