"""Bytes each device holds at its peak: weights, gradients, optimizer state, activations, KV cache
and all-to-all buffers, compared with its memory capacity.

The busiest device of a pipeline stage is the one that matters: it holds the stage's dense weights
(split over tensor-parallel ranks), its expert slots (with replicas), and, in training, the
activations of the micro-batches in flight (1F1B keeps up to ``pp - stage`` of them; interleaving
adds ``(pp - 1) / vp``-ish more for the first stage). Optimizer state is split over the data-parallel
group by ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also weights.
Activation bytes per token per layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), with flash attention (no s^2 term) and the MLP term
replaced by the chosen experts' SwiGLU/GELU activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moesim.compute import kv_bytes_per_token, kv_shards
from moesim.errors import OutOfMemory
from moesim.layout import Layout
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import Scenario, mtp_held, tokens_per_sequence

__all__ = ["MemoryBreakdown", "stage_memory", "check_memory", "block_params", "stage_params",
           "zero3_regathers", "saved_activation_dtype", "saved_bytes_per_token_layer",
           "tokens_per_microbatch", "group_tokens_per_microbatch",
           "share_tokens_per_microbatch", "routed_tokens_per_microbatch"]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes on the busiest device of one pipeline stage."""

    stage: int
    dense_weights: float
    expert_weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float
    comm_buffers: float
    reserved: float
    capacity: float

    @property
    def total(self) -> float:
        return (self.dense_weights + self.expert_weights + self.gradients + self.optimizer
                + self.activations + self.kv_cache + self.comm_buffers + self.reserved)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def block_params(s: Scenario, layout: Layout, block: int | str) -> tuple[float, float]:
    """(dense params, expert params on one device) of MoE-model block ``block``: a layer id
    (attention with its share of any cross-attention, then the dense FFN, or the shared experts,
    router and this device's expert slots), ``"embedding"``, or ``"lm_head"`` (none when tied to
    the embedding on a single stage). Dense parameters before tensor parallelism splits them."""
    m, par = s.model, s.parallelism
    if block == "embedding":
        return float(m.vocab_size * m.hidden_size), 0.0
    if block == "lm_head":
        tied = m.tie_embeddings and par.pp == 1
        return (0.0 if tied else float(m.vocab_size * m.hidden_size)), 0.0
    dense: float = m.attention_params
    if m.cross_attention_layers:
        dense += m.cross_attention_layers * m.attention_params / m.num_layers
    if layout.moe_index(int(block)) is None:
        return dense + m.dense_ffn_params, 0.0
    slots = (m.num_experts + s.placement.redundant_experts) // par.ep
    return (dense + m.shared_expert_params + m.num_experts * m.hidden_size,
            float(slots * m.expert_params / par.etp))


def stage_params(s: Scenario, layout: Layout, stage: int) -> tuple[float, float]:
    """(dense params, expert params) held by one device of ``stage``: its blocks'
    (:func:`block_params`), the embedding on the first stage, the LM head and any MTP modules on
    the last."""
    m, par = s.model, s.parallelism
    blocks: list[int | str] = list(layout.stage_layers(stage))
    embedding, head = layout.holds_ends(stage)
    if embedding:
        blocks.append("embedding")
    if head:
        blocks.append("lm_head")
    dense, experts = (float(sum(part)) for part in zip(
        *(block_params(s, layout, b) for b in blocks), strict=True))
    mtp = mtp_held(s) if head else 0
    h = m.hidden_size
    # A multi-token-prediction module: two norms, a [2h -> h] projection, one MoE block.
    dense += mtp * (m.attention_params + m.shared_expert_params + m.num_experts * h
                    + 2 * h * h + 2 * h)
    slots = (m.num_experts + s.placement.redundant_experts) // par.ep
    experts += mtp * slots * m.expert_params / par.etp
    return dense / par.tp, experts


def zero3_regathers(s: Scenario) -> bool:
    """Whether a ZeRO-3 block's parameters are gathered again for its backward
    (``communication.zero3_reshard``; ``auto``: not under pipeline parallelism, as
    torchtitan-style FSDP2 stacks set ``reshard_after_forward``)."""
    mode = s.communication.zero3_reshard
    if mode == "auto":
        return s.parallelism.pp == 1
    return mode == "after_forward"


def group_tokens_per_microbatch(s: Scenario) -> float:
    """Tokens of a device's tensor-parallel group per micro-batch (per pipeline stage), what its
    TP-split parts run on: the group's share of each sequence under context parallelism."""
    wl, par = s.workload, s.parallelism
    return wl.micro_batch * tokens_per_sequence(s) / par.cp


