"""Tests of moesim.topology: builder shapes by hand, paths, re-routing and validation."""

from __future__ import annotations

import itertools
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest

from moesim.errors import ScenarioError, TopologyError
from moesim.spec.cluster import ClusterSpec, ExplicitDevice, ExplicitLink
from moesim.spec.fields import build
from moesim.spec.hardware import load_hardware
from moesim.topology import build_topology

H100 = load_hardware("h100-sxm")
TPU = load_hardware("tpu-v4")
NVLINK = 450e9 * 0.822   # H100 profile: line rate x NCCL efficiency
NIC = 50e9 * 0.97


def cluster(**kw) -> ClusterSpec:
    return ClusterSpec(hardware=kw.pop("hardware", "h100-sxm"), **kw)


def idx(topo, u, v) -> int:
    return topo.graph.edges[u, v]["index"]


def ends(topo, src, dst) -> list[tuple[str, str]]:
    return [topo.link_ends[i] for i in topo.path_links(src, dst)]


def assert_chain(topo, src, dst):
    """The path's links join end to end from device src to device dst."""
    hops = ends(topo, src, dst)
    assert hops[0][0] == topo.devices[src] and hops[-1][1] == topo.devices[dst]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(hops))


# -- switched builders --------------------------------------------------------------------------

def test_fat_tree_2x4_counts_by_hand():
    topo = build_topology(cluster(topology="fat_tree", nodes=2, devices_per_node=4), H100)
    assert topo.devices == tuple(f"n{n}.gpu{g}" for n in range(2) for g in range(4))
    assert topo.device_node.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # 8 devices + 2 NVSwitches + 1 leaf (both nodes fit one leaf: no core).
    assert topo.graph.number_of_nodes() == 11
    # 8 x (egress + ingress) NVLink + 8 x (egress + ingress) NIC.
    assert topo.num_links == topo.graph.number_of_edges() == 32
    summary = topo.summary()
    assert summary["switches"] == 3
    assert summary["links_by_class"] == {"scale_out": 16, "scale_up": 16}
    assert (topo.num_devices, topo.num_nodes) == (8, 2)


def test_intra_node_path_is_egress_then_ingress_nvlink():
    topo = build_topology(cluster(topology="fat_tree", nodes=2, devices_per_node=4), H100)
    path = topo.path_links(0, 3)
    assert path.tolist() == [idx(topo, "n0.gpu0", "n0.nvsw"), idx(topo, "n0.nvsw", "n0.gpu3")]
    assert topo.capacity[path] == pytest.approx([NVLINK, NVLINK])
    assert topo.latency[path].sum() == pytest.approx(2e-6)   # charged once, on egress
    assert topo.path_links(5, 5).size == 0


def test_inter_node_path_crosses_two_nic_links():
    topo = build_topology(cluster(topology="fat_tree", nodes=2, devices_per_node=4), H100)
    assert ends(topo, 1, 6) == [("n0.gpu1", "leaf0"), ("leaf0", "n1.gpu2")]
    path = topo.path_links(1, 6)
    assert [topo.link_class[i] for i in path] == ["scale_out", "scale_out"]
    assert topo.capacity[path] == pytest.approx([NIC, NIC])
    assert topo.graph.edges["n0.gpu1", "leaf0"]["line_rate"] == pytest.approx(50e9)


