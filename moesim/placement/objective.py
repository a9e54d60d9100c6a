"""What a placement costs, layer by layer: the planner's objective, priced by the pricing layer.

For each MoE layer the placement fixes where the layer's routed tokens go; the price is
:func:`moesim.pricing.moe_layer.price_layer`: dispatch + combine all-to-alls (closed form for
search, or flow-level exactly as ``moesim run`` charges them) + the slowest device's expert
compute (nothing overlapped). Also reported: cross-node bytes of dispatch plus combine, and
max/mean device load (token-expert pairs each device computes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moesim import routing, routing_trace
from moesim.placement.placement import Placement
from moesim.pricing.context import PricingContext
from moesim.pricing.moe_layer import LayerPrice, price_layer

__all__ = ["LayerCost", "PlanCost", "layer_cost", "plan_cost", "layer_scorer", "robust_scorer",
           "time_windows", "drifted", "trace_choices"]

LayerCost = LayerPrice


@dataclass(frozen=True)
class PlanCost:
    """Per-layer costs of a placement, and their means over layers."""

    layers: tuple[LayerCost, ...]

    def _mean(self, name: str) -> float:
        return float(np.mean([getattr(c, name) for c in self.layers])) if self.layers else 0.0

    @property
    def layer_time(self) -> float:
        return self._mean("layer_time")

    @property
    def alltoall(self) -> float:
        return self._mean("alltoall")

    @property
    def compute(self) -> float:
        return self._mean("compute")

    @property
    def cross_node_bytes(self) -> float:
        return self._mean("cross_node_bytes")

    @property
    def max_over_mean(self) -> float:
        return self._mean("max_over_mean")

    def as_dict(self) -> dict[str, float]:
        return {"layer_time": self.layer_time, "alltoall": self.alltoall,
                "compute": self.compute, "cross_node_bytes": self.cross_node_bytes,
                "max_over_mean": self.max_over_mean}


def layer_cost(ctx: PricingContext, choices: routing.LayerChoices, placement: Placement,
               layer: int, *, exact: bool = False) -> LayerCost:
    """Cost of MoE layer ``layer`` of ``placement`` for the tokens ``choices``.

    ``exact=False`` prices the all-to-alls by the closed form, ``True`` by the flow simulation.
    """
    return price_layer(ctx, choices, placement, layer, exact=exact)


def plan_cost(ctx: PricingContext, choices: Sequence[routing.LayerChoices], placement: Placement,
              *, exact: bool = False, layers: Sequence[int] | None = None) -> PlanCost:
    """:func:`layer_cost` of every layer (or of ``layers``); ``choices[l]`` is layer l's."""
    chosen = range(placement.num_layers) if layers is None else layers
    return PlanCost(tuple(layer_cost(ctx, choices[layer], placement, layer, exact=exact)
                          for layer in chosen))


def layer_scorer(ctx: PricingContext, choices: Sequence[routing.LayerChoices], num_experts: int
                 ) -> Callable[[int, np.ndarray], float]:
    """``score(layer, slot_expert: int[ep, slots]) -> predicted layer time`` (closed form), for
    planners that build one layer at a time."""
    def score(layer: int, slot_expert: np.ndarray) -> float:
        placement = Placement(np.asarray(slot_expert)[None], num_experts)
        return layer_cost(ctx, choices[layer], placement, 0).layer_time
    return score


def time_windows(choices: routing.LayerChoices, windows: int, ep: int
                 ) -> list[routing.LayerChoices]:
    """``choices`` cut into ``windows`` consecutive windows of whole rounds (``ep`` tokens, one
    per source; tokens are dealt in time order), each re-weighted to stand for the full batch.
    Fewer windows when there are fewer rounds than ``windows``."""
    rounds = choices.num_tokens // ep
    windows = max(1, min(windows, rounds))
    size = rounds // windows * ep
    if windows == 1:
        return [choices]
    weight = choices.weight * choices.num_tokens / size
    return [routing.LayerChoices(choices.experts[w * size:(w + 1) * size],
                                 choices.source[w * size:(w + 1) * size], weight)
            for w in range(windows)]


def drifted(choices: routing.LayerChoices, fraction: float, rng: np.random.Generator,
            num_experts: int) -> routing.LayerChoices:
    """``choices`` after drift: a random ``fraction`` of the tokens choose other experts, every
    expert ``e`` becoming ``perm[e]`` for one random permutation (so the popularity profile and
    the co-activation of the moved tokens stay, but which experts are popular changes)."""
    perm = rng.permutation(num_experts).astype(np.int32)
    moved = rng.random(choices.num_tokens) < fraction
    experts = np.where(moved[:, None], perm[choices.experts], choices.experts)
    return routing.LayerChoices(experts, choices.source, choices.weight)


def robust_scorer(ctx: PricingContext, choices: Sequence[routing.LayerChoices],
                  num_experts: int, *, windows: int = 3, drift: float = 0.2,
                  worst_weight: float = 0.5, seed: int = 0
                  ) -> Callable[[int, np.ndarray], float]:
    """Like :func:`layer_scorer`, for planning against drift: the layer's time on each of
    ``windows`` consecutive time windows of the planning tokens (:func:`time_windows`), all but
    the first :func:`drifted` by ``drift`` (seeded per layer and window), scored
    ``(1 - worst_weight) * mean + worst_weight * max`` (expected and worst case). Each window
    holds ``1 / windows`` of the tokens, so a score costs about one full-window pricing."""
    if not 0.0 <= worst_weight <= 1.0:
        raise ValueError(f"worst_weight={worst_weight} must be in [0, 1]")
    cut = []
    for layer, c in enumerate(choices):
        parts = time_windows(c, windows, ctx.ep)
        cut.append([parts[0]] + [drifted(part, drift, np.random.default_rng([seed, layer, w]),
                                         num_experts) for w, part in enumerate(parts[1:], 1)])

    seen: dict[tuple[int, bytes], float] = {}     # the planner re-prices some plans

    def score(layer: int, slot_expert: np.ndarray) -> float:
        table = np.ascontiguousarray(slot_expert, dtype=np.int64)
        key = (layer, table.shape[1].to_bytes(4, "little") + table.tobytes())
        if key not in seen:
            placement = Placement(table[None], num_experts)
            times = [layer_cost(ctx, c, placement, 0).layer_time for c in cut[layer]]
            seen[key] = float((1.0 - worst_weight) * np.mean(times) + worst_weight * max(times))
        return seen[key]
    return score


def trace_choices(ctx: PricingContext, trace: routing_trace.RoutingTrace, *, seed: int = 0
                  ) -> list[routing.LayerChoices]:
    """The tokens the group's devices route in each layer when the routing is ``trace``.

    Per-token traces are dealt out in order as :func:`moesim.routing_trace.choices_from_trace`
    does; counts-only traces are sampled (seeded per layer, as the simulator seeds them).
    """
    return [routing_trace.choices_from_trace(
        trace, layer, num_sources=ctx.ep, tokens_per_source=max(1, round(ctx.tokens_per_source)),
        rng=routing.layer_rng(seed, layer), max_tokens_per_source=ctx.max_tokens_per_source,
        top_k=ctx.top_k) for layer in range(trace.num_layers)]
