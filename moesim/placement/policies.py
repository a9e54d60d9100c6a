"""The placement a scenario asks for: a baseline, EPLB, moesim's planner, or a plan file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim import routing
from moesim.errors import ScenarioError
from moesim.placement import baselines
from moesim.placement.eplb import eplb_rebalance
from moesim.placement.placement import Placement
from moesim.spec.scenario import Scenario

__all__ = ["POLICIES", "expected_load", "resolve_placement"]

POLICIES = ("contiguous", "round_robin", "random", "eplb", "moesim", "file")


def expected_load(s: Scenario, tokens_per_source: float) -> np.ndarray:
    """float[moe_layers, experts]: tokens per expert of the scenario's routing (one EP group).

    Drawn with node-limiting off: planners see the router's preferences, not a placement's.
    """
    ep, e = s.parallelism.ep, s.model.num_experts
    layers = routing.scenario_routing(s, tokens_per_source=tokens_per_source, node_limited=False)
    return np.stack([routing.counts_from_choices(c, ep, e).sum(axis=0) for c in layers])


def resolve_placement(s: Scenario, tokens_per_source: float, device_node: np.ndarray
                      ) -> Placement:
    """Build the placement of ``s.placement`` for one EP group whose devices sit on ``device_node``."""
    m, ep = s.model, s.parallelism.ep
    layers, experts = m.num_moe_layers, m.num_experts
    physical = experts + s.placement.redundant_experts
    policy = s.placement.policy
    load = None
    if s.placement.redundant_experts or policy in ("eplb", "moesim"):
        load = expected_load(s, tokens_per_source)
    if policy == "contiguous":
        table = baselines.contiguous(layers, experts, ep, physical, load=load)
    elif policy == "round_robin":
        table = baselines.round_robin(layers, experts, ep, physical, load=load)
    elif policy == "random":
        table = baselines.random_placement(layers, experts, ep, physical, s.seed, load=load)
    elif policy == "eplb":
        nodes = len(np.unique(device_node))
        groups = nodes if experts % nodes == 0 else 1
        table = eplb_rebalance(load, physical, groups, nodes, ep).physical_to_logical
    elif policy == "moesim":
        from moesim.placement.planner import plan_for_scenario
        return plan_for_scenario(s, load, device_node)
    elif policy == "file":
        from moesim.placement.export import load_plan
        base = Path(s.source).parent if s.source else Path.cwd()
        path = Path(s.placement.file)
        return load_plan(path if path.is_absolute() else base / path, s)
    else:
        raise ScenarioError(f"unknown placement policy {policy!r} (allowed: "
                            f"{', '.join(POLICIES)})", field="placement.policy")
    return Placement.from_physical(table, ep, experts, name=policy)
