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
  the gain is not positive);
- *drift*: routing drifts, so the new plan's gain fades. Priced on consecutive time windows of
  a per-token trace (:func:`gain_decay`), the gain per window is fitted by ``g(t) = g0 *
  exp(-t / tau)`` (``t`` in passes, least squares on ``log g``); the gain repays the stall
  after ``n = -tau * ln(1 - stall / (g0 * tau))`` passes, and never when ``stall >= g0 * tau``
  (all the gain it will ever bring). A gain that does not fade keeps ``tau = inf`` and the
  plain payoff.
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

__all__ = ["STALLS", "Advice", "Decay", "weight_copies", "advise", "gain_decay", "fit_decay"]

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
    decay: Decay | None = None   # how the gain fades with drift (None: not measured)

    @property
    def gain(self) -> float:
        return self.current_time - self.new_time

    @property
    def move_time(self) -> float:
        return float(sum(self.layer_move_time))

    @property
    def payoff_passes(self) -> float:
        """Passes after which the gain repays the stall (``inf`` when it never does), at the
        trace's drift rate when :attr:`decay` was measured."""
        if self.decay is not None and math.isfinite(self.decay.tau):
            return self.decay.payoff(self.stall)
        if self.gain <= 0:
            return math.inf
        return float(math.ceil(self.stall / self.gain)) if self.stall > 0 else 0.0

    def as_dict(self) -> dict[str, float | str | int | list[float]]:
        out: dict[str, float | str | int | list[float]] = {
            "current_time": self.current_time, "new_time": self.new_time, "gain": self.gain,
            "moved_slots": self.moved_slots, "moved_bytes": self.moved_bytes,
            "move_time": self.move_time, "stall_model": self.stall_model, "stall": self.stall,
            "payoff_passes": self.payoff_passes}
        if self.decay is not None:
            out.update({"gain_at_move": self.decay.g0, "gain_decay_passes": self.decay.tau,
                        "window_gains": list(self.decay.gains),
                        "passes_per_window": self.decay.passes_per_window})
        return out


@dataclass(frozen=True)
class Decay:
    """The gain per pass fitted as ``g0 * exp(-t / tau)`` over ``t`` passes (``tau`` may be
    ``inf``: no fading), from the gains measured on consecutive windows of
    ``passes_per_window`` passes each."""

    g0: float
    tau: float
    gains: tuple[float, ...] = ()
    passes_per_window: float = 0.0

    def payoff(self, stall: float) -> float:
        """Passes after which the fading gain has repaid ``stall`` (``inf``: never).

        >>> Decay(g0=2.0, tau=10.0).payoff(10.0)   # -10 ln(1 - 10/20) = 6.93 -> 7
        7.0
        >>> Decay(g0=2.0, tau=10.0).payoff(20.0)   # the gain ever brought is only 20
        inf
        """
        if self.g0 <= 0:
            return math.inf
        if stall <= 0:
            return 0.0
        if not math.isfinite(self.tau):
            return float(math.ceil(stall / self.g0))
        total = self.g0 * self.tau
        if stall >= total:
            return math.inf
        return float(math.ceil(-self.tau * math.log(1.0 - stall / total)))


def fit_decay(gains: Sequence[float], passes_per_window: float) -> Decay:
    """:class:`Decay` of the gains of consecutive windows (window ``w`` centred at ``(w + 0.5)
    * passes_per_window`` passes): least squares of ``log g`` on time over the windows up to
    the first whose gain is not positive (the gain is gone there). One usable window, or a gain
    that does not fall: ``tau = inf`` and ``g0`` the mean gain of those windows.

    >>> d = fit_decay([4.0, 2.0, 1.0], passes_per_window=10.0)   # halves every 10 passes
    >>> round(d.tau, 4), round(d.g0, 4)                           # 10 / ln 2; 4 * 2 ** 0.5
    (14.427, 5.6569)
    """
    values = [float(g) for g in gains]
    usable: list[float] = []
    for g in values:
        if g <= 0:
            break
        usable.append(g)
    if not usable:
        return Decay(0.0, math.inf, tuple(values), passes_per_window)
    if len(usable) < 2 or passes_per_window <= 0:
        return Decay(float(np.mean(usable)), math.inf, tuple(values), passes_per_window)
    t = (np.arange(len(usable)) + 0.5) * passes_per_window
    slope, intercept = np.polyfit(t, np.log(usable), 1)
    if slope >= 0:
        return Decay(float(np.mean(usable)), math.inf, tuple(values), passes_per_window)
    return Decay(float(np.exp(intercept)), float(-1.0 / slope), tuple(values), passes_per_window)


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


def _moe_time(cost: objective.PlanCost) -> float:
    """MoE time per pass of a priced plan: its layers' times summed."""
    return float(sum(c.layer_time for c in cost.layers))


def gain_decay(ctx: PricingContext, current: Placement, new: Placement,
               windows: Sequence[Sequence[routing.LayerChoices]], passes_per_window: float, *,
               exact: bool = False) -> Decay:
    """How the gain of ``new`` over ``current`` fades: both priced on each of ``windows``
    (consecutive time windows of the routing, each ``passes_per_window`` passes long), the
    gains fitted by :func:`fit_decay`."""
    def total(placement: Placement, choices: Sequence[routing.LayerChoices]) -> float:
        return _moe_time(objective.plan_cost(ctx, list(choices), placement, exact=exact))
    gains = [total(current, w) - total(new, w) for w in windows]
    return fit_decay(gains, passes_per_window)


def advise(ctx: PricingContext, current: Placement, new: Placement,
           choices: Sequence[routing.LayerChoices], expert_bytes: float, *,
           stall: str = "blocking", exact: bool = False,
           windows: Sequence[Sequence[routing.LayerChoices]] | None = None,
           passes_per_window: float = 0.0) -> Advice:
    """:class:`Advice` for moving from ``current`` to ``new``, both priced on ``choices``;
    with ``windows`` (consecutive time windows of the routing, ``passes_per_window`` passes
    each) also how the gain fades (:func:`gain_decay`)."""
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
    decay = (gain_decay(ctx, current, new, windows, passes_per_window, exact=exact)
             if windows else None)
    return Advice(_moe_time(before), _moe_time(after), slots, moved, tuple(times), stall, stalled,
                  decay)
