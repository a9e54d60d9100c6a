"""Executing a chunk of blocks on one EP group: a compute stream and a communication stream per device.

A chunk (the layers a pipeline stage runs for one micro-batch, forward or backward) becomes a list
of operations in issue order. Each op runs on the ``compute`` or ``comm`` stream, after the ops it
depends on. Collective ops (all-to-alls) are barriers: they start when every device of the group
is ready. Overlap policies differ only in the dependencies:

- ``none``: every op waits for the previous one of the same micro-batch;
- ``shared_expert``: the shared experts (or dense FFN) depend on the gate, not on the dispatch, so
  they run on the compute stream while the dispatch is in flight;
- ``two_batch``: the micro-batch is split in two halves whose chains interleave, so one half's
  all-to-all overlaps the other half's compute (DeepSeek's DualPipe / SGLang two-batch overlap).

:func:`run_ops` evaluates the op list with numpy over all devices of the group at once. The full
engine (``moesim.sim.full``) runs the same op list as SimPy processes, one per device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.sim.costs import BlockCost

__all__ = ["Op", "ChunkRun", "chunk_ops", "run_ops"]

COMPUTE, COMM = "compute", "comm"


@dataclass(frozen=True, eq=False)
class Op:
    name: str               # "attention", "dispatch", ...
    stream: str             # "compute" or "comm"
    category: str           # "compute", "alltoall", "tp_comm"
    duration: np.ndarray    # float[ep] (collectives: the same value on every device)
    deps: tuple[int, ...]   # indices of earlier ops
    layer: int
    barrier: bool = False   # a collective: starts when all devices are ready
    collective: object | None = None  # the Collective, for link accounting


@dataclass(frozen=True, eq=False)
class ChunkRun:
    """Result of running a chunk's ops: starts/ends ``[ops, ep]`` relative to the chunk start."""

    ops: list[Op]
    start: np.ndarray
    end: np.ndarray

    @property
    def makespan(self) -> float:
        return float(self.end.max()) if len(self.ops) else 0.0


def _block_ops(cost: BlockCost, ep: int, backward: bool, recompute: bool, overlap: str,
               tag: str = "") -> list[tuple[str, str, str, np.ndarray, str, bool, object]]:
    """The ops of one block in data-flow order: (name, stream, category, duration, dep, barrier).

    ``dep`` names which earlier op of this block an op waits for ("prev" = the previous op).
    """
    scale = 2.0 if backward else 1.0
    ones = np.ones(ep)

    def comp(name, seconds, dep="prev"):
        return (name + tag, COMPUTE, "compute", np.broadcast_to(seconds * scale, (ep,)) * ones,
                dep, False, None)

    ops = []
    if backward and recompute:
        ops += [(*c[:4], "prev", False, None) for c in _block_ops(cost, ep, False, False,
                                                                  overlap, tag + ".recompute")]
    ops.append(comp("attention", cost.attention))
    if cost.tp_comm:
        ops.append(("tp_allreduce" + tag, COMM, "tp_comm", ones * cost.tp_comm, "prev", True,
                    None))
    if not cost.is_moe:
        ops.append(comp("dense_ffn", cost.ffn))
        return ops
    first, second = (cost.combine, cost.dispatch) if backward else (cost.dispatch, cost.combine)
    ops.append(comp("gate", cost.gate + cost.permute / 2))
    ops.append(("dispatch" + tag, COMM, "alltoall", ones * first.duration, "prev", True, first))
    shared_dep = "gate" if overlap in ("shared_expert", "two_batch") else "prev"
    if cost.ffn:
        ops.append(comp("shared_experts", cost.ffn, dep=shared_dep))
    ops.append(comp("experts", cost.experts + cost.permute / 2, dep="dispatch"))
    ops.append(("combine" + tag, COMM, "alltoall", ones * second.duration, "prev", True, second))
    return ops


def chunk_ops(costs: list[BlockCost], ep: int, *, backward: bool, recompute: bool,
              overlap: str) -> list[Op]:
    """Op list of a chunk (blocks in execution order; reversed by the caller for backward)."""
    halves = ("", ) if overlap != "two_batch" else (".a", ".b")
    chains: list[list[tuple]] = []
    for tag in halves:
        chain = []
        for cost in costs:
            chain += [(cost.layer, op) for op in _block_ops(cost, ep, backward, recompute,
                                                            overlap, tag)]
        chains.append(chain)
    # Interleave the halves' chains op by op (issue order), keeping each chain's dependencies.
    order = [(c, i) for i in range(max(len(ch) for ch in chains)) for c in range(len(chains))
             if i < len(chains[c])]
    index: dict[tuple[int, int], int] = {}
    ops: list[Op] = []
    for c, i in order:
        layer, (name, stream, category, duration, dep, barrier, coll) = chains[c][i]
        deps = []
        if i > 0:
            if dep == "prev":
                deps.append(index[(c, i - 1)])
            else:  # the most recent op of this block with that base name
                j = i - 1
                while j >= 0 and not chains[c][j][1][0].startswith(dep):
                    j -= 1
                deps.append(index[(c, max(j, 0))])
                if dep == "dispatch":   # experts also follow the shared experts' data flow
                    deps.append(index[(c, i - 1)])
        index[(c, i)] = len(ops)
        ops.append(Op(name, stream, category, duration, tuple(deps), layer, barrier, coll))
    return ops


def run_ops(ops: list[Op], ep: int) -> ChunkRun:
    """Earliest-start schedule of ``ops`` on each device's two streams, vectorised over devices."""
    n = len(ops)
    start = np.zeros((n, ep))
    end = np.zeros((n, ep))
    free = {COMPUTE: np.zeros(ep), COMM: np.zeros(ep)}
    for i, op in enumerate(ops):
        ready = free[op.stream].copy()
        for d in op.deps:
            np.maximum(ready, end[d], out=ready)
        if op.barrier:
            ready[:] = ready.max()
        start[i] = ready
        end[i] = ready + op.duration
        free[op.stream] = end[i]
    return ChunkRun(ops, start, end)
