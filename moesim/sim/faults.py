"""Faults: devices and links that fail or slow down, and what they do to a step.

- A failed link is removed (both directions) and flows re-route around it where the topology
  allows (e.g. through a peer GPU's NIC); if a device is cut off, the scenario is an error.
- A slowed link keeps its path but carries ``1/slowdown`` of its bandwidth.
- A slowed device runs its compute ``slowdown`` times slower: its EP group waits for it at every
  all-to-all.
- A failed device produces no tokens and computes nothing; the tokens its expert slots would have
  served go to surviving replicas of those experts, or are dropped and counted.

A fault hits the EP group that holds the device; since data-parallel pipelines only meet at the
gradient reduction, the step waits for that group's pipeline, which is the one simulated.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from moesim.errors import TopologyError
from moesim.layout import Layout
from moesim.spec.scenario import Scenario
from moesim.topology import Topology

__all__ = ["DeviceFaults", "device_faults", "faulty_topology", "fault_summary"]


class DeviceFaults:
    """Device faults seen from the representative EP group: which stage, which local devices."""

    def __init__(self, stage_local: dict[int, dict[int, float]], ep: int):
        self.stage_local = stage_local   # stage -> {local device index: slowdown (0 = failed)}
        self.ep = ep

    def slow_vector(self, stage: int) -> np.ndarray:
        """float[ep] compute time multiplier per device of ``stage``'s group (failed: 0)."""
        vec = np.ones(self.ep)
        for local, slowdown in self.stage_local.get(stage, {}).items():
            vec[local] = slowdown
        return vec

    def failed(self, stage: int) -> np.ndarray:
        """bool[ep]: failed devices of ``stage``'s group."""
        mask = np.zeros(self.ep, dtype=bool)
        for local, slowdown in self.stage_local.get(stage, {}).items():
            mask[local] = slowdown == 0
        return mask


def device_faults(s: Scenario, layout: Layout) -> DeviceFaults | None:
    faults = [f for f in s.faults if f.kind == "device"]
    if not faults:
        return None
    stage_local: dict[int, dict[int, float]] = {}
    for fault in faults:
        stage = fault.device // layout.stage_size
        local = layout.ep_position(fault.device)
        stage_local.setdefault(stage, {})[local] = fault.slowdown
    return DeviceFaults(stage_local, s.parallelism.ep)


def faulty_topology(s: Scenario, topology: Topology) -> Topology:
    """The topology after the scenario's link faults (failed links removed, slow links slowed)."""
    failed = [(str(f.link[0]), str(f.link[1])) for f in s.faults
              if f.kind == "link" and f.slowdown == 0]
    slow = [f for f in s.faults if f.kind == "link" and f.slowdown >= 1]
    if failed:
        try:
            topology = topology.without(links=failed)
        except TopologyError as exc:
            raise TopologyError(f"{s.source or s.name}: faults: {exc}") from None
    if slow:
        capacity = topology.capacity.copy()
        index = {ends: i for i, ends in enumerate(topology.link_ends)}
        for fault in slow:
            a, b = fault.link
            for ends in ((a, b), (b, a)):
                if ends in index:
                    capacity[index[ends]] /= fault.slowdown
        topology = replace(topology, capacity=capacity)
    return topology


def fault_summary(s: Scenario, healthy, faulty) -> dict[str, Any]:
    return {
        "faults": [{"kind": f.kind, "device": f.device, "link": list(f.link),
                    "slowdown": f.slowdown, "at": f.at} for f in s.faults],
        "healthy_step_time": healthy.step_time,
        "step_time": faulty.step_time,
        "step_time_change_pct": 100.0 * (faulty.step_time / healthy.step_time - 1.0),
        "dropped_tokens_due_to_faults": faulty.dropped_tokens - healthy.dropped_tokens,
    }
