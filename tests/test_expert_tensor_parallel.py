"""Expert tensor parallelism (``parallelism.etp``): every expert's FFN split over the TP group,
as vLLM and SGLang run MoE without expert parallelism. Hand profile (conftest), tiny-cpu model
(hidden 256, 4 experts of 512 here, top-1)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import network
from moesim.assembly import scenario_placement, simulate
from moesim.compute import KernelTimer
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.pricing.collectives import _shard_groups, tp_all_reduce_time
from moesim.pricing.context import PricingContext
from moesim.sim.costs import CostModel
from moesim.sim.faults import device_faults

ETP2 = {"parallelism": {"tp": 2, "dp": 2, "ep": 1, "etp": 2}}


def test_expert_tensor_parallel_layouts_name_the_field(make_scenario):
    for changes, match in (({"tp": 2, "dp": 2, "ep": 1, "etp": 4}, "etp=4 must divide tp=2"),
                           ({"tp": 2, "dp": 2, "ep": 4, "etp": 2},
                            r"ep \* etp = 8 must divide dp \* cp \* tp = 4")):
        with pytest.raises(ScenarioError, match=match) as exc:
            make_scenario({"parallelism": changes})
        assert exc.value.field == "parallelism.etp"
    with pytest.raises(ScenarioError, match="does not split") as exc:
        make_scenario({**ETP2, "model": {"expert_ffn_size": 513}})
    assert exc.value.field == "parallelism.etp"


def test_each_tp_rank_runs_its_slice_of_every_expert(make_scenario):
    """The grouped GEMMs of an etp-2 rank are those of whole experts half as wide (the same
    kernel model at f / 2); its expert slices are reduced with the ranks holding the same slice
    (0 and 2), as the dense weights are."""
    s = make_scenario(ETP2)
    ctx = PricingContext.from_scenario(s)
    tokens = np.array([64.0, 0.0, 17.0, 300.0])
    whole = KernelTimer(s.model, s.hardware.device, tp=2)
    assert ctx.timer.experts(tokens) == pytest.approx(whole.experts(tokens, ffn_size=256),
                                                      rel=1e-12)
    groups = _shard_groups(ctx, 0, dense=1.0, experts=1.0)
    assert [members.tolist() for _, members in groups] == [[0, 2], [0, 2]]


def test_a_step_with_experts_split_over_tp(make_scenario):
    """TP2 without EP: with etp 1 each TP rank runs whole experts on its half of the group's
    tokens (a token is routed once by its group); with etp 2 every token of the group through
    half of each expert: the same FLOPs, in GEMMs half as wide over twice the tokens, and twice
    the tokens to permute. Whole experts need no TP collective (each rank gets its own tokens'
    outputs back); split ones one all-reduce of the group's outputs, forward and backward
    alike. Nothing else differs (the router runs on the tokens a rank holds, no all-to-all
    either way), so a forward pass differs by exactly the MoE layer's difference plus that
    all-reduce in each of its 4 blocks, a backward by twice the MoE layer's plus the
    all-reduce (the rest of the step differs too: half the expert gradients to reduce and to
    update)."""
    plain = simulate(make_scenario({"parallelism": {"tp": 2, "dp": 2, "ep": 1}}))
    split = simulate(make_scenario(ETP2))
    ctxs = [sim.costs.ctx for sim in (plain, split)]
    assert ctxs[0].group_tokens == ctxs[1].group_tokens == ctxs[1].tokens_per_source
    assert ctxs[0].tokens_per_source == ctxs[0].group_tokens / 2
    blocks = [CostModel(sim.costs.ctx, scenario_placement(sim.scenario)).block(0)
              for sim in (plain, split)]
    assert blocks[0].dispatch.duration == blocks[1].dispatch.duration == 0.0
    assert blocks[0].gate == blocks[1].gate
    assert blocks[0].traffic.slot_tokens.sum() * 2 == pytest.approx(
        blocks[1].traffic.slot_tokens.sum(), rel=1e-12)
    moe = [float(b.experts.max()) + b.permute for b in blocks]
    assert moe[0] != moe[1]
    all_reduce = tp_all_reduce_time(ctxs[1], ctxs[1].group_tokens)
    assert all_reduce > 0
    assert blocks[1].tp_comm - blocks[0].tp_comm == pytest.approx(all_reduce, rel=1e-12)
    for kind, scale in (("F", 1), ("B", 2)):
        run = [sim.runs[(0, kind, 0)].makespan for sim in (plain, split)]
        assert run[1] - run[0] == pytest.approx((scale * (moe[1] - moe[0]) + all_reduce) * 4,
                                                rel=1e-9)


def test_search_keeps_experts_split_over_each_layouts_tp(tmp_path):
    """A scenario with etp = tp keeps its experts split over the TP group in every layout the
    search tries (etp = that layout's tp, ep 1); layouts with ep > 1 are dropped."""
    import yaml

    from moesim.search.space import (
        candidate_overrides,
        candidate_scenario,
        enumerate_layouts,
        load_search,
    )

    from .conftest import REPO
    data = yaml.safe_load((REPO / "scenarios" / "tiny-cpu.yaml").read_text())
    data["parallelism"] = {"tp": 2, "pp": 1, "dp": 2, "ep": 1, "etp": 2}
    data["search"] = {"workload.micro_batch": [1], "parallelism.zero_stage": [1],
                      "memory.recompute": ["none"], "communication.overlap": ["none"],
                      "communication.alltoall": ["direct"], "parallelism.schedule": ["1f1b"],
                      "parallelism.vp": [1], "parallelism.pp": [1]}
    path = tmp_path / "etp.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_search(path)
    cands, dropped, _ = enumerate_layouts(spec)
    # TP2 x DP2 with EP4 cannot take one rank of ep = 4 TP groups of 2 from 4 ranks
    assert dropped["experts split over TP (etp) need etp | tp, ep * etp | dp*cp*tp, an FFN "
                   "that splits"] > 0
    assert {c.get("parallelism.tp") for c in cands} == {1, 2}     # nodes of 2 devices
    assert {(c.get("parallelism.tp"), c.get("parallelism.ep")) for c in cands} >= {(2, 1),
                                                                                   (2, 2)}
    for cand in cands:
        fast, checked = candidate_scenario(spec, cand), candidate_scenario(spec, cand,
                                                                             validate=True)
        assert fast.parallelism == checked.parallelism
        par = fast.parallelism
        assert par.etp == par.tp and (par.dp * par.tp) % (par.ep * par.etp) == 0
        assert f"parallelism.etp={fast.parallelism.tp}" in candidate_overrides(spec, cand)


ETP_EP = {"parallelism": {"tp": 2, "dp": 2, "ep": 2, "etp": 2, "sequence_parallel": True}}


def test_expert_tensor_and_expert_parallel_groups_by_hand(make_scenario):
    """TP2 x DP2 with ETP2 x EP2 (Megatron-Core's layout, ETP fastest): TP groups (0, 1) and
    (2, 3); an EP group takes the ranks at one TP position of both, (0, 2) and (1, 3); each
    expert slice is held once per stage (expert-DP 1). A device fault on rank 3 hits position
    1 of its EP group."""
    s = make_scenario(ETP_EP)
    layout = Layout.for_scenario(s)
    assert [layout.ep_group(0, g).tolist() for g in range(layout.ep_groups)] == [[0, 2], [1, 3]]
    assert [layout.ep_position(r) for r in range(4)] == [0, 0, 1, 1]
    assert layout.expert_dp == 1
    faulty = make_scenario({**ETP_EP, "faults": [{"kind": "device", "device": 3,
                                                   "slowdown": 2.0}]})
    assert device_faults(faulty, Layout.for_scenario(faulty)).stage_local == {0: {1: 2.0}}


def test_expert_tensor_and_expert_parallel_layer_by_hand(make_scenario):
    """The EP group (0, 2) stands for both TP groups' 256 tokens each (every source routes its
    group's tokens), top-1 over 4 balanced experts, 2 per member: 512 copies, each member
    runs 256 through its half-wide slices. Each TP rank sends its own half of its group's
    copies, so the group's flows carry half a copy's bytes: 128 copies x 256 x 2 B / 2 from
    each source to the other member. The block's TP communication is the attention's all-
    reduce plus the all-gather and reduce-scatter of the busiest member's copies over the TP
    pair, in place of the FFN's all-reduce."""
    s = make_scenario(ETP_EP)
    ctx = PricingContext.from_scenario(s)
    assert ctx.group.tolist() == [0, 2] and ctx.tokens_per_source == 256
    block = CostModel(ctx, scenario_placement(s)).block(0)
    tr = block.traffic
    assert tr.slot_tokens.sum() == pytest.approx(512)
    assert tr.slot_tokens.sum(axis=1).tolist() == pytest.approx([256, 256])
    sent = np.bincount(tr.pairs[:, 0], tr.dispatch_bytes, minlength=2)
    assert sent.tolist() == pytest.approx([128 * 256 * 2 / 2] * 2)
    link = s.hardware.link("scale_up")
    bw, lat = link.effective_bandwidth, link.latency
    attention_all_reduce = network.ring_time("allreduce", 256 * 256 * 2, 2, bw, lat)
    gather = network.ring_time("allgather", 256 * 256 * 2, 2, bw, lat)
    scatter = network.ring_time("reducescatter", 256 * 256 * 2, 2, bw, lat)
    assert block.tp_comm == pytest.approx(attention_all_reduce + gather + scatter, rel=1e-12)
    # the same expert FLOPs as EP4 over whole experts, in slices half as wide on twice the copies
    plain = make_scenario({"parallelism": {"tp": 2, "dp": 2, "ep": 4,
                                           "sequence_parallel": True}})
    whole = CostModel(PricingContext.from_scenario(plain), scenario_placement(plain)).block(0)
    assert whole.traffic.slot_tokens.sum(axis=1).tolist() == pytest.approx([128] * 4)
    assert simulate(s).result.step_time > 0


def test_experts_split_over_part_of_the_tp_group_by_hand(make_scenario):
    """TP4 on one node of 4 with ETP2 x EP2 (MoE Parallel Folding's ETP < TP): the experts are
    split over the pairs (0, 1) and (2, 3) of the TP group, EP groups (0, 2) and (1, 3). A
    source stands for its pair's 2 of the group's 4 shares of 256 tokens, 128; the group (0, 2)
    routes 256 copies top-1 over 4 experts, 128 per member, sending half a copy's bytes each.
    TP communication: the attention's all-reduce of 256 tokens over 4 ranks, then the pair's
    all-gather and reduce-scatter of its member's 128 copies."""
    s = make_scenario({"cluster": {"nodes": 1},
                       "parallelism": {"tp": 4, "dp": 1, "ep": 2, "etp": 2,
                                       "sequence_parallel": True}},
                      {"node": {"devices_per_node": 4}})
    ctx = PricingContext.from_scenario(s)
    assert ctx.group.tolist() == [0, 2] and ctx.tokens_per_source == 128
    assert Layout.for_scenario(s).expert_dp == 1
    block = CostModel(ctx, scenario_placement(s)).block(0)
    assert block.traffic.slot_tokens.sum(axis=1).tolist() == pytest.approx([128, 128])
    sent = np.bincount(block.traffic.pairs[:, 0], block.traffic.dispatch_bytes, minlength=2)
    assert sent.tolist() == pytest.approx([64 * 256 * 2 / 2] * 2)
    link = s.hardware.link("scale_up")
    bw, lat = link.effective_bandwidth, link.latency
    expected = (network.ring_time("allreduce", 256 * 256 * 2, 4, bw, lat)
                + network.ring_time("allgather", 128 * 256 * 2, 2, bw, lat)
                + network.ring_time("reducescatter", 128 * 256 * 2, 2, bw, lat))
    assert block.tp_comm == pytest.approx(expected, rel=1e-12)
    assert KernelTimer(s.model, s.hardware.device, tp=4, etp=2).experts(
        np.array([64.0])) == pytest.approx(KernelTimer(s.model, s.hardware.device, tp=4).experts(
            np.array([64.0]), ffn_size=256), rel=1e-12)


def test_search_screen_prices_each_expert_group_apart(tmp_path):
    """A search of a scenario with experts split over TP: TP1 EP2 puts the EP group on ranks
    (0, 1) of one node, TP2 ETP2 EP2 on ranks (0, 2) of two nodes; the screen's shared caches
    keep them apart, so each layout screened after the others costs what it costs alone."""
    import yaml

    from moesim.search.space import candidate_scenario, enumerate_layouts, load_search

    from .conftest import REPO, screened_alone_and_shared
    data = yaml.safe_load((REPO / "scenarios" / "tiny-cpu.yaml").read_text())
    data["parallelism"] = {"tp": 2, "pp": 1, "dp": 2, "ep": 2, "etp": 2}
    data["search"] = {"workload.micro_batch": [1], "parallelism.zero_stage": [1],
                      "memory.recompute": ["none"], "communication.overlap": ["none"],
                      "communication.alltoall": ["direct"], "parallelism.schedule": ["1f1b"],
                      "parallelism.vp": [1], "parallelism.pp": [1], "parallelism.ep": [2]}
    path = tmp_path / "etp_ep.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_search(path)
    cands, _, _ = enumerate_layouts(spec)
    groups = {tuple(PricingContext.from_scenario(candidate_scenario(spec, c)).group.tolist())
              for c in cands}
    assert groups == {(0, 1), (0, 2)}
    for shared, alone in screened_alone_and_shared(spec, cands):
        assert shared == pytest.approx(alone, rel=1e-12)
