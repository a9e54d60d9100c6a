"""Assembling a run: the scenario's placement resolved, then the step simulated with it.

This is where the layers meet (see docs/architecture.md): the pricing context is built from the
scenario (:mod:`moesim.pricing`), the placement policy resolved with it (:mod:`moesim.placement`),
and the simulator core (:mod:`moesim.sim`) run with that placement. Neither the simulator nor the
planner imports the other.
"""

from __future__ import annotations

from dataclasses import replace

from moesim.placement.placement import Placement
from moesim.placement.policies import resolve_placement
from moesim.pricing.context import PricingContext
from moesim.sim.simulate import simulate_step
from moesim.sim.simulation import Simulation
from moesim.spec.scenario import Scenario

__all__ = ["simulate", "scenario_placement"]


def scenario_placement(s: Scenario) -> Placement:
    """The placement ``s.placement.policy`` chooses, planned on the healthy cluster."""
    healthy = replace(s, faults=()) if s.faults else s
    return resolve_placement(healthy, PricingContext.from_scenario(healthy))


def simulate(s: Scenario, *, engine: str | None = None,
             placement: Placement | None = None) -> Simulation:
    """Simulate one step of ``s``; ``engine`` overrides ``simulation.mode``; ``placement``
    overrides the scenario's placement policy."""
    return simulate_step(s, scenario_placement(s) if placement is None else placement,
                         engine=engine)