def test_oversubscribed_uplinks_by_hand():
    # 5 nodes x 2 GPUs, 2 nodes per leaf -> leaves of 4, 4 and 2 devices, 4:1 oversubscribed.
    spec = cluster(topology="fat_tree", nodes=5, devices_per_node=2, leaf_nodes=2,
                   oversubscription=4.0)
    topo = build_topology(spec, H100)
    assert topo.graph.number_of_nodes() == 10 + 5 + 3 + 1     # devices, nvsw, leaves, core
    assert topo.num_links == 20 + 20 + 6
    for leaf, devices in (("leaf0", 4), ("leaf2", 2)):
        for u, v in ((leaf, "core"), ("core", leaf)):
            assert topo.capacity[idx(topo, u, v)] == pytest.approx(devices * 50e9 / 4 * 0.97)
    assert ends(topo, 0, 9) == [("n0.gpu0", "leaf0"), ("leaf0", "core"), ("core", "leaf2"),
                                ("leaf2", "n4.gpu1")]
    # Rank-order halves {0..4} | {5..9}: the edges leaving the first half are leaf0's uplink
    # (4 NICs / 4), and rank 4's (n2.gpu0) NVLink egress to n2.gpu1 and its NIC egress.
    assert topo.summary()["bisection_bandwidth"] == pytest.approx(
        4 * 50e9 / 4 * 0.97 + NVLINK + NIC)


def test_bisection_of_two_oversubscribed_leaves():
    spec = cluster(topology="fat_tree", nodes=4, devices_per_node=2, leaf_nodes=2,
                   oversubscription=2.0)
    summary = build_topology(spec, H100).summary()
    assert summary["bisection_bandwidth"] == pytest.approx(4 * 50e9 / 2 * 0.97)
    assert summary["min_device_egress_by_class"] == pytest.approx(
        {"scale_out": NIC, "scale_up": NVLINK})


def test_bandwidth_overrides_replace_the_line_rate():
    spec = cluster(topology="fat_tree", nodes=2, devices_per_node=2, scale_out_bandwidth=100e9,
                   scale_up_bandwidth=900e9)
    topo = build_topology(spec, H100)
    assert topo.capacity[idx(topo, "n0.gpu0", "leaf0")] == pytest.approx(100e9 * 0.97)
    assert topo.capacity[idx(topo, "n0.gpu0", "n0.nvsw")] == pytest.approx(900e9 * 0.822)


def test_nvswitch_node_counts_and_paths():
    topo = build_topology(cluster(topology="nvswitch"), H100)   # profile: 8 per node
    assert topo.graph.number_of_nodes() == 9 and topo.num_links == 16
    for s, d in itertools.permutations(range(8), 2):
        assert ends(topo, s, d) == [(f"n0.gpu{s}", "n0.nvsw"), ("n0.nvsw", f"n0.gpu{d}")]


def test_rail_optimized_counts_and_pxn_path_by_hand():
    topo = build_topology(cluster(topology="rail_optimized", nodes=2, devices_per_node=4), H100)
    # 8 devices + 2 nvsw + 4 rail switches + 1 core; 16 NVLink + 16 NIC + 8 rail-core edges.
    assert topo.graph.number_of_nodes() == 15
    assert topo.num_links == 40
    # Same rail: straight over the rail switch.
    assert ends(topo, 1, 5) == [("n0.gpu1", "g0.rail1"), ("g0.rail1", "n1.gpu1")]
    # Cross rail (PXN): NVLink to n0.gpu2 (the destination's rail), then its NIC.
    assert ends(topo, 0, 6) == [("n0.gpu0", "n0.nvsw"), ("n0.nvsw", "n0.gpu2"),
                                ("n0.gpu2", "g0.rail2"), ("g0.rail2", "n1.gpu2")]


def test_rail_groups_cross_the_core():
    spec = cluster(topology="rail_optimized", nodes=4, devices_per_node=2, leaf_nodes=2)
    topo = build_topology(spec, H100)
    assert ends(topo, 0, 7) == [("n0.gpu0", "n0.nvsw"), ("n0.nvsw", "n0.gpu1"),
                                ("n0.gpu1", "g0.rail1"), ("g0.rail1", "core"),
                                ("core", "g1.rail1"), ("g1.rail1", "n3.gpu1")]


