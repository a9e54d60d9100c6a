"""What the simulator now charges beyond kernels' rooflines, each derived by hand: recomputation
by mode and module, the MTP module, prefill logits, the pipeline split that counts the ends,
SMs held by overlapped communication, link message-size curves and per-collective costs, and
balanced routing with random expert pairing."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.assembly import scenario_placement, simulate
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import stage_params
from moesim.pricing.block import attention_part, block_cost, selective_recompute_time
from moesim.pricing.context import PricingContext
from moesim.routing import balanced_layer
from moesim.sim.costs import CostModel
from moesim.sim.streams import chunk_ops, run_ops

ONE_LAYER = {"model": {"num_layers": 1}, "parallelism": {"dp": 4, "ep": 4}}


def _backward(make_scenario, memory: dict) -> tuple[float, float, PricingContext]:
    sim = simulate(make_scenario({**ONE_LAYER, "memory": memory}))
    return (sim.runs[(0, "B", 0)].makespan, sim.runs[(0, "F", 0)].makespan,
            sim.costs.ctx)


def test_recompute_costs_what_each_mode_reruns(make_scenario):
    none, forward, ctx = _backward(make_scenario, {"recompute": "none"})
    block = CostModel(ctx, scenario_placement(ctx.scenario)).block(0)
    t = ctx.timer
    context, _ = ctx.context_length()
    # selective (default module: the attention core) re-runs one forward attention core
    core, _, _ = _backward(make_scenario, {"recompute": "selective"})
    assert core - none == pytest.approx(t.attention_core(ctx.tokens_per_source, context),
                                        rel=1e-12)
    # norms: two memory-bound kernels reading and writing h per token each
    norms, _, _ = _backward(make_scenario, {"recompute": "selective",
                                            "recompute_modules": ["layernorm"]})
    h, ab = ctx.hidden, ctx.activation_bytes
    assert norms - none == pytest.approx(t.elementwise(4 * ctx.tokens_per_source * h * ab,
                                                       kernels=2), rel=1e-12)
    # full: the whole block forward again (the forward chunk less its embedding and LM head)
    full, _, _ = _backward(make_scenario, {"recompute": "full"})
    ends = t.embedding(ctx.microbatch_tokens) + t.lm_head(ctx.microbatch_tokens)
    assert full - none == pytest.approx(forward - ends, rel=1e-9)
    assert block.recompute == 0.0


def test_recomputing_the_moe_layer_reruns_its_ops_and_all_to_alls(make_scenario):
    """Selective ``moe`` (Megatron's whole-MoE-layer checkpoint): before the block's backward the
    router, dispatch, experts and combine run again (balanced routing: every device's experts
    take the same time), so the backward grows by exactly the forward MoE layer; its parts
    listed beside it are not charged twice."""
    none, _, ctx = _backward(make_scenario, {"recompute": "selective",
                                             "recompute_modules": ["layernorm"]})
    block = CostModel(ctx, scenario_placement(ctx.scenario)).block(0)
    assert np.ptp(block.experts) == 0 and block.dispatch.duration > 0
    layer = (block.gate + block.permute + block.ffn + float(block.experts.max())
             + block.dispatch.duration + block.combine.duration)
    for modules in (["layernorm", "moe"], ["layernorm", "moe", "moe_act", "shared_experts"]):
        moe, _, ctx_moe = _backward(make_scenario, {"recompute": "selective",
                                                    "recompute_modules": modules})
        assert moe - none == pytest.approx(layer, rel=1e-9)
    redo = CostModel(ctx_moe, scenario_placement(ctx_moe.scenario)).block(0)
    ops = chunk_ops([redo], 4, backward=True, recompute=False, overlap="none")
    assert [op.name for op in ops][:5] == ["recompute", "gate.recompute", "dispatch.recompute",
                                           "experts.recompute", "combine.recompute"]
    # The search's closed form adds the same layer, with its closed-form all-to-alls, to the
    # block's recompute: block compute less attention, plus the block's comm less TP's.
    from moesim.search.screen import _choices, _placement, block_times
    placement = _placement(ctx_moe.scenario)
    choices = _choices(ctx_moe, placement)
    plain = block_times(ctx, True, choices, placement)
    both = block_times(ctx_moe, True, choices, placement)
    _, attention, tp = attention_part(ctx, True)
    assert both.recompute - plain.recompute == pytest.approx(
        plain.compute - attention + plain.comm - tp, rel=1e-9)


def test_recomputing_a_dense_mlp_reruns_its_ffn(make_scenario):
    s = make_scenario({**ONE_LAYER, "memory": {"recompute": "selective",
                                                "recompute_modules": ["mlp"]}})
    ctx = PricingContext.from_scenario(s)
    t, tokens = ctx.timer, ctx.tokens_per_source
    f = s.model.dense_ffn_size or 4 * ctx.hidden
    assert selective_recompute_time(ctx, tokens, tokens, None) == pytest.approx(
        t.dense_ffn(tokens, f), rel=1e-12)


def test_mtp_adds_a_block_and_a_head_on_the_last_stage(make_scenario):
    base = {"parallelism": {"pp": 2, "dp": 2, "ep": 2}, "workload": {"global_batch": 4}}
    plain = make_scenario(base)
    mtp = make_scenario({**base, "model": {"mtp_modules": 1}})
    a, b = simulate(plain), simulate(mtp)
    dispatches = [sum(op.name == "dispatch" for op in sim.runs[(1, "F", 0)].ops)
                  for sim in (a, b)]
    assert dispatches[1] == dispatches[0] + 1
    assert sum(op.name == "dispatch" for op in b.runs[(0, "F", 0)].ops) == dispatches[0]
    # Parameters: the last stage holds one more block's dense parts, a [2h -> h] projection
    # and two norms, and one more layer of expert slots.
    m, h = mtp.model, mtp.model.hidden_size
    extra = (m.attention_params + m.shared_expert_params + m.num_experts * h + 2 * h * h + 2 * h)
    (d0, e0), (d1, e1) = (stage_params(s, Layout.for_scenario(s), 1) for s in (plain, mtp))
    assert d1 - d0 == extra
    assert e1 - e0 == (m.num_experts // 2) * m.expert_params
    assert mtp.model.param_counts() == plain.model.param_counts()   # not in the model's count
    # Serving runs no MTP module.
    serve = {**base, "workload": {"mode": "decode", "global_batch": 4, "context_len": 16}}
    assert (simulate(make_scenario({**serve, "model": {"mtp_modules": 1}})).result.step_time
            == simulate(make_scenario(serve)).result.step_time)


def test_prefill_computes_logits_for_the_last_token_of_each_prompt(make_scenario):
    s = make_scenario({"workload": {"mode": "prefill", "global_batch": 8, "seq_len": 256,
                                    "micro_batch": 2}})
    sim = simulate(s)
    head = next(op for op in sim.runs[(0, "F", 0)].ops if op.name == "lm_head")
    assert head.duration[0] == pytest.approx(sim.costs.ctx.timer.lm_head(2))   # 2 prompts


def test_pipeline_split_counts_the_ends_as_layers(make_scenario):
    def layout(layers: int, mtp: int = 0, **flags) -> Layout:
        return Layout.for_scenario(make_scenario({
            "model": {"num_layers": layers, "mtp_modules": mtp},
            "parallelism": {"pp": 4, "dp": 1, "ep": 1, **flags},
            "workload": {"global_batch": 4}}))

    def sizes(lay: Layout) -> list[int]:
        return [len(lay.stage_layers(i)) for i in range(4)]

    # 8 blocks over 4 stages: 2 each. Counting the embedding and the loss as one layer each:
    # 10 = 3, 3, 2, 2, then the first stage gives one to the embedding, the last one to the loss.
    assert sizes(layout(8)) == [2, 2, 2, 2]
    assert sizes(layout(8, account_for_embedding=True, account_for_loss=True)) == [2, 3, 2, 1]
    # With an MTP module the loss side weighs two layers: 8 + 2 = 10 -> 3, 3, 2, 2 - 2 = 0.
    assert sizes(layout(8, mtp=1, account_for_loss=True)) == [3, 3, 2, 0]
    # 4 blocks, both ends and MTP: 7 -> 2, 2, 2, 1: the last stage would need -1 blocks.
    with pytest.raises(ScenarioError, match="cannot be split"):
        layout(4, mtp=1, account_for_embedding=True, account_for_loss=True)


def test_ends_counted_as_layers_allow_more_virtual_stages_than_blocks(make_scenario):
    # Megatron's Qwen3-235B recipe: 94 blocks + embedding + loss = 96 units on pp 32 x vp 3.
    # Small: 6 blocks + 2 ends = 8 units on pp 4 x vp 2: one unit per virtual stage, so the
    # first virtual stage holds only the embedding and the last only the loss.
    def scenario(**flags):
        return make_scenario({"model": {"num_layers": 6},
                              "parallelism": {"pp": 4, "vp": 2, "dp": 1, "ep": 1, **flags},
                              "workload": {"global_batch": 8}})

    with pytest.raises(ScenarioError, match="exceeds the model's 6 layers"):
        scenario()
    with pytest.raises(ScenarioError, match=r"6 layers \(\+ 1 for the ends\)"):
        scenario(account_for_embedding=True)
    lay = Layout.for_scenario(scenario(account_for_embedding=True, account_for_loss=True))
    chunks = [len(c) for chunk in zip(*lay.chunk_layers(), strict=True) for c in chunk]
    assert chunks == [0, 1, 1, 1, 1, 1, 1, 0]      # virtual stages 0..7 (chunk-major)
    sim = simulate(scenario(account_for_embedding=True, account_for_loss=True))
    assert sim.result.step_time > 0


def test_a_stage_with_only_the_loss_runs(make_scenario):
    sim = simulate(make_scenario({"model": {"num_layers": 8, "mtp_modules": 1},
                                  "parallelism": {"pp": 4, "dp": 1, "ep": 1,
                                                  "account_for_loss": True},
                                  "workload": {"global_batch": 4}}))
    last = [op.name for op in sim.runs[(3, "F", 0)].ops]
    assert "lm_head" in last and last.count("dispatch") == 1    # the MTP block alone


def test_compute_beside_communication_runs_on_fewer_sms():
    from tests.test_streams import _block
    # attention 1, gate 0.5, dispatch 2, shared 1.5, experts 1 / 3, combine 2; the shared
    # experts overlap the dispatch and run 1.25x slower: 1.5-3.375, the dispatch ends at 3.5.
    ops = chunk_ops([_block()], 2, backward=False, recompute=False, overlap="shared_expert",
                    comm_slowdown=1.25)
    run = run_ops(ops, 2)
    shared = [op.name for op in ops].index("shared_experts")
    assert run.end[shared].tolist() == [3.375, 3.375]
    assert run.makespan == pytest.approx(8.5)
    # Without overlap nothing runs beside a collective: no slowdown.
    serial = chunk_ops([_block()], 2, backward=False, recompute=False, overlap="none",
                       comm_slowdown=1.25)
    assert run_ops(serial, 2).makespan == pytest.approx(10.0)
    # Two-batch overlap keeps communication kernels running: all of the block's compute slows.
    both = chunk_ops([_block()], 2, backward=False, recompute=False, overlap="two_batch",
                     comm_slowdown=1.25)
    plain = chunk_ops([_block()], 2, backward=False, recompute=False, overlap="two_batch")
    for slow, fast in zip(both, plain):
        factor = 1.25 if fast.stream == "compute" else 1.0
        assert np.allclose(slow.duration, fast.duration * factor)


TWO_DEVICES = {
    "cluster": {"topology": "explicit", "nodes": 2,
                "devices": [{"name": "a", "node": 0}, {"name": "b", "node": 1}],
                "links": [{"a": "a", "b": "b", "bandwidth": "10 GB/s", "latency": "0 us"}]},
    "parallelism": {"tp": 1, "pp": 1, "dp": 2, "ep": 2},
    "model": {"num_experts": 2, "top_k": 1},
    "workload": {"mode": "prefill", "global_batch": 2, "seq_len": 256, "micro_batch": 1},
}


def test_all_to_all_pays_the_message_size_curve_and_a_fixed_cost(make_scenario):
    # Balanced top-1 of 2 experts: each device sends half its 256 tokens to the other, one
    # message of 128 x hidden x 2 bytes; a message of s bytes with half-efficiency size h takes
    # (s + h) / 10 GB/s on the link, plus the collective's fixed cost once.
    curve = {"links": {"scale_out": {"half_efficiency_size": "100 KB",
                                     "collective_overhead": "7 us"}}}
    plain = make_scenario(TWO_DEVICES)
    real = make_scenario(TWO_DEVICES, profile_changes=curve)
    s_bytes = 128 * plain.model.hidden_size * 2

    def dispatch(s):
        ctx = PricingContext.from_scenario(s)
        costs = CostModel(ctx, scenario_placement(s))
        return costs.block(s.model.moe_layer_ids[0]).dispatch

    assert dispatch(plain).duration == pytest.approx(s_bytes / 10e9, rel=1e-9)
    coll = dispatch(real)
    assert coll.duration == pytest.approx((s_bytes + 100e3) / 10e9 + 7e-6, rel=1e-9)
    assert coll.total_bytes == pytest.approx(2 * s_bytes)        # real bytes are reported


def test_balanced_random_routing_is_exactly_balanced_with_random_pairs():
    rng = np.random.default_rng(3)
    c = balanced_layer(16, num_sources=4, tokens_per_source=64, top_k=4, rng=rng)
    assert np.all(np.bincount(c.experts.ravel(), minlength=16) == 4 * 64 * 4 // 16)
    assert all(len(set(row)) == 4 for row in c.experts.tolist())          # distinct experts
    fixed = balanced_layer(16, num_sources=4, tokens_per_source=64, top_k=4)
    # The fixed scheme pairs neighbours (experts 4j..4j+3); random pairing does not, mostly.
    neighbours = np.all(np.diff(np.sort(c.experts, axis=1), axis=1) == 1, axis=1)
    assert np.all(np.diff(fixed.experts, axis=1) == 1) and neighbours.mean() < 0.2
    again = balanced_layer(16, num_sources=4, tokens_per_source=64, top_k=4,
                           rng=np.random.default_rng(3))
    assert np.array_equal(again.experts, c.experts)                      # seeded


def test_block_cost_is_what_the_engine_reads(make_scenario):
    s = make_scenario(ONE_LAYER)
    ctx = PricingContext.from_scenario(s)
    costs = CostModel(ctx, scenario_placement(s))
    direct = block_cost(ctx, 0, costs.choices[0], costs.placement)
    assert direct.attention == costs.block(0).attention
    assert np.array_equal(direct.experts, costs.block(0).experts)


def test_fp8_recipes_keep_the_lm_head_and_router_weights_in_bf16():
    """An FP8-weight model reads its LM head and router weights in BF16 (DeepSeek-V3 keeps the
    output head and the gating modules in their original precision): at one token both are
    weight streaming, so their time is the BF16 weight bytes over bandwidth, as a BF16 model's."""
    from moesim.compute import KernelTimer
    from moesim.spec.hardware import load_hardware
    from moesim.spec.models import load_model
    device = load_hardware("h100-sxm").device
    model = load_model("deepseek-v3")
    fp8 = KernelTimer(model, device, "fp8", "fp8", "bf16")
    bf16 = KernelTimer(model, device, "bf16", "bf16", "bf16")
    assert fp8.lm_head(1) == pytest.approx(bf16.lm_head(1))
    assert fp8.gate(1) == pytest.approx(bf16.gate(1))
    bw = device.memory_bandwidth * device.memory_efficiency
    h, v = model.hidden_size, model.vocab_size
    # GEMM: read the token (2 h bytes) and the [h, v] BF16 head, write v FP32 logits; then the
    # softmax reads v FP32 logits: two kernel floors.
    head = (2 * h + 2 * h * v + 4 * v) / bw + 4 * v / bw + 2 * device.kernel_overhead
    assert fp8.lm_head(1) == pytest.approx(head, rel=1e-6)


def test_shared_experts_output_is_added_to_the_routed_output_once_per_token():
    """With shared experts the MoE layer ends in ``routed + shared``: one element-wise kernel
    reading two hidden vectors and writing one per token (BF16), at HBM bandwidth plus one kernel
    floor; a model without shared experts has no such kernel."""
    from moesim.compute import KernelTimer
    from moesim.spec.hardware import load_hardware
    from moesim.spec.models import load_model
    device = load_hardware("h100-sxm").device
    bw = device.memory_bandwidth * device.memory_efficiency
    dsv3 = KernelTimer(load_model("deepseek-v3"), device, "bf16", "bf16", "bf16")
    assert dsv3.shared_output_add(64) == pytest.approx(
        64 * 3 * 7168 * 2 / bw + device.kernel_overhead, rel=1e-9)
    assert dsv3.shared_output_add(0) == 0.0
    mixtral = KernelTimer(load_model("mixtral-8x7b"), device, "bf16", "bf16", "bf16")
    assert mixtral.shared_output_add(64) == 0.0


def test_an_moe_block_with_shared_experts_charges_them_and_their_add(make_scenario):
    s = make_scenario({**ONE_LAYER, "model": {"num_layers": 1, "num_shared_experts": 1}})
    ctx = PricingContext.from_scenario(s)
    costs = CostModel(ctx, scenario_placement(s))
    block = costs.block(0)
    assert block.is_moe
    t = ctx.timer
    assert block.ffn == pytest.approx(t.shared_experts(ctx.tokens_per_source)
                                      + t.shared_output_add(ctx.tokens_per_source))
    assert t.shared_output_add(ctx.tokens_per_source) > 0


def test_activations_saved_narrower_cost_memory_less_and_a_cast_per_block(make_scenario):
    """BF16 activations saved for the backward in FP8 (DeepSeek-V3's recipe): memory holds half
    the activation bytes (the FP32 router probabilities, 4 bytes per expert, stay), and each
    training block casts what it saves (read 2 bytes, write 1 per element) as one memory-bound
    kernel on its tokens, counted in its attention op."""
    from moesim.memory import activation_bytes_per_token_layer
    from moesim.pricing.block import saved_activation_cast
    plain = make_scenario(ONE_LAYER)
    narrow = make_scenario({**ONE_LAYER, "precision": {"saved_activations": "fp8"}})
    router = plain.model.num_experts * 4
    assert activation_bytes_per_token_layer(narrow, True) == pytest.approx(
        (activation_bytes_per_token_layer(plain, True) - router) / 2 + router)
    ctx = PricingContext.from_scenario(narrow)
    elements = activation_bytes_per_token_layer(narrow, True) / 1.0
    expected = ctx.timer.elementwise(ctx.tokens_per_source * elements * (2 + 1))
    assert saved_activation_cast(ctx, True) == pytest.approx(expected)
    assert saved_activation_cast(PricingContext.from_scenario(plain), True) == 0.0
    narrow_block = CostModel(ctx, scenario_placement(narrow)).block(0)
    plain_ctx = PricingContext.from_scenario(plain)
    plain_block = CostModel(plain_ctx, scenario_placement(plain)).block(0)
    assert narrow_block.attention == pytest.approx(plain_block.attention + expected)


def test_saved_activations_wider_than_the_activations_is_refused(make_scenario):
    with pytest.raises(ScenarioError) as err:
        make_scenario({**ONE_LAYER, "precision": {"saved_activations": "fp32"}})
    assert "precision.saved_activations" in str(err.value)
