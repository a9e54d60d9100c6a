"""A placement: for every MoE layer, the logical expert held by each physical slot of an EP group.

Every device of an EP group has the same number of slots. A logical expert may hold several slots
(replicas); each source device sends an expert's tokens to the replicas that
:meth:`Placement.replica_split` picks, by the placement's ``replica_rule``:

``"least_loaded"`` (default, as serving engines dispatch): the replica on the source's own device,
else one on its own node, else any; among several candidates the least loaded device takes the
tokens (a fluid model: the tokens fill the candidates' loads up to a common level, largest groups
first). ``"even"``: the same candidates, each taking an equal share per slot (moesim's rule
before; EPLB's own load estimate).

This is the one replica-selection rule of moesim: planner pricing, the simulator (through
:func:`moesim.traffic.layer_traffic`) and the loads reported for exported plans all use it. All
EP groups of the cluster use the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InfeasiblePlacement

__all__ = ["Placement", "ReplicaSplit", "REPLICA_RULES"]

REPLICA_RULES = ("least_loaded", "even")


@dataclass(frozen=True, eq=False)
class Placement:
    """``slot_expert: int[moe_layers, ep, slots_per_device]`` logical expert of each slot."""

    slot_expert: np.ndarray
    num_experts: int
    name: str = ""
    notes: tuple[str, ...] = ()     # what the planner wants said (e.g. a budget it hit)
    replica_rule: str = "least_loaded"   # one of REPLICA_RULES (see the module docstring)

    def __post_init__(self) -> None:
        if self.replica_rule not in REPLICA_RULES:
            raise InfeasiblePlacement(f"replica_rule={self.replica_rule!r}; allowed: "
                                      f"{', '.join(REPLICA_RULES)}")
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

    def replica_share(self, layer: int, device_node: np.ndarray,
                      counts: np.ndarray | None = None) -> np.ndarray:
        """float[src, experts, dst]: fraction of src's tokens for an expert sent to each device.

        ``device_node: int[ep]`` node of each device of the group. Replicas on the same device win,
        then replicas on the same node, then all replicas; see :meth:`replica_split` for how the
        candidates share.
        """
        return self.replica_split(layer, device_node, counts=counts).dense()

    def replica_split(self, layer: int, device_node: np.ndarray,
                      failed: np.ndarray | None = None,
                      counts: np.ndarray | None = None) -> ReplicaSplit:
        """:meth:`replica_share` in compact form (per node, plus the experts each device holds).

        ``failed: bool[ep]`` devices whose slots serve nothing; an expert with no live slot gets
        no destination (its tokens must be dropped by the caller, see :meth:`live_experts`).
        ``counts: float[src, experts]`` the tokens routed: with ``replica_rule="least_loaded"``
        several candidate replicas take them least loaded device first (:func:`_fill_least_loaded`);
        without counts, or with ``"even"``, each candidate slot takes an equal share.
        """
        ep, experts = self.ep, self.num_experts
        holds = np.zeros((experts, ep))  # holds[e, d] = slots of expert e on device d
        np.add.at(holds, (self.slot_expert[layer], np.arange(ep)[:, None]), 1.0)
        if failed is not None:
            holds[:, np.asarray(failed, dtype=bool)] = 0.0
        # Per node, the replicas on that node where it has any, else all of them.
        _, node_of = np.unique(np.asarray(device_node), return_inverse=True)
        node_of = node_of.ravel()
        in_node = node_of[None, :] == np.arange(node_of.max() + 1)[:, None]      # [N, dst]
        on_node = in_node[:, None, :] * holds[None, :, :]                          # [N, E, dst]
        by_node = np.where(on_node.any(axis=2, keepdims=True), on_node, holds[None, :, :])
        total = by_node.sum(axis=2, keepdims=True)
        by_node = np.divide(by_node, total, out=np.zeros_like(by_node), where=total > 0)
        own = holds.T > 0
        if self.replica_rule == "least_loaded" and counts is not None:
            by_node = _fill_least_loaded(by_node, own, node_of, np.asarray(counts, dtype=float))
        return ReplicaSplit(node_of, by_node, own)

    def expert_node(self, device_node: np.ndarray) -> np.ndarray:
        """int[layers, experts]: node position (0..N-1) of the lowest-numbered device holding
        each expert, for node-limited routing."""
        _, node_of = np.unique(np.asarray(device_node), return_inverse=True)
        slots = self.slot_expert                                           # [layers, ep, slots]
        out = np.zeros((self.num_layers, self.num_experts), dtype=int)
        for dev in range(self.ep - 1, -1, -1):       # lower devices overwrite higher ones
            np.put_along_axis(out, slots[:, dev, :], node_of.ravel()[dev], axis=1)
        return out

    def live_experts(self, layer: int, failed: np.ndarray | None = None) -> np.ndarray:
        """bool[experts]: experts with at least one slot on a device that has not failed."""
        slots = self.slot_expert[layer]
        if failed is not None:
            slots = slots[~np.asarray(failed, dtype=bool)]
        return np.isin(np.arange(self.num_experts), slots)


def _fill_least_loaded(by_node: np.ndarray, own: np.ndarray, node_of: np.ndarray,
                       counts: np.ndarray) -> np.ndarray:
    """Shares ``[N, experts, dst]`` when the least loaded candidate replica takes each token.

    Fixed first: tokens kept on their own device and groups (node, expert) with one candidate
    device. Then every group with several candidates, largest volume first (ties: node, then
    expert), pours its tokens into its candidates' current device loads up to a common level
    (water-filling, the fluid limit of sending each token to the least loaded replica).
    """
    away = np.where(own, 0.0, counts)                                    # [src, E]
    volume = np.stack([away[node_of == n].sum(axis=0)
                       for n in range(by_node.shape[0])])                # [N, E]
    candidates = by_node > 0                                             # [N, E, dst]
    many = candidates.sum(axis=2) > 1                                    # [N, E]
    load = np.where(own, counts, 0.0).sum(axis=1)                        # kept at home, [dst]
    load = load + np.einsum("ne,ned->d", np.where(many, 0.0, volume), by_node)
    if not many.any():
        return by_node
    out = by_node.copy()
    groups = np.argwhere(many & (volume > 0))
    order = np.lexsort((groups[:, 1], groups[:, 0], -volume[groups[:, 0], groups[:, 1]]))
    for n, e in groups[order]:
        devices = np.flatnonzero(candidates[n, e])
        share = _water_fill(load[devices], float(volume[n, e]))
        out[n, e] = 0.0
        out[n, e, devices] = share
        load[devices] += share * volume[n, e]
    return out


def _water_fill(levels: np.ndarray, volume: float) -> np.ndarray:
    """Shares of ``volume`` that raise the lowest of ``levels`` to a common level."""
    order = np.sort(levels)
    # The level L with sum(max(0, L - level)) = volume: try the k lowest devices.
    for k in range(len(order), 0, -1):
        top = (volume + order[:k].sum()) / k
        if top >= order[k - 1]:
            break
    fill = np.maximum(top - levels, 0.0)
    return fill / fill.sum()


@dataclass(frozen=True, eq=False)
class ReplicaSplit:
    """Where each source sends each expert's tokens, without a ``[src, experts, dst]`` array.

    A source device that holds the expert keeps all its tokens for it; any other source sends
    them as its node's row of ``by_node`` says (replicas on the node, else all, by slot count).
    """

    node_of: np.ndarray   # int[ep]: node position 0..N-1 of each device
    by_node: np.ndarray   # float[N, experts, dst]: share for sources of node n not holding e
    own: np.ndarray       # bool[src, experts]: the source device holds the expert

    def dense(self) -> np.ndarray:
        """float[src, experts, dst], as :meth:`Placement.replica_share`."""
        share = np.take(self.by_node, self.node_of, axis=0)
        src, expert = np.nonzero(self.own)
        share[src, expert, :] = 0.0
        share[src, expert, src] = 1.0
        return share

    def route(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``counts: [src, experts]`` sent to devices: ``(tokens [src, dst],
        per_device_expert [dst, experts])`` (the einsums of ``counts`` with :meth:`dense`)."""
        away = np.where(self.own, 0.0, counts)          # tokens that leave their source device
        home = np.where(self.own, counts, 0.0)
        tokens = np.empty((counts.shape[0], self.by_node.shape[2]))
        per_node = np.empty((self.by_node.shape[0], counts.shape[1]))
        for n in range(self.by_node.shape[0]):
            rows = self.node_of == n
            tokens[rows] = away[rows] @ self.by_node[n]
            per_node[n] = away[rows].sum(axis=0)
        tokens[np.diag_indices_from(tokens)] += home.sum(axis=1)
        per_device_expert = np.einsum("ne,ned->de", per_node, self.by_node) + home
        return tokens, per_device_expert

    def preferred_device(self, src: int) -> np.ndarray:
        """int[experts]: the device taking the largest share of ``src``'s tokens per expert
        (the first such device on ties, as ``argmax`` of :meth:`dense`)."""
        return np.where(self.own[src], src, self.by_node[self.node_of[src]].argmax(axis=1))