def test_paths_csr_matches_path_links():
    topo = build_topology(cluster(topology="rail_optimized", nodes=3, devices_per_node=4), H100)
    pairs = np.array(list(itertools.product(range(12), repeat=2)))
    ptr, links = topo.paths_csr(pairs)
    assert ptr.shape == (len(pairs) + 1,) and ptr[0] == 0 and ptr[-1] == len(links)
    for f, (s, d) in enumerate(pairs):
        assert links[ptr[f]:ptr[f + 1]].tolist() == topo.path_links(s, d).tolist()
        if s != d:
            assert_chain(topo, s, d)


# -- torus ---------------------------------------------------------------------------------------

def torus_hops(a, b, dims, wrap=True):
    diff = [abs(x - y) for x, y in zip(a, b)]
    return sum(min(d, n - d) if wrap else d for d, n in zip(diff, dims))


@pytest.mark.parametrize("dims, wrap, links", [((4, 4), True, 64), ((2, 2, 2), True, 24),
                                               ((3, 4), False, 34)])
def test_torus_hop_counts_match_formula_and_networkx(dims, wrap, links):
    topo = build_topology(cluster(hardware="tpu-v4", topology="torus", torus_dims=dims,
                                  wraparound=wrap), TPU)
    assert topo.num_links == links
    assert set(topo.link_class) == {"ici"}
    lengths = dict(nx.all_pairs_shortest_path_length(topo.graph))
    coords = list(itertools.product(*(range(n) for n in dims)))
    for s, d in itertools.permutations(range(len(coords)), 2):
        hops = len(topo.path_links(s, d))
        assert hops == torus_hops(coords[s], coords[d], dims, wrap)
        assert hops == lengths[topo.devices[s]][topo.devices[d]]
        assert_chain(topo, s, d)


