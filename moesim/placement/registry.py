"""One table of placement policies and planners, for scenarios (``placement.policy``) and the
``moesim plan`` CLI (``--planner``) alike.

Every entry takes a :class:`PlacementRequest` (the EP group's pricing context, the routing to plan
on, slots, seed) and returns a :class:`~moesim.placement.placement.Placement`. ``file`` reads a
plan written earlier and needs the scenario's ``placement.file``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim import routing
from moesim.errors import ScenarioError
from moesim.placement import baselines, planner
from moesim.placement.eplb import eplb_rebalance
from moesim.placement.export import load_plan
from moesim.placement.objective import robust_scorer
from moesim.placement.placement import Placement
from moesim.placement.problem import ClusterShape, LayerRouting
from moesim.pricing.context import PricingContext
from moesim.spec.fields import relative_file
from moesim.spec.scenario import Scenario

__all__ = ["PlacementRequest", "Placer", "PLACERS", "CLI_PLANNERS", "placer", "place"]

# Time windows of the planning tokens moesim's planner scores each candidate on (1 = one window).
ROBUST_WINDOWS = 2


@dataclass(frozen=True, eq=False)
class PlacementRequest:
    """What a placement policy needs to place one EP group's experts.

    ``layers``: the routing to plan on, one per MoE layer; ``plan_choices``: the same window as
    the group's tokens (lets the moesim planner price candidates), or None.
    """

    ctx: PricingContext
    layers: Sequence[LayerRouting]
    num_experts: int
    slots_per_device: int
    seed: int = 0
    max_evaluations: int = 100_000   # the moesim planner's budget (objective calls)
    plan_choices: Sequence[routing.LayerChoices] | None = None
    progress: Callable[[int, int], None] | None = None
    scenario: Scenario | None = None     # for ``file``: the plan path is relative to it

    @property
    def load(self) -> np.ndarray:
        """float[layers, experts] token-expert pairs per expert, per layer."""
        return np.stack([info.load for info in self.layers])

    @property
    def physical(self) -> int:
        return self.ctx.ep * self.slots_per_device


Placer = Callable[[PlacementRequest], Placement]


def _table(name: str, request: PlacementRequest, table: np.ndarray) -> Placement:
    return Placement.from_physical(table, request.ctx.ep, request.num_experts, name=name)


def _contiguous(r: PlacementRequest) -> Placement:
    return _table("contiguous", r, baselines.contiguous(
        len(r.layers), r.num_experts, r.ctx.ep, r.physical, load=r.load))


def _round_robin(r: PlacementRequest) -> Placement:
    return _table("round_robin", r, baselines.round_robin(
        len(r.layers), r.num_experts, r.ctx.ep, r.physical, load=r.load))


def _random(r: PlacementRequest) -> Placement:
    return _table("random", r, baselines.random_placement(
        len(r.layers), r.num_experts, r.ctx.ep, r.physical, r.seed, load=r.load))


def _eplb(r: PlacementRequest) -> Placement:
    """EPLB's hierarchical policy: groups packed to nodes when the experts divide evenly."""
    nodes = int(np.unique(r.ctx.device_node).size)
    groups = nodes if r.num_experts % nodes == 0 else 1
    return _table("eplb", r, eplb_rebalance(r.load, r.physical, groups, nodes,
                                            r.ctx.ep).physical_to_logical)


def _eplb_global(r: PlacementRequest) -> Placement:
    """EPLB's global policy: replicate and pack over all devices, ignoring nodes."""
    return _table("eplb_global", r, eplb_rebalance(r.load, r.physical, 1, 1,
                                                   r.ctx.ep).physical_to_logical)


def _moesim(r: PlacementRequest) -> Placement:
    """moesim's planner, pricing candidates on the request's tokens when it has them, over
    ``ROBUST_WINDOWS`` time windows of them (expected and worst case, for drift)."""
    shape = ClusterShape(r.num_experts, r.ctx.device_node, r.slots_per_device)
    score = None if r.plan_choices is None else robust_scorer(
        r.ctx, r.plan_choices, r.num_experts, windows=ROBUST_WINDOWS, seed=r.seed)
    config = planner.PlannerConfig(seed=r.seed, max_evaluations=r.max_evaluations)
    return planner.plan(r.layers, shape, config, score=score, progress=r.progress)


def _file(r: PlacementRequest) -> Placement:
    s = r.scenario
    if s is None or not s.placement.file:
        raise ScenarioError("placement 'file' needs placement.file", field="placement.file")
    base = Path(s.source).parent if s.source else Path.cwd()
    return load_plan(relative_file(s.placement.file, base), s)


PLACERS: dict[str, Placer] = {
    "contiguous": _contiguous,
    "round_robin": _round_robin,
    "random": _random,
    "eplb": _eplb,
    "eplb_global": _eplb_global,
    "moesim": _moesim,
    "file": _file,
}
CLI_PLANNERS = tuple(name for name in PLACERS if name != "file")   # ``file`` has no CLI path


def placer(name: str, field: str = "placement.policy", source: str | None = None) -> Placer:
    """The placement policy called ``name``; an unknown name lists the valid ones."""
    try:
        return PLACERS[name]
    except KeyError:
        raise ScenarioError(f"unknown placement policy {name!r} (allowed: "
                            f"{', '.join(PLACERS)})", source=source, field=field) from None


def place(name: str, request: PlacementRequest) -> Placement:
    return placer(name)(request)
