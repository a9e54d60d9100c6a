"""Executing a chunk of blocks on one EP group: a compute stream and a communication stream per device.

A chunk (the layers a pipeline stage runs for one micro-batch, forward or backward) becomes a list
of operations in issue order. Each op runs on the ``compute`` or ``comm`` stream, after the ops it
depends on. Collective ops (all-to-alls) are barriers: they start when every device of the group
is ready. A schedule (:data:`SCHEDULES`) writes each block's ops with named dependencies
(:class:`OpSpec`); :func:`chunk_ops` resolves them into the indexed list the engines run. Adding
an overlap schedule is one new block function. The shipped ones differ only in the dependencies:

- ``none``: every op waits for the previous one of the same micro-batch;
- ``shared_expert``: the shared experts (or dense FFN) depend on the gate, not on the dispatch, so
  they run on the compute stream while the dispatch is in flight;
- ``two_batch``: the micro-batch is split in two halves whose chains interleave, so one half's
  all-to-all overlaps the other half's compute (DeepSeek's DualPipe / SGLang two-batch overlap).

:func:`run_ops` evaluates the op list with numpy over all devices of the group at once. The full
engine (``moesim.sim.full``) runs the same op list as SimPy processes, one per device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moesim.pricing.alltoall import Collective
from moesim.pricing.block import BlockCost

__all__ = ["Op", "OpSpec", "ChunkRun", "Schedule", "SCHEDULES", "chunk_ops", "run_ops",
           "merge_pair"]

COMPUTE, COMM = "compute", "comm"


@dataclass(frozen=True, eq=False)
class OpSpec:
    """One op of a block as a schedule writes it: dependencies by name, inside the block.

    An op with no ``after`` is the block's entry: it follows the previous block's last op of
    the same chain (nothing, for a chunk's first block).
    """

    name: str                        # unique in its block: "attention", "dispatch", ...
    stream: str                      # COMPUTE or COMM
    category: str                    # "compute", "alltoall", "tp_comm"
    seconds: np.ndarray              # float[ep] (collectives: the same value on every device)
    after: tuple[str, ...] = ()      # names of this block's ops it waits for
    barrier: bool = False            # a collective: starts when all devices are ready
    collective: Collective | None = None
    beside_comm: bool = False        # compute scheduled to run while a communication kernel
                                     # holds some of the SMs (runs slower, see chunk_ops)


@dataclass(frozen=True, eq=False)
class Op:
    """An op of a chunk's resolved op list: dependencies are indices of earlier ops."""

    name: str               # "attention", "dispatch.a", ...
    stream: str             # "compute" or "comm"
    category: str           # "compute", "alltoall", "tp_comm"
    duration: np.ndarray    # float[ep] (collectives: the same value on every device)
    deps: tuple[int, ...]   # indices of earlier ops
    layer: int
    barrier: bool = False   # a collective: starts when all devices are ready
    collective: Collective | None = None  # for link accounting


@dataclass(frozen=True, eq=False)
class ChunkRun:
    """Result of running a chunk's ops: starts/ends ``[ops, ep]`` relative to the chunk start."""

    ops: list[Op]
    start: np.ndarray
    end: np.ndarray

    @property
    def makespan(self) -> float:
        return float(self.end.max()) if len(self.ops) else 0.0


BlockOps = Callable[[BlockCost, int, bool], list[OpSpec]]


@dataclass(frozen=True)
class Schedule:
    """An overlap schedule: the ops of one block (``block(cost, ep, backward)``), how many
    interleaved chains (micro-batch halves) a chunk runs, and whether all compute then runs
    beside communication kernels (two-batch overlap keeps them running throughout)."""

    block: BlockOps
    halves: int = 1
    compute_beside_comm: bool = False


def _ops(cost: BlockCost, ep: int, backward: bool, *, shared_after: str) -> list[OpSpec]:
    """A block's ops in data-flow order; the shared experts (or nothing) wait for
    ``shared_after``: "dispatch" runs them after the dispatch, "gate" beside it."""
    scale = 2.0 if backward else 1.0
    ones = np.ones(ep)

    def compute(name: str, seconds: float | np.ndarray, *after: str) -> OpSpec:
        return OpSpec(name, COMPUTE, "compute", np.broadcast_to(seconds * scale, (ep,)) * ones,
                      after)

    ops = [compute("attention", cost.attention)]
    if cost.cp_comm:   # context parallelism's exchange beyond the attention it hides behind
        wait = cost.cp_comm_backward if backward else cost.cp_comm
        ops.append(OpSpec("cp_exchange", COMM, "tp_comm", ones * wait, ("attention",),
                          barrier=True))
    if cost.tp_comm:
        ops.append(OpSpec("tp_allreduce", COMM, "tp_comm", ones * cost.tp_comm,
                          (ops[-1].name,), barrier=True))
    if not cost.is_moe:
        return [*ops, compute("dense_ffn", cost.ffn, ops[-1].name)]
    first, second = (cost.combine, cost.dispatch) if backward else (cost.dispatch, cost.combine)
    ops.append(compute("gate", cost.gate + cost.permute / 2, ops[-1].name))
    ops.append(OpSpec("dispatch", COMM, "alltoall", ones * first.duration, ("gate",),
                      barrier=True, collective=first))
    experts_after: tuple[str, ...] = ("dispatch",)
    if cost.ffn:
        beside = shared_after != "dispatch" and first.duration > 0
        ops.append(replace(compute("shared_experts", cost.ffn, shared_after),
                           beside_comm=beside))
        experts_after = ("dispatch", "shared_experts")
    ops.append(compute("experts", cost.experts + cost.permute / 2, *experts_after))
    ops.append(OpSpec("combine", COMM, "alltoall", ones * second.duration, ("experts",),
                      barrier=True, collective=second))
    return ops


def serial_block(cost: BlockCost, ep: int, backward: bool) -> list[OpSpec]:
    """``none``: every op waits for the one before it."""
    return _ops(cost, ep, backward, shared_after="dispatch")


def shared_expert_overlap_block(cost: BlockCost, ep: int, backward: bool) -> list[OpSpec]:
    """``shared_expert``: the shared experts (or dense FFN) run on the compute stream while the
    dispatch is in flight (they need only the gate's input)."""
    return _ops(cost, ep, backward, shared_after="gate")


SCHEDULES: dict[str, Schedule] = {
    "none": Schedule(serial_block),
    "shared_expert": Schedule(shared_expert_overlap_block),
    # two_batch: two halves of the micro-batch whose chains interleave, so one half's
    # all-to-all overlaps the other half's compute (DualPipe / SGLang two-batch overlap).
    "two_batch": Schedule(shared_expert_overlap_block, halves=2, compute_beside_comm=True),
}


def _recomputed(ops: list[OpSpec]) -> list[OpSpec]:
    """Full recomputation before a backward block: its forward ops again, one after another
    (collectives included, without the barrier), then the backward ops after them."""
    return [OpSpec(op.name + ".recompute", op.stream, op.category, op.seconds,
                   () if i == 0 else (ops[i - 1].name + ".recompute",))
            for i, op in enumerate(ops)]


MOE_OPS = ("gate", "dispatch", "shared_experts", "experts", "combine")


def _selective_redo(cost: BlockCost, schedule: Schedule, ep: int) -> list[OpSpec]:
    """Ops selective recomputation runs before a block's backward: the re-run modules'
    forward seconds as one compute op, then, when the whole MoE layer is re-run
    (``recompute_moe``), its forward ops again, all-to-alls included, one after another."""
    redo = []
    if cost.recompute > 0:
        redo.append(OpSpec("recompute", COMPUTE, "compute", np.full(ep, cost.recompute)))
    if cost.recompute_moe and cost.is_moe:
        moe = _recomputed([op for op in schedule.block(cost, ep, False) if op.name in MOE_OPS])
        if redo:
            moe[0] = replace(moe[0], after=(redo[-1].name,))
        redo += moe
    return redo


def chunk_ops(costs: list[BlockCost], ep: int, *, backward: bool, recompute: bool,
              overlap: str, comm_slowdown: float = 1.0) -> list[Op]:
    """Op list of a chunk (blocks in execution order; reversed by the caller for backward).

    ``comm_slowdown``: factor on compute that runs beside a communication kernel holding some
    of the SMs (:func:`moesim.kernels.overlapped_compute_slowdown`): ops a schedule marks
    ``beside_comm``, or all compute of an MoE block under a schedule whose halves overlap.
    """
    schedule = SCHEDULES[overlap]
    tags = ("",) if schedule.halves == 1 else tuple(f".{chr(97 + h)}" for h in
                                                     range(schedule.halves))
    # Step 1: each half's chain of (layer, op spec, block position) in issue order.
    chains: list[list[tuple[int, OpSpec, int]]] = []
    for _ in tags:
        chain = []
        for b, cost in enumerate(costs):
            ops = schedule.block(cost, ep, backward)
            if backward and not recompute:   # selective: first re-run what it discarded
                redo = _selective_redo(cost, schedule, ep)
                if redo:
                    ops = [*redo, *(replace(op, after=op.after or (redo[-1].name,))
                                    for op in ops)]
            if backward and recompute:
                forward = _recomputed(schedule.block(cost, ep, False))
                ops = [*forward, *(replace(op, after=op.after or (forward[-1].name,))
                                   for op in ops)]
            if comm_slowdown != 1.0:
                moving = cost.dispatch.duration > 0 or cost.combine.duration > 0
                ops = [replace(op, seconds=op.seconds * comm_slowdown)
                       if op.stream == COMPUTE and (op.beside_comm or (
                           schedule.compute_beside_comm and moving)) else op for op in ops]
            chain += [(cost.layer, op, b) for op in ops]
        chains.append(chain)
    # Step 2: interleave the halves op by op (issue order) and resolve names to indices.
    order = [(c, i) for i in range(max(len(ch) for ch in chains)) for c in range(len(chains))
             if i < len(chains[c])]
    index: dict[tuple[int, int, str], int] = {}
    last_of_block: dict[tuple[int, int], int] = {}
    out: list[Op] = []
    for c, i in order:
        layer, spec, b = chains[c][i]
        if spec.after:
            deps = tuple(index[(c, b, name)] for name in spec.after)
        else:
            previous = last_of_block.get((c, b - 1))
            deps = () if previous is None else (previous,)
        index[(c, b, spec.name)] = last_of_block[(c, b)] = len(out)
        name = spec.name if not tags[c] else _tagged(spec.name, tags[c])
        out.append(Op(name, spec.stream, spec.category, spec.seconds, deps, layer, spec.barrier,
                      spec.collective))
    return out


def _tagged(name: str, tag: str) -> str:
    """"attention.recompute" of half ".a" is "attention.a.recompute"."""
    base, dot, rest = name.partition(".")
    return base + tag + dot + rest


def _earliest_start(op: Op, dep_ends: list[np.ndarray],
                    free: dict[str, np.ndarray]) -> np.ndarray:
    """float[ep]: when ``op`` can start on each device: its stream free and its dependencies
    done; a collective (barrier) on every device at once."""
    ready = free[op.stream].copy()
    for done in dep_ends:
        np.maximum(ready, done, out=ready)
    if op.barrier:
        ready[:] = ready.max()
    return ready


def merge_pair(first: list[Op], second: list[Op], ep: int) -> list[Op]:
    """Two chunks' ops as one list that overlaps them (DualPipe's forward-backward pair): each
    keeps its own order and dependencies, and the next op issued is whichever head can start
    first on the earliest-start schedule (:func:`run_ops`; ties: ``first``), so one chunk's
    communication runs under the other's compute.

    >>> c = Op("c", COMPUTE, "compute", np.ones(1), (), 0)
    >>> m = Op("m", COMM, "alltoall", np.ones(1), (0,), 0)
    >>> d = Op("d", COMPUTE, "compute", np.ones(1), (1,), 0)
    >>> run_ops(merge_pair([c, m, d], [c, m, d], 1), 1).makespan   # 6 back to back
    4.0
    """
    lists = (first, second)
    where: list[list[int]] = [[], []]     # merged index of each list's ops so far
    out: list[Op] = []
    end: list[np.ndarray] = []
    free = {COMPUTE: np.zeros(ep), COMM: np.zeros(ep)}
    heads = [0, 0]

    def start_of(k: int) -> np.ndarray:
        op = lists[k][heads[k]]
        return _earliest_start(op, [end[where[k][d]] for d in op.deps], free)

    while heads[0] < len(first) or heads[1] < len(second):
        live = [k for k in (0, 1) if heads[k] < len(lists[k])]
        starts = {k: start_of(k) for k in live}
        k = min(live, key=lambda j: (float(starts[j].max()), j))
        op = lists[k][heads[k]]
        ready = starts[k]
        where[k].append(len(out))
        out.append(replace(op, deps=tuple(where[k][d] for d in op.deps)))
        end.append(ready + op.duration)
        free[op.stream] = end[-1]
        heads[k] += 1
    return out


def run_ops(ops: list[Op], ep: int) -> ChunkRun:
    """Earliest-start schedule of ``ops`` on each device's two streams, vectorised over devices."""
    n = len(ops)
    start = np.zeros((n, ep))
    end = np.zeros((n, ep))
    free = {COMPUTE: np.zeros(ep), COMM: np.zeros(ep)}
    for i, op in enumerate(ops):
        ready = _earliest_start(op, [end[d] for d in op.deps], free)
        start[i] = ready
        end[i] = ready + op.duration
        free[op.stream] = end[i]
    return ChunkRun(ops, start, end)
