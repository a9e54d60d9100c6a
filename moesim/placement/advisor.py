"""Rebalance advisor: is moving from the running plan to a new one worth the weights it copies?

For a current and a new placement of the same EP group, priced on the same routing:

- *gain*: predicted MoE time per pass (sum over MoE layers of the objective's layer time, one
  micro-batch forward) of the current plan minus the new plan's;
- *moves*: the new plan is first relabelled onto the current one
  (:func:`moesim.placement.migration.align_to`); every slot whose expert changes receives one
  expert's weights from a device that holds it now (the receiver itself if it already has a
  copy: free; else a holder on its node; else any holder; among several, the one that sent
  least so far, lowest index on ties);
- *move time* per layer: those copies as one transfer over the scenario's links, priced like an
  all-to-all by :func:`moesim.pricing.alltoall.alltoall_closed_form` (busiest link's bytes over
  its capacity plus the longest path's latency);
- *stall*, by the engine's model: ``blocking`` (serving stops while every layer is copied: the
  sum of the layers' move times, as SGLang's and TensorRT-LLM's rebalance) or ``layerwise`` (one
  layer per pass, copied while the pass computes its experts and the links carry no all-to-all:
  a pass waits only for the part of its layer's copy longer than the pass's expert compute);
- *payoff*: passes after which the gain has repaid the stall, ``ceil(stall / gain)`` (never when
  the gain is not positive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim import routing
from moesim.errors import InfeasiblePlacement
from moesim.placement import migration, objective
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import alltoall_closed_form
from moesim.pricing.context import PricingContext

__all__ = ["STALLS", "Advice", "weight_copies", "advise"]

STALLS = ("blocking", "layerwise")


@dataclass(frozen=True)
class Advice:
    """What a rebalance costs and gains (seconds, bytes; per pass = one micro-batch forward)."""

    current_time: float          # MoE time per pass, current plan
    new_time: float              # MoE time per pass, new plan
    moved_slots: int
    moved_bytes: float           # over the network (copies to a device that had it are free)
    layer_move_time: tuple[float, ...]
    stall_model: str
    stall: float

    @property
    def gain(self) -> float:
        return self.current_time - self.new_time

    @property
    def move_time(self) -> float:
        return float(sum(self.layer_move_time))

    @property
    def payoff_passes(self) -> float:
        """Passes after which the gain repays the stall (``inf`` when it never does)."""
        if self.gain <= 0:
            return math.inf
        return float(math.ceil(self.stall / self.gain)) if self.stall > 0 else 0.0

    def as_dict(self) -> dict[str, float | str | int]:
        return {"current_time": self.current_time, "new_time": self.new_time,
                "gain": self.gain, "moved_slots": self.moved_slots,
                "moved_bytes": self.moved_bytes, "move_time": self.move_time,
                "stall_model": self.stall_model, "stall": self.stall,
                "payoff_passes": self.payoff_passes}


def weight_copies(old: np.ndarray, new: np.ndarray, device_node: np.ndarray,
                  expert_bytes: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Copies that turn one layer's ``old`` slots into ``new`` (both ``int[ep, slots]``, already
    aligned): ``(pairs int[F, 2] (donor, receiver), bytes float[F], slots changed)``."""
    ep = old.shape[0]
    sent = np.zeros(ep)
    flows: dict[tuple[int, int], float] = {}
    changed = 0
    for device, slot in zip(*np.nonzero(new != old)):
        changed += 1
        expert = new[device, slot]
        if np.any(old[device] == expert):
            continue                                     # a copy on the device itself
        holders = np.flatnonzero((old == expert).any(axis=1))
        near = holders[device_node[holders] == device_node[device]]
        pool = near if near.size else holders
        donor = int(pool[np.argmin(sent[pool])])
        sent[donor] += expert_bytes
        flows[(donor, int(device))] = flows.get((donor, int(device)), 0.0) + expert_bytes
    pairs = np.array(list(flows), dtype=np.int64).reshape(-1, 2)
    return pairs, np.array(list(flows.values()), dtype=float), changed


def advise(ctx: PricingContext, current: Placement, new: Placement,
           choices: Sequence[routing.LayerChoices], expert_bytes: float, *,
           stall: str = "blocking", exact: bool = False) -> Advice:
    """:class:`Advice` for moving from ``current`` to ``new``, both priced on ``choices``."""
    if stall not in STALLS:
        raise InfeasiblePlacement(f"stall model {stall!r}; allowed: {', '.join(STALLS)}")
    if current.slot_expert.shape != new.slot_expert.shape:
        raise InfeasiblePlacement(f"current plan has shape {current.slot_expert.shape}; the new "
                                  f"plan has {new.slot_expert.shape} (layers, devices, slots)")
    node = np.asarray(ctx.device_node)
    aligned = np.stack([migration.align_to(new.slot_expert[i], current.slot_expert[i], node)
                        for i in range(new.num_layers)])
    new = Placement(aligned, new.num_experts, new.name, new.notes, new.replica_rule)
    before = objective.plan_cost(ctx, choices, current, exact=exact)
    after = objective.plan_cost(ctx, choices, new, exact=exact)
    times, moved, slots = [], 0.0, 0
    for i in range(new.num_layers):
        pairs, nbytes, changed = weight_copies(current.slot_expert[i], aligned[i], node,
                                               expert_bytes)
        times.append(alltoall_closed_form(ctx, pairs, nbytes) if len(pairs) else 0.0)
        moved += float(nbytes.sum())
        slots += changed
    if stall == "blocking":
        stalled = float(sum(times))
    else:
        idle = float(sum(layer.compute for layer in after.layers))   # links idle per pass
        stalled = float(sum(max(0.0, t - idle) for t in times))
    total = lambda cost: float(sum(c.layer_time for c in cost.layers))  # noqa: E731
    return Advice(total(before), total(after), slots, moved, tuple(times), stall, stalled)
