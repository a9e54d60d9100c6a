"""A finished simulation: the result and what the trace, plots and invariant checks need."""

from __future__ import annotations

from dataclasses import dataclass

from moesim.layout import Layout
from moesim.placement.placement import Placement
from moesim.results import Result
from moesim.sim.costs import CostModel
from moesim.sim.pipeline import ChunkSpan
from moesim.sim.streams import ChunkRun
from moesim.spec.scenario import Scenario
from moesim.topology import Topology

__all__ = ["Timeline", "Simulation"]


@dataclass
class Timeline:
    """One simulated step before it is summarised: ``runs[(stage, "F"|"B", chunk)]`` are the
    chunks' op timelines, ``spans`` the pipeline's chunk placements in time, ``stage_end`` each
    stage's finish."""

    scenario: Scenario
    topology: Topology
    layout: Layout
    placement: Placement
    costs: CostModel
    runs: dict[tuple[int, str, int], ChunkRun]
    spans: list[ChunkSpan]
    stage_end: list[float]
    rep_device: int = 0     # the device whose timeline the breakdown follows
    wall_seconds: float = 0.0


@dataclass(kw_only=True)
class Simulation(Timeline):
    """A finished simulation: the timeline and its :class:`~moesim.results.Result`."""

    result: Result
