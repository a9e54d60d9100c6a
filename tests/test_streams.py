"""A chunk on two streams: overlap policies against timelines computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.pricing.alltoall import Collective
from moesim.pricing.block import BlockCost
from moesim.sim.streams import chunk_ops, run_ops


def _coll(seconds: float) -> Collective:
    return Collective(seconds, np.zeros(0, dtype=int), np.zeros(0), 1.0, 0.0)


def _block() -> BlockCost:
    # attention 1, gate 0.5, dispatch 2, shared experts 1.5, experts 1 and 3, combine 2.
    from moesim.traffic import LayerTraffic
    dummy = LayerTraffic(np.zeros((0, 2), dtype=int), np.zeros(0), np.zeros(0), np.zeros((2, 2)),
                         np.zeros((2, 1)), np.zeros((2, 2)), 0.0, 0.0)
    return BlockCost(0, 1.0, 0.0, 0.5, 1.5, np.array([1.0, 3.0]), 0.0, _coll(2.0), _coll(2.0),
                     dummy)


def _ends(overlap: str, backward: bool = False) -> tuple[list[str], np.ndarray, float]:
    ops = chunk_ops([_block()], 2, backward=backward, recompute=False, overlap=overlap)
    run = run_ops(ops, 2)
    return [op.name for op in ops], run.end, run.makespan


def test_no_overlap_serialises_everything():
    # attention 0-1, gate 1-1.5, dispatch 1.5-3.5, shared 3.5-5, experts 5-6 / 5-8 (straggler),
    # combine waits for both: 8-10.
    names, end, makespan = _ends("none")
    assert names == ["attention", "gate", "dispatch", "shared_experts", "experts", "combine"]
    assert end[4].tolist() == [6.0, 8.0]
    assert makespan == pytest.approx(10.0)


def test_shared_experts_overlap_the_dispatch():
    # shared runs 1.5-3 during the dispatch (1.5-3.5); experts 3.5-4.5 / 3.5-6.5; combine 6.5-8.5.
    _, end, makespan = _ends("shared_expert")
    assert end[3].tolist() == [3.0, 3.0]
    assert makespan == pytest.approx(8.5)


def test_backward_doubles_compute_not_communication():
    # attention 0-2, gate 2-3, dispatch 3-5, shared 5-8, experts 8-10 / 8-14, combine 14-16.
    _, _, makespan = _ends("none", backward=True)
    assert makespan == pytest.approx(16.0)


def test_two_batch_overlap_hides_communication_behind_the_other_half():
    # Both halves carry the full block cost here, so the overlapped chunk must beat two serial
    # chunks (2 x 10) but not the compute-stream bound of the straggler (2 x (1+0.5+1.5+3) = 12).
    _, _, makespan = _ends("two_batch")
    assert 12.0 <= makespan < 20.0


def test_a_new_overlap_schedule_is_one_block_function(monkeypatch):
    # A made-up schedule: the experts start with the gate's output (as if tokens were local),
    # the dispatch runs beside them and the combine waits for both. Named dependencies only.
    from moesim.sim import streams

    def experts_first(cost, ep, backward):
        ones = np.ones(ep)
        return [streams.OpSpec("attention", streams.COMPUTE, "compute", ones * cost.attention),
                streams.OpSpec("gate", streams.COMPUTE, "compute", ones * cost.gate,
                               ("attention",)),
                streams.OpSpec("experts", streams.COMPUTE, "compute", cost.experts, ("gate",)),
                streams.OpSpec("dispatch", streams.COMM, "alltoall",
                               ones * cost.dispatch.duration, ("gate",), barrier=True),
                streams.OpSpec("combine", streams.COMM, "alltoall",
                               ones * cost.combine.duration, ("experts", "dispatch"),
                               barrier=True)]

    monkeypatch.setitem(streams.SCHEDULES, "experts_first", streams.Schedule(experts_first))
    # attention 0-1, gate 1-1.5, experts 1.5-2.5 / 1.5-4.5, dispatch 1.5-3.5, combine 4.5-6.5.
    names, end, makespan = _ends("experts_first")
    assert names == ["attention", "gate", "experts", "dispatch", "combine"]
    assert end[2].tolist() == [2.5, 4.5]
    assert end[3].tolist() == [3.5, 3.5]
    assert makespan == pytest.approx(6.5)


def test_blocks_chain_through_their_entry_ops():
    # Two blocks, no overlap: the second block's attention starts when the first's combine ends.
    ops = chunk_ops([_block(), _block()], 2, backward=False, recompute=False, overlap="none")
    run = run_ops(ops, 2)
    assert ops[6].name == "attention" and ops[6].deps == (5,)
    assert run.makespan == pytest.approx(20.0)


def test_recompute_reruns_the_forward_before_the_backward_block():
    # Full recompute: forward ops (10, as test_no_overlap) then the backward (16) = 26.
    ops = chunk_ops([_block()], 2, backward=True, recompute=True, overlap="none")
    assert [op.name for op in ops][:2] == ["attention.recompute", "gate.recompute"]
    assert run_ops(ops, 2).makespan == pytest.approx(26.0)
