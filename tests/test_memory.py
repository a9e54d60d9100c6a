"""Memory per device against hand calculations; ZeRO sharding; KV cache; out-of-memory errors."""

from __future__ import annotations

import pytest

from moesim.errors import OutOfMemory
from moesim.layout import Layout
from moesim.memory import check_memory, stage_memory

H, FFN, VOCAB, LAYERS, EXPERTS = 256, 512, 1000, 4, 4
# One GQA attention block: q 256x256, k and v 256x128 each, out 256x256, two norms of 256.
ATTENTION = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 2 * 256
EXPERT = 3 * H * FFN                       # SwiGLU: gate, up, down
ROUTER = EXPERTS * H
DENSE = LAYERS * (ATTENTION + ROUTER) + 2 * VOCAB * H    # untied input and output embeddings


def _layout(s):
    return Layout.for_scenario(s)


def test_weights_gradients_optimizer_by_hand(make_scenario):
    # dp=4, ep=4: one expert slot per device, expert-DP = 1; ZeRO-1 shards optimizer state of
    # dense parameters over dp=4 and of experts over expert-DP=1.
    s = make_scenario()
    m = stage_memory(s, _layout(s), 0)
    assert m.dense_weights == DENSE * 2
    assert m.expert_weights == LAYERS * 1 * EXPERT * 2
    assert m.gradients == (DENSE + LAYERS * EXPERT) * 4
    assert m.optimizer == DENSE * 12 / 4 + LAYERS * EXPERT * 12 / 1
    assert m.kv_cache == 0


def test_zero3_shards_weights_and_redundant_slots_cost_memory(make_scenario):
    s = make_scenario({"parallelism": {"zero_stage": 3, "dp": 4, "ep": 2},
                       "placement": {"redundant_experts": 2}})
    m = stage_memory(s, _layout(s), 0)
    slots = (EXPERTS + 2) // 2                           # 3 slots per device
    # The shard, plus gathered copies of 2 of the 4 blocks (running and prefetched; without
    # pipeline parallelism a block's parameters are freed after its forward): the other 3/4
    # of half the parameters.
    assert m.dense_weights == DENSE * 2 / 4 + 0.5 * DENSE * 2 * (1 - 1 / 4)
    assert m.expert_weights == (LAYERS * slots * EXPERT * 2 / 2           # expert-DP = 4 / 2
                                + 0.5 * LAYERS * slots * EXPERT * 2 * (1 - 1 / 2))
    assert m.gradients == DENSE * 4 / 4 + LAYERS * slots * EXPERT * 4 / 2
    # Kept from forward to backward, every block is gathered at once: the whole weights.
    kept = make_scenario({"parallelism": {"zero_stage": 3, "dp": 4, "ep": 2},
                          "placement": {"redundant_experts": 2},
                          "communication": {"zero3_reshard": "after_backward"}})
    k = stage_memory(kept, _layout(kept), 0)
    assert k.dense_weights == DENSE * 2 and k.expert_weights == LAYERS * slots * EXPERT * 2


def test_decode_kv_cache_by_hand(make_scenario):
    # 8 sequences per DP rank x (1 new + 100 cached) tokens x 4 layers x (k, v) 2 heads x 64 x 2 B
    s = make_scenario({"workload": {"mode": "decode", "global_batch": 32, "seq_len": 1,
                                    "micro_batch": 8, "context_len": 100}})
    m = stage_memory(s, _layout(s), 0)
    assert m.kv_cache == 8 * 101 * LAYERS * 2 * 2 * 64 * 2
    assert m.optimizer == 0 and m.gradients == 0