def tokens_per_microbatch(s: Scenario) -> float:
    """Tokens one device holds per micro-batch between the TP-split parts: its group's, of
    which sequence parallelism leaves it ``1 / tp``."""
    par = s.parallelism
    return group_tokens_per_microbatch(s) / (par.tp if par.sequence_parallel else 1)


def share_tokens_per_microbatch(s: Scenario) -> float:
    """A device's ``1 / tp`` share of its TP group's tokens per micro-batch: the tokens whose
    activations it keeps (each TP-split part's share of every token, or under sequence
    parallelism the rank's own tokens)."""
    return group_tokens_per_microbatch(s) / s.parallelism.tp


def routed_tokens_per_microbatch(s: Scenario) -> float:
    """Tokens one device routes into the MoE layer per micro-batch: its share of its TP
    group's (:func:`share_tokens_per_microbatch`; a token is routed once by its group), or
    under expert tensor parallelism its ``etp`` ranks' shares, which each of them runs through
    its slice of the experts."""
    return share_tokens_per_microbatch(s) * s.parallelism.etp


def saved_activation_dtype(s: Scenario) -> str:
    """The dtype training caches activations in for the backward."""
    return s.precision.saved_activations or s.precision.activations


def activation_bytes_per_token_layer(s: Scenario, moe_layer: bool) -> float:
    """Stored activation bytes per token per block (training), before recomputation, in the
    dtype they are saved in (:func:`saved_activation_dtype`)."""
    return sum(_activation_parts(s, moe_layer))


def _activation_parts(s: Scenario, moe_layer: bool) -> tuple[float, float]:
    """(attention sub-layer with both norms, FFN or MoE sub-layer) of
    :func:`activation_bytes_per_token_layer`."""
    m, ab = s.model, dtype_bytes(saved_activation_dtype(s))
    h = m.hidden_size
    # Korthikanti et al.: attention 11h + 2 norms 4h (in 16-bit units: 2 bytes); dropout masks 1 byte.
    attn = (11 * h + 4 * h) * ab / 2
    if moe_layer:
        # input, projections, activation of each routed copy. Counted, as everything here,
        # per token of a device's 1/tp share of its TP group's tokens: under expert tensor
        # parallelism a device runs every token of its group (etp = tp of them per share)
        # through its 1/etp slice of the experts, the copies' inputs whole.
        etp, f = s.parallelism.etp, m.expert_ffn_size
        per_expert = etp * (2 * h + (m.ffn_matrices + 1) * f / etp) * ab
        ffn = m.effective_top_k * per_expert + m.num_experts * 4  # + router probabilities
        if m.num_shared_experts:
            fs = (m.shared_expert_ffn_size or f) * m.num_shared_experts
            ffn += (2 * h + (m.ffn_matrices + 1) * fs) * ab
    else:
        ffn = (2 * h + (m.dense_ffn_matrices + 1) * (m.dense_ffn_size or 4 * h)) * ab
    return attn, ffn


def saved_bytes_per_token_layer(s: Scenario, moe_layer: bool) -> float:
    """Bytes per token a training block keeps for its backward under ``memory.recompute``: all
    its activations (none), half (selective), or only its input (full). Selective recomputation
    of the whole FFN sub-layer (``recompute_modules``: ``moe`` on an MoE block, ``mlp`` on a
    dense one) keeps only that sub-layer's input (one hidden vector per token) in place of its
    half, as Megatron-Core checkpoints the module around its input.

    >>> from types import SimpleNamespace as N
    >>> m = N(hidden_size=4, expert_ffn_size=8, ffn_matrices=3, effective_top_k=1,
    ...       num_experts=2, num_shared_experts=0)
    >>> s = N(model=m, precision=N(saved_activations=None, activations="bf16"),
    ...       memory=N(recompute="selective", recompute_modules=("moe",)),
    ...       parallelism=N(etp=1))
    >>> attn, ffn = 15 * 4, (2 * 4 + 4 * 8) * 2 + 2 * 4    # bytes: 60, 88
    >>> saved_bytes_per_token_layer(s, True) == attn / 2 + 4 * 2
    True
    """
    mode = s.memory.recompute
    ab = dtype_bytes(saved_activation_dtype(s))
    if mode == "full":
        return s.model.hidden_size * ab
    if mode != "selective":
        return activation_bytes_per_token_layer(s, moe_layer)
    attn, ffn = _activation_parts(s, moe_layer)
    if (moe_layer and "moe" in s.memory.recompute_modules) or (
            not moe_layer and "mlp" in s.memory.recompute_modules):
        return attn / 2 + s.model.hidden_size * ab
    return (attn + ffn) / 2


