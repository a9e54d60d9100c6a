"""The full engine: every device of a pipeline stage as SimPy processes, one per stream.

The aggregated engine (:func:`moesim.sim.streams.run_ops`) runs one EP group with numpy and takes
every other group of the stage to be identical. The full engine checks that: it runs each device
of every EP group of the stage as two SimPy processes (compute stream, communication stream) that
wait on the events of the ops they depend on, meets at a barrier for every collective, and times
each group's all-to-all on that group's own links of the topology (the representative group's
price, shifted by what the group's own links change in a flow-level all-to-all). On the small scenarios where it
is affordable, both engines must agree (tests/test_engines.py).
"""

from __future__ import annotations

import numpy as np
import simpy

from moesim.pricing.alltoall import alltoall
from moesim.sim.costs import CostModel
from moesim.sim.streams import COMM, COMPUTE, ChunkRun, Op

__all__ = ["run_ops_full"]


class _Group:
    """One EP group of a stage: its devices' processes and its collectives' barriers."""

    def __init__(self, env: simpy.Environment, ops: list[Op], ranks: np.ndarray,
                 costs: CostModel, reference: dict[int, float]):
        self.env, self.ops, self.ranks, self.costs = env, ops, ranks, costs
        self.reference = reference   # op -> the representative group's flow-level time, shared
        ep = len(ranks)
        self.done = [[env.event() for _ in range(ep)] for _ in ops]
        self.start = np.zeros((len(ops), ep))
        self.end = np.zeros((len(ops), ep))
        self.arrived = [0] * len(ops)
        self.release = [env.event() for _ in ops]
        self.duration: dict[int, float] = {}

    def _collective_time(self, i: int) -> float:
        """This group's time for the collective priced on the representative group: its price
        (algorithm, message-size curve, fixed cost) plus the difference the group's own links
        make to a flow-level all-to-all of the same bytes (none where the groups' links are
        alike)."""
        op = self.ops[i]
        coll = op.collective
        if coll is None or len(coll.pairs) == 0:
            return float(op.duration[0])
        group0 = self.costs.group
        if np.array_equal(self.ranks, group0):
            return float(op.duration[0])
        local = np.searchsorted(group0, coll.pairs)       # back to group-local indices
        ctx = self.costs.ctx
        own = alltoall(ctx.topology, self.ranks[local], coll.nbytes, ctx.rtol).duration
        if i not in self.reference:
            self.reference[i] = alltoall(ctx.topology, coll.pairs, coll.nbytes, ctx.rtol).duration
        return max(0.0, float(op.duration[0]) + own - self.reference[i])

    def stream(self, device: int, stream: str):
        for i, op in enumerate(self.ops):
            if op.stream != stream:
                continue
            if op.deps:
                yield self.env.all_of([self.done[d][device] for d in op.deps])
            if op.barrier:
                self.arrived[i] += 1
                if self.arrived[i] == len(self.ranks):
                    self.duration[i] = self._collective_time(i)
                    self.release[i].succeed()
                yield self.release[i]
                seconds = self.duration[i]
            else:
                seconds = float(op.duration[device])
            self.start[i, device] = self.env.now
            yield self.env.timeout(seconds)
            self.end[i, device] = self.env.now
            self.done[i][device].succeed()


def run_ops_full(ops: list[Op], costs: CostModel, stage: int) -> ChunkRun:
    """Run a chunk's ops on every device of every EP group of ``stage``; return the slowest group."""
    env = simpy.Environment()
    layout = costs.ctx.layout
    groups = []
    reference: dict[int, float] = {}
    for g in range(layout.ep_groups):
        group = _Group(env, ops, layout.ep_group(stage, g), costs, reference)
        groups.append(group)
        for device in range(len(group.ranks)):
            env.process(group.stream(device, COMPUTE))
            env.process(group.stream(device, COMM))
    env.run()
    slowest = max(groups, key=lambda g: g.end.max() if len(ops) else 0.0)
    return ChunkRun(ops, slowest.start, slowest.end)