def test_activations_shrink_with_recomputation_and_grow_with_pipeline_depth(make_scenario):
    base = {"parallelism": {"pp": 2, "dp": 2, "ep": 2}, "workload": {"global_batch": 8}}
    none = make_scenario(base)
    full = make_scenario({**base, "memory": {"recompute": "full"}})
    first, last = (stage_memory(none, _layout(none), st).activations for st in (0, 1))
    assert first == pytest.approx(2 * last)        # 1F1B: stage 0 holds pp=2 micro-batches
    # Full recomputation keeps each layer's input (h x 2 B per token, 2 layers x 2 micro-batches)
    # plus one layer's activations while it is recomputed: first / (2 layers x 2 micro-batches).
    tokens = 256
    expected = tokens * (2 * H * 2 * 2) + first / 4
    assert stage_memory(full, _layout(full), 0).activations == pytest.approx(expected)


def test_memory_never_negative_and_error_names_the_stage(make_scenario):
    s = make_scenario({}, {"device": {"memory": "10 MB"}})
    with pytest.raises(OutOfMemory, match=r"stage 0 need .* GiB but have"):
        check_memory(s, _layout(s))
    warn = make_scenario({"memory": {"on_overflow": "warn"}}, {"device": {"memory": "10 MB"}})
    rows = check_memory(warn, _layout(warn))
    assert all(v >= 0 for row in rows for v in row.as_dict().values())


def test_all_gather_dispatch_buffers_every_token_of_the_group(make_scenario):
    """The all-to-all receive buffer holds one copy per routed pair (top-k per token); the
    all-gather dispatch holds every token of the EP group (ep per token)."""
    wl = {"mode": "decode", "global_batch": 32, "seq_len": 1, "micro_batch": 8, "context_len": 10}
    a2a = make_scenario({"workload": wl})
    gather = make_scenario({"workload": wl, "communication": {"alltoall": "allgather"}})
    m_a2a, m_gather = stage_memory(a2a, _layout(a2a), 0), stage_memory(gather, _layout(gather), 0)
    p, h = a2a.parallelism, a2a.model.hidden_size
    tokens = 8   # one decode token per sequence, 8 sequences per rank
    per_copy = h * 2 * 2   # BF16 dispatch + BF16 combine
    factor = a2a.memory.alltoall_buffer_factor
    assert m_a2a.comm_buffers == factor * tokens * a2a.model.effective_top_k * per_copy
    assert m_gather.comm_buffers == factor * tokens * p.ep * per_copy


def test_recomputing_the_whole_moe_layer_keeps_only_its_input(make_scenario):
    """Selective recomputation of the whole MoE layer (``moe``) keeps half the attention
    sub-layer's activations, as selective does, and of the MoE sub-layer only its input: per
    token and layer 15 h x 2 B / 2 + h x 2 B = 1,920 + 512 bytes (BF16, h = 256); 4 MoE layers,
    256 tokens, one micro-batch in flight."""
    s = make_scenario({"memory": {"recompute": "selective", "recompute_modules": ["moe"]}})
    m = stage_memory(s, _layout(s), 0)
    attention = 15 * H * 2 / 2       # Korthikanti's 15 h in 16-bit units of 2 bytes: 3,840 B
    assert m.activations == 256 * LAYERS * (attention / 2 + H * 2)
    half = make_scenario({"memory": {"recompute": "selective"}})
    assert m.activations < stage_memory(half, _layout(half), 0).activations


def test_expert_tensor_parallelism_splits_every_expert(make_scenario):
    """TP2 with etp 2 and ep 1 on 4 devices (DP2): every device holds half of each of the 4
    experts (4 layers x 4 x EXPERT / 2 parameters in BF16); ZeRO-1 shards their optimizer state
    over the 2 ranks holding the same half (etp apart), like the dense weights."""
    s = make_scenario({"parallelism": {"tp": 2, "dp": 2, "ep": 1, "etp": 2}})
    m = stage_memory(s, _layout(s), 0)
    assert m.expert_weights == LAYERS * EXPERTS * EXPERT / 2 * 2
    assert _layout(s).expert_dp == 2
    assert m.optimizer == pytest.approx(DENSE / 2 * 12 / 2 + LAYERS * EXPERTS * EXPERT / 2 * 12 / 2)
