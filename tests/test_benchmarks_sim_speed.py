"""Simulator speed (issue 7): the speed benchmark's tiny run, its scaling arithmetic and setups,
and that every shortcut the fast simulator takes agrees with the plain computation it replaces:
the mirrored combine with a second flow simulation, the compact replica split with the dense
share, the vectorised hierarchical flows with the per-(source, node) loop, and the expert-major
routing sampler with a brute-force reading of the same random stream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim import routing, routing_draw
from moesim.assembly import simulate
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import alltoall, mirrored_alltoalls
from moesim.pricing.step import micro_batches
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import load_scenario
from moesim.traffic import _hierarchical_flows, merge_flows

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import sim_speed  # noqa: E402

# --- the benchmark ---


def test_tiny_benchmark_measures_every_case(tmp_path, capsys):
    assert sim_speed.main(["--tiny", "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["name"] for r in rows] == [c.name for c in sim_speed.cases(tiny=True)]
    for r in rows:
        assert r["name"] in out
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["step_time_s"] > 0
        assert r["peak_mb"] >= r["base_mb"] > 0
    assert all(r["events"] > 0 for r in rows)
    assert {r["table"] for r in rows} == {"shipped", "devices", "layers"}
    assert "linear growth in devices x MoE layers" in out


def test_growth_ratio_by_hand():
    def row(devices, moe_layers, cpu):
        return sim_speed.Row("t", "x", devices, moe_layers + 3, moe_layers, cpu, cpu, 1.0, 1.0,
                             1, 1.0)
    # Twice the devices at twice the time: linear (1). Twice the MoE layers at the same time: 0.5.
    # Four times devices x MoE layers at eight times the time: 2 (faster than linear).
    rows = [row(256, 10, 1.0), row(512, 10, 2.0), row(256, 20, 1.0), row(512, 20, 8.0)]
    assert sim_speed.growth_ratios(rows) == pytest.approx([1.0, 1.0, 0.5, 2.0])


@pytest.mark.parametrize("devices", [256, 512, 1024, 2048, 4096])
def test_deepseek_family_keeps_ep64_and_120_micro_batches(devices):
    s = load_scenario(sim_speed.DEEPSEEK, list(sim_speed.deepseek_at(devices)))
    par = s.parallelism
    assert par.pp * par.dp * par.tp == devices == 8 * s.cluster.nodes
    assert par.ep == 64 and micro_batches(s) == 120 and s.model.num_layers == 61


def test_deepseek_family_at_2048_is_the_shipped_scenario():
    shipped = load_scenario(sim_speed.DEEPSEEK)
    family = load_scenario(sim_speed.DEEPSEEK, list(sim_speed.deepseek_at(2048)))
    for part in ("cluster", "parallelism", "workload", "routing", "communication", "model",
                 "precision"):
        assert getattr(family, part) == getattr(shipped, part), part
    with pytest.raises(ValueError, match="multiple of 64"):
        sim_speed.deepseek_at(300)


# --- the mirrored combine ---


def _rail(alltoall_kind: str):
    """Qwen3-30B-A3B, EP32 over 4 rail-optimised nodes of 8 H100 (2 layers, no fault)."""
    return load_scenario(REPO / "scenarios" / "faults_rail_link.yaml",
                         ["faults=[]", "model.num_layers=2", "workload.global_batch=32",
                          f"communication.alltoall={alltoall_kind}", "precision.combine=fp32"])


@pytest.mark.parametrize("rtol", [1e-12, 1e-2])
def test_mirrored_combine_equals_simulating_the_reversed_flows(rtol):
    # Hierarchical all-to-all on a rail-optimised cluster: every reversed path is the forward
    # path mirrored, so one fluid simulation must give what a second one gives.
    s = _rail("hierarchical")
    sim = simulate(s)
    costs, topo = sim.costs, sim.topology
    traffic = costs.block(s.model.moe_layer_ids[0]).traffic
    pairs = costs.group[traffic.pairs]
    scale = dtype_bytes("fp32") / dtype_bytes(s.precision.dispatch)
    assert scale > 1 and np.array_equal(traffic.combine_bytes, traffic.dispatch_bytes * scale)
    both = mirrored_alltoalls(topo, costs.ctx.reverse_link, pairs, traffic.dispatch_bytes, scale, rtol)
    assert both is not None
    forward, back = both
    direct_fwd = alltoall(topo, pairs, traffic.dispatch_bytes, rtol)
    direct_back = alltoall(topo, pairs[:, ::-1], traffic.combine_bytes, rtol)
    for got, want in ((forward, direct_fwd), (back, direct_back)):
        assert got.duration == pytest.approx(want.duration, rel=1e-9)
        assert np.array_equal(got.link_index, want.link_index)
        assert got.link_bytes == pytest.approx(want.link_bytes, rel=1e-9)
        assert got.link_busy == pytest.approx(want.link_busy, rel=1e-9)
        assert got.cross_node_bytes == pytest.approx(want.cross_node_bytes, rel=1e-12)
    assert back.duration > forward.duration                  # more bytes


def test_mirror_is_refused_where_reversed_paths_differ():
    # Direct all-to-all on rail-optimised: a cross-rail transfer crosses NVLink on the sender's
    # node (PXN), so the reverse transfer does so on the other node: not a mirror image.
    s = _rail("direct")
    sim = simulate(s)
    costs = sim.costs
    traffic = costs.block(s.model.moe_layer_ids[0]).traffic
    assert mirrored_alltoalls(sim.topology, costs.ctx.reverse_link, costs.group[traffic.pairs],
                              traffic.dispatch_bytes, 2.0) is None


# --- replica split and hierarchical flows ---


def _random_placement(rng, ep=12, experts=10, slots=2):
    physical = np.concatenate([rng.permutation(experts), rng.integers(0, experts,
                                                                      ep * slots - experts)])
    return Placement(rng.permutation(physical).reshape(1, ep, slots), experts)


def test_replica_split_routes_like_the_dense_share():
    rng = np.random.default_rng(3)
    for _ in range(5):
        placement = _random_placement(rng)
        device_node = rng.permutation(np.arange(12) % 4) * 7            # 4 nodes, scattered ids
        split = placement.replica_split(0, device_node)
        dense = placement.replica_share(0, device_node)
        counts = rng.integers(0, 50, (12, 10)) * 1.5
        tokens, per_device_expert = split.route(counts)
        assert tokens == pytest.approx(np.einsum("se,sed->sd", counts, dense), rel=1e-12)
        assert per_device_expert == pytest.approx(np.einsum("se,sed->de", counts, dense),
                                                  rel=1e-12)
        for src in range(12):
            assert np.array_equal(split.preferred_device(src), dense[src].argmax(axis=1))
        assert dense.sum(axis=2) == pytest.approx(1.0)


def _hierarchical_reference(choices, counts, raw, share, tokens, device_node, token_bytes):
    """The per-(source, node) loop the vectorised version replaced."""
    ep = tokens.shape[0]
    _, node_of = np.unique(device_node, return_inverse=True)
    num_nodes = node_of.max() + 1
    members = [np.flatnonzero(node_of == n) for n in range(num_nodes)]
    rank_in_node = np.zeros(ep, dtype=int)
    for m in members:
        rank_in_node[m] = np.arange(len(m))
    kept = np.divide(counts, raw, out=np.ones_like(counts), where=raw > 0)
    src, dst, nbytes = [], [], []
    # Expected network copies per (source, node), token by token: a token reaches node b unless
    # each of its experts' copies goes elsewhere (its source's replica shares, summed per node).
    fanout = np.zeros((ep, num_nodes))
    for token, experts in zip(choices.source, choices.experts, strict=True):
        for b in range(num_nodes):
            miss = 1.0
            for e in experts:
                miss *= 1.0 - share[token, e, members[b]].sum()
            fanout[token, b] += (1.0 - miss) * choices.weight
    for n in range(num_nodes):
        for s in members[n]:
            for b in range(num_nodes):
                if b == n:
                    continue
                relay = members[b][rank_in_node[s] % len(members[b])]
                src.append([s]), dst.append([relay])
                nbytes.append([fanout[s, b] * kept.mean(axis=1)[s] * token_bytes])
                src.append(np.full(len(members[b]), relay)), dst.append(members[b])
                nbytes.append(tokens[s, members[b]] * token_bytes)
            src.append(np.full(len(members[n]), s)), dst.append(members[n])
            nbytes.append(tokens[s, members[n]] * token_bytes)
    return merge_flows(np.concatenate(src), np.concatenate(dst), np.concatenate(nbytes), ep)


def test_vectorised_hierarchical_flows_equal_the_loop():
    rng = np.random.default_rng(5)
    for trial in range(4):
        placement = _random_placement(rng)
        device_node = np.repeat([3, 8, 9], [5, 4, 3]) if trial % 2 else np.arange(12) // 4
        device_node = rng.permutation(device_node) if trial >= 2 else device_node
        p = routing.expert_popularity(10, "zipf", rng, zipf_s=1.0)
        choices = routing.sample_layer(p, num_sources=12, tokens_per_source=40, top_k=3,
                                       rng=rng)
        raw = routing.counts_from_choices(choices, 12, 10)
        counts, _ = routing.apply_capacity(raw, 40, 3, 1.0 if trial == 3 else None)
        split = placement.replica_split(0, device_node)
        tokens, _ = split.route(counts)
        got = _hierarchical_flows(choices, counts, raw, split, tokens, device_node, 7.0)
        want = _hierarchical_reference(choices, counts, raw, split.dense(), tokens,
                                       device_node, 7.0)
        assert np.array_equal(got[0], want[0])
        assert got[1] == pytest.approx(want[1], rel=1e-9)     # same flows, same bytes


# --- the routing sampler ---


def _brute_force_choices(popularity, *, sources, tokens, k, expert_node, max_nodes, seed):
    """Read the sampler's random stream token by token: keys ``log(u) / p``, DeepSeek-V3's node
    scores (sum of the ceil(k/M) highest distinct affinities -1/key), the M best nodes, then the
    k best keys there. Returns the expert set of each token (and whether the node choice was
    clear-cut: no tie in node score at the M-th place)."""
    e = popularity.size
    picker = routing._TopK(e, k)
    e_pad = picker.b * picker.nb
    inv = np.full(e_pad, 1.0, np.float32)
    inv[:e] = (1.0 / np.maximum(popularity / popularity.sum(), 1e-30)).astype(np.float32)
    rng = np.random.default_rng(seed)
    t = sources * tokens
    bits = rng.bit_generator.random_raw(t * e_pad // 2).view(np.uint32).reshape(t, e_pad)
    u = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32)
    keys = np.log(u - np.float32(1 - 2.0**-24)) * inv
    r = -(-k // max_nodes)
    sets, clear = [], []
    for row in keys[:, :e]:
        affinity = np.float32(-1.0) / row
        score = {}
        for n in np.unique(expert_node):
            top = np.unique(affinity[expert_node == n])[::-1][:r]
            total = np.float32(0.0)
            for value in top:
                total = np.float32(total + value)
            score[n] = total
        ranked = sorted(score.values(), reverse=True)
        best = {n for n, v in score.items() if v >= ranked[max_nodes - 1]}
        clear.append(len(ranked) == max_nodes or ranked[max_nodes - 1] > ranked[max_nodes])
        allowed = np.flatnonzero(np.isin(expert_node, list(best)))
        sets.append(set(allowed[np.argsort(-row[allowed], kind="stable")[:k]].tolist()))
    return sets, clear


@pytest.mark.parametrize(("e", "k", "nodes", "max_nodes"), [(64, 6, 8, 3), (40, 4, 5, 2)])
def test_sampler_picks_what_the_rule_picks_on_the_same_random_stream(e, k, nodes, max_nodes):
    rng = np.random.default_rng(11)
    popularity = routing.expert_popularity(e, "zipf", rng, zipf_s=0.9)
    expert_node = rng.permutation(np.arange(e) % nodes)
    choices = routing.sample_layer(popularity, num_sources=2, tokens_per_source=600, top_k=k,
                                   rng=np.random.default_rng(4), max_tokens_per_source=600,
                                   expert_node=expert_node, max_nodes=max_nodes)
    want, clear = _brute_force_choices(popularity, sources=2, tokens=600, k=k,
                                       expert_node=expert_node, max_nodes=max_nodes, seed=4)
    got = [set(row.tolist()) for row in choices.experts]
    assert sum(clear) > 0.99 * len(clear)
    assert all(g == w for g, w, c in zip(got, want, clear) if c)


def test_node_scores_fast_path_equals_reference_form_with_ties():
    rng = np.random.default_rng(2)
    e, n, per, t = 24, 4, 6, 300
    slots = rng.permutation(e).reshape(n, per)
    keys = -rng.integers(1, 5, (e, t)).astype(np.float32)   # many equal keys within a node
    keys[rng.random((e, t)) < 0.1] = -np.inf
    for r in (1, 2, 3, per - 1, per):
        fast = routing._top_affinity_sums(keys[slots.ravel()].reshape(n, per, t), r)
        assert fast is not None
        if r < per:      # the r highest distinct affinities
            assert np.array_equal(fast, routing._node_scores(keys, e, slots, r))
        else:            # every affinity counts, equal ones too
            assert np.array_equal(fast, (np.float32(-1.0) / keys[slots.T]).sum(axis=0))


def test_tiled_transpose_equals_plain_transpose():
    rng = np.random.default_rng(0)
    for shape in [(64, 96), (50, 64), (32, 32), (7, 5)]:
        bits = rng.integers(0, 2**32, shape, dtype=np.uint32)
        out = np.empty(shape[::-1], dtype=np.uint32)
        routing._transpose_shift(bits, out)
        assert np.array_equal(out, bits.T >> np.uint32(9))


def test_sample_routing_reuses_draws_read_only():
    spec = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml").routing
    kw = dict(num_experts=8, num_layers=2, num_sources=2, tokens_per_source=64, top_k=2)
    first = list(routing_draw.sample_routing(spec, seed=1, **kw))
    again = list(routing_draw.sample_routing(spec, seed=1, **kw))
    other = list(routing_draw.sample_routing(spec, seed=2, **kw))
    assert all(a is b for a, b in zip(first, again))
    assert not np.array_equal(first[0].experts, other[0].experts)
    with pytest.raises(ValueError, match="read-only"):
        first[0].experts[0, 0] = 0
