"""Context parallelism (``parallelism.cp``): each sequence's tokens split over cp ranks, attention
run as a ring (Megatron-Core / Transformer Engine ``p2p``), everything else on the rank's share.
Hand profile (conftest): 2 devices per node, 100 GB/s scale-up links with 1 us latency."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.assembly import scenario_placement, simulate
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import stage_memory, tokens_per_microbatch
from moesim.pricing.block import attention_part, block_cost
from moesim.pricing.collectives import (
    _shard_groups,
    cp_all_gather_time,
    cp_all_to_all_bytes,
    cp_all_to_all_time,
    cp_exchange_time,
    cp_kv_bytes_per_token,
    cp_ring_step_time,
)
from moesim.pricing.context import PricingContext
from moesim.routing import balanced_layer
from moesim.sim.costs import CostModel
from moesim.sim.streams import BlockCost, serial_block
from moesim.spec.scenario import micro_batches

CP2 = {"parallelism": {"dp": 2, "cp": 2, "ep": 4}}      # 4 devices: tp 1, cp 2, dp 2


def test_ranks_are_ordered_tp_then_cp_then_dp(make_scenario):
    s = make_scenario({"parallelism": {"tp": 2, "cp": 2, "dp": 1, "ep": 4}})
    layout = Layout.for_scenario(s)
    assert layout.cp_group(0).tolist() == [0, 2]          # tp ranks 0, 1 are neighbours
    assert layout.cp_group(0, 1).tolist() == [1, 3]
    assert layout.stage_size == 4 and layout.expert_dp == 1
    ctx = PricingContext.from_scenario(s)
    # Dense gradients are reduced over the dp x cp ranks holding the same TP shard: 0 and 2.
    ((_, members),) = _shard_groups(ctx, 0, dense=1.0, experts=1.0)
    assert members.tolist() == [0, 2]


def test_bad_context_parallel_layouts_name_the_field(make_scenario):
    with pytest.raises(ScenarioError, match=r"tp \* cp \* pp \* dp = 1 \* 2 \* 1 \* 4 = 8"):
        make_scenario({"parallelism": {"dp": 4, "cp": 2}})
    with pytest.raises(ScenarioError, match="decode") as exc:
        make_scenario({**CP2, "workload": {"mode": "decode", "seq_len": 1, "context_len": 64}})
    assert exc.value.field == "parallelism.cp"
    with pytest.raises(ScenarioError, match="2 \\* cp = 4 equal chunks") as exc:
        make_scenario({**CP2, "workload": {"seq_len": 250}})
    assert exc.value.field == "workload.seq_len"


def test_each_rank_holds_its_share_of_the_sequence(make_scenario):
    s, base = make_scenario(CP2), make_scenario({"parallelism": {"dp": 2, "ep": 2},
                                                 "cluster": {"nodes": 1}})
    assert tokens_per_microbatch(s) == 256 / 2 == tokens_per_microbatch(base) / 2
    # Activations halve with the tokens; ZeRO-1 shards the dense optimizer state over the
    # dp x cp = 4 ranks holding the same dense weights, not over dp = 2.
    m, b = stage_memory(s, Layout.for_scenario(s), 0), stage_memory(base,
                                                                    Layout.for_scenario(base), 0)
    assert m.activations == pytest.approx(b.activations / 2)
    assert m.dense_weights == b.dense_weights
    dense = m.dense_weights / 2                            # BF16 weights: parameters
    assert m.optimizer - m.expert_weights / 2 * 12 == pytest.approx(dense * 12 / 4)


def test_ring_step_and_exposed_wait_by_hand(make_scenario):
    s = make_scenario(CP2)
    ctx = PricingContext.from_scenario(s)
    # tiny-cpu: 2 KV heads of 64, K and V, BF16 activations: 512 bytes per token
    assert cp_kv_bytes_per_token(s.model, 2) == 2 * 2 * 64 * 2
    tokens = 128                                           # 256 / cp per sequence
    step = 1e-6 + tokens * 512 / 100e9                     # ring neighbours 0, 1 share a node
    assert cp_ring_step_time(ctx, tokens) == pytest.approx(step, rel=1e-12)
    # cp - 1 = 1 exchange, hidden behind core / cp of the attention core; twice in the backward
    assert cp_exchange_time(ctx, tokens, core=0.0) == pytest.approx((step, 2 * step),
                                                                    rel=1e-12)
    assert cp_exchange_time(ctx, tokens, core=step) == pytest.approx((step / 2, step),
                                                                     rel=1e-12)
    assert cp_exchange_time(ctx, tokens, core=2 * step) == (0.0, 0.0)


def test_ring_across_nodes_waits_on_the_nic(make_scenario):
    """tp 2 x cp 2 on nodes of 2: the CP neighbours 0 and 2 sit on different nodes, so each
    step crosses the 10 GB/s NIC (5 us); a rank's 1 of 2 KV heads is 256 bytes a token."""
    s = make_scenario({"parallelism": {"tp": 2, "cp": 2, "dp": 1, "ep": 4}})
    ctx = PricingContext.from_scenario(s)
    assert cp_kv_bytes_per_token(s.model, 2, tp=2) == 256
    path = ctx.topology.path_links(0, 2)
    latency = float(ctx.topology.latency[path].sum())
    assert float(ctx.topology.capacity[path].min()) == 10e9
    assert cp_ring_step_time(ctx, 128) == pytest.approx(latency + 128 * 256 / 10e9, rel=1e-12)


