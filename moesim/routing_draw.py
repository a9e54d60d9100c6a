"""A scenario's routing, every MoE layer: drawn from its distribution or dealt from its trace.

:mod:`moesim.routing` holds the per-layer primitives (choices, popularity, capacity) and
:mod:`moesim.routing_trace` reads recorded traces; this module puts them together the way the
simulator and the planners both draw a scenario's routing, with a small cache so that repeated
draws of the same arguments (a planned placement, a faulted run's healthy twin) are shared.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from moesim.routing import (
    LayerChoices,
    balanced_layer,
    effective_top_k,
    expert_popularity,
    layer_rng,
    sample_layer,
)
from moesim.routing_trace import RoutingTrace, choices_from_trace, load_trace
from moesim.spec.scenario import RoutingSpec, Scenario

__all__ = ["sample_routing", "scenario_routing"]


def sample_routing(spec: RoutingSpec, *, num_experts: int, num_layers: int, num_sources: int,
                   tokens_per_source: int, top_k: int, seed: int, gating: str = "topk",
                   expert_node: np.ndarray | None = None,
                   trace: RoutingTrace | None = None) -> Iterator[LayerChoices]:
    """Yield the choices of layers ``0..num_layers-1`` of a scenario's routing.

    ``expert_node``: ``int[E]`` or ``int[layers, E]`` (needed when ``spec.node_limit`` > 0).
    ``spec.distribution == "trace"`` samples from ``trace`` (or loads ``spec.trace`` when None).

    The last few draws are kept (arrays read-only) and handed out again for the same arguments:
    a placement planned on the routing, a faulted run's healthy twin and a sweep's repeated
    points draw the same layers.
    """
    if spec.distribution == "trace" or trace is not None:       # a file may change: no reuse
        return _sample_layers(spec, num_experts, num_layers, num_sources, tokens_per_source,
                              top_k, seed, gating, expert_node, trace)
    nodes = None if expert_node is None else np.asarray(expert_node)
    key = (spec, num_experts, num_layers, num_sources, tokens_per_source, top_k, seed, gating,
           None if nodes is None else (nodes.shape, nodes.dtype.str, nodes.tobytes()))
    layers = _DRAWN.get(key)
    if layers is None:
        layers = list(_sample_layers(spec, num_experts, num_layers, num_sources,
                                     tokens_per_source, top_k, seed, gating, nodes, None))
        for choice in layers:
            choice.experts.flags.writeable = choice.source.flags.writeable = False
        _DRAWN[key] = layers
        while len(_DRAWN) > _DRAWN_KEPT:
            _DRAWN.popitem(last=False)
    _DRAWN.move_to_end(key)
    return iter(layers)


def scenario_routing(s: Scenario, *, tokens_per_source: float,
                     expert_node: np.ndarray | None = None,
                     node_limited: bool = True) -> list[LayerChoices]:
    """The routing of one EP group of scenario ``s``, every MoE layer, as the simulator draws it.

    ``node_limited=False`` draws the router's preferences with node-limited routing off: the
    planners use that, since the limit depends on the placement being chosen.
    """
    spec = s.routing
    if spec.node_limit and not node_limited:
        spec = replace(spec, node_limit=0)
    whole = max(1, round(tokens_per_source))
    layers = list(sample_routing(
        spec, num_experts=s.model.num_experts, num_layers=s.model.num_moe_layers,
        num_sources=s.parallelism.ep, tokens_per_source=whole,
        top_k=s.model.top_k, seed=s.seed, gating=s.model.gating,
        expert_node=expert_node if spec.node_limit else None))
    if whole != tokens_per_source:   # e.g. half of an odd micro-batch under two-batch overlap
        layers = [replace(c, weight=c.weight * tokens_per_source / whole) for c in layers]
    return layers


_DRAWN: OrderedDict[tuple, list[LayerChoices]] = OrderedDict()   # sample_routing's last draws
_DRAWN_KEPT = 2


def _sample_layers(spec: RoutingSpec, num_experts: int, num_layers: int, num_sources: int,
                   tokens_per_source: int, top_k: int, seed: int, gating: str,
                   expert_node: np.ndarray | None, trace: RoutingTrace | None
                   ) -> Iterator[LayerChoices]:
    k = effective_top_k(gating, top_k, num_experts)
    if spec.distribution == "trace" and trace is None:
        trace = load_trace(spec.trace, num_experts=num_experts, num_layers=num_layers)
    max_nodes = spec.node_limit or None
    for layer in range(num_layers):
        rng = layer_rng(seed, layer)
        nodes = None if expert_node is None else np.asarray(expert_node)
        if nodes is not None and nodes.ndim == 2:
            nodes = nodes[layer]
        if spec.distribution == "trace":
            assert trace is not None
            yield choices_from_trace(trace, layer, num_sources=num_sources,
                                     tokens_per_source=tokens_per_source, rng=rng, top_k=k,
                                     max_tokens_per_source=spec.max_tokens_per_source,
                                     expert_node=nodes, max_nodes=max_nodes)
        elif spec.distribution in ("balanced", "balanced_random"):
            yield balanced_layer(num_experts, num_sources=num_sources,
                                 tokens_per_source=tokens_per_source,
                                 top_k=k,
                                 max_tokens_per_source=spec.max_tokens_per_source,
                                 rng=rng if spec.distribution == "balanced_random" else None,
                                 expert_node=nodes, max_nodes=max_nodes)
        else:
            popularity = expert_popularity(
                num_experts, spec.distribution, rng, zipf_s=spec.zipf_s,
                dirichlet_alpha=spec.dirichlet_alpha, hot_experts=spec.hot_experts,
                hot_fraction=spec.hot_fraction)
            yield sample_layer(
                popularity, num_sources=num_sources, tokens_per_source=tokens_per_source,
                top_k=top_k, rng=rng, max_tokens_per_source=spec.max_tokens_per_source,
                coactivation_groups=spec.coactivation_groups,
                coactivation_strength=spec.coactivation_strength, expert_node=nodes,
                max_nodes=max_nodes, gating=gating)


