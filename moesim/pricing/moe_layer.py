"""One routed MoE layer of one EP group: its traffic, its expert kernels and its price.

:func:`layer_traffic` is the one place that turns routing choices and a placement into the
layer's flows with the scenario's sizes and dtypes; :func:`expert_times` prices each device's
grouped GEMM; :func:`price_layer` adds the two all-to-alls and the slowest device's expert
compute, the planner's objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim import routing, traffic
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import layer_alltoall_times
from moesim.pricing.context import PricingContext

__all__ = ["LayerPrice", "layer_traffic", "expert_times", "permute_time", "price_layer"]


def layer_traffic(ctx: PricingContext, choices: routing.LayerChoices, placement: Placement,
                  layer: int, failed: np.ndarray | None = None) -> traffic.LayerTraffic:
    """Flows of MoE layer ``layer`` (the placement's layer index) for the tokens ``choices``.

    ``failed: bool[ep]`` devices of the group that send nothing and serve nothing.
    """
    s = ctx.scenario
    # Under expert tensor parallelism with EP each source stands for its etp ranks' tokens,
    # which they send in parallel, 1 / etp of them each (Megatron-Core): one member's share.
    share = 1.0 / ctx.layout.ep_stride
    return traffic.layer_traffic(
        choices, placement, layer, device_node=ctx.device_node,
        tokens_per_source=ctx.tokens_per_source, hidden=ctx.hidden,
        dispatch_bytes_per_elem=ctx.dispatch_bytes_per_elem,
        combine_bytes_per_elem=ctx.combine_bytes_per_elem,
        capacity_factor=s.model.capacity_factor, top_k=ctx.top_k, algorithm=ctx.algorithm,
        failed=failed, copy_share=share)


def expert_times(ctx: PricingContext, flows: traffic.LayerTraffic) -> np.ndarray:
    """float[ep]: each device's routed-expert grouped GEMM over its slots' tokens (seconds)."""
    return ctx.timer.experts_per_device(flows.slot_tokens)


def permute_time(ctx: PricingContext, flows: traffic.LayerTraffic) -> float:
    """Permute before and unpermute after the experts (two memory-bound kernels), on the device
    that permutes the most token copies: each copy is read and written once each way."""
    return ctx.timer.permute(float(flows.tokens.sum(axis=1).max()))


@dataclass(frozen=True)
class LayerPrice:
    """Predicted cost of one MoE layer (seconds, bytes)."""

    dispatch: float
    combine: float
    compute: float            # slowest device's expert GEMM
    cross_node_bytes: float   # dispatch + combine
    max_over_mean: float      # device load (token-expert pairs computed), max / mean

    @property
    def alltoall(self) -> float:
        return self.dispatch + self.combine

    @property
    def layer_time(self) -> float:
        return self.dispatch + self.combine + self.compute


def price_layer(ctx: PricingContext, choices: routing.LayerChoices, placement: Placement,
                layer: int, *, exact: bool = False) -> LayerPrice:
    """Dispatch + combine + the slowest device's expert compute of one MoE layer.

    ``exact=False`` prices the all-to-alls by the closed form, ``True`` flow-level, exactly as the
    simulator charges them.
    """
    flows = layer_traffic(ctx, choices, placement, layer)
    dispatch, combine = layer_alltoall_times(ctx, flows, exact=exact)
    load = flows.slot_tokens.sum(axis=1)
    mean = float(load.mean())
    balance = float(load.max()) / mean if mean > 0 else 1.0
    cross = flows.cross_node_dispatch_bytes * (
        1.0 + ctx.combine_bytes_per_elem / ctx.dispatch_bytes_per_elem)
    return LayerPrice(dispatch, combine, float(expert_times(ctx, flows).max()), cross, balance)
