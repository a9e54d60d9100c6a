"""The placement a scenario asks for (``placement.policy``), resolved before the simulation runs.

Plans on the scenario's own routing sample for one EP group, drawn with node-limited routing off
(the limit depends on the placement being chosen), with the policy of
:data:`moesim.placement.registry.PLACERS` that ``placement.policy`` names.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moesim import routing, routing_draw
from moesim.placement.placement import Placement
from moesim.placement.problem import LayerRouting
from moesim.placement.registry import PlacementRequest, placer
from moesim.pricing.context import PricingContext
from moesim.spec.scenario import Scenario

__all__ = ["expected_load", "scenario_choices", "scenario_request", "resolve_placement"]


def scenario_choices(s: Scenario, ctx: PricingContext) -> list[routing.LayerChoices]:
    """The scenario's routing sample for one EP group, as the simulator draws it but with
    node-limited routing off (that limit depends on the placement being chosen)."""
    return routing_draw.scenario_routing(s, tokens_per_source=ctx.tokens_per_source,
                                         node_limited=False)


def expected_load(s: Scenario, tokens_per_source: float) -> np.ndarray:
    """float[moe_layers, experts]: tokens per expert of the scenario's routing (one EP group),
    drawn with node-limiting off: planners see the router's preferences, not a placement's."""
    ep, e = s.parallelism.ep, s.model.num_experts
    layers = routing_draw.scenario_routing(s, tokens_per_source=tokens_per_source,
                                           node_limited=False)
    return np.stack([routing.counts_from_choices(c, ep, e).sum(axis=0) for c in layers])


def scenario_request(s: Scenario, ctx: PricingContext) -> PlacementRequest:
    """What the scenario's placement policy plans on: its routing sample, its slots, its seed."""
    choices = scenario_choices(s, ctx)
    load = expected_load(s, ctx.tokens_per_source)
    soft = all(c.top_k == s.model.num_experts for c in choices)   # soft gating: no structure
    layers = [LayerRouting(row, None if soft else c.experts) for row, c in zip(load, choices)]
    slots = (s.model.num_experts + s.placement.redundant_experts) // s.parallelism.ep
    return PlacementRequest(ctx, layers, s.model.num_experts, slots, seed=s.seed,
                            plan_choices=choices, scenario=s)


# Policies that place experts without looking at the routing when there are no replicas to give.
BLIND = ("contiguous", "round_robin", "random")


def resolve_placement(s: Scenario, ctx: PricingContext) -> Placement:
    """The placement of ``s.placement.policy`` for the EP group of ``ctx``, with the scenario's
    replica rule (``placement.replica_rule``)."""
    policy = placer(s.placement.policy, source=s.source)
    if s.placement.policy in BLIND and not s.placement.redundant_experts:   # no routing needed
        m = s.model
        blank = [LayerRouting(np.zeros(m.num_experts))] * m.num_moe_layers
        placement = policy(PlacementRequest(ctx, blank, m.num_experts, m.num_experts // ctx.ep,
                                            seed=s.seed, scenario=s))
    else:
        placement = policy(scenario_request(s, ctx))
    if s.placement.replica_rule in (None, placement.replica_rule):
        return placement
    return replace(placement, replica_rule=s.placement.replica_rule)
