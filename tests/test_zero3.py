"""ZeRO-3 / FSDP: per-block parameter all-gathers and gradient reduce-scatters, by hand."""

from __future__ import annotations

import pytest

from moesim.assembly import simulate
from moesim.memory import zero3_regathers
from moesim.network import ring_all_gather, ring_reduce_scatter
from moesim.pricing.collectives import link_between, prefetched_makespan, sharded_block_times
from moesim.pricing.context import PricingContext

H, EXPERTS, LAYERS = 256, 4, 4
# tiny-cpu's blocks: GQA attention (q 256x256, k and v 256x128, out 256x256, two norms) and a
# router of 4 experts; SwiGLU experts of 512.
ATTENTION = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 2 * 256
BLOCK_DENSE = ATTENTION + EXPERTS * H
EXPERT = 3 * H * 512
ZERO3 = {"parallelism": {"zero_stage": 3, "dp": 4, "ep": 2}}


def _bottleneck(topology, members):
    return min(link_between(topology, a, b) for a, b in zip(members, members[1:]))


def test_prefetched_makespan_by_hand():
    # Forward, 3 blocks: gathers 1, 4, 1 and compute 2, 2, 2. Block 0 waits for its gather
    # (0-1) and runs 1-3; block 1's gather starts with block 0 (1-5), so block 1 runs 5-7;
    # block 2's gather starts then (5... stream free at 5 -> 5-6) and block 2 runs 7-9.
    assert prefetched_makespan([1, 4, 1], [2, 2, 2]) == 9
    # Backward with reduce-scatters 3 each: gathers 0-1, then block 0 1-3 while block 1's
    # gather runs 1-5; block 0's reduce-scatter queues behind it (5-8); block 1 runs 5-7 and
    # block 2's gather (issued at 5) waits for the stream: 8-9; block 1's reduce-scatter 9-12;
    # block 2 runs 9-11; its reduce-scatter 12-15.
    assert prefetched_makespan([1, 4, 1], [2, 2, 2], [3, 3, 3]) == 15
    # Nothing to move: the compute alone.
    assert prefetched_makespan([0, 0], [2, 3], [0, 0]) == 5


def test_block_gather_and_scatter_by_hand(make_scenario):
    # dp 4 over 2 nodes: the dense shard group is ranks 0-3 (ring through the NIC); ep 2 leaves
    # 2 expert slots per device and expert-DP 2 (ranks 0 and 2). Weights BF16, gradients FP32.
    s = make_scenario(ZERO3)
    ctx = PricingContext.from_scenario(s)
    dense_bw, dense_lat = _bottleneck(ctx.topology, [0, 1, 2, 3])
    exp_bw, exp_lat = _bottleneck(ctx.topology, [0, 2])
    gather, scatter = sharded_block_times(ctx, 0, 1)
    assert gather == pytest.approx(
        ring_all_gather(BLOCK_DENSE * 2, 4, dense_bw, dense_lat)
        + ring_all_gather(2 * EXPERT * 2, 2, exp_bw, exp_lat), rel=1e-12)
    assert scatter == pytest.approx(
        ring_reduce_scatter(BLOCK_DENSE * 4, 4, dense_bw, dense_lat)
        + ring_reduce_scatter(2 * EXPERT * 4, 2, exp_bw, exp_lat), rel=1e-12)


def test_reshard_modes():
    class S:    # the two fields the rule reads
        def __init__(self, mode, pp):
            self.communication = type("C", (), {"zero3_reshard": mode})()
            self.parallelism = type("P", (), {"pp": pp})()
    assert zero3_regathers(S("auto", 1)) and not zero3_regathers(S("auto", 2))
    assert zero3_regathers(S("after_forward", 4)) and not zero3_regathers(S("after_backward", 1))


def test_a_communication_bound_zero3_step_is_the_gathers_and_scatters(make_scenario):
    # NICs at 10 MB/s: every block's gathers and reduce-scatters take far longer than its
    # compute, so the one micro-batch's forward is the gathers of the embedding, the 4 blocks
    # and the (untied) LM head back to back, and its backward (parameters gathered again,
    # pp = 1) the same gathers and the reduce-scatters on one stream: the step is
    # 2 x sum(gathers) + sum(scatters), up to the compute of a block or two.
    slow = {"links": {"scale_out": {"bandwidth": "10 MB/s"}}}
    s = make_scenario(ZERO3, slow)
    ctx = PricingContext.from_scenario(s)
    times = [sharded_block_times(ctx, 0, key)
             for key in ("embedding", *range(LAYERS), "lm_head")]
    expected = 2 * sum(g for g, _ in times) + sum(r for _, r in times)
    result = simulate(s).result
    assert result.step_time == pytest.approx(expected, rel=0.02)
    assert result.breakdown["exposed_other_comm"] > 0.95 * result.step_time
    # The embedding and the head hold vocabulary x hidden parameters each, like the blocks.
    assert times[0] == times[-1] == sharded_block_times(ctx, 0, "lm_head")
    assert times[0][0] == pytest.approx(ring_all_gather(
        1000 * H * 2, 4, *_bottleneck(ctx.topology, [0, 1, 2, 3])), rel=1e-12)


def test_the_search_screen_prices_zero3_as_the_simulator(make_scenario):
    # Two paths: the closed-form screen (block sums) and the simulator (the run's block spans)
    # put the same gathers and reduce-scatters on the same prefetching stream. With slow NICs
    # the step is all ZeRO-3 traffic, so the two agree closely.
    from moesim.search.screen import screen_layout

    slow = {"links": {"scale_out": {"bandwidth": "10 MB/s"}}}
    s = make_scenario(ZERO3, slow)
    ctx = PricingContext.from_scenario(s)
    screened = screen_layout(s, ctx.topology).step_time
    assert screened == pytest.approx(simulate(s).result.step_time, rel=0.03)
