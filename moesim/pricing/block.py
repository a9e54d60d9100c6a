"""What one transformer block costs one EP group for one micro-batch: the pieces the engine orders.

Every device of the group runs attention (and its tensor-parallel all-reduce), then either a dense
FFN or an MoE layer: gate, dispatch all-to-all, its expert slots' grouped GEMM (the work differs
per device with the routing), shared experts, combine all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim import routing
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import EMPTY, Collective, layer_alltoalls
from moesim.pricing.collectives import tp_all_reduce_time
from moesim.pricing.context import PricingContext
from moesim.pricing.moe_layer import expert_times, layer_traffic, permute_time
from moesim.traffic import LayerTraffic

__all__ = ["BlockCost", "block_cost"]


@dataclass(frozen=True, eq=False)
class BlockCost:
    """Forward costs of one block for one micro-batch on one EP group (seconds)."""

    layer: int
    attention: float
    tp_comm: float
    gate: float
    ffn: float                       # dense FFN or shared experts (same on every device)
    experts: np.ndarray              # float[ep] routed-expert grouped GEMM per device
    permute: float                   # token permute/unpermute (memory-bound)
    dispatch: Collective = EMPTY
    combine: Collective = EMPTY
    traffic: LayerTraffic | None = None

    @property
    def is_moe(self) -> bool:
        return self.traffic is not None


def block_cost(ctx: PricingContext, layer: int, choices: routing.LayerChoices | None,
               placement: Placement, failed: np.ndarray | None = None) -> BlockCost:
    """Forward costs of block ``layer``; ``choices``: its routing (None for a dense block)."""
    s, t = ctx.scenario, ctx.timer
    tokens = ctx.tokens_per_source   # per device: the MoE layer's share (split by TP under SP)
    # Tensor-parallel parts (attention, dense FFN, shared experts) see the whole sequence and
    # split their weights/heads over TP; KernelTimer divides their work by tp.
    par = s.parallelism
    dense_tokens = tokens * par.tp if par.sequence_parallel else tokens
    context, kv = ctx.context_length()
    attention = t.attention(dense_tokens, context, kv)
    tp_comm = tp_all_reduce_time(ctx, dense_tokens)
    moe_index = ctx.layout.moe_index(layer)
    if moe_index is None or choices is None:
        ffn = t.dense_ffn(dense_tokens, s.model.dense_ffn_size or 4 * ctx.hidden)
        return BlockCost(layer, attention, tp_comm, 0.0, ffn, np.zeros(par.ep), 0.0)
    flows = layer_traffic(ctx, choices, placement, moe_index, failed)
    dispatch, combine = layer_alltoalls(ctx, flows)
    return BlockCost(layer, attention, tp_comm, t.gate(tokens), t.shared_experts(dense_tokens),
                     expert_times(ctx, flows), permute_time(ctx, flows), dispatch, combine, flows)