def test_context_parallel_conserves_tokens_and_all_to_all_bytes(make_scenario):
    """cp 2 x dp 2 and cp 1 x dp 4 on the same 4 devices and global batch route the same
    tokens: 2 micro-batches of 128 tokens per device against 1 of 256, the same bytes a step."""
    a, b = make_scenario(CP2), make_scenario()
    totals = []
    for s in (a, b):
        ctx = PricingContext.from_scenario(s)
        choices = balanced_layer(s.model.num_experts, num_sources=ctx.ep,
                                 tokens_per_source=int(ctx.tokens_per_source),
                                 top_k=s.model.effective_top_k)
        block = block_cost(ctx, 0, choices, scenario_placement(s))
        totals.append(block.dispatch.total_bytes * micro_batches(s))
    assert micro_batches(a) == 2 * micro_batches(b)
    assert totals[0] == pytest.approx(totals[1], rel=1e-12) and totals[0] > 0


def test_engine_charges_the_wait_after_attention_and_twice_in_the_backward(make_scenario):
    cost = BlockCost(0, 1.0, 0.25, 0.0, 2.0, np.zeros(2), 0.0, cp_comm=0.5, cp_comm_backward=1.0)
    forward, backward = serial_block(cost, 2, False), serial_block(cost, 2, True)
    names = [op.name for op in forward]
    assert names[:3] == ["attention", "cp_exchange", "tp_allreduce"]
    assert forward[2].after == ("cp_exchange",)
    assert forward[1].seconds.tolist() == [0.5, 0.5] and backward[1].seconds.tolist() == [1, 1]
    # In a run: a slow ring (0.1 GB/s scale-up) leaves each block's forward waiting the
    # exchange less the attention core's step, as priced.
    s = make_scenario(CP2, {"links": {"scale_up": {"bandwidth": "0.1 GB/s"}}})
    sim = simulate(s)
    ctx = sim.costs.ctx
    block = CostModel(ctx, scenario_placement(s)).block(0)
    core = ctx.timer.attention_core(128, *ctx.context_length())
    assert block.cp_comm == pytest.approx(1e-6 + 128 * 512 / 0.1e9 - core / 2, rel=1e-9)
    assert block.cp_comm_backward == pytest.approx(2 * block.cp_comm, rel=1e-12)
    run = sim.runs[(0, "F", 0)]
    waits = [float(run.end[i].max() - run.start[i].max()) for i, op in enumerate(run.ops)
             if op.name == "cp_exchange"]
    assert waits == pytest.approx([block.cp_comm] * s.model.num_layers, rel=1e-9)


