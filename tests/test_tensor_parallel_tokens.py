"""Which tokens each part of a tensor-parallel block runs on: the TP-split parts (attention,
LM head, embedding) on the whole group's tokens, the MoE layer on each rank's 1/tp share (a
token routed once by its group) or, under expert tensor parallelism, on every token; with or
without sequence parallelism, which only changes what a rank holds between the parts. Hand
profile (conftest): 2 devices per node, 256-token sequences, tiny-cpu model (hidden 256,
4 experts of 512, top-1), BF16 activations."""

from __future__ import annotations

import pytest

from moesim.assembly import scenario_placement, simulate
from moesim.layout import Layout
from moesim.memory import stage_memory
from moesim.pricing.collectives import link_between, p2p_time
from moesim.pricing.context import PricingContext
from moesim.pricing.step import heads_time
from moesim.sim.costs import CostModel

T, H = 256, 256          # tokens per micro-batch (one sequence), hidden size


def _tp2(sp: bool, **more) -> dict:
    return {"parallelism": {"tp": 2, "dp": 2, "ep": 4, "sequence_parallel": sp, **more}}


def test_a_token_is_routed_once_by_its_tp_group_with_or_without_sequence_parallelism(
        make_scenario):
    """TP2 x DP2, EP4 over all four ranks. Without sequence parallelism every rank of a TP
    pair holds all 256 tokens; it still routes only its 128, as with it: the group's tokens
    reach the experts once (not once per TP rank), so expert work and all-to-all bytes are the
    same either way, and so is the LM head (all 256 tokens of the group against half the
    vocabulary)."""
    ctxs = [PricingContext.from_scenario(make_scenario(_tp2(sp))) for sp in (False, True)]
    for ctx, held in zip(ctxs, (T, T / 2)):
        assert ctx.group_tokens == T
        assert ctx.tokens_per_source == T / 2
        assert ctx.held_tokens == held
    assert heads_time(ctxs[0]) == heads_time(ctxs[1]) > 0
    sims = [simulate(make_scenario(_tp2(sp))) for sp in (False, True)]
    blocks = [CostModel(sim.costs.ctx, scenario_placement(sim.scenario)).block(0)
              for sim in sims]
    for b in blocks:   # 4 sources x 128 tokens x top-1: every routed copy once
        assert b.traffic.slot_tokens.sum() + b.traffic.dropped == pytest.approx(4 * T / 2)
    assert blocks[0].experts.tolist() == blocks[1].experts.tolist()
    assert blocks[0].dispatch.duration == pytest.approx(blocks[1].dispatch.duration, rel=1e-12)
    assert blocks[0].attention == blocks[1].attention


def test_pipeline_send_is_one_tp_share_of_the_groups_activations(make_scenario):
    """TP2 x PP2: each rank of stage 0 sends 1/2 of the micro-batch's 256 x 256 BF16
    activations to stage 1, on the next node: 65,536 bytes over the NIC path, with or without
    sequence parallelism (it was divided by tp twice under it)."""
    for sp in (False, True):
        s = make_scenario({"parallelism": {"tp": 2, "pp": 2, "dp": 1, "ep": 2,
                                           "sequence_parallel": sp}})
        ctx = PricingContext.from_scenario(s)
        bw, lat = link_between(ctx.topology, 0, 2)
        assert p2p_time(ctx) == pytest.approx(lat + T * H * 2 / 2 / bw, rel=1e-12)


def test_expert_tensor_parallel_activations_by_hand(make_scenario):
    """TP2 x DP2 without EP, no pipeline, nothing recomputed: each rank keeps, per block, its
    half of the attention activations (15 h per token, in 2-byte units) and, for the MoE
    layer, every one of the group's 256 routed copies with its input whole (2 h) and its
    half of the projections and activation (4 x 512 / 2), plus the router's probabilities
    (4 experts x 4 bytes) of the 128 tokens it holds. With whole experts (etp 1) it keeps
    its 128 tokens' copies at the full width instead."""
    s = make_scenario({"parallelism": {"tp": 2, "dp": 2, "ep": 1, "etp": 2}})
    m = s.model
    layers = m.num_layers
    attention = T / 2 * 15 * H
    fm1 = m.ffn_matrices + 1
    split = T * (2 * H + fm1 * m.expert_ffn_size / 2) * 2 + T / 2 * m.num_experts * 4
    assert stage_memory(s, Layout.for_scenario(s), 0).activations == pytest.approx(
        layers * (attention + split), rel=1e-12)
    whole = make_scenario({"parallelism": {"tp": 2, "dp": 2, "ep": 1}})
    plain = T / 2 * ((2 * H + fm1 * m.expert_ffn_size) * 2 + m.num_experts * 4)
    assert stage_memory(whole, Layout.for_scenario(whole), 0).activations == pytest.approx(
        layers * (attention + plain), rel=1e-12)
