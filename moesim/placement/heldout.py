"""Held-out evaluation: how a plan does on routing it was not planned on.

A held-out trace is read by :func:`moesim.routing_trace.load_trace` (either token layout).
:func:`every_token` deals *all* the trace's tokens (or a deterministic sample) over the EP
group's devices, each standing for the real tokens of the workload's batch, so a plan is scored
on the whole held-out trace. :func:`score` prices a plan on them with the objective's pricing
(:func:`moesim.placement.objective.plan_cost`) and adds the cross-node sends per token: the
expected number of other nodes a token's dispatch reaches under the placement's replica rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim import routing, routing_trace
from moesim.errors import TraceError
from moesim.placement import objective
from moesim.placement.placement import Placement
from moesim.pricing.context import PricingContext

__all__ = ["every_token", "sends_per_token", "HeldOutScore",
           "score"]

def every_token(ctx: PricingContext, trace: routing_trace.RoutingTrace, *,
                sample: int | None = None, seed: int = 0) -> list[routing.LayerChoices]:
    """Each layer's tokens of a per-token ``trace``: token ``i`` comes from device ``i % ep``;
    together they stand for the workload's batch (``ep * tokens_per_source`` real tokens), so
    byte and time prices are those of one batch whatever the trace's length.

    ``sample``: score this many tokens, drawn without replacement with ``seed`` (the same tokens
    in every layer, in time order); ``None`` scores every token.
    """
    if trace.expert_ids is None:
        raise TraceError(f"{trace.path}: held-out evaluation needs a per-token trace "
                         "(expert_ids), not counts")
    total = trace.expert_ids.shape[1]
    index = np.arange(total)
    if sample is not None and sample < total:
        index = np.sort(np.random.default_rng(seed).choice(total, size=sample, replace=False))
    weight = ctx.ep * ctx.tokens_per_source / index.size
    source = (np.arange(index.size) % ctx.ep).astype(np.int32)
    return [routing.LayerChoices(trace.expert_ids[layer, index].astype(np.int32), source, weight)
            for layer in range(trace.num_layers)]


def sends_per_token(ctx: PricingContext, choices: routing.LayerChoices, placement: Placement,
                    layer: int) -> float:
    """Expected number of nodes other than its own that one token's dispatch reaches.

    A token's expert ``e`` goes to node ``b`` with the share the replica rule gives (1 or 0 with
    one replica); its experts choose replicas independently, so node ``b`` is reached with
    probability ``1 - prod_e (1 - share_e(b))``. Hierarchical and DeepEP dispatch send one copy
    per such node.
    """
    ep = placement.ep
    counts = routing.counts_from_choices(choices, ep, placement.num_experts)
    share = placement.replica_split(layer, ctx.device_node, counts=counts).dense()  # [s, E, d]
    _, node_of = np.unique(np.asarray(ctx.device_node), return_inverse=True)
    node_of = node_of.ravel()
    nodes = int(node_of.max()) + 1
    to_node = np.zeros(share.shape[:2] + (nodes,))
    for b in range(nodes):
        to_node[:, :, b] = share[:, :, node_of == b].sum(axis=2)
    miss = np.ones((choices.num_tokens, nodes))
    for j in range(choices.top_k):
        miss *= 1.0 - to_node[choices.source, choices.experts[:, j]]
    reach = 1.0 - miss
    reach[np.arange(choices.num_tokens), node_of[choices.source]] = 0.0
    return float(reach.sum() / max(choices.num_tokens, 1))


@dataclass(frozen=True)
class HeldOutScore:
    """A plan on held-out tokens: sends per token (mean over layers) and the objective's costs."""

    sends_per_token: float
    cost: objective.PlanCost

    def as_dict(self) -> dict[str, float]:
        return {"sends_per_token": self.sends_per_token, **self.cost.as_dict()}


def score(ctx: PricingContext, choices: list[routing.LayerChoices], placement: Placement, *,
          exact: bool = False) -> HeldOutScore:
    """:class:`HeldOutScore` of ``placement`` on ``choices`` (one entry per MoE layer)."""
    sends = np.mean([sends_per_token(ctx, choices[i], placement, i)
                     for i in range(placement.num_layers)])
    return HeldOutScore(float(sends), objective.plan_cost(ctx, choices, placement, exact=exact))
