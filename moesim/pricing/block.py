"""What one transformer block costs one EP group for one micro-batch: the pieces the engine orders.

Every device of the group runs attention (and its tensor-parallel all-reduce), then either a dense
FFN or an MoE layer: gate, dispatch all-to-all, its expert slots' grouped GEMM (the work differs
per device with the routing), shared experts, combine all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim import routing
from moesim.memory import saved_activation_dtype, saved_bytes_per_token_layer
from moesim.placement.placement import Placement
from moesim.pricing.alltoall import EMPTY, Collective, layer_alltoalls
from moesim.pricing.collectives import (
    cp_exchange_time,
    cp_gathered_kv_bytes,
    expert_tp_gather_time,
    tp_all_reduce_time,
)
from moesim.pricing.context import PricingContext
from moesim.pricing.moe_layer import expert_times, layer_traffic, permute_time
from moesim.spec.hardware import dtype_bytes
from moesim.traffic import LayerTraffic

__all__ = ["BlockCost", "block_cost", "attention_part", "ffn_tp_comm", "cp_wait",
           "shared_part",
           "saved_activation_cast",
           "selective_recompute_time", "recomputed_modules", "recomputes"]


@dataclass(frozen=True, eq=False)
class BlockCost:
    """Forward costs of one block for one micro-batch on one EP group (seconds)."""

    layer: int
    attention: float
    tp_comm: float
    gate: float
    ffn: float                       # dense FFN, or shared experts + adding their output
    experts: np.ndarray              # float[ep] routed-expert grouped GEMM per device
    permute: float                   # token permute/unpermute (memory-bound)
    dispatch: Collective = EMPTY
    combine: Collective = EMPTY
    traffic: LayerTraffic | None = None
    recompute: float = 0.0           # forward work re-run before this block's backward (selective)
    recompute_moe: bool = False      # selective "moe": the MoE layer's forward ops run again
    cp_comm: float = 0.0             # attention's wait on context parallelism, forward
    cp_comm_backward: float = 0.0    # the same in the backward

    @property
    def is_moe(self) -> bool:
        return self.traffic is not None


def block_cost(ctx: PricingContext, layer: int, choices: routing.LayerChoices | None,
               placement: Placement, failed: np.ndarray | None = None) -> BlockCost:
    """Forward costs of block ``layer``; ``choices``: its routing (None for a dense block)."""
    s, t = ctx.scenario, ctx.timer
    par = s.parallelism
    moe_index = ctx.layout.moe_index(layer)
    dense_tokens, attention, tp_comm = attention_part(ctx, moe_index is not None
                                                      and choices is not None)
    cp_comm, cp_back = cp_wait(ctx, dense_tokens)
    if moe_index is None or choices is None:
        ffn = t.dense_ffn(dense_tokens, s.model.dense_ffn_size or 4 * ctx.hidden)
        tp_comm += ffn_tp_comm(ctx, dense_tokens, None)
        return BlockCost(layer, attention, tp_comm, 0.0, ffn, np.zeros(par.ep), 0.0,
                         recompute=selective_recompute_time(ctx, dense_tokens, ctx.held_tokens,
                                                            None),
                         cp_comm=cp_comm, cp_comm_backward=cp_back)
    flows = layer_traffic(ctx, choices, placement, moe_index, failed)
    dispatch, combine = layer_alltoalls(ctx, flows)
    tp_comm += ffn_tp_comm(ctx, dense_tokens, flows)
    return BlockCost(layer, attention, tp_comm, t.gate(ctx.held_tokens),
                     shared_part(ctx, dense_tokens),
                     expert_times(ctx, flows), permute_time(ctx, flows), dispatch, combine, flows,
                     selective_recompute_time(ctx, dense_tokens, ctx.held_tokens, flows),
                     recompute_moe=recomputes(ctx, "moe"), cp_comm=cp_comm,
                     cp_comm_backward=cp_back)


def recomputed_modules(ctx: PricingContext) -> tuple[str, ...]:
    """The modules a training step's selective recomputation re-runs before each block's
    backward (``memory.recompute_modules``; the attention core when none is listed); none
    outside training or without ``memory.recompute: selective``."""
    memory = ctx.scenario.memory
    if ctx.scenario.workload.mode != "training" or memory.recompute != "selective":
        return ()
    return memory.recompute_modules or ("core_attn",)


def recomputes(ctx: PricingContext, module: str) -> bool:
    """Whether selective recomputation re-runs ``module`` (:func:`recomputed_modules`)."""
    return module in recomputed_modules(ctx)


def attention_part(ctx: PricingContext, moe: bool) -> tuple[float, float, float]:
    """(tokens the tensor-parallel parts see, attention seconds, its TP all-reduce's seconds) of
    an MoE (``moe``) or dense block; the attention op also carries the block's cast of what it
    saves for the backward (:func:`saved_activation_cast`).

    Tensor-parallel parts (attention, dense FFN, shared experts) see the whole sequence under
    sequence parallelism and split their weights/heads over TP (KernelTimer divides by tp).
    Under context parallelism they see this rank's share of each sequence, whose queries still
    attend to the whole causal context (the context length is the sequence's); the ring runs
    the attention core as ``cp`` kernels, each with a correction of the partial outputs, so
    ``2 (cp - 1)`` kernels more than one fused call (their fixed cost is charged here; the
    exchange is :func:`cp_wait`); the all-to-all variant runs one fused call over its heads;
    the all-gather variant copies the gathered keys and values into sequence order and runs
    the core as two calls, one per chunk of the rank's queries.
    """
    s = ctx.scenario
    par = s.parallelism
    dense_tokens = ctx.group_tokens
    context, kv = ctx.context_length()
    attention = ctx.timer.attention(dense_tokens, context, kv) + saved_activation_cast(ctx, moe)
    if s.communication.cp_algorithm == "ring":
        attention += 2 * (par.cp - 1) * ctx.timer.device.kernel_overhead
    elif s.communication.cp_algorithm == "all_gather" and par.cp > 1:
        # The gathered keys and values reordered into sequence order (one copy each), and the
        # core run as two calls, one per chunk of this rank's queries.
        attention += (ctx.timer.elementwise(2 * cp_gathered_kv_bytes(ctx, dense_tokens),
                                            kernels=2)
                      + ctx.timer.device.kernel_overhead)
    return dense_tokens, attention, tp_all_reduce_time(ctx, dense_tokens)


def ffn_tp_comm(ctx: PricingContext, dense_tokens: float, flows: LayerTraffic | None
                ) -> float:
    """Forward seconds of a block's FFN sub-layer's tensor-parallel communication, on
    ``dense_tokens`` (its TP group's tokens); ``flows``: the MoE layer's traffic (None for a
    dense FFN).

    - A dense FFN, or every expert split over the whole TP group without EP: the all-reduce of
      its output (under sequence parallelism an all-gather of its input and a reduce-scatter
      of its output, the same bytes).
    - Expert tensor parallelism with EP, or over part of the TP group: the expert-TP group's
      all-gather and reduce-scatter of the token copies its EP rank receives
      (:func:`expert_tp_gather_time`, on the busiest rank of ``flows``), plus the shared
      experts' exchange.
    - Whole experts (``etp`` 1) under TP: each rank routes its own share of the group's tokens
      and gets their outputs back from the combine, so the routed experts need no TP
      collective (Megatron-Core's all-to-all dispatcher gathers over the *expert* TP group
      only; without sequence parallelism the attention's all-reduce is a reduce-scatter before
      the layer and an all-gather after it, the same bytes); only the shared experts, split
      over TP, exchange their input and output. With the ``replicated`` dispatch every rank
      runs its experts on all the group's tokens, and the all-reduce sums their partial
      outputs.
    """
    par = ctx.scenario.parallelism
    if flows is None or (par.ep <= 1 and par.etp == par.tp) or (
            par.etp <= 1 and ctx.scenario.communication.alltoall == "replicated"):
        return tp_all_reduce_time(ctx, dense_tokens)
    shared = (tp_all_reduce_time(ctx, dense_tokens) if ctx.scenario.model.num_shared_experts
              else 0.0)
    return shared + expert_tp_gather_time(ctx, float(flows.slot_tokens.sum(axis=1).max()))


def cp_wait(ctx: PricingContext, dense_tokens: float) -> tuple[float, float]:
    """(forward, backward) seconds attention waits on context parallelism beyond its own
    compute (:func:`moesim.pricing.collectives.cp_exchange_time` against this rank's attention
    core); (0, 0) without context parallelism."""
    if ctx.scenario.parallelism.cp <= 1:
        return 0.0, 0.0
    context, kv = ctx.context_length()
    return cp_exchange_time(ctx, dense_tokens, ctx.timer.attention_core(dense_tokens, context,
                                                                        kv))


def shared_part(ctx: PricingContext, dense_tokens: float) -> float:
    """An MoE block's shared experts on the tokens the tensor-parallel parts see, plus adding
    their output into the routed experts' on this device's tokens."""
    t = ctx.timer
    return t.shared_experts(dense_tokens) + t.shared_output_add(ctx.held_tokens)


def saved_activation_cast(ctx: PricingContext, moe: bool) -> float:
    """Forward seconds a training block spends casting what it saves for the backward
    (:func:`moesim.memory.saved_bytes_per_token_layer`) into ``precision.saved_activations``
    when that is narrower than the activations (read them, write the narrow copy; the engine's
    backward, twice the forward, covers casting them back), on this device's tokens. 0 when
    nothing is narrowed or outside training."""
    s = ctx.scenario
    narrow = dtype_bytes(saved_activation_dtype(s))
    if s.workload.mode != "training" or narrow >= ctx.activation_bytes:
        return 0.0
    elements = saved_bytes_per_token_layer(s, moe) / narrow
    return ctx.timer.elementwise(ctx.share_tokens * elements * (ctx.activation_bytes + narrow))


def selective_recompute_time(ctx: PricingContext, dense_tokens: float, tokens: float,
                             flows: LayerTraffic | None) -> float:
    """Forward seconds that selective recomputation re-runs before a block's backward:
    ``memory.recompute_modules`` (default: the attention core); 0 unless ``selective``. The
    whole MoE layer (``moe``) is not in this sum: its ops, all-to-alls included, run again as
    ops (:attr:`BlockCost.recompute_moe`), and its parts (``moe_act``, ``shared_experts``) are
    then not counted twice."""
    modules = recomputed_modules(ctx)
    if not modules:
        return 0.0
    if flows is not None and "moe" in modules:
        modules = tuple(m for m in modules if m not in ("moe_act", "shared_experts"))
    t, h, ab = ctx.timer, ctx.hidden, ctx.activation_bytes
    total = 0.0
    if "core_attn" in modules:
        context, kv = ctx.context_length()
        total += t.attention_core(dense_tokens, context, kv)
    if "layernorm" in modules:          # the block's two norms: read and write h each
        total += t.elementwise(2 * 2 * tokens * h * ab, kernels=2)
    a = ctx.scenario.model.attention
    if "mla_up_proj" in modules and a.kind == "mla":   # q_b and kv_b on this rank's heads
        heads = a.num_heads / ctx.scenario.parallelism.tp
        d, v = ctx.scenario.model.head_dim, a.v_head_dim or ctx.scenario.model.head_dim
        if a.q_lora_rank:
            total += t.gemm(dense_tokens, heads * (d + a.qk_rope_head_dim), a.q_lora_rank)
        total += t.gemm(dense_tokens, heads * (d + v), a.kv_lora_rank)
    if "moe_act" in modules and flows is not None:   # SwiGLU over the busiest device's copies
        copies = float(flows.slot_tokens.sum(axis=1).max())
        f = ctx.scenario.model.expert_ffn_size / ctx.scenario.parallelism.etp
        total += t.elementwise(copies * 3 * f * ab)
    if "shared_experts" in modules and flows is not None:
        total += t.shared_experts(dense_tokens)
    if "mlp" in modules and flows is None:           # a dense block's FFN
        total += t.dense_ffn(dense_tokens, ctx.scenario.model.dense_ffn_size or 4 * h)
    return total
