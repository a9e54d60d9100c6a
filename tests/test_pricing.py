"""The pricing layer: one set of cost functions under both the simulator and the planner.

- no import cycles anywhere in moesim, function-local imports included, and the layering holds;
- the planner's exact price of a placement equals what the simulator charges for it;
- the registries (placement policies, engines, overlap schedules) are the ones the YAML allows;
- the cost formulas that moved here (DP sync, optimizer) match hand derivations.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from moesim import network
from moesim.assembly import scenario_placement, simulate
from moesim.errors import ScenarioError
from moesim.memory import stage_params
from moesim.placement import objective
from moesim.placement.registry import CLI_PLANNERS, PLACERS, placer
from moesim.pricing.collectives import dp_sync_time
from moesim.pricing.context import PricingContext
from moesim.pricing.step import optimizer_bytes_per_param, optimizer_time
from moesim.sim.costs import CostModel
from moesim.sim.simulate import ENGINES
from moesim.sim.streams import SCHEDULES
from moesim.spec.scenario import CommunicationSpec, PlacementSpec, SimulationSpec, load_scenario
from moesim.traffic import LAYER_ALGORITHMS

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "moesim"


def import_graph() -> nx.DiGraph:
    """moesim module -> moesim modules it imports, from every import statement in the AST
    (module level, inside functions, under TYPE_CHECKING alike). ``from moesim import x`` is an
    edge to ``moesim.x`` when that is a module; a package's own ``__init__`` counts as a module."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycle_in_moesim():
    graph = import_graph()
    assert len(graph) > 60                                    # every module was read
    assert list(nx.simple_cycles(graph)) == []


def test_the_import_graph_sees_function_local_imports(tmp_path):
    # The walker must find imports inside function bodies (the ones that used to hide cycles).
    graph = import_graph()
    assert graph.has_edge("moesim.cli", "moesim.assembly")   # imported inside _cmd_run


def test_layers_import_only_downwards():
    graph = import_graph()

    def reach(prefix: str) -> set[str]:
        return {t for m in graph if m.startswith(prefix) for t in nx.descendants(graph, m)}

    placement_types = {"moesim.placement", "moesim.placement.placement"}
    assert not {m for m in reach("moesim.pricing") if m.startswith(("moesim.sim",
                                                                     "moesim.placement"))
                } - placement_types
    assert not {m for m in reach("moesim.sim") if m.startswith("moesim.placement")
                } - placement_types
    assert not {m for m in reach("moesim.placement") if m.startswith("moesim.sim")}


# --- one price for a placement ------------------------------------------------------------------

AGREEMENT = {
    "tiny-cpu.yaml": [],                                            # fat tree, direct
    "switch-base-128-tpu.yaml": [],                                 # 3D torus
    "published/s2-gpt-oss-120b-automodel-64xh100.yaml": [],         # hierarchical, 8 nodes
    "mixtral-8x7b-infer-1node.yaml": ["communication.overlap=two_batch"],   # halved tokens
}


@pytest.mark.parametrize("name", sorted(AGREEMENT))
def test_planner_exact_price_equals_what_the_simulator_charges(name):
    s = load_scenario(REPO / "scenarios" / name, AGREEMENT[name])
    placement = scenario_placement(s)
    if name == "tiny-cpu.yaml":       # the whole simulation, as ``moesim run`` does it
        costs = simulate(s, placement=placement).costs
    else:
        costs = CostModel(PricingContext.from_scenario(s), placement)
    planner_ctx = PricingContext.from_scenario(s)        # built independently of the simulator's
    layers = list(s.model.moe_layer_ids)[:3]
    assert layers
    for layer in layers:
        moe = costs.ctx.layout.moe_index(layer)
        block = costs.block(layer)
        price = objective.layer_cost(planner_ctx, costs.choices[moe], placement, moe, exact=True)
        assert price.dispatch == pytest.approx(block.dispatch.duration, rel=1e-9, abs=0)
        assert price.combine == pytest.approx(block.combine.duration, rel=1e-9, abs=0)
        assert price.compute == pytest.approx(float(block.experts.max()), rel=1e-9, abs=0)
        assert block.dispatch.duration > 0 or name == "switch-base-128-tpu.yaml"


