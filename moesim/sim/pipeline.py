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

__all__ = ["ChunkSpan", "run_pipeline"]


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
    spans: list[ChunkSpan] = field(default_factory=list)
    arrived: dict[tuple, simpy.Event] = field(default_factory=dict)
    events: int = 0

    def _event(self, key: tuple) -> simpy.Event:
        if key not in self.arrived:
            self.arrived[key] = self.env.event()
        return self.arrived[key]

    def _input(self, stage: int, kind: str, mb: int, chunk: int) -> tuple | None:
        """Key of the chunk whose output this chunk needs, or None."""
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

    def stage(self, stage: int, order: list[tuple[str, int, int]]):
        for kind, mb, chunk in order:
            needed = self._input(stage, kind, mb, chunk)
            if needed is not None:
                yield self._event(needed)
            start = self.env.now
            yield self.env.timeout(self.duration(stage, kind, chunk, start))
            self.events += 1
            self.spans.append(ChunkSpan(stage, kind, mb, chunk, start, self.env.now))
            key = (kind, mb, chunk, stage)
            self.env.process(self._send(key, self.p2p))


def run_pipeline(orders: list[list[tuple[str, int, int]]], vp: int,
                 duration: Callable[[int, str, int, float], float], p2p: float
                 ) -> tuple[list[ChunkSpan], int]:
    """Run every stage's schedule; return the chunk spans (sorted by start) and the event count."""
    env = simpy.Environment()
    pipe = _Pipeline(env, len(orders), vp, duration, p2p)
    for stage, order in enumerate(orders):
        env.process(pipe.stage(stage, order))
    env.run()
    done = sum(len(o) for o in orders)
    if len(pipe.spans) != done:
        from moesim.errors import InternalError
        raise InternalError(f"pipeline deadlocked: {len(pipe.spans)} of {done} chunks ran")
    return sorted(pipe.spans, key=lambda s: (s.start, s.stage)), pipe.events
