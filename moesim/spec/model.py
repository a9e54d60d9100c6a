"""The MoE transformer being simulated: its shape, its experts and its gate.

A model is a stack of ``num_layers`` transformer blocks. Each block has an attention sub-layer and an
FFN sub-layer; the FFN is dense in the first ``first_dense_layers`` blocks and then an MoE layer every
``moe_layer_interval`` blocks (1 = every block, 2 = every other block as in Switch/GLaM). An MoE layer
holds ``num_experts`` routed experts (each token picks ``top_k``) and ``num_shared_experts`` that every
token uses. Parameter and FLOP counts are pure functions of this description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moesim.errors import ScenarioError
from moesim.spec.fields import spec_field

__all__ = ["AttentionSpec", "ModelSpec", "ParamCounts"]

Activation = Literal["swiglu", "geglu", "gelu", "relu", "silu"]
Gating = Literal["topk", "top1", "soft"]


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """Multi-head (MHA), grouped-query (GQA) or multi-head latent (MLA) attention."""

    num_heads: int = spec_field(min=1, max=65536, doc="query heads")
    num_kv_heads: int = spec_field(0, min=0, max=65536, doc="key/value heads (0 = num_heads; GQA when fewer)")
    head_dim: int = spec_field(0, min=0, max=65536, doc="per-head dim (0 = hidden_size / num_heads)")
    kind: Literal["mha", "gqa", "mla"] = "mha"
    # MLA (DeepSeek-V2/V3): queries and keys/values go through low-rank latents; the KV cache
    # holds the latent (kv_lora_rank + qk_rope_head_dim per token), not full heads.
    q_lora_rank: int = spec_field(0, min=0, max=1 << 20, doc="MLA query latent rank (0 = no query compression)")
    kv_lora_rank: int = spec_field(0, min=0, max=1 << 20, doc="MLA key/value latent rank")
    qk_rope_head_dim: int = spec_field(0, min=0, max=65536, doc="MLA decoupled RoPE dim per head")
    v_head_dim: int = spec_field(0, min=0, max=65536, doc="MLA value dim per head (0 = head_dim)")
    bias: bool = False
    # Sliding-window (banded) attention, as gpt-oss alternates it with full attention: windowed
    # layers attend to at most ``sliding_window`` earlier tokens; every ``full_attention_every``-th
    # layer attends to the full context (1 = all layers full, 2 = every other layer).
    sliding_window: int = spec_field(0, min=0, doc="tokens a windowed layer attends to (0 = off)")
    full_attention_every: int = spec_field(1, min=1, doc="every n-th layer has full attention")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model, split by where the parameters live."""

    embedding: int          # input embedding (+ output head if untied)
    attention: int          # all attention sub-layers (incl. norms)
    dense_ffn: int          # FFNs of dense blocks
    routed_experts: int     # all routed experts of all MoE layers
    shared_experts: int     # shared experts of all MoE layers
    router: int             # gate matrices
    total: int
    active: int             # used per token (top-k routed experts + everything else)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """An MoE transformer. Sizes are the model's public configuration (e.g. its HF config.json)."""

    name: str
    hidden_size: int = spec_field(min=1, max=1 << 20)
    num_layers: int = spec_field(min=1, max=10_000, doc="transformer blocks (encoder + decoder if enc-dec)")
    vocab_size: int = spec_field(min=1, max=1 << 24)
    attention: AttentionSpec = field(default_factory=lambda: AttentionSpec(num_heads=1))
    num_experts: int = spec_field(min=1, max=1 << 16, doc="routed experts per MoE layer")
    top_k: int = spec_field(min=1, max=1 << 16, doc="routed experts per token")
    expert_ffn_size: int = spec_field(min=1, max=1 << 22, doc="intermediate size of one routed expert")
    num_shared_experts: int = spec_field(0, min=0, max=1024)
    shared_expert_ffn_size: int = spec_field(0, min=0, max=1 << 22, doc="0 = expert_ffn_size")
    dense_ffn_size: int = spec_field(0, min=0, max=1 << 22, doc="intermediate size of dense blocks' FFN")
    first_dense_layers: int = spec_field(0, min=0, max=10_000, doc="leading blocks with a dense FFN")
    moe_layer_interval: int = spec_field(1, min=1, max=10_000, doc="an MoE FFN every n-th block after those")
    cross_attention_layers: int = spec_field(0, min=0, max=10_000, doc="decoder blocks with cross-attention")
    activation: Activation = "swiglu"
    # GLaM gates only its dense FFNs (GeGLU) and keeps plain GELU experts; null = activation.
    dense_activation: Activation | None = None
    gating: Gating = "topk"
    capacity_factor: float | None = spec_field(None, gt=0.0, doc="null = dropless")
    tie_embeddings: bool = False
    # DeepSeek-V3's multi-token prediction: modules after the last block that predict one more
    # token each (norms, a [2h -> h] projection, one MoE block, the shared LM head). Trained with
    # the model; not counted in its parameters (671B excludes the 14B MTP module).
    mtp_modules: int = spec_field(0, min=0, max=16, doc="multi-token-prediction modules")
    expert_bias: bool = False
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ScenarioError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}",
                                field="model.top_k")
        if self.first_dense_layers > self.num_layers:
            raise ScenarioError(f"first_dense_layers={self.first_dense_layers} must be <= "
                                f"num_layers={self.num_layers}", field="model.first_dense_layers")
        if self.num_moe_layers == 0:
            raise ScenarioError("the model has no MoE layer (check first_dense_layers and "
                                "moe_layer_interval)", field="model")
        a = self.attention
        if a.kind == "mla" and not a.kv_lora_rank:
            raise ScenarioError("MLA attention needs kv_lora_rank > 0 (the latent the KV cache "
                                "holds; DeepSeek-V3: 512)", field="model.attention.kv_lora_rank")
        if not a.head_dim and self.hidden_size % a.num_heads:
            raise ScenarioError(f"hidden_size={self.hidden_size} must be a multiple of num_heads="
                                f"{a.num_heads}, or give attention.head_dim",
                                field="model.attention.head_dim")
        if self.cross_attention_layers > self.num_layers:
            raise ScenarioError(f"cross_attention_layers={self.cross_attention_layers} must be <= "
                                f"num_layers={self.num_layers}",
                                field="model.cross_attention_layers")
        if a.kind != "mla" and a.num_kv_heads and a.num_heads % a.num_kv_heads:
            raise ScenarioError(f"num_kv_heads={a.num_kv_heads} must divide num_heads="
                                f"{a.num_heads} (each key/value head serves a whole group of "
                                "query heads)", field="model.attention.num_kv_heads")
        if self.first_dense_layers and self.dense_ffn_size == 0:
            raise ScenarioError("dense_ffn_size is required when first_dense_layers > 0",
                                field="model.dense_ffn_size")

    # ---- structure -------------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Indices of the blocks whose FFN is an MoE layer."""
        return tuple(i for i in range(self.first_dense_layers, self.num_layers)
                     if (i - self.first_dense_layers) % self.moe_layer_interval
                     == self.moe_layer_interval - 1)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def effective_top_k(self) -> int:
        """Routed experts per token as the gate actually uses them."""
        return {"topk": self.top_k, "top1": 1, "soft": self.num_experts}[self.gating]

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices per FFN: gated activations (SwiGLU, GeGLU) have 3, others 2."""
        return 3 if self.activation in ("swiglu", "geglu") else 2

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.hidden_size // self.attention.num_heads

    @property
    def kv_heads(self) -> int:
        return self.attention.num_kv_heads or self.attention.num_heads

    @property
    def dense_ffn_matrices(self) -> int:
        """Weight matrices of a dense block's FFN (``dense_activation``, else ``activation``)."""
        return 3 if (self.dense_activation or self.activation) in ("swiglu", "geglu") else 2

    # ---- parameters ------------------------------------------------------------------------
    def ffn_params(self, ffn_size: int) -> int:
        """Parameters of one expert-style FFN (``activation``) of intermediate size ``ffn_size``."""
        return self.ffn_matrices * self.hidden_size * ffn_size

    @property
    def dense_ffn_params(self) -> int:
        """Parameters of one dense block's FFN (default intermediate size 4 * hidden)."""
        return self.dense_ffn_matrices * self.hidden_size * (self.dense_ffn_size
                                                             or 4 * self.hidden_size)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (one layer)."""
        bias = (self.ffn_matrices - 1) * self.expert_ffn_size + self.hidden_size
        return self.ffn_params(self.expert_ffn_size) + (bias if self.expert_bias else 0)

    @property
    def shared_expert_params(self) -> int:
        """Parameters of all shared experts of one MoE layer."""
        size = self.shared_expert_ffn_size or self.expert_ffn_size
        return self.num_shared_experts * self.ffn_params(size)

    @property
    def attention_params(self) -> int:
        """Parameters of one self-attention sub-layer, including its two RMS/LayerNorms."""
        a, h = self.attention, self.hidden_size
        if a.kind == "mla":
            nope = self.head_dim
            rope = a.qk_rope_head_dim
            v = a.v_head_dim or self.head_dim
            qk = nope + rope
            if a.q_lora_rank:
                q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk
            else:
                q = h * a.num_heads * qk
            kv = h * (a.kv_lora_rank + rope) + a.kv_lora_rank
            kv += a.kv_lora_rank * a.num_heads * (nope + v)
            out = a.num_heads * v * h
            return q + kv + out + 2 * h
        q = h * a.num_heads * self.head_dim
        kv = 2 * h * self.kv_heads * self.head_dim
        out = a.num_heads * self.head_dim * h
        bias = (a.num_heads + 2 * self.kv_heads) * self.head_dim + h if a.bias else 0
        return q + kv + out + bias + 2 * h

    def param_counts(self) -> ParamCounts:
        """Total and active parameters, by part."""
        h = self.hidden_size
        moe = self.num_moe_layers
        dense_blocks = self.num_layers - moe
        embedding = self.vocab_size * h * (1 if self.tie_embeddings else 2) + h  # + final norm
        attention = self.num_layers * self.attention_params
        attention += self.cross_attention_layers * self.attention_params
        dense_ffn = dense_blocks * self.dense_ffn_params
        routed = moe * self.num_experts * self.expert_params
        shared = moe * self.shared_expert_params
        router = moe * self.num_experts * h
        total = embedding + attention + dense_ffn + routed + shared + router
        active = total - routed + moe * self.effective_top_k * self.expert_params
        return ParamCounts(embedding, attention, dense_ffn, routed, shared, router, total, active)

    # ---- FLOPs ----------------------------------------------------------------------------
    @property
    def query_width(self) -> int:
        """Width of one token's queries (heads x query/key head dim, incl. MLA's RoPE part)."""
        return self.attention.num_heads * (self.head_dim + self.attention.qk_rope_head_dim)

    @property
    def key_width(self) -> int:
        """Width of one token's keys as attention reads them (MLA materialises them per head)."""
        heads = self.attention.num_heads if self.attention.kind == "mla" else self.kv_heads
        return heads * (self.head_dim + self.attention.qk_rope_head_dim)

    def attended_context(self, context: float) -> float:
        """Mean tokens a query attends to, averaged over layers, for a mean ``context``.

        ``context`` is the full-attention mean (S/2 for causal training on S tokens). A layer with
        a window W < S attends to min(t, W) tokens at position t: on average W (1 - W / (2S)).
        """
        a = self.attention
        window = a.sliding_window
        if window == 0 or a.full_attention_every == 1 or window >= 2 * context:
            return context
        windowed = window * (1.0 - window / (4.0 * context))
        full_share = 1.0 / a.full_attention_every
        return full_share * context + (1.0 - full_share) * windowed

    def attention_projection_flops_per_token(self) -> float:
        """Forward FLOPs of one attention sub-layer's projections for one token: 2 per weight."""
        return 2.0 * (self.attention_params - 2 * self.hidden_size)

    def attention_core_flops_per_token(self, context: float) -> float:
        """Forward FLOPs of QK^T and AV for one token attending to ``context`` tokens (mean over
        layers, sliding windows applied): 2 * heads * (qk_dim + v_dim) * context."""
        a = self.attention
        v = a.v_head_dim or self.head_dim
        qk = self.head_dim + a.qk_rope_head_dim
        return 2.0 * a.num_heads * (qk + v) * self.attended_context(context)

    def attention_flops_per_token(self, context: float) -> float:
        """Forward FLOPs of one attention sub-layer for one token attending to ``context`` tokens.

        2 FLOPs per weight (projections) + QK^T and AV (2 * 2 * heads * head_dim * context).
        Causal training over a sequence of length S uses context = S/2 on average; sliding-window
        layers attend to less (:meth:`attended_context`).
        """
        return (self.attention_projection_flops_per_token()
                + self.attention_core_flops_per_token(context))

    def expert_flops_per_token(self) -> float:
        """Forward FLOPs of one routed expert for one token (2 per weight)."""
        return 2.0 * self.ffn_params(self.expert_ffn_size)
