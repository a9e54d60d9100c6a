"""The planning problem: what a planner knows of one layer's routing and of the EP group.

Shared by the planner's steps (:mod:`moesim.placement.planner`, :mod:`~.local_search`,
:mod:`~.migration`), which all import it from here so none of them imports another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim.errors import InfeasiblePlacement

__all__ = ["LayerRouting", "ClusterShape", "subsample_tokens"]


@dataclass(frozen=True, eq=False)
class LayerRouting:
    """What the planner knows of one layer's routing."""

    load: np.ndarray                  # float[E] token-expert pairs per expert
    tokens: np.ndarray | None = None  # int[T, k] per-token choices, or None (counts only)
    pairs: np.ndarray | None = None   # float[E, E] co-activation counts, or None


@dataclass(frozen=True, eq=False)
class ClusterShape:
    """The EP group: ``device_node: int[ep]`` node of each device, equal slots per device."""

    num_experts: int
    device_node: np.ndarray
    slots_per_device: int

    def __post_init__(self) -> None:
        nodes, index = np.unique(np.asarray(self.device_node), return_inverse=True)
        per_node = np.bincount(index)
        if np.any(per_node != per_node[0]):
            raise InfeasiblePlacement(f"the moesim planner needs the same number of EP devices on "
                                      f"every node; got {per_node.tolist()} (use policy eplb)")
        slots = index.size * self.slots_per_device
        if self.slots_per_device < 1 or slots < self.num_experts:
            raise InfeasiblePlacement(f"{index.size} devices x {self.slots_per_device} slots = "
                                      f"{slots} slots cannot hold {self.num_experts} experts")
        object.__setattr__(self, "device_node", index)

    @property
    def num_nodes(self) -> int:
        return int(self.device_node.max()) + 1

    @property
    def devices_per_node(self) -> int:
        return self.device_node.size // self.num_nodes

    @property
    def slots_per_node(self) -> int:
        return self.devices_per_node * self.slots_per_device

    def node_devices(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.device_node == node)

    def max_everywhere(self) -> int:
        """Most experts that can hold a slot on every node (one spare slot each elsewhere)."""
        if self.num_nodes == 1:
            return 0
        spare = self.num_nodes * self.slots_per_node - self.num_experts
        return min(spare // (self.num_nodes - 1), self.slots_per_node - 1, self.num_experts)


def subsample_tokens(tokens: np.ndarray | None, max_tokens: int, seed: Sequence[int]
                     ) -> np.ndarray | None:
    """At most ``max_tokens`` rows of ``tokens: int[T, k]``, drawn without replacement (seeded),
    in their original order; None stays None."""
    if tokens is None or tokens.shape[0] <= max_tokens:
        return None if tokens is None else tokens.astype(np.int64)
    rows = np.random.default_rng(list(seed)).choice(tokens.shape[0], max_tokens, replace=False)
    return tokens[np.sort(rows)].astype(np.int64)
