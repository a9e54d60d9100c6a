"""Dispatch traffic by hand: direct copies per expert, hierarchical copies per node, all-gather
copies per (source, other device)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import routing
from moesim.placement.placement import Placement
from moesim.traffic import copy_bytes, layer_traffic


def _traffic(placement, choices, device_node, algorithm):
    return layer_traffic(choices, placement, 0, device_node=np.asarray(device_node),
                         tokens_per_source=choices.num_tokens, hidden=10,
                         dispatch_bytes_per_elem=2, combine_bytes_per_elem=4,
                         capacity_factor=None, top_k=choices.top_k, algorithm=algorithm)


def _choices(rows, source=None):
    rows = np.asarray(rows, dtype=np.int32)
    source = np.zeros(len(rows), dtype=np.int32) if source is None else np.asarray(source)
    return routing.LayerChoices(rows, source.astype(np.int32), 1.0)


def test_hierarchical_sends_one_network_copy_per_remote_node():
    # Devices 0,1 on node 0; 2,3 on node 1; expert i on device i. Source 0 sends 3 tokens, each
    # to experts 2 and 3 (both on node 1). Direct: 6 copies cross; hierarchical: 3 cross (to the
    # relay, device 2 = local index 0 of node 1), then device 2 forwards 3 copies to device 3.
    placement = Placement(np.arange(4).reshape(1, 4, 1), 4)
    choices = _choices([[2, 3]] * 3)
    token = 10 * 2
    direct = _traffic(placement, choices, [0, 0, 1, 1], "direct")
    hier = _traffic(placement, choices, [0, 0, 1, 1], "hierarchical")
    assert direct.cross_node_dispatch_bytes == 6 * token
    assert hier.cross_node_dispatch_bytes == 3 * token
    flows = {tuple(p): b for p, b in zip(hier.pairs.tolist(), hier.dispatch_bytes, strict=True)}
    assert flows == {(0, 2): 3 * token, (2, 3): 3 * token}
    assert hier.combine_bytes.sum() == 2 * hier.dispatch_bytes.sum()   # fp32 combine


def test_replicas_on_two_remote_nodes_each_get_their_network_copies():
    # Three one-device nodes; expert 0 has replicas on nodes 1 and 2 (even split). Four tokens of
    # source 0 choose expert 0: two copies cross to node 1 and two to node 2 (four in all), none
    # appears on a node without having crossed the network.
    placement = Placement(np.array([[[1], [0], [0]]]), 2)
    hier = _traffic(placement, _choices([[0]] * 4), [0, 1, 2], "hierarchical")
    token = 10 * 2
    flows = {tuple(p): b for p, b in zip(hier.pairs.tolist(), hier.dispatch_bytes, strict=True)}
    assert flows == {(0, 1): pytest.approx(2 * token), (0, 2): pytest.approx(2 * token)}
    assert hier.cross_node_dispatch_bytes == pytest.approx(4 * token)


def test_direct_bytes_are_token_copies_times_hidden_times_dtype():
    placement = Placement(np.arange(4).reshape(1, 4, 1), 4)
    choices = _choices([[1, 2], [3, 0]], source=[0, 1])
    tr = _traffic(placement, choices, [0, 0, 1, 1], "direct")
    flows = {tuple(p): b for p, b in zip(tr.pairs.tolist(), tr.dispatch_bytes, strict=True)}
    # source 0 -> devices 1, 2; source 1 -> devices 3, 0 (one copy each, 20 bytes).
    assert flows == {(0, 1): 20, (0, 2): 20, (1, 3): 20, (1, 0): 20}


def _two_node_example(algorithm):
    # Two nodes of two devices: 0, 1 on node 0; 2, 3 on node 1. Eight experts, expert e on
    # device e // 2. Source 0 sends four top-2 tokens:
    #   t1 -> experts 4, 5 (both on device 2)       t2 -> experts 4, 6 (devices 2 and 3)
    #   t3 -> experts 2, 3 (both on device 1)       t4 -> experts 0, 6 (itself and device 3)
    # hidden 256, FP8 dispatch (1 byte), BF16 combine (2 bytes).
    placement = Placement(np.arange(8).reshape(1, 4, 2), 8)
    choices = _choices([[4, 5], [4, 6], [2, 3], [0, 6]])
    tr = layer_traffic(choices, placement, 0, device_node=np.array([0, 0, 1, 1]),
                       tokens_per_source=4, hidden=256, dispatch_bytes_per_elem=1,
                       combine_bytes_per_elem=2, capacity_factor=None, top_k=2,
                       algorithm=algorithm)
    dispatch = {tuple(p): b for p, b in zip(tr.pairs.tolist(), tr.dispatch_bytes, strict=True)}
    combine = {tuple(p): b for p, b in zip(tr.combine_pairs.tolist(), tr.combine_bytes,
                                           strict=True)}
    return tr, dispatch, combine


def test_two_node_bytes_direct():
    # One 256-byte copy per (token, expert): device 2 gets t1 x2 + t2 = 3, device 3 t2 + t4 = 2,
    # device 1 t3 x2 = 2; t4's expert 0 is local. Combine: 512 bytes per copy, reversed.
    tr, dispatch, combine = _two_node_example("direct")
    assert dispatch == {(0, 1): 512, (0, 2): 768, (0, 3): 512}
    assert combine == {(1, 0): 1024, (2, 0): 1536, (3, 0): 1024}
    assert tr.cross_node_dispatch_bytes == 1280
    assert tr.per_message_cost and not tr.via_nic


def test_two_node_bytes_hierarchical():
    # One network copy per (token, node): t1, t2, t4 reach node 1, to the relay of local index 0
    # (device 2): 3 x 256; the relay forwards one copy per (token, expert) to device 3: t2, t4 =
    # 2 x 256 (its own copies stay); node 0's device 1 directly: 2 x 256.
    tr, dispatch, _ = _two_node_example("hierarchical")
    assert dispatch == {(0, 1): 512, (0, 2): 768, (2, 3): 512}
    assert tr.cross_node_dispatch_bytes == 768


def test_two_node_bytes_deepep_normal():
    # A copy is 256 + 256 / 128 x 4 = 264 bytes (FP8 + FP32 scales). One copy per (token, rank):
    # device 1 gets t3 once (264); node 1 gets t1, t2, t4 once each over RDMA at the relay
    # (792), which forwards to device 3 the tokens with an expert there: t2, t4 (528).
    # Combine is BF16 without scales: 512 bytes per copy on the same routes reversed.
    tr, dispatch, combine = _two_node_example("deepep_normal")
    assert dispatch == {(0, 1): 264, (0, 2): 792, (2, 3): 528}
    assert combine == {(1, 0): 512, (2, 0): 1536, (3, 2): 1024}
    assert tr.cross_node_dispatch_bytes == 792
    assert (tr.dispatch_copy_bytes, tr.combine_copy_bytes) == (264, 512)
    assert not tr.per_message_cost and not tr.via_nic


def test_two_node_bytes_deepep_low_latency():
    # One message per (token, expert), 256 + 8 + 16 = 280 bytes (payload, scales, metadata),
    # straight to the holder, through the NIC even to device 1 on the same node; the copy for
    # expert 0 stays on device 0. Combine: 512 BF16 bytes per pair back.
    tr, dispatch, combine = _two_node_example("deepep_ll")
    assert dispatch == {(0, 1): 560, (0, 2): 840, (0, 3): 560}
    assert combine == {(1, 0): 1024, (2, 0): 1536, (3, 0): 1024}
    assert tr.cross_node_dispatch_bytes == 1400
    assert tr.via_nic and not tr.per_message_cost
    assert tr.algorithm == "deepep_ll"


def test_two_node_bytes_allgather():
    # Every device all-gathers its T = 4 real tokens (FP8: 4 x 256 x 1 = 1,024 bytes) to each of
    # the 3 others, whatever they route (sources 1-3 route nothing here and still send theirs):
    # 12 flows. Cross-node: devices 0, 1 <-> 2, 3, 8 flows = 8,192 bytes. The reduce-scatter
    # returns the same pairs reversed in BF16 without scales: 4 x 256 x 2 = 2,048 bytes each.
    tr, dispatch, combine = _two_node_example("allgather")
    others = [(s, d) for s in range(4) for d in range(4) if s != d]
    assert dispatch == dict.fromkeys(others, 1024)
    assert combine == dict.fromkeys(others, 2048)
    assert tr.cross_node_dispatch_bytes == 8 * 1024
    assert (tr.dispatch_copy_bytes, tr.combine_copy_bytes) == (256, 512)   # no FP8 scales
    assert tr.per_message_cost and not tr.via_nic
    # The routed copies and what the expert slots compute are the routing's, as for direct.
    direct, _, _ = _two_node_example("direct")
    np.testing.assert_array_equal(tr.tokens, direct.tokens)
    np.testing.assert_array_equal(tr.slot_tokens, direct.slot_tokens)
    # Device 2 computes t1 for experts 4, 5 and t2 for expert 4 (slots 4, 5); device 3 t2, t4.
    np.testing.assert_array_equal(tr.slot_tokens[2:], [[2, 1], [2, 0]])


def test_allgather_bytes_ignore_top_k_and_routing():
    # Same 2 x 2 devices, 8 experts, T = 4 tokens per source, hidden 256, FP8 dispatch; the
    # all-gather moves 1,024 bytes per (source, other device) pair for top-2 routing to device 2
    # only, top-1 routing to device 3 only, or top-2 routing spread over all sources.
    placement = Placement(np.arange(8).reshape(1, 4, 2), 8)
    spread = np.random.default_rng(3)
    cases = {
        "top-2 to device 2": _choices([[4, 5]] * 16, source=np.repeat(np.arange(4), 4)),
        "top-1 to device 3": _choices([[6]] * 16, source=np.repeat(np.arange(4), 4)),
        "top-2 random": _choices([spread.choice(8, 2, replace=False) for _ in range(16)],
                                 source=np.repeat(np.arange(4), 4)),
    }
    flows, slots = {}, {}
    for name, choices in cases.items():
        tr = layer_traffic(choices, placement, 0, device_node=np.array([0, 0, 1, 1]),
                           tokens_per_source=4, hidden=256, dispatch_bytes_per_elem=1,
                           combine_bytes_per_elem=2, capacity_factor=None, top_k=choices.top_k,
                           algorithm="allgather")
        flows[name] = {tuple(p): b for p, b in zip(tr.pairs.tolist(), tr.dispatch_bytes,
                                                   strict=True)}
        slots[name] = tr.slot_tokens
    expect = {(s, d): 1024 for s in range(4) for d in range(4) if s != d}
    assert all(f == expect for f in flows.values())
    # The expert work does follow the routing: 16 tokens x 2 copies on device 2's two slots,
    # 16 x 1 on device 3's first slot.
    np.testing.assert_array_equal(slots["top-2 to device 2"][2], [16, 16])
    assert slots["top-2 to device 2"].sum() == 32
    np.testing.assert_array_equal(slots["top-1 to device 3"][3], [16, 0])
    assert slots["top-1 to device 3"].sum() == 16
    assert slots["top-2 random"].sum() == 32


def test_allgather_failed_device_sends_and_receives_nothing():
    # Device 1 fails: the three live devices gather among themselves, 1,024 bytes per pair,
    # 6 flows; cross-node: 0 <-> 2, 0 <-> 3 = 4 flows.
    placement = Placement(np.arange(8).reshape(1, 4, 2), 8)
    choices = _choices([[4, 5]] * 16, source=np.repeat(np.arange(4), 4))
    tr = layer_traffic(choices, placement, 0, device_node=np.array([0, 0, 1, 1]),
                       tokens_per_source=4, hidden=256, dispatch_bytes_per_elem=1,
                       combine_bytes_per_elem=2, capacity_factor=None, top_k=2,
                       algorithm="allgather", failed=np.array([False, True, False, False]))
    flows = {tuple(p): b for p, b in zip(tr.pairs.tolist(), tr.dispatch_bytes, strict=True)}
    assert flows == {(s, d): 1024 for s in (0, 2, 3) for d in (0, 2, 3) if s != d}
    assert tr.cross_node_dispatch_bytes == 4 * 1024
    assert tr.live_sources == 3
    assert tr.dropped == 4 * 2       # device 1's own 4 tokens x top-2 copies are lost


def test_deepseek_low_latency_message_is_7408_bytes():
    # DeepEP tests/test_low_latency.py: hidden + hidden / 128 * 4 + 16 at hidden 7,168.
    assert copy_bytes("deepep_ll", 7168, 1, 2) == (7408.0, 14336.0)
    assert copy_bytes("deepep_normal", 7168, 1, 2) == (7392.0, 14336.0)
    assert copy_bytes("deepep_normal", 7168, 2, 2) == (14336.0, 14336.0)   # BF16: no scales
    assert copy_bytes("direct", 7168, 1, 2) == (7168.0, 14336.0)
    assert copy_bytes("allgather", 7168, 1, 2) == (7168.0, 14336.0)   # NCCL gather: no scales
    assert copy_bytes("allgather", 7168, 2, 2) == (14336.0, 14336.0)


def test_deepep_normal_rank_copies_match_a_token_loop():
    # Random routing of source 0 with replicated experts: the vectorised expected copies equal a
    # per-token loop over the replica shares (two independent paths). Source 0 reaches device 1
    # directly, node 1 through the relay device 2 (its local index 0), which forwards to 3.
    rng = np.random.default_rng(5)
    slots = np.array([[[0, 1], [2, 3], [4, 0], [5, 1]]])           # experts 0, 1 replicated
    placement = Placement(slots, 6)
    choices = _choices([rng.choice(6, 2, replace=False) for _ in range(40)])
    node = np.array([0, 0, 1, 1])
    tr = layer_traffic(choices, placement, 0, device_node=node, tokens_per_source=40,
                       hidden=128, dispatch_bytes_per_elem=2, combine_bytes_per_elem=2,
                       capacity_factor=None, top_k=2, algorithm="deepep_normal")
    share = placement.replica_share(0, node)[0]                     # [expert, dst] of source 0
    rank = np.zeros(4)
    remote_node = 0.0
    for experts in choices.experts:
        rank += 1 - np.prod(1 - share[experts], axis=0)
        remote_node += 1 - np.prod(1 - share[experts][:, 2:].sum(axis=1))
    flows = {tuple(p): b for p, b in zip(tr.pairs.tolist(), tr.dispatch_bytes, strict=True)}
    assert flows[(0, 1)] == pytest.approx(rank[1] * 256)
    assert flows[(0, 2)] == pytest.approx(remote_node * 256)
    assert flows[(2, 3)] == pytest.approx(rank[3] * 256)
