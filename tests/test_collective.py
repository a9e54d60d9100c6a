"""``moesim collective``: one collective alone, priced by hand on small topologies.

The test profile has a 100 GB/s NVLink at 50% efficiency (B_eff = 50 GB/s) and a 10 GB/s NIC at
100%, no latency unless a test adds it, so every expected time below is bytes / bandwidth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from moesim import routing
from moesim.cli import main
from moesim.collective import (
    BUSBW_FACTOR,
    deepep_choices,
    ring_collective,
    token_alltoall,
    uniform_alltoall,
)
from moesim.placement.placement import Placement
from moesim.spec.cluster import ClusterSpec
from moesim.spec.hardware import DeviceSpec, HardwareProfile, LinkSpec, NodeSpec, RingProtocol
from moesim.topology import build_topology

NVL = LinkSpec(kind="nvlink", bandwidth=100e9, efficiency=0.5)
NIC = LinkSpec(kind="infiniband", bandwidth=10e9)


def _hardware(nvl=NVL, nic=NIC, per_node=4):
    device = DeviceSpec(name="t", peak_flops={"bf16": 1e12}, memory=1e9, memory_bandwidth=1e9)
    return HardwareProfile(name="t", device=device, links={"scale_up": nvl, "scale_out": nic},
                           node=NodeSpec(devices_per_node=per_node))


def _topology(hw, nodes=1, kind=None):
    cluster = ClusterSpec(hardware="t", nodes=nodes,
                          topology=kind or ("nvswitch" if nodes == 1 else "fat_tree"))
    return build_topology(cluster, hw)


def test_busbw_factors_are_nccl_tests():
    # nccl-tests doc/PERFORMANCE.md: all-reduce 2(n-1)/n, the others (n-1)/n.
    assert BUSBW_FACTOR("allreduce", 8) == pytest.approx(1.75)
    assert BUSBW_FACTOR("allgather", 8) == pytest.approx(0.875)
    assert BUSBW_FACTOR("reducescatter", 4) == pytest.approx(0.75)
    assert BUSBW_FACTOR("alltoall", 64) == pytest.approx(63 / 64)


def test_direct_alltoall_busbw_is_the_link_rate():
    # 4 ranks, S = 4 GB each: every rank sends 3 x 1 GB through its 50 GB/s NVLink egress:
    # 0.06 s; algbw = 4e9 / 0.06, busbw = algbw x 3/4 = 50 GB/s.
    hw = _hardware()
    r = uniform_alltoall(_topology(hw), hw, 4e9)
    assert r.seconds == pytest.approx(0.06)
    assert r.busbw == pytest.approx(50e9)


def test_size_curve_and_fixed_cost_slow_small_alltoalls():
    # h = 1 MB per message and 10 us per collective: each rank's 3 messages of 1 kB cost
    # 3 x (1e3 + 1e6) / 5e10 = 60.06 us on the wire, + 10 us = 70.06 us.
    hw = _hardware(nvl=dataclasses.replace(NVL, half_efficiency_size=1e6,
                                           collective_overhead=10e-6))
    r = uniform_alltoall(_topology(hw), hw, 4e3)
    assert r.overhead == pytest.approx(10e-6)
    assert r.seconds == pytest.approx(10e-6 + 3 * (1e3 + 1e6) / 5e10)


def test_hierarchical_alltoall_sends_one_network_message_per_node():
    # 2 nodes x 4, S = 8 MB: each rank sends 1 MB to every rank. Direct: 4 remote MB through
    # each 10 GB/s NIC = 0.4 ms. Hierarchical: one 4 MB message per (rank, other node), the
    # same 4 MB on each NIC = 0.4 ms, and NVLink forwards of 3 x 1 MB concurrently (0.06 ms +
    # the own node's 3 MB: 6 MB / 50 GB/s = 0.12 ms) beside it. With h = 1 MB per NIC message
    # direct pays 4 extra MB (0.8 ms) and hierarchical 1 (0.5 ms).
    hw = _hardware(nic=dataclasses.replace(NIC, half_efficiency_size=1e6))
    topo = _topology(hw, nodes=2)
    direct = uniform_alltoall(topo, hw, 8e6, algorithm="direct")
    hier = uniform_alltoall(topo, hw, 8e6, algorithm="hierarchical")
    assert direct.seconds == pytest.approx(8e-4, rel=1e-6)
    assert hier.seconds == pytest.approx(5e-4, rel=1e-6)


def test_ring_allreduce_busbw_is_the_link_rate():
    # 4 ranks on one NVSwitch, 4 rings of S/4; each rank sends 2(n-1)/n x S = 1.5 S through its
    # 50 GB/s egress: S = 1 GB takes 0.03 s and busbw = (1e9 / 0.03) x 1.5 = 50 GB/s.
    hw = _hardware()
    r = ring_collective(_topology(hw), hw, "allreduce", 1e9)
    assert r.seconds == pytest.approx(0.03)
    assert r.busbw == pytest.approx(50e9)
    gather = ring_collective(_topology(hw), hw, "allgather", 1e9)
    assert gather.seconds == pytest.approx(0.015)      # (n-1)/n x S = 0.75 GB at 50 GB/s
    assert gather.busbw == pytest.approx(50e9)


# Two ring regimes on the test NVLink (B_eff = 50 GB/s): a low-latency one at half of B_eff
# (5 us + 1 us per step) and a bandwidth one at B_eff (40 us, nothing per step).
PROTOCOLS = (RingProtocol(name="LL", fixed=5e-6, per_step=1e-6, efficiency=0.25),
             RingProtocol(name="Simple", fixed=40e-6, efficiency=0.5))
NVL_RINGS = dataclasses.replace(NVL, ring_protocols=PROTOCOLS)


def test_ring_protocols_tiny_buffer_is_latency_huge_is_bandwidth():
    # All-gather on 4 ranks: 3 steps, each rank sends 3/4 S. S = 4 KB: 3 KB at 50 GB/s is
    # 61.44 ns, at LL's 25 GB/s 122.88 ns: LL = 5 + 3 x 1 us + 0.123 us (Simple: 40.06 us).
    # S = 1 GB: 15 ms at 50 GB/s: Simple = 40 us + 15 ms (LL: 8 us + 30 ms).
    hw = _hardware(nvl=NVL_RINGS)
    topo = _topology(hw)
    tiny = ring_collective(topo, hw, "allgather", 4096)
    assert tiny.seconds == pytest.approx(8e-6 + 3072 / 25e9, rel=1e-9)
    assert tiny.overhead == pytest.approx(8e-6, rel=1e-9)
    huge = ring_collective(topo, hw, "allgather", 1e9)
    assert huge.seconds == pytest.approx(40e-6 + 0.015, rel=1e-6)
    assert huge.busbw == pytest.approx(50e9 * 0.015 / (0.015 + 40e-6), rel=1e-6)
    # All-reduce: twice the steps and the bytes. S = 4 KB: 5 + 6 x 1 us + 6 KB at 25 GB/s.
    reduce = ring_collective(topo, hw, "allreduce", 4096)
    assert reduce.seconds == pytest.approx(11e-6 + 6144 / 25e9, rel=1e-9)


def test_allgather_layer_in_ring_protocols():
    # _gathered's layer on a node whose NVLink has the two regimes: the dispatch's 768 bytes
    # per rank take 15.36 ns at 50 GB/s; LL: 5 + 3 x 1 us + 2 x 15.36 ns.
    hw = _hardware(nvl=NVL_RINGS)
    topo = _topology(hw)
    choices = routing.LayerChoices(np.zeros((8, 1), dtype=np.int32),
                                   np.repeat(np.arange(4, dtype=np.int32), 2), 1.0)
    placement = Placement(np.arange(4).reshape(1, 4, 1), 4)
    dispatch, combine = token_alltoall(topo, hw, choices, placement, hidden=128,
                                       algorithm="allgather", tokens_per_source=2)
    assert dispatch.seconds == pytest.approx(8e-6 + 768 / 25e9, rel=1e-9)
    assert combine.seconds == pytest.approx(8e-6 + 1536 / 25e9, rel=1e-9)


def test_multi_node_ring_uses_every_nic_once():
    # 2 nodes x 4: four rings, each crossing both node boundaries once through a different NIC
    # pair, so a NIC carries one ring: 2(n-1)/n x S/4 = 7/16 S at 10 GB/s; S = 1.6 GB: 70 ms.
    hw = _hardware()
    r = ring_collective(_topology(hw, nodes=2), hw, "allreduce", 1.6e9)
    assert r.seconds == pytest.approx(7 / 16 * 1.6e9 / 10e9, rel=1e-6)


def _one_token(algorithm, ll_nvlink=False, kind="fat_tree"):
    # One node, two devices, a fat tree (so a NIC exists); device 0 sends one token to expert 1
    # on device 1; hidden 128, FP8: a low-latency message is 128 + 4 + 16 = 148 bytes.
    hw = _hardware(per_node=2)
    topo = _topology(hw, nodes=1, kind=kind)
    choices = routing.LayerChoices(np.array([[1]], dtype=np.int32), np.array([0], np.int32), 1.0)
    placement = Placement(np.array([[[0], [1]]]), 2)
    return token_alltoall(topo, hw, choices, placement, hidden=128, algorithm=algorithm,
                          tokens_per_source=1, ll_nvlink=ll_nvlink)


def test_low_latency_goes_through_the_nic_inside_a_node():
    # Through the NIC: 148 B at 10 GB/s = 14.8 ns; over NVLink (allowed): 148 B at 50 GB/s.
    # DeepEP-style LL GB/s counts the one pair over the two ranks: 148 / 2 per rank / time.
    dispatch, combine = _one_token("deepep_ll")
    assert dispatch.seconds == pytest.approx(148 / 10e9)
    assert combine.seconds == pytest.approx(256 / 10e9)           # BF16 back, no metadata
    assert dispatch.figures["ll_gbps"] == pytest.approx(74 / (148 / 10e9))
    nvlink, _ = _one_token("deepep_ll", ll_nvlink=True)
    assert nvlink.seconds == pytest.approx(148 / 50e9)
    assert dispatch.figures["via_nic"] == 1.0 and nvlink.figures["via_nic"] == 0.0
    no_nic, _ = _one_token("deepep_ll", kind="nvswitch")      # no NIC modelled: NVLink
    assert no_nic.seconds == pytest.approx(148 / 50e9)
    normal, _ = _one_token("deepep_normal")
    assert normal.seconds == pytest.approx(132 / 50e9)            # 128 + 4 scale bytes, NVLink


@pytest.mark.parametrize("per_sm, link_share, rate", [
    (4e9, 1.0, 10e9),      # 10 SMs x 0.25 x 4 GB/s = 10 GB/s, below the 50 GB/s link
    (40e9, 1.0, 50e9),     # 100 GB/s of SMs: the link sets the rate
    (16e9, 0.5, 25e9),     # 40 GB/s of SMs, but the kernel reaches half the link: 25 GB/s
    (4e9, 0.5, 10e9),      # SMs below half the link: the SMs again
])
def test_deepep_normal_copies_over_nvlink_at_its_sms_or_link_share_rate(per_sm, link_share, rate):
    """DeepEP's normal kernels move NVLink bytes at the lower of comm_sm_fraction x sm_count x
    comm_sm_bandwidth and comm_link_efficiency of the link (one intra-node token); the
    low-latency kernels keep the link's rate (the pricing layer's side: tests/test_pricing.py)."""
    device = dataclasses.replace(_hardware(per_node=2).device, sm_count=10, comm_sm_fraction=0.25,
                                 comm_sm_bandwidth=per_sm, comm_link_efficiency=link_share)
    hw = dataclasses.replace(_hardware(per_node=2), device=device)
    topo = _topology(hw, nodes=1, kind="fat_tree")
    choices = routing.LayerChoices(np.array([[1]], dtype=np.int32), np.array([0], np.int32), 1.0)
    placement = Placement(np.array([[[0], [1]]]), 2)
    normal, back = token_alltoall(topo, hw, choices, placement, hidden=128,
                                  algorithm="deepep_normal", tokens_per_source=1)
    assert normal.seconds == pytest.approx(132 / rate)           # 128 + 4 scale bytes
    assert back.seconds == pytest.approx(256 / rate)              # BF16 combine
    ll, _ = token_alltoall(topo, hw, choices, placement, hidden=128,
                           algorithm="deepep_ll", tokens_per_source=1, ll_nvlink=True)
    assert ll.seconds == pytest.approx(148 / 50e9)                # low latency: not limited


def test_a_deepep_kernel_pays_its_own_fixed_cost_inside_a_node():
    """NVLink's per-collective cost 1 us, the scale-out class's (fitted on DeepEP's kernels)
    10 us. One token inside one node: the NCCL-style direct all-to-all pays NVLink's 1 us; the
    DeepEP kernels pay 10 us though no byte touches the NIC."""
    hw = _hardware(nvl=dataclasses.replace(NVL, collective_overhead=1e-6),
                   nic=dataclasses.replace(NIC, collective_overhead=10e-6), per_node=2)
    topo = _topology(hw, nodes=1, kind="fat_tree")
    choices = routing.LayerChoices(np.array([[1]], dtype=np.int32), np.array([0], np.int32), 1.0)
    placement = Placement(np.array([[[0], [1]]]), 2)
    for algorithm, overhead, nbytes in (("direct", 1e-6, 128), ("deepep_normal", 10e-6, 132),
                                        ("deepep_ll", 10e-6, 148)):
        d, _ = token_alltoall(topo, hw, choices, placement, hidden=128, algorithm=algorithm,
                              tokens_per_source=1, ll_nvlink=True)
        assert d.overhead == pytest.approx(overhead)
        assert d.seconds == pytest.approx(overhead + nbytes / 50e9, rel=1e-3)


def _gathered(experts, nodes=1):
    # 4 devices per node, one expert on each; 2 tokens per source routed to ``experts``;
    # hidden 128, FP8 dispatch (128 bytes a token), BF16 combine (256 bytes).
    hw = _hardware()
    topo = _topology(hw, nodes=nodes)
    ranks = 4 * nodes
    experts = np.asarray(experts, dtype=np.int32).reshape(ranks * 2, -1)
    choices = routing.LayerChoices(experts, np.repeat(np.arange(ranks, dtype=np.int32), 2), 1.0)
    placement = Placement(np.arange(ranks).reshape(1, ranks, 1), ranks)
    return token_alltoall(topo, hw, choices, placement, hidden=128, algorithm="allgather",
                          tokens_per_source=2)


def test_allgather_layer_busbw_is_the_link_rate_whatever_the_routing():
    # One NVSwitch node, 4 ranks: every rank sends its 2 tokens (256 bytes) to each of the 3
    # others through its 50 GB/s NVLink egress: 768 B / 50 GB/s; the reduce-scatter sends 3 x
    # 512 BF16 bytes. nccl-tests' all-gather S is the whole buffer, 4 x 256 B, so busbw =
    # S / t x 3/4 = the link's 50 GB/s. All tokens to expert 0 or spread top-2: same times.
    for experts in ([0] * 8, [[r % 4, (r + 1) % 4] for r in range(8)]):
        dispatch, combine = _gathered(experts)
        assert dispatch.seconds == pytest.approx(768 / 50e9)
        assert combine.seconds == pytest.approx(1536 / 50e9)
        assert dispatch.nbytes == 1024 and combine.nbytes == 2048
        assert dispatch.busbw == pytest.approx(50e9) and combine.busbw == pytest.approx(50e9)
        assert dispatch.flows == combine.flows == 12
        assert "nvl_gbps" not in dispatch.figures          # DeepEP's figures do not apply


def test_allgather_layer_across_two_nodes_is_bound_by_the_nic():
    # Two nodes of 4: each rank sends its 256 bytes to 4 ranks of the other node through its
    # 10 GB/s NIC (1,024 B: 102.4 ns) and to 3 of its own over NVLink (768 B at 50 GB/s, 15.4
    # ns): the NIC decides.
    dispatch, combine = _gathered([0] * 16, nodes=2)
    assert dispatch.seconds == pytest.approx(1024 / 10e9)
    assert combine.seconds == pytest.approx(2048 / 10e9)


def test_deepep_choices_respect_node_groups():
    # 4 nodes, 2 groups per token: every token's 8 experts lie on at most 2 nodes.
    c = deepep_choices(ranks=8, tokens=64, num_experts=32, top_k=8, nodes=4, groups=2)
    assert c.experts.shape == (512, 8)
    nodes = c.experts // 8
    assert max(len(set(row)) for row in nodes.tolist()) <= 2
    assert all(len(set(row)) == 8 for row in c.experts.tolist())


def test_cli_prints_a_table(capsys):
    assert main(["collective", "h100-sxm", "--size", "1 MiB", "--size", "1 GiB"]) == 0
    out = capsys.readouterr().out
    assert "busbw" in out and out.count("alltoall") == 2
    assert main(["collective", "h800-sxm", "--nodes", "2", "--tokens", "8", "--hidden", "256",
                 "--experts", "32", "--algorithm", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count("dispatch") == 5 and "deepep_ll" in out
    assert "allgather" in out and "(reduce-scatter)" in out
    assert main(["collective", "h100-sxm", "--tokens", "64", "--hidden", "4096", "--experts",
                 "8", "--top-k", "2", "--groups", "1", "--algorithm", "allgather"]) == 0
    row = [r for r in capsys.readouterr().out.splitlines() if r.startswith("dispatch")]
    assert len(row) == 1 and "allgather" in row[0]
    # S = 8 ranks x 64 tokens x 4,096 bytes (FP8) = 2.10 MB.
    assert "2.10MB" in row[0]
    assert main(["collective", "h100-sxm", "--algorithm", "allgather"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_cli_layer_runs_the_scenarios_own_algorithm_unless_told(capsys):
    """The shipped Mixtral serving scenario runs DP attention's all-gather: ``--layer`` alone
    prices that, ``--algorithm direct`` the all-to-all."""
    path = str(Path(__file__).resolve().parent.parent / "scenarios"
               / "mixtral-8x7b-infer-1node.yaml")
    for extra, algorithm in (([], "allgather"), (["--algorithm", "direct"], "direct")):
        assert main(["collective", path, "--layer", *extra]) == 0
        rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("dispatch")]
        assert len(rows) == 1 and rows[0].split()[1] == algorithm


def test_cli_rejects_bad_ranks(capsys):
    assert main(["collective", "h100-sxm", "--ranks", "9"]) == 2
    assert "--ranks=9" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--size", "-5 MiB"], "--size '-5 MiB' must be > 0"),
    (["--size", "0 B"], "--size '0 B' must be > 0"),
    (["--size", "0"], "has no unit"),
    (["--size", "1e400 B"], "not a finite number"),
    (["--size", "lots"], "cannot read 'lots'"),
    (["--tokens", "-3", "--algorithm", "deepep_ll"], "--tokens=-3 must be >= 1"),
    (["--tokens", "8", "--hidden", "-5"], "--hidden=-5 must be >= 1"),
    (["--tokens", "8", "--top-k", "999"], "--top-k=999 must be <= --experts=256"),
    (["--tokens", "8", "--experts", "-8"], "--experts=-8 must be >= 1"),
    (["--tokens", "8", "--groups", "-2"], "--groups=-2 must be >= 1"),
    (["--tokens", "8", "--seed", "-1"], "--seed=-1 must be >= 0"),
    (["--nodes", "0"], "--nodes=0 must be >= 1"),
    (["--ranks", "0"], "--ranks=0 must be >= 1"),
])
def test_cli_bad_options_are_bad_input_naming_the_option(capsys, args, named):
    # Out-of-range options once reached numpy (negative dimensions) or the flow model (negative
    # bytes) and were reported as internal errors (exit 3); they are the user's input (exit 2).
    assert main(["collective", "h100-sxm", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "internal error" not in err