def test_torus_hosts_dimension_order_and_ties_go_plus():
    topo = build_topology(cluster(hardware="tpu-v4", topology="torus", torus_dims=(4, 4)), TPU)
    assert topo.device_node.tolist() == [r // 4 for r in range(16)]   # 4 chips per host
    assert topo.devices[5] == "n1.tpu1"
    # (0,0) -> (2,3): dim 0 first, +2 (tie, goes +); then dim 1 one step back round the ring.
    names = [topo.devices[r] for r in (0, 4, 8, 11)]
    assert ends(topo, 0, 11) == list(itertools.pairwise(names))
    assert topo.latency[topo.path_links(0, 11)].sum() == pytest.approx(3e-6)  # per hop


def test_torus_needs_ici_and_a_consistent_node_count():
    with pytest.raises(TopologyError, match="needs a 'ici' link.*'h100-sxm'"):
        build_topology(cluster(topology="torus", torus_dims=(4,)), H100)
    with pytest.raises(TopologyError, match="nodes=3 .* 4 hosts"):
        build_topology(cluster(hardware="tpu-v4", topology="torus", torus_dims=(4, 4), nodes=3),
                       TPU)


def test_fat_tree_needs_a_nic_link():
    no_nic = replace(H100, name="no-nic", links={"scale_up": H100.links["scale_up"]})
    with pytest.raises(TopologyError, match="fat_tree topology needs a 'scale_out' link.*no-nic"):
        build_topology(cluster(topology="fat_tree", nodes=2, devices_per_node=2), no_nic)
    # One device per node needs no NVSwitch, hence no scale_up link.
    no_nvlink = replace(H100, links={"scale_out": H100.links["scale_out"]})
    topo = build_topology(cluster(topology="fat_tree", nodes=3, devices_per_node=1), no_nvlink)
    assert topo.num_links == 6 and set(topo.link_class) == {"scale_out"}


# -- explicit ------------------------------------------------------------------------------------

def explicit(links, devices=("a", "b", "c"), **kw):
    devs = tuple(d if isinstance(d, ExplicitDevice) else ExplicitDevice(name=d) for d in devices)
    return cluster(topology="explicit", devices=devs, links=tuple(links), **kw)


def test_explicit_heterogeneous_paths_and_profiles():
    a100 = load_hardware("a100-sxm-80gb")
    spec = explicit([ExplicitLink(a="a", b="sw", bandwidth=50e9, latency=4e-6),
                     ExplicitLink(a="b", b="sw", bandwidth=50e9, latency=4e-6),
                     ExplicitLink(a="c", b="sw", bandwidth=25e9, latency=4e-6),
                     ExplicitLink(a="a", b="b", bandwidth=450e9, kind="scale_up")],
                    devices=("a", ExplicitDevice(name="b", node=0),
                             ExplicitDevice(name="c", node=1, hardware="a100-sxm-80gb")))
    topo = build_topology(spec, H100, {"a100-sxm-80gb": a100})
    assert topo.device_hardware(2) is a100 and topo.device_hardware(0) is H100
    assert topo.device_node.tolist() == [0, 0, 1] and topo.num_nodes == 2
    assert ends(topo, 0, 1) == [("a", "b")]                       # 1 hop beats 2
    assert ends(topo, 2, 1) == [("c", "sw"), ("sw", "b")]
    # Efficiency of the cluster profile's link class applies to explicit line rates.
    assert topo.capacity[idx(topo, "c", "sw")] == pytest.approx(25e9 * 0.97)
    assert topo.capacity[idx(topo, "a", "b")] == pytest.approx(450e9 * 0.822)
    with pytest.raises(TopologyError, match="device 'c' uses hardware profile 'a100-sxm-80gb'"):
        build_topology(spec, H100)


def test_explicit_ties_on_hops_break_on_latency():
    spec = explicit([ExplicitLink(a="a", b="slow", bandwidth=1e9, latency=5e-6),
                     ExplicitLink(a="slow", b="b", bandwidth=1e9, latency=5e-6),
                     ExplicitLink(a="a", b="fast", bandwidth=1e9, latency=1e-6),
                     ExplicitLink(a="fast", b="b", bandwidth=1e9, latency=1e-6)],
                    devices=("a", "b"))
    assert ends(build_topology(spec, H100), 0, 1) == [("a", "fast"), ("fast", "b")]


def test_explicit_disconnected_device_is_named():
    spec = explicit([ExplicitLink(a="a", b="b", bandwidth=1e9)])
    with pytest.raises(TopologyError, match="device 'c' has no links"):
        build_topology(spec, H100)
    one_way = explicit([ExplicitLink(a="a", b="b", bandwidth=1e9),
                        ExplicitLink(a="b", b="c", bandwidth=1e9, bidirectional=False)])
    with pytest.raises(TopologyError, match="device 'c' cannot reach device 'a'"):
        build_topology(one_way, H100)


def test_explicit_unknown_endpoint_is_named():
    spec = explicit([ExplicitLink(a="a", b="b", bandwidth=1e9),
                     ExplicitLink(a="b", b="c", bandwidth=1e9),
                     ExplicitLink(a="c", b="gpu9", bandwidth=1e9)])
    with pytest.raises(TopologyError, match="'gpu9' is not a listed device"):
        build_topology(spec, H100)


def test_explicit_bad_link_class_is_named():
    spec = explicit([ExplicitLink(a="a", b="b", bandwidth=1e9, kind="nvlink"),
                     ExplicitLink(a="b", b="c", bandwidth=1e9)])
    with pytest.raises(TopologyError, match=r"links\[0\]: kind 'nvlink' is not a link class"):
        build_topology(spec, H100)


def test_zero_or_negative_bandwidth_is_rejected():
    data = {"hardware": "h100-sxm", "topology": "explicit", "devices": [{"name": "a"}],
            "links": [{"a": "a", "b": "b", "bandwidth": "0 GB/s"}]}
    with pytest.raises(ScenarioError, match=r"cluster.links\[0\].bandwidth: 0.0 must be > 0"):
        build(ClusterSpec, data, source="s.yaml", path="cluster")
    spec = explicit([ExplicitLink(a="a", b="b", bandwidth=-1.0),
                     ExplicitLink(a="b", b="c", bandwidth=1e9)])
    with pytest.raises(TopologyError, match="link a -> b has bandwidth -1.0 B/s; it must be > 0"):
        build_topology(spec, H100)


# -- failures ------------------------------------------------------------------------------------

def ring(size=4):
    return build_topology(cluster(hardware="tpu-v4", topology="torus", torus_dims=(size,),
                                  devices_per_node=1), TPU)


def test_without_reroutes_around_a_failed_ring_link():
    topo = ring()
    assert ends(topo, 0, 1) == [("n0.tpu0", "n1.tpu0")]
    cut = topo.without(links=[("n0.tpu0", "n1.tpu0")])        # both directions fail
    assert cut.num_links == topo.num_links - 2
    assert ends(cut, 0, 1) == [("n0.tpu0", "n3.tpu0"), ("n3.tpu0", "n2.tpu0"),
                               ("n2.tpu0", "n1.tpu0")]
    assert len(cut.path_links(1, 0)) == 3
    assert ends(cut, 2, 3) == ends(topo, 2, 3)               # unbroken paths are kept
    for i, (u, v) in enumerate(cut.link_ends):              # indices renumbered consistently
        assert cut.graph.edges[u, v]["index"] == i
        assert cut.capacity[i] == topo.capacity[idx(topo, u, v)]
    assert topo.num_links == 8 and len(topo.path_links(0, 1)) == 1   # original untouched


def test_without_raises_when_a_device_is_cut_off():
    with pytest.raises(TopologyError, match="'n0.tpu0'.*cannot reach.*'n1.tpu0'"):
        ring().without(links=[("n0.tpu0", "n1.tpu0"), ("n3.tpu0", "n0.tpu0")])
    with pytest.raises(TopologyError, match="no such link"):
        ring().without(links=[("n0.tpu0", "n2.tpu0")])


def test_without_device_reroutes_pxn_through_the_core():
    topo = build_topology(cluster(topology="rail_optimized", nodes=2, devices_per_node=4), H100)
    cut = topo.without(devices=[2])                          # the PXN proxy of 0 -> n1.gpu2
    assert cut.devices == ("n0.gpu0", "n0.gpu1", "n0.gpu3", "n1.gpu0", "n1.gpu1", "n1.gpu2",
                           "n1.gpu3")
    assert cut.device_node.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert cut.graph.nodes["n1.gpu2"]["rank"] == 5
    assert ends(cut, 0, 5) == [("n0.gpu0", "g0.rail0"), ("g0.rail0", "core"),
                               ("core", "g0.rail2"), ("g0.rail2", "n1.gpu2")]
    assert ends(cut, 0, 2) == [("n0.gpu0", "n0.nvsw"), ("n0.nvsw", "n0.gpu3")]
    for s, d in itertools.permutations(range(cut.num_devices), 2):
        assert_chain(cut, s, d)


def test_without_keeps_structural_paths_that_survive():
    topo = build_topology(cluster(topology="rail_optimized", nodes=2, devices_per_node=4), H100)
    cut = topo.without(links=[("n0.gpu3", "n0.nvsw")])
    # PXN (NVLink 2 us + NIC 4 us) is kept although a fresh search would take the equally short,
    # lower-latency detour gpu0 -> rail0 -> core -> rail2 (4 us).
    assert ends(cut, 0, 6) == ends(topo, 0, 6) == [
        ("n0.gpu0", "n0.nvsw"), ("n0.nvsw", "n0.gpu2"), ("n0.gpu2", "g0.rail2"),
        ("g0.rail2", "n1.gpu2")]
    assert ends(cut, 3, 0) == [("n0.gpu3", "g0.rail3"), ("g0.rail3", "core"),
                               ("core", "g0.rail0"), ("g0.rail0", "n0.gpu0")]


def test_rank_out_of_range():
    with pytest.raises(TopologyError, match="rank 4 is out of range 0..3"):
        ring().path_links(0, 4)