def _cp_search(tmp_path, search: dict):
    import yaml

    from moesim.search.space import load_search

    from .conftest import REPO
    data = yaml.safe_load((REPO / "scenarios" / "tiny-cpu.yaml").read_text())
    data["parallelism"] = {"tp": 1, "cp": 2, "pp": 1, "dp": 2, "ep": 2}
    data["search"] = {"workload.micro_batch": [1], "parallelism.zero_stage": [1],
                      "memory.recompute": ["none"], "communication.overlap": ["none"],
                      "communication.alltoall": ["direct"], "parallelism.schedule": ["1f1b"],
                      "parallelism.vp": [1], **search}
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_search(path)


def test_search_keeps_the_scenarios_context_parallelism(tmp_path):
    """tiny-cpu on 4 devices with cp 2 and no cp listed: every layout keeps cp 2, so dp is
    4 / (tp * pp * 2), and layouts whose tp * pp leaves no room for the CP pair are dropped."""
    from moesim.search.space import candidate_scenario, enumerate_layouts

    spec = _cp_search(tmp_path, {})
    cands, dropped, _ = enumerate_layouts(spec)
    assert cands and dropped["tp*pp*cp does not divide the devices"] > 0
    for cand in cands:
        par = candidate_scenario(spec, cand).parallelism
        assert par.cp == 2 and par.tp * par.pp * par.dp * 2 == 4
    # tp in {1, 2} x pp in {1, 2} leave dp = 2, 1, 1 and none for tp 2 x pp 2
    assert {(c.get("parallelism.tp"), c.get("parallelism.pp"), c.get("parallelism.dp"))
            for c in cands} == {(1, 1, 2), (2, 1, 1), (1, 2, 1)}


def test_search_over_context_parallelism_prices_each_cp_apart(tmp_path):
    """cp listed as a knob: layouts with cp 1 and 2 both enumerate (dp = 4 / (tp pp cp)), and
    the screen's shared price cache keeps them apart: each layout screened after the others
    costs what it costs screened alone."""
    from moesim.search.space import enumerate_layouts

    from .conftest import screened_alone_and_shared

    spec = _cp_search(tmp_path, {"parallelism.cp": [1, 2], "parallelism.tp": [1],
                                 "parallelism.pp": [1]})
    cands, _, _ = enumerate_layouts(spec)
    layouts = {(c.get("parallelism.cp"), c.get("parallelism.dp"), c.get("parallelism.ep"))
               for c in cands}
    assert {(1, 4), (2, 2)} == {(cp, dp) for cp, dp, _ in layouts}
    assert any(c.label().startswith("TP1 CP2 ") for c in cands)
    for shared, alone in screened_alone_and_shared(spec, cands):
        assert shared == pytest.approx(alone, rel=1e-12)


def test_serving_search_refuses_context_parallelism(tmp_path):
    import yaml

    from moesim.search.space import load_search

    from .conftest import REPO
    data = yaml.safe_load((REPO / "scenarios" / "tiny-cpu.yaml").read_text())
    data["parallelism"] = {"tp": 1, "cp": 2, "pp": 1, "dp": 2, "ep": 2}
    data["workload"] = {"mode": "prefill", "global_batch": 2, "seq_len": 256, "micro_batch": 1}
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError, match="serving search") as exc:
        load_search(path)
    assert exc.value.field == "parallelism.cp"


def test_all_to_all_context_parallelism_by_hand(make_scenario):
    """Ulysses-style CP on the 2-rank NVLink group: before the core each rank sends the other
    half of its 4 query heads (2 x 64 values) and, tiny-cpu having 2 KV heads, one of them (K
    and V, 64 + 64); after it half its output (2 x 64); BF16, 128 tokens: (128 + 128 + 128) x
    2 B x 128 = 98,304 bytes, plus a 1 us message per all-to-all. Nothing hides it, and the backward
    moves the same bytes; no extra attention kernels, unlike the ring."""
    floor = {"device": {"kernel_overhead": "4 us"}}
    s = make_scenario({**CP2, "communication": {"cp_algorithm": "all_to_all"}}, floor)
    ctx = PricingContext.from_scenario(s)
    assert cp_all_to_all_bytes(s.model, 2, tp=1, cp=2) == ((128 + 128) * 2, 128 * 2)
    wait = 2 * 1e-6 + 128 * (128 + 128 + 128) * 2 / 100e9
    assert cp_all_to_all_time(ctx, 128) == pytest.approx(wait, rel=1e-12)
    assert cp_exchange_time(ctx, 128, core=1.0) == pytest.approx((wait, wait), rel=1e-12)
    ring = make_scenario(CP2, floor)
    _, a2a_attention, _ = attention_part(ctx, True)
    _, ring_attention, _ = attention_part(PricingContext.from_scenario(ring), True)
    assert ring_attention - a2a_attention == pytest.approx(2 * 1 * 4e-6, rel=1e-9)
    # cp must divide the heads per tensor-parallel rank (4 query heads; cp 8 on 8 devices)
    with pytest.raises(ScenarioError, match="cp must divide") as exc:
        make_scenario({"parallelism": {"dp": 1, "cp": 8, "ep": 4}, "cluster": {"nodes": 4},
                       "communication": {"cp_algorithm": "all_to_all"}})
    assert exc.value.field == "communication.cp_algorithm"


