"""Per-step prices outside the blocks: micro-batches, the optimizer update, model FLOPs."""

from __future__ import annotations

from moesim.kernels import memory_time
from moesim.memory import stage_params
from moesim.pricing.context import PricingContext
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import (
    Scenario,
    draft_passes,
    micro_batches,
    mtp_blocks,
    tokens_per_sequence,
)

__all__ = ["micro_batches", "optimizer_time", "optimizer_bytes_per_param",
           "model_flops_per_token", "heads_time", "logit_tokens"]


def optimizer_bytes_per_param(s: Scenario) -> float:
    """HBM bytes the Adam update moves per parameter (a memory-bound kernel).

    Read the gradient; read and write the optimizer state; with FP32 master weights read and
    write the master copy and write the model weight, else read and write the weight itself
    (the same bytes :mod:`moesim.memory` charges for each).
    """
    prec = s.precision
    weights = dtype_bytes(prec.weights)
    params = 2 * 4.0 + weights if prec.master_weights else 2 * weights
    return 2 * prec.optimizer_state_bytes + dtype_bytes(prec.gradients) + params


def optimizer_time(ctx: PricingContext, stage: int) -> float:
    """The optimizer step of one stage's busiest device (ZeRO >= 1 shards it over DP)."""
    s = ctx.scenario
    if s.workload.mode != "training":
        return 0.0
    par = s.parallelism
    dense, experts = stage_params(s, ctx.layout, stage)
    shard = par.dense_dp if par.zero_stage >= 1 else 1
    eshard = ctx.layout.expert_dp if par.zero_stage >= 1 else 1
    nbytes = (dense / shard + experts / eshard) * optimizer_bytes_per_param(s)
    return memory_time(nbytes, s.hardware.device, kernels=1)   # one fused multi-tensor kernel


def model_flops_per_token(s: Scenario) -> float:
    """Model FLOPs per token: 2 per active weight per token forward (x3 for training), plus
    attention scores (QK^T and AV over the average causal context), excluding the input embedding
    lookup. This is the PaLM/Megatron MFU convention (6N + attention for training)."""
    m, wl = s.model, s.workload
    counts = m.param_counts()
    input_embedding = m.vocab_size * m.hidden_size
    dense = 2.0 * (counts.active - input_embedding)
    context = wl.context_len + 1 if wl.mode == "decode" else wl.seq_len / 2
    attn_proj = 2.0 * (m.attention_params - 2 * m.hidden_size)
    scores = (m.attention_flops_per_token(context) - attn_proj) * m.num_layers
    forward = dense + scores
    return 3.0 * forward if wl.mode == "training" else forward


def heads_time(ctx: PricingContext) -> float:
    """The LM head (and loss) of the last stage, plus each MTP module's projection and its
    own pass through the shared head: trained at the step's tokens, or, drafting in decode,
    once per draft pass at one token per sequence (the passes' blocks are
    :func:`moesim.sim.simulate`'s)."""
    t, h, s = ctx.timer, ctx.hidden, ctx.scenario

    def mtp_pass(tokens: float) -> float:   # the [2h -> h] projection and the shared head
        return t.gemm(tokens, h, 2 * h) + t.lm_head(tokens)

    # Only kernels that run are priced (a measured profile counts which table served each).
    heads = t.lm_head(logit_tokens(ctx))
    if mtp := mtp_blocks(s):
        heads += mtp * mtp_pass(ctx.group_microbatch_tokens)
    if drafts := draft_passes(s):
        heads += drafts * mtp_pass(ctx.group_microbatch_tokens / tokens_per_sequence(s))
    return heads


def logit_tokens(ctx: PricingContext) -> float:
    """Tokens per device per micro-batch whose logits are computed: every token in training,
    the last token of each prompt in prefill (its next token), every token in decode."""
    wl = ctx.scenario.workload
    tokens = ctx.group_microbatch_tokens   # the head splits the vocabulary over TP
    if wl.mode == "prefill":
        return tokens / wl.seq_len
    return tokens
