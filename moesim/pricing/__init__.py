"""Pricing: what every piece of a step costs, for the simulator and the planner alike.

One :class:`~moesim.pricing.context.PricingContext` is built per scenario (topology, layout, kernel
timer, tokens per micro-batch, the EP group's paths, the network tolerance); the modules here are
named pure functions of it: :mod:`~.alltoall` (dispatch and combine), :mod:`~.moe_layer` (a
routed layer's traffic, expert kernels and price), :mod:`~.block` (a whole block for the engine),
:mod:`~.collectives` (TP, PP and DP communication), :mod:`~.step` (optimizer, model FLOPs).
Nothing here imports the simulator or the planner; both import this.
"""

from moesim.pricing.context import PricingContext, scenario_topology

__all__ = ["PricingContext", "scenario_topology"]