def test_all_gather_context_parallelism_by_hand(make_scenario):
    """Transformer Engine's all-gather CP (the Llama 3 scheme) on the 2-rank NVLink group: each
    rank's 128 tokens hold 128 x 256 bytes of keys and as many of values (tiny-cpu: 2 KV heads
    of 64, BF16); the keys and the values are each ring-all-gathered into a 2 x 32,768-byte
    buffer: one 1 us step moving half of it at 100 GB/s, twice. Nothing hides it; the backward
    gathers again and reduce-scatters the gradients (the same ring shape): twice the forward.
    The attention copies the gathered keys and values (2 x 65,536 bytes, read and written) into
    sequence order and runs its core as two calls: 3 kernels and those bytes beyond the
    all-to-all variant's single call."""
    floor = {"device": {"kernel_overhead": "4 us"}}
    s = make_scenario({**CP2, "communication": {"cp_algorithm": "all_gather"}}, floor)
    ctx = PricingContext.from_scenario(s)
    one = 1e-6 + 2 * 128 * 256 / 2 / 100e9
    assert cp_all_gather_time(ctx, 128) == pytest.approx(2 * one, rel=1e-12)
    assert cp_exchange_time(ctx, 128, core=1.0) == pytest.approx((2 * one, 4 * one),
                                                                 rel=1e-12)
    a2a = make_scenario({**CP2, "communication": {"cp_algorithm": "all_to_all"}}, floor)
    _, gather_attention, _ = attention_part(ctx, True)
    _, a2a_attention, _ = attention_part(PricingContext.from_scenario(a2a), True)
    d = s.hardware.device
    copies = 2 * 2 * 65_536 / (d.memory_bandwidth * d.memory_efficiency)
    assert gather_attention - a2a_attention == pytest.approx(copies + 3 * 4e-6, rel=1e-9)
    sim = simulate(s)
    block = CostModel(sim.costs.ctx, scenario_placement(s)).block(0)
    assert (block.cp_comm, block.cp_comm_backward) == pytest.approx((2 * one, 4 * one),
                                                                    rel=1e-12)


def test_cp_algorithm_without_context_parallelism_is_warned(make_scenario):
    from moesim.spec.scenario import scenario_warnings
    s = make_scenario({"communication": {"cp_algorithm": "all_to_all"}})
    assert any("cp_algorithm is unused" in w for w in scenario_warnings(s))
    assert not any("cp_algorithm" in w for w in scenario_warnings(make_scenario(CP2)))


def test_search_on_more_gpus_keeps_cp_and_scales_dp(tmp_path):
    import yaml

    from moesim.search.space import load_search

    from .conftest import REPO
    data = yaml.safe_load((REPO / "scenarios" / "tiny-cpu.yaml").read_text())
    data["parallelism"] = {"tp": 1, "cp": 2, "pp": 1, "dp": 2, "ep": 2}
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump(data))
    par = load_search(path, gpus=8).scenario.parallelism
    assert (par.cp, par.dp, par.world) == (2, 4, 8)           # 8 / (tp 1 x pp 1 x cp 2)
    with pytest.raises(ScenarioError, match=r"tp \* pp \* cp = 4"):
        data["parallelism"] = {"tp": 2, "cp": 2, "pp": 1, "dp": 1, "ep": 2}
        path.write_text(yaml.safe_dump(data))
        load_search(path, gpus=6)
