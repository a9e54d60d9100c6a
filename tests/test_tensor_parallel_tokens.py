"""Which tokens each part of a tensor-parallel block runs on: the TP-split parts (attention,
LM head, embedding) on the whole group's tokens, the MoE layer on each rank's 1/tp share (a
token routed once by its group) or, under expert tensor parallelism, on every token; with or
without sequence parallelism, which only changes what a rank holds between the parts. Hand
profile (conftest): 2 devices per node, 256-token sequences, tiny-cpu model (hidden 256,
4 experts of 512, top-1), BF16 activations."""

from __future__ import annotations

import pytest

from moesim.assembly import scenario_placement, simulate
from moesim.compute import KernelTimer
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import stage_memory
from moesim.pricing.collectives import (
    expert_tp_gather_time,
    link_between,
    p2p_time,
    tp_all_reduce_time,
)
from moesim.pricing.context import PricingContext
from moesim.pricing.step import heads_time
from moesim.sim.costs import CostModel

T, H = 256, 256          # tokens per micro-batch (one sequence), hidden size
LAYERS_TINY = 4


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


def test_whole_experts_need_no_tp_collective_only_shared_experts_do(make_scenario):
    """TP2 x DP2 training under sequence parallelism, EP4 over all four ranks, whole experts
    (etp 1): each rank routes its own 128 tokens and gets their outputs back from the combine,
    so an MoE block's TP communication is the attention's all-reduce (all-gather + reduce-
    scatter of the group's 256 tokens) alone; a shared expert split over TP adds its own
    exchange of the same bytes. With experts split over the TP pair (etp 2, EP2) the copies'
    all-gather and reduce-scatter come on top."""
    def tp_comm(changes: dict) -> tuple[float, float, float]:
        sim = simulate(make_scenario(changes))
        ctx = sim.costs.ctx
        block = CostModel(ctx, scenario_placement(sim.scenario)).block(0)
        assert block.is_moe
        gather = expert_tp_gather_time(ctx, float(block.traffic.slot_tokens.sum(axis=1).max()))
        return block.tp_comm, tp_all_reduce_time(ctx, T), gather

    comm, all_reduce, gather = tp_comm(_tp2(True))
    assert all_reduce > 0 and gather == 0
    assert comm == pytest.approx(all_reduce, rel=1e-12)
    shared = {"model": {"num_shared_experts": 1}}
    comm, all_reduce, _ = tp_comm(_tp2(True) | shared)
    assert comm == pytest.approx(2 * all_reduce, rel=1e-12)
    comm, all_reduce, gather = tp_comm(_tp2(True, ep=2, etp=2) | shared)
    assert gather > 0
    assert comm == pytest.approx(2 * all_reduce + gather, rel=1e-12)


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


def _decode(parallelism: dict, attention: dict | None = None) -> dict:
    changes = {"parallelism": parallelism, "cluster": {"nodes": 1},
               "workload": {"mode": "decode", "global_batch": 16, "seq_len": 1,
                            "micro_batch": 8, "context_len": 99}}
    if attention:
        changes["model"] = {"attention": attention}
    return changes


FOUR_PER_NODE = {"node": {"devices_per_node": 4}}


def test_kv_cache_splits_over_tp_only_as_far_as_there_are_kv_heads(make_scenario):
    """tiny-cpu has 2 KV heads of 64: TP2 gives each rank one; TP4 cannot split further, each
    rank keeps the one head its queries read (engines replicate it), so a rank's cache per
    sequence is the same at TP2 and TP4: 100 tokens x 4 layers x (k, v) x 64 x 2 B, for 8
    sequences per DP rank at TP2 (dp 2), 16 at TP4 (dp 1). The decode attention reads what
    the rank keeps: with a long cache (memory-bound) it takes as long at TP4 as at TP2."""
    per_sequence = 100 * LAYERS_TINY * 2 * 64 * 2
    timers = []
    for tp, dp, sequences in ((2, 2, 8), (4, 1, 16)):
        s = make_scenario(_decode({"tp": tp, "dp": dp, "ep": 4}), FOUR_PER_NODE)
        assert stage_memory(s, Layout.for_scenario(s), 0).kv_cache == sequences * per_sequence
        timers.append(KernelTimer(s.model, s.hardware.device, tp=tp, inference=True))
    core = [t.attention_core(8, 1e6, 8e6) for t in timers]
    assert core[1] == pytest.approx(core[0], rel=1e-3)


