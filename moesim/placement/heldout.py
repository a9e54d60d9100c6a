"""Held-out evaluation: how a plan does on routing it was not planned on.

:func:`load_any_layout` reads a per-token trace stored ``[layers, tokens, k]`` (moesim's layout)
or ``[tokens, layers, k]`` (how most recorders dump it): the file may say which in a ``layout``
string array, else the caller's ``layout``, else the shape decides against the model's MoE layer
count. :func:`every_token` deals *all* the trace's tokens (or a deterministic sample) over the EP
group's devices, each standing for the real tokens of the workload's batch, so a plan is scored
on the whole held-out trace. :func:`score` prices a plan on them with the objective's pricing
(:func:`moesim.placement.objective.plan_cost`) and adds the cross-node sends per token: the
expected number of other nodes a token's dispatch reaches under the placement's replica rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim import routing, routing_trace
from moesim.errors import TraceError
from moesim.placement import objective
from moesim.placement.placement import Placement
from moesim.pricing.context import PricingContext

__all__ = ["LAYOUTS", "load_any_layout", "every_token", "sends_per_token", "HeldOutScore",
           "score"]

LAYOUTS = ("auto", "layers,tokens,k", "tokens,layers,k")


def load_any_layout(path: str | Path, *, num_experts: int, num_layers: int, top_k: int | None,
                    layout: str = "auto") -> routing_trace.RoutingTrace:
    """A routing trace from ``.npz`` in either token layout (``.csv`` and counts-only archives
    go to :func:`moesim.routing_trace.load_trace` unchanged).

    Raises
    ------
    TraceError
        Unknown layout, or a shape that fits neither layout for ``num_layers`` MoE layers.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise TraceError(f"{path}: layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if path.suffix.lower() != ".npz" or not path.is_file():
        return routing_trace.load_trace(path, num_experts, num_layers, top_k)
    try:
        with np.load(path, allow_pickle=False) as archive:
            fields = {name: archive[name] for name in archive.files}
    except Exception as exc:   # numpy raises ValueError, OSError or zipfile errors here
        raise TraceError(f"{path}: not a readable .npz archive ({exc})") from None
    ids = fields.get("expert_ids")
    if ids is None or ids.ndim != 3:
        return routing_trace.load_trace(path, num_experts, num_layers, top_k)
    declared = fields.get("layout")
    if declared is not None:
        said = str(declared.reshape(-1)[0]).replace(" ", "") if declared.size else ""
        if said not in LAYOUTS[1:]:
            raise TraceError(f"{path}: layout array says {said!r}; allowed: "
                             f"{', '.join(LAYOUTS[1:])}")
        if layout != "auto" and layout != said:
            raise TraceError(f"{path}: the file says layout {said!r} but {layout!r} was asked")
        layout = said
    if layout == "auto":
        if ids.shape[0] == num_layers:
            layout = LAYOUTS[1]
        elif ids.shape[1] == num_layers:
            layout = LAYOUTS[2]
        else:
            raise TraceError(f"{path}: expert_ids has shape {ids.shape}; neither axis 0 "
                             f"([layers, tokens, k]) nor axis 1 ([tokens, layers, k]) is the "
                             f"model's {num_layers} MoE layers")
    if layout == LAYOUTS[2]:
        fields["expert_ids"] = np.ascontiguousarray(ids.transpose(1, 0, 2))
    fields = {k: v for k, v in fields.items() if k in ("expert_ids", "num_experts")}
    return routing_trace.validated_trace(str(path), fields, num_experts, num_layers, top_k)


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