def stage_memory(s: Scenario, layout: Layout, stage: int) -> MemoryBreakdown:
    """Peak memory of the busiest device of one pipeline stage."""
    par, prec, wl = s.parallelism, s.precision, s.workload
    dense, experts = stage_params(s, layout, stage)
    wb = dtype_bytes(prec.weights)
    expert_dp = layout.expert_dp
    zero = par.zero_stage if wl.mode == "training" else 0
    shard_dense = par.dense_dp if zero >= 3 else 1
    shard_expert = expert_dp if zero >= 3 else 1
    dense_w = dense * wb / shard_dense
    expert_w = experts * wb / shard_expert
    if zero >= 3:
        # Gathered copies while blocks run: the stage's parameters stay gathered from forward
        # to backward, else the running block's and the prefetched next one's.
        held = 1.0 if not zero3_regathers(s) else min(1.0, 2.0 / max(len(
            layout.stage_layers(stage)), 1))
        dense_w += held * dense * wb * (1 - 1 / shard_dense)
        expert_w += held * experts * wb * (1 - 1 / shard_expert)
    grads = opt = acts = kv = 0.0
    in_flight: float
    tokens = share_tokens_per_microbatch(s)   # the tokens whose activations a device keeps
    layers = layout.stage_layers(stage)
    if wl.mode == "training":
        gb = dtype_bytes(prec.gradients)
        gdense, gexp = (par.dense_dp, expert_dp) if zero >= 2 else (1, 1)
        grads = dense * gb / gdense + experts * gb / gexp
        per_param = prec.optimizer_state_bytes + (4.0 if prec.master_weights else 0.0)
        odense, oexp = (par.dense_dp, expert_dp) if zero >= 1 else (1, 1)
        opt = dense * per_param / odense + experts * per_param / oexp
        if layout.dual:   # DualPipe: pp + 1 chunks' activations per device, of two stages each
            in_flight = (par.pp + 1) / 2
        else:
            in_flight = par.pp - stage
            if par.vp > 1:
                in_flight += (par.pp - 1 - stage) / par.vp + 1
        moe = [layout.moe_index(x) is not None for x in layers]
        acts = tokens * sum(saved_bytes_per_token_layer(s, m) for m in moe) * in_flight
        if s.memory.recompute == "full":   # plus the block being recomputed, whole
            acts += tokens * max((activation_bytes_per_token_layer(s, m) for m in moe),
                                 default=0.0)
    else:
        context = tokens_per_sequence(s) + (wl.context_len if wl.mode == "decode" else 0)
        # the last stage's drafting MTP modules keep a KV cache of their own
        drafters = mtp_held(s) if layout.holds_ends(stage)[1] else 0
        # (a context-parallel rank holds the keys and values of its share of each sequence)
        kv = (wl.global_batch / par.dp) * context / par.cp * (len(layers) + drafters)
        kv *= kv_bytes_per_token(s.model, prec.kv_cache) / kv_shards(s.model, par.tp)
        acts = tokens * max(activation_bytes_per_token_layer(s, True),
                            activation_bytes_per_token_layer(s, False))
    # Receive buffers: one copy per routed (token, expert) pair, or, for the all-gather dispatch,
    # every token of the EP group (each rank gathers them all, then reduce-scatters the outputs).
    # (none when every rank already holds the tokens, ``replicated``)
    algorithm = s.communication.alltoall
    copies = (par.ep if algorithm == "allgather" else 0 if algorithm == "replicated"
              else s.model.effective_top_k)
    buf = s.memory.alltoall_buffer_factor * routed_tokens_per_microbatch(s) * copies
    buf *= s.model.hidden_size * (dtype_bytes(prec.dispatch) + dtype_bytes(prec.combine))
    dev = s.hardware.device
    return MemoryBreakdown(stage, dense_w, expert_w, grads, opt, acts, kv, buf,
                           dev.reserved_memory, dev.memory)


def check_memory(s: Scenario, layout: Layout) -> list[MemoryBreakdown]:
    """Breakdown per stage; raises OutOfMemory naming the stage unless memory.on_overflow = warn."""
    rows = [stage_memory(s, layout, stage) for stage in range(s.parallelism.pp)]
    worst = max(rows, key=lambda r: r.total / r.capacity)
    if not worst.fits and s.memory.on_overflow == "error":
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in worst.as_dict().items()
                          if k not in ("stage", "capacity", "total") and v > 0)
        raise OutOfMemory(
            f"{s.source or s.name}: devices of pipeline stage {worst.stage} need "
            f"{worst.total / 2**30:.1f} GiB but have {worst.capacity / 2**30:.1f} GiB ({parts} GiB); "
            "add devices (ep/pp/dp), ZeRO, recomputation, or set memory.on_overflow: warn")
    return rows