def test_mla_latent_cache_is_whole_on_every_tp_rank(make_scenario):
    """MLA caches one latent per token (kv_lora_rank 32 + rope 16 here) that every head reads:
    under TP2 each rank keeps all of it for its sequences, 48 x 2 B per token and layer."""
    mla = {"kind": "mla", "num_heads": 4, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
           "q_lora_rank": 0}
    s = make_scenario(_decode({"tp": 2, "dp": 2, "ep": 4}, mla), FOUR_PER_NODE)
    assert stage_memory(s, Layout.for_scenario(s), 0).kv_cache == 8 * 100 * LAYERS_TINY * 48 * 2


def test_replicated_dispatch_moves_nothing_and_saves_exactly_the_all_to_alls(make_scenario):
    """TP2 x DP2 decode, EP2 inside each TP pair, no sequence parallelism: both ranks of a pair
    hold its 8 tokens after attention. ``replicated`` (vLLM's TP + EP) sends no byte and keeps
    no all-to-all buffer; the experts compute what the direct all-to-all's would (same copies
    per slot), but each rank's output is partial, summed by an all-reduce of the pair's 8
    tokens that the direct dispatch does not need (each rank gets its own tokens' outputs back;
    the attention's all-reduce, split around the layer, restores them on both). So each of the
    4 blocks of a forward pass differs by exactly the direct dispatch + combine less that
    all-reduce."""
    base = _decode({"tp": 2, "dp": 2, "ep": 2}) | {"cluster": {"nodes": 2}}
    sims = [simulate(make_scenario(base | {"communication": {"alltoall": a}}))
            for a in ("direct", "replicated")]
    blocks = [CostModel(sim.costs.ctx, scenario_placement(sim.scenario)).block(0)
              for sim in sims]
    direct, replicated = blocks
    assert replicated.traffic.dispatch_bytes.sum() == replicated.traffic.combine_bytes.sum() == 0
    assert replicated.dispatch.duration == replicated.combine.duration == 0.0
    assert direct.dispatch.duration > 0
    assert replicated.traffic.slot_tokens.tolist() == direct.traffic.slot_tokens.tolist()
    assert sims[1].scenario.model.num_shared_experts == 0
    all_reduce = tp_all_reduce_time(sims[1].costs.ctx, 8)
    assert replicated.tp_comm - direct.tp_comm == pytest.approx(all_reduce, rel=1e-12)
    assert all_reduce > 0
    saved = direct.dispatch.duration + direct.combine.duration - all_reduce
    runs = [sim.runs[(0, "F", 0)].makespan for sim in sims]
    assert runs[0] - runs[1] == pytest.approx(LAYERS_TINY * saved, rel=1e-9)
    memory = [stage_memory(sim.scenario, Layout.for_scenario(sim.scenario), 0) for sim in sims]
    assert memory[1].comm_buffers == 0 < memory[0].comm_buffers


def test_replicated_dispatch_needs_the_ep_group_inside_a_tp_group(make_scenario):
    for parallelism, match in (({"tp": 1, "dp": 4, "ep": 4}, "ep=4 must divide tp=1"),
                               ({"tp": 2, "dp": 2, "ep": 2, "sequence_parallel": True},
                                "sequence parallelism"),
                               ({"tp": 2, "dp": 2, "ep": 2, "etp": 2}, "several TP groups")):
        with pytest.raises(ScenarioError, match=match) as exc:
            make_scenario({"parallelism": parallelism,
                           "communication": {"alltoall": "replicated"}})
        assert exc.value.field == "communication.alltoall"


def test_each_tp_rank_projects_the_kv_heads_its_queries_read(make_scenario):
    """tiny-cpu (4 query heads, 2 KV heads of 64) at TP4: a rank projects 1 query head and,
    the KV heads being fewer than the ranks, one whole KV head (k and v): 3 x 64 columns; at
    TP2 1 of each: (2 + 2) x 64."""
    s = make_scenario()
    for tp, columns in ((4, 3 * 64), (2, 4 * 64)):
        shapes = KernelTimer(s.model, s.hardware.device, tp=tp)._projection_shapes(False)
        assert shapes[0] == (columns, H, 1)