def test_allgather_layer_on_one_node_is_the_ring_in_its_fastest_protocol():
    # Shipped Mixtral decode: 8 H100 on NVSwitch, 64 tokens per GPU, BF16 hidden 4096. The
    # all-gather has each GPU send its 64 x 4096 x 2 = 524,288 bytes to 7 others: 7 x 524,288
    # bytes at B_eff = 450 GB/s x 0.822; the ring takes 7 steps, in the faster of the profile's
    # two protocols (fixed + 7 x per-step + transfer x 0.822 / protocol efficiency). The
    # reduce-scatter moves the same BF16 bytes back.
    s = load_scenario(REPO / "scenarios" / "mixtral-8x7b-infer-1node.yaml")
    assert s.communication.alltoall == "allgather" and s.precision.dispatch == "bf16"
    link = s.hardware.link("scale_up")
    transfer = 7 * 64 * 4096 * 2 / (450e9 * 0.822)
    expected = min(p.fixed + 7 * p.per_step + transfer * 0.822 / p.efficiency
                   for p in link.ring_protocols)
    assert len(link.ring_protocols) == 2
    ctx = PricingContext.from_scenario(s)
    placement = scenario_placement(s)
    costs = CostModel(ctx, placement)
    layer = s.model.moe_layer_ids[0]
    block = costs.block(layer)
    assert block.dispatch.duration == pytest.approx(expected, rel=1e-6)
    assert block.combine.duration == pytest.approx(expected, rel=1e-6)
    fast = objective.layer_cost(ctx, costs.choices[0], placement, 0)
    assert fast.dispatch == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("algorithm,scenario", [
    ("direct", "mixtral-8x7b-train-4node.yaml"), ("allgather", "mixtral-8x7b-train-4node.yaml"),
    ("allgather", "mixtral-8x7b-infer-1node.yaml")])
def test_closed_form_is_a_lower_bound_of_the_flow_price(algorithm, scenario):
    s = load_scenario(REPO / "scenarios" / scenario, [f"communication.alltoall={algorithm}"])
    ctx = PricingContext.from_scenario(s)
    placement = scenario_placement(s)
    costs = CostModel(ctx, placement)
    for moe in range(2):
        fast = objective.layer_cost(ctx, costs.choices[moe], placement, moe)
        exact = objective.layer_cost(ctx, costs.choices[moe], placement, moe, exact=True)
        assert 0 < fast.dispatch <= exact.dispatch * (1 + 1e-9)
        assert 0 < fast.combine <= exact.combine * (1 + 1e-9)
        assert fast.compute == exact.compute


# --- registries ---------------------------------------------------------------------------------

def _literal(cls: type, field: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(cls)[field]))


def test_the_yaml_allows_exactly_the_registered_names():
    assert _literal(PlacementSpec, "policy") == set(PLACERS)
    assert set(CLI_PLANNERS) == set(PLACERS) - {"file"}
    assert _literal(SimulationSpec, "mode") == set(ENGINES)
    assert _literal(CommunicationSpec, "overlap") == set(SCHEDULES)
    assert _literal(CommunicationSpec, "alltoall") == set(LAYER_ALGORITHMS)


def test_an_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ScenarioError, match=r"unknown placement policy 'best'.*eplb_global"):
        placer("best")


def test_eplb_global_runs_from_a_scenario():
    s = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml", ["placement.policy=eplb_global"])
    assert scenario_placement(s).name == "eplb_global"


# --- formulas that moved into the pricing layer ---------------------------------------------------

def test_optimizer_bytes_follow_master_weights(make_scenario):
    # Adam, 8 bytes of state, FP32 gradients: with an FP32 master copy, read+write master (8),
    # read+write state (16), read the gradient (4), write the BF16 weight (2) = 30 bytes;
    # without it, read+write the BF16 weight (4) + state (16) + gradient (4) = 24.
    with_master = make_scenario({"precision": {"weights": "bf16", "gradients": "fp32"}})
    without = make_scenario({"precision": {"weights": "bf16", "gradients": "fp32",
                                           "master_weights": False}})
    assert optimizer_bytes_per_param(with_master) == 30
    assert optimizer_bytes_per_param(without) == 24
    ctx = PricingContext.from_scenario(with_master)
    ratio = optimizer_time(ctx, 0) / optimizer_time(PricingContext.from_scenario(without), 0)
    assert ratio == pytest.approx(30 / 24)


def test_dp_sync_reduces_gradients_in_their_own_dtype(make_scenario):
    # Hand profile: 2 devices per node, 10 GB/s NICs with 5 us, 100 GB/s NVLink with 1 us.
    # dp=4 over 2 nodes, ep=1: the dense gradient ring's bottleneck is the NIC path.
    changes = {"parallelism": {"dp": 4, "ep": 1}, "precision": {"gradients": "fp32"}}
    s = make_scenario(changes)
    ctx = PricingContext.from_scenario(s)
    dense, experts = stage_params(s, ctx.layout, 0)
    path = ctx.topology.path_links(1, 2)                       # node 0 -> node 1
    bw = float(ctx.topology.capacity[path].min())
    lat = float(ctx.topology.latency[path].sum())
    # Dense parameters over dp and expert parameters over the expert-DP group (also 4 ranks
    # with ep=1): two ring all-reduces, each paying its own latency.
    def rings(nbytes_per_param: float) -> float:
        return sum(network.ring_all_reduce(p * nbytes_per_param, 4, bw, lat)
                   for p in (dense, experts))

    assert dp_sync_time(ctx, 0) == pytest.approx(rings(4), rel=1e-12)
    bf16 = make_scenario({**changes, "precision": {"gradients": "bf16"}})
    assert dp_sync_time(PricingContext.from_scenario(bf16), 0) == pytest.approx(rings(2),
                                                                               rel=1e-12)


