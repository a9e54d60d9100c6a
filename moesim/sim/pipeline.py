"""The SimPy model of a pipeline-parallel step: one process per stage, chunks linked by sends.

Each stage walks its schedule (``moesim.sim.schedule``); a chunk may start when the stage is free
and its input has arrived: the activations from the previous virtual stage (forward) or the
gradients from the next one (backward), each after a point-to-point transfer. Chunk durations come
from the chunk runs of the cost model, so the pipeline bubble, stragglers and sends all show up in
the timeline the engine records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from moesim.sim.schedule import StagePlan

__all__ = ["ChunkSpan", "run_pipeline"]

FORWARD = ("F", "f")     # entry kinds that run a forward chunk (see moesim.sim.schedule)


@dataclass(frozen=True)
class ChunkSpan:
    stage: int
    kind: str        # "F" or "B"
    micro_batch: int
    chunk: int
    start: float
    end: float


@dataclass
class _Pipeline:
    env: simpy.Environment
    pp: int
    vp: int
    duration: Callable[[int, str, int, float], float]  # (stage, kind, chunk, now) -> seconds
    p2p: float
    dual: bool = False       # DualPipe: chunk d is direction d (direction 1 runs stages backwards)
    spans: list[ChunkSpan] = field(default_factory=list)
    arrived: dict[tuple, simpy.Event] = field(default_factory=dict)
    events: int = 0

    def _event(self, key: tuple) -> simpy.Event:
        if key not in self.arrived:
            self.arrived[key] = self.env.event()
        return self.arrived[key]

    def _input(self, stage: int, kind: str, mb: int, chunk: int) -> tuple | None:
        """Key of the chunk whose output this chunk needs, or None. A weight-gradient chunk
        ("W") needs only its own stage's input-gradient chunk, which ran before it."""
        if kind == "W":
            return None
        if self.dual:    # direction 0 flows up the stages, direction 1 down
            forward = kind in FORWARD
            prev = stage - 1 if forward == (chunk == 0) else stage + 1
            return ("F" if forward else "B", mb, chunk, prev) if 0 <= prev < self.pp else None
        if kind == "F":
            if stage > 0:
                return ("F", mb, chunk, stage - 1)
            return ("F", mb, chunk - 1, self.pp - 1) if chunk > 0 else None
        if stage < self.pp - 1:
            return ("B", mb, chunk, stage + 1)
        return ("B", mb, chunk + 1, 0) if chunk < self.vp - 1 else None

    def _send(self, key: tuple, delay: float):
        yield self.env.timeout(delay)
        self._event(key).succeed()

    def stage(self, stage: int, order: list[tuple[str, int, int]],
              plan: StagePlan | None = None):
        sends: dict[int, list[int]] = {}   # entry index -> the entries whose output it sends
        for j, at in enumerate(plan.release if plan is not None else range(len(order))):
            sends.setdefault(at, []).append(j)
        for i, (kind, mb, chunk) in enumerate(order):
            inputs = [i, *(plan.waits[i] if plan is not None else ())]
            for j in inputs:
                needed = self._input(stage, *order[j])
                if needed is not None:
                    yield self._event(needed)
            start = self.env.now
            yield self.env.timeout(self.duration(stage, kind, chunk, start))
            self.events += 1
            self.spans.append(ChunkSpan(stage, kind, mb, chunk, start, self.env.now))
            for j in sends.get(i, ()):
                sent, smb, schunk = order[j]
                if sent != "W":   # input-gradient and paired chunks send as F or B do
                    key = ("F" if sent in FORWARD else "B", smb, schunk, stage)
                    self.env.process(self._send(key, self.p2p))


def run_pipeline(orders: list[list[tuple[str, int, int]]], vp: int,
                 duration: Callable[[int, str, int, float], float], p2p: float, *,
                 plans: list[StagePlan] | None = None) -> tuple[list[ChunkSpan], int]:
    """Run every stage's schedule; return the chunk spans (sorted by start) and the event count.
    ``plans``: DualPipe's stage plans (two directions: chunk 0 up the stages, chunk 1 down; their
    receive and send points), which give the orders."""
    env = simpy.Environment()
    pipe = _Pipeline(env, len(orders), vp, duration, p2p, plans is not None)
    for stage, order in enumerate(orders):
        env.process(pipe.stage(stage, order, plans[stage] if plans is not None else None))
    env.run()
    done = sum(len(o) for o in orders)
    if len(pipe.spans) != done:
        from moesim.errors import InternalError
        raise InternalError(f"pipeline deadlocked: {len(pipe.spans)} of {done} chunks ran")
    return sorted(pipe.spans, key=lambda s: (s.start, s.stage)), pipe.events