def test_hierarchical_dp_sync_is_two_level(make_scenario):
    s = make_scenario({"parallelism": {"dp": 4, "ep": 1},
                       "communication": {"dp_algorithm": "hierarchical"}})
    ctx = PricingContext.from_scenario(s)
    dense, experts = stage_params(s, ctx.layout, 0)
    topo = ctx.topology
    intra, inter = topo.path_links(0, 1), topo.path_links(0, 2)
    expect = sum(network.hierarchical_all_reduce(                # FP32 gradients (default)
        p * 4, 2, 2, float(topo.capacity[intra].min()), float(topo.latency[intra].sum()),
        float(topo.capacity[inter].min()), float(topo.latency[inter].sum()))
        for p in (dense, experts))
    assert dp_sync_time(ctx, 0) == pytest.approx(expect, rel=1e-12)
    ring = make_scenario({"parallelism": {"dp": 4, "ep": 1}})
    assert dp_sync_time(ctx, 0) < dp_sync_time(PricingContext.from_scenario(ring), 0)


def test_context_halves_tokens_under_two_batch_overlap():
    base = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml")
    two = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml", ["communication.overlap=two_batch"])
    a, b = PricingContext.from_scenario(base), PricingContext.from_scenario(two)
    assert b.tokens_per_source == a.tokens_per_source / 2
    assert b.microbatch_tokens == a.microbatch_tokens == 256
    assert np.array_equal(a.group, [0, 1])


def test_deepep_normal_nvlink_flows_move_at_the_sms_rate(make_scenario):
    """One NVSwitch node of 4, DeepEP normal kernels: every flow is intra-node, so each device's
    NVLink egress drains at the kernel's SM rate (4 SMs x 2.5 GB/s = 10 GB/s) when that is below
    the 100 GB/s link, at the link rate otherwise, at comm_link_efficiency of it when that is
    lower (0.5: 50 GB/s); plus the path latency (1 us)."""
    for per_sm, efficiency, rate in (("2.5 GB/s", 1.0, 10e9), ("250 GB/s", 1.0, 100e9),
                                     ("250 GB/s", 0.5, 50e9), ("2.5 GB/s", 0.5, 10e9)):
        s = make_scenario({"communication": {"alltoall": "deepep_normal"},
                           "cluster": {"topology": "nvswitch", "nodes": 1}},
                          {"node": {"devices_per_node": 4},
                           "device": {"sm_count": 8, "comm_sm_fraction": 0.5,
                                      "comm_sm_bandwidth": per_sm,
                                      "comm_link_efficiency": efficiency}})
        block = CostModel(PricingContext.from_scenario(s), scenario_placement(s)).block(0)
        flows = block.traffic
        egress = np.bincount(flows.pairs[:, 0], weights=flows.dispatch_bytes, minlength=4)
        assert block.dispatch.duration == pytest.approx(egress.max() / rate + 1e-6, rel=1e-6)
    # The DeepEP kernel's own fixed cost (the scale-out class's figure) is paid inside the node.
    s = make_scenario({"communication": {"alltoall": "deepep_normal"},
                       "cluster": {"topology": "nvswitch", "nodes": 1}},
                      {"node": {"devices_per_node": 4},
                       "links": {"scale_out": {"collective_overhead": "10 us"}}})
    block = CostModel(PricingContext.from_scenario(s), scenario_placement(s)).block(0)
    egress = np.bincount(block.traffic.pairs[:, 0], weights=block.traffic.dispatch_bytes,
                         minlength=4)
    assert block.dispatch.duration == pytest.approx(egress.max() / 100e9 + 1e-6 + 10e-6,
                                                    rel=1e-6)


def test_the_scenario_chooses_the_replica_rule(make_scenario):
    """placement.replica_rule reaches the placement the simulator prices: the scenario's "even"
    prices exactly as the same placement with its rule replaced by hand, and differently from
    the engines' default rule when a hot expert has replicas. The YAML choices are the rules
    the placement knows."""
    from dataclasses import replace

    from moesim.placement.placement import REPLICA_RULES
    hint = typing.get_type_hints(PlacementSpec)["replica_rule"]
    literal = next(a for a in typing.get_args(hint) if a is not type(None))
    assert set(typing.get_args(literal)) == set(REPLICA_RULES)
    tokens, placements, ctxs = {}, {}, {}
    for rule in (None, "even"):
        s = make_scenario({"placement": {"policy": "eplb", "redundant_experts": 4,
                                         **({"replica_rule": rule} if rule else {})},
                           "cluster": {"topology": "nvswitch", "nodes": 1},
                           "routing": {"distribution": "zipf", "zipf_s": 1.2}},
                          {"node": {"devices_per_node": 4}})
        placements[rule] = scenario_placement(s)
        assert placements[rule].replica_rule == (rule or "least_loaded")
        ctxs[rule] = PricingContext.from_scenario(s)
        tokens[rule] = CostModel(ctxs[rule], placements[rule]).block(0).traffic.slot_tokens
    # The default scenario's placement with its rule replaced by hand prices as "even" does.
    by_hand = replace(placements[None], replica_rule="even")
    assert np.array_equal(CostModel(ctxs[None], by_hand).block(0).traffic.slot_tokens,
                          tokens["even"])
    assert not np.allclose(tokens["even"], tokens[None])
