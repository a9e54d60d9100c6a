"""Kernel times on one device: attention, gate, expert FFNs, shared experts, dense FFNs.

Each function is pure: sizes in, seconds out. A kernel takes the roofline time, the larger of its
FLOPs over the device's achievable FLOP/s (peak x matmul_efficiency) and its bytes over the
achievable HBM bandwidth (bandwidth x memory_efficiency). So small batches are memory-bound, as they
are on real GPUs: a decode step of an expert reads all its weights for a handful of tokens.

Three refinements make a training step's kernels add up to what frameworks measure:

- **Precision per kernel.** With ``compute: fp8`` only the GEMMs run in FP8 (Transformer Engine,
  DeepSeek-V3); the fused attention core (QK^T, softmax, AV) stays in BF16, and every FP8 GEMM
  input is first quantized by a memory-bound cast kernel.
- **Fused attention efficiency.** The attention core is not a cuBLAS GEMM: flash attention reaches a
  lower fraction of peak (:data:`ATTENTION_EFFICIENCY`).
- **Glue kernels.** Norms, residual adds, rotary embedding and the FFN activation are separate
  memory-bound kernels (:func:`glue_bytes_attention`, :func:`glue_bytes_ffn`); they add to the
  GEMMs instead of hiding under them.

Backward kernels cost twice the forward (the engine's convention), glue included.

When the hardware profile carries measured tables (``moesim calibrate``), :class:`KernelTimer` uses
them instead, interpolated in log space, and records which source served each kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.calibration import MeasuredTables
from moesim.spec.hardware import DeviceSpec, dtype_bytes
from moesim.spec.model import ModelSpec

__all__ = ["roofline", "KernelTimer", "kv_bytes_per_token", "ATTENTION_EFFICIENCY",
           "glue_bytes_attention", "glue_bytes_ffn"]

# Fraction of the dense BF16 peak that fused flash attention reaches, forward and backward
# together, by device kind (one value per hardware class). GPUs: FlashAttention-3 on H100 SXM5
# (Shah et al. 2024, arXiv 2407.08608, BF16, head dim 128, causal, 4k tokens) runs the forward
# at ~640 TFLOPS and the backward (2.5x the forward's FLOPs) at ~500 TFLOPS, so forward plus
# backward take 3F / (F/640 + 2.5F/500) = 457 TFLOPS in the engine's 1 + 2 accounting, 0.46 of
# 989.4. cuDNN's fused attention, which Transformer Engine uses, is in the same range. TPUs and
# CPUs run attention as ordinary matmuls: their matmul_efficiency applies.
ATTENTION_EFFICIENCY = {"gpu": 0.46}


def roofline(flops: float, nbytes: float, device: DeviceSpec, dtype: str,
             efficiency: float | None = None) -> float:
    """Seconds for a kernel doing ``flops`` FLOPs and moving ``nbytes`` bytes of HBM traffic.

    ``efficiency`` replaces the device's ``matmul_efficiency`` (fused attention).

    >>> from moesim.spec.hardware import DeviceSpec
    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 100.0}, memory=1.0, memory_bandwidth=10.0)
    >>> roofline(200.0, 10.0, d, "bf16"), roofline(10.0, 100.0, d, "bf16")
    (2.0, 10.0)
    """
    eff = device.matmul_efficiency if efficiency is None else efficiency
    compute = flops / (device.flops(dtype) * eff)
    memory = nbytes / (device.memory_bandwidth * device.memory_efficiency)
    return max(compute, memory)


def glue_bytes_attention(model: ModelSpec, act_bytes: float) -> float:
    """HBM bytes per token of the attention sub-layer's memory-bound kernels (forward).

    Pre-norm (read h, write h), rotary embedding of queries and keys (read and write both) and
    the residual add (read two h, write one).
    """
    h = model.hidden_size
    q, k = model.query_width, model.key_width
    return act_bytes * (2 * h + 2 * (q + k) + 3 * h)


def glue_bytes_ffn(model: ModelSpec, act_bytes: float, copies: float, ffn_size: int,
                   matrices: int) -> float:
    """HBM bytes per token of an FFN sub-layer's memory-bound kernels (forward).

    Pre-norm and residual add once per token; the activation (gated: read two f, write f; plain:
    read f, write f) once per routed copy (``copies`` = top-k for experts, 1 for a dense FFN).
    """
    h = model.hidden_size
    activation = (3 if matrices == 3 else 2) * ffn_size
    return act_bytes * (2 * h + 3 * h + copies * activation)


@dataclass(frozen=True)
class KernelTimer:
    """Kernel times of one model on one device type, in one precision.

    ``calibration`` is the ``calibration`` mapping of a measured profile (or None); ``tp`` divides the
    dense parts (attention heads, shared experts) over tensor-parallel ranks.
    """

    model: ModelSpec
    device: DeviceSpec
    compute_dtype: str = "bf16"
    weight_dtype: str = "bf16"
    act_dtype: str = "bf16"
    tp: int = 1
    tables: MeasuredTables | None = None

    @property
    def _wb(self) -> float:
        return dtype_bytes(self.weight_dtype)

    @property
    def _ab(self) -> float:
        return dtype_bytes(self.act_dtype)

    @property
    def _gemm_wb(self) -> float:
        """Bytes per weight a GEMM reads: FP8 GEMMs read FP8 copies of the weights."""
        return min(self._wb, dtype_bytes(self.compute_dtype))

    def _cast(self, elements: float) -> float:
        """Seconds to quantize ``elements`` GEMM inputs to FP8 (0 unless computing in FP8).

        Read the activation, write a row-wise and a column-wise (transposed, for the weight
        gradient) FP8 copy, as Transformer Engine does on Hopper.
        """
        if dtype_bytes(self.compute_dtype) >= self._ab:
            return 0.0
        return self.elementwise(elements * (self._ab + 2 * dtype_bytes(self.compute_dtype)))

    def attention(self, tokens: float, context: float, kv_tokens: float = 0.0) -> float:
        """Forward attention sub-layer for ``tokens`` tokens attending to ``context`` tokens each.

        Projections (GEMMs, compute dtype) + the fused attention core (BF16) + glue kernels.
        ``kv_tokens``: tokens of KV cache read (decode); prefill/training read none from HBM beyond
        the activations (flash attention keeps the score matrix on chip).
        """
        if tokens <= 0:
            return 0.0
        m, h = self.model, self.model.hidden_size
        if self.tables is not None:  # shaped tables (aiconfigurator import): core + GEMMs
            measured = self._measured_attention(tokens, context, kv_tokens)
            if measured is not None:
                return measured
        if self.tables is not None:
            measured = self.tables.attention(h, tokens)
            if measured is not None:
                return measured / self.tp
        proj_flops = tokens * m.attention_projection_flops_per_token() / self.tp
        weights = (m.attention_params - 2 * h) * self._gemm_wb / self.tp
        acts = tokens * (2 * h + 2 * m.query_width) * self._ab / self.tp
        projections = roofline(proj_flops, weights + acts, self.device, self.compute_dtype)
        core_flops = tokens * m.attention_core_flops_per_token(context) / self.tp
        kv = kv_tokens * kv_bytes_per_token(m, self.act_dtype) / self.tp
        core_io = tokens * (2 * m.query_width + 2 * m.key_width) * self._ab / self.tp
        core = roofline(core_flops, kv + core_io, self.device, "bf16",
                        ATTENTION_EFFICIENCY.get(self.device.kind))
        glue = self.elementwise(tokens * glue_bytes_attention(m, self._ab) / self.tp)
        cast = self._cast(tokens * (h + m.query_width) / self.tp)
        return projections + core + glue + cast

    def gate(self, tokens: float) -> float:
        """Router: a [tokens, hidden] x [hidden, experts] GEMM plus softmax/top-k (memory-bound),
        after the MoE sub-layer's norm; its residual add is counted here too."""
        if tokens <= 0:
            return 0.0
        h, e = self.model.hidden_size, self.model.num_experts
        if self.tables is not None:  # shaped tables (aiconfigurator import): router GEMM
            measured = self._measured_gate(tokens)
            if measured is not None:
                return measured
        if self.tables is not None:
            measured = self.tables.gate(h, e, tokens)
            if measured is not None:
                return measured
        flops = 2.0 * tokens * h * e
        nbytes = h * e * self._wb + tokens * h * self._ab + 3 * tokens * e * 4
        return roofline(flops, nbytes, self.device, "bf16") + self.ffn_glue(tokens)

    def experts(self, tokens_per_slot: np.ndarray, ffn_size: int | None = None) -> float:
        """Grouped GEMM over a device's expert slots: ``tokens_per_slot: [slots]`` tokens each.

        One grouped kernel: total FLOPs against total bytes (every slot's weights are read once,
        whether it got 1 token or 10,000). A slot with no tokens reads no weights. Plus the
        activation kernel and the FP8 casts of both GEMMs' inputs, per routed token copy.
        """
        tokens = np.asarray(tokens_per_slot, dtype=float)
        f = ffn_size or self.model.expert_ffn_size
        h = self.model.hidden_size
        if self.tables is not None:  # shaped tables (aiconfigurator import): fused MoE layer
            measured = self._measured_moe(tokens, f)
            if measured is not None:
                return measured
        if self.tables is not None:
            measured = self.tables.expert_ffn(h, f, tokens)
            if measured is not None:
                return measured
        mats = self.model.ffn_matrices
        active = tokens > 0
        copies = float(tokens.sum())
        flops = 2.0 * mats * h * f * copies
        weights = mats * h * f * self._gemm_wb * active.sum()
        acts = copies * (2 * h + (mats - 1) * f) * self._ab
        gemm = roofline(flops, weights + acts, self.device, self.compute_dtype)
        activation = copies * (3 if mats == 3 else 2) * f * self._ab
        return gemm + self.elementwise(activation) + self._cast(copies * (h + f))

    def ffn_glue(self, tokens: float) -> float:
        """Norm and residual add around a block's FFN sub-layer (once per token, not per copy)."""
        return self.elementwise(tokens * 5 * self.model.hidden_size * self._ab)

    def shared_experts(self, tokens: float) -> float:
        m = self.model
        if m.num_shared_experts == 0 or tokens <= 0:
            return 0.0
        f = (m.shared_expert_ffn_size or m.expert_ffn_size) * m.num_shared_experts
        return self.dense_ffn(tokens, f, self.model.ffn_matrices, block_glue=False)

    def dense_ffn(self, tokens: float, ffn_size: int, matrices: int | None = None, *,
                  block_glue: bool = True) -> float:
        """A dense FFN (dense blocks, shared experts), split over tensor-parallel ranks.

        ``block_glue``: add the sub-layer's norm and residual add (a dense block's FFN; the gate
        carries them in an MoE block, whose shared experts pass False).
        """
        if tokens <= 0:
            return 0.0
        h = self.model.hidden_size
        mats = matrices or self.model.dense_ffn_matrices
        if self.tables is not None:  # shaped tables (aiconfigurator import): the FFN's GEMMs
            measured = self._measured_ffn(tokens, ffn_size, mats, block_glue)
            if measured is not None:
                return measured
        if self.tables is not None:
            measured = self.tables.expert_ffn(h, ffn_size, np.array([tokens]))
            if measured is not None:
                return measured / self.tp
        flops = 2.0 * mats * h * ffn_size * tokens / self.tp
        nbytes = (mats * h * ffn_size * self._gemm_wb + tokens * (2 * h + 2 * ffn_size) * self._ab)
        gemm = roofline(flops, nbytes / self.tp, self.device, self.compute_dtype)
        activation = tokens * (3 if mats == 3 else 2) * ffn_size * self._ab / self.tp
        cast = self._cast(tokens * (h + ffn_size) / self.tp)
        glue = self.ffn_glue(tokens) / self.tp if block_glue else 0.0
        return gemm + self.elementwise(activation) + cast + glue

    def lm_head(self, tokens: float) -> float:
        """Output projection to the vocabulary plus softmax cross-entropy (training/prefill)."""
        if tokens <= 0:
            return 0.0
        h, v = self.model.hidden_size, self.model.vocab_size
        flops = 2.0 * tokens * h * v / self.tp
        nbytes = (h * v * self._wb + tokens * v * 4 * 2) / self.tp + tokens * h * self._ab
        return roofline(flops, nbytes, self.device, "bf16")

    def embedding(self, tokens: float) -> float:
        """Embedding lookup: a gather of ``tokens`` rows (memory-bound)."""
        return self.elementwise(2 * tokens * self.model.hidden_size * self._ab)

    def elementwise(self, nbytes: float) -> float:
        """Memory-bound glue (permute/unpermute tokens, norms, residual adds)."""
        return nbytes / (self.device.memory_bandwidth * self.device.memory_efficiency)

    # ---- measured shaped tables (moesim calibrate --import aiconfigurator) --------------------
    # Each helper answers from the profile's shaped tables or returns None (a shape, batch or
    # dtype the tables do not hold): the caller then takes its own model. Table times replace
    # the kernels they measured; the memory-bound glue around them stays modelled as above.

    def _gemms(self, tokens: float, shapes: list[tuple[float, float]]) -> float | None:
        """Seconds of GEMMs ``[tokens, k] x [k, n]`` for ``shapes: [(n, k)]``, None if any
        shape is fractional or has no table."""
        total = 0.0
        for n, k in shapes:
            if n != int(n) or k != int(k):
                return None
            measured = self.tables.gemm(tokens, int(n), int(k), self.compute_dtype)
            if measured is None:
                return None
            total += measured
        return total

    def _measured_attention(self, tokens: float, context: float, kv_tokens: float) -> float | None:
        """Attention core from the context/generation (or MLA) table, projections from GEMM
        tables, plus glue and casts. Decode (``kv_tokens`` > 0) is one new token per sequence:
        batch = tokens, KV length = kv_tokens / tokens; prefill and training read ``context`` as
        half the causal sequence: sequence = 2 context, batch = tokens / sequence."""
        t, m, a, tp = self.tables, self.model, self.model.attention, self.tp
        if not hasattr(t, "gemm"):
            return None
        heads = a.num_heads / tp
        kv = "fp8" if dtype_bytes(self.act_dtype) == 1 else self.act_dtype
        decode = kv_tokens > 0
        batch = tokens if decode else tokens / (2 * context)
        length = kv_tokens / tokens if decode else 2 * context
        h, d = m.hidden_size, m.head_dim
        if heads != int(heads):
            return None
        if a.kind == "mla":
            # aiconfigurator's MLA kernels are DeepSeek-V3's latent shape only.
            v = a.v_head_dim or d
            if (a.kv_lora_rank, a.qk_rope_head_dim, d, v) != (512, 64, 128, 128):
                return None
            lookup = t.mla_generation if decode else t.mla_context
            core = lookup(batch, length, int(heads), kv)
            qk = d + a.qk_rope_head_dim
            q = ([(a.q_lora_rank, h), (heads * qk, a.q_lora_rank)] if a.q_lora_rank
                 else [(heads * qk, h)])
            shapes = [*q, (a.kv_lora_rank + a.qk_rope_head_dim, h),
                      (heads * (d + v), a.kv_lora_rank), (h, heads * v)]
        else:
            kv_heads = max(1.0, m.kv_heads / tp)
            if kv_heads != int(kv_heads):
                return None
            lookup = t.attention_generation if decode else t.attention_context
            core = lookup(batch, length, int(heads), int(kv_heads), d, kv)
            shapes = [((heads + 2 * kv_heads) * d, h), (h, heads * d)]
        if core is None:
            return None
        projections = self._gemms(tokens, shapes)
        if projections is None:
            return None
        glue = self.elementwise(tokens * glue_bytes_attention(m, self._ab) / tp)
        cast = self._cast(tokens * (h + m.query_width) / tp)
        return core + projections + glue + cast

    def _measured_gate(self, tokens: float) -> float | None:
        """Router GEMM from the BF16 GEMM table; softmax/top-k and the FFN glue as modelled."""
        if not hasattr(self.tables, "gemm"):
            return None
        h, e = self.model.hidden_size, self.model.num_experts
        gemm = self.tables.gemm(tokens, e, h, "bf16")
        if gemm is None:
            return None
        return gemm + self.elementwise(3 * tokens * e * 4) + self.ffn_glue(tokens)

    def _measured_moe(self, tokens_per_slot: np.ndarray, ffn_size: int) -> float | None:
        """A device's routed experts from the fused-MoE table (grouped GEMMs, activation and
        the kernel's own routing glue), priced at the device's total token copies."""
        if not hasattr(self.tables, "moe"):
            return None
        m = self.model
        tokens = np.asarray(tokens_per_slot, dtype=float).ravel()
        return self.tables.moe(tokens, m.hidden_size, ffn_size, tokens.size, m.effective_top_k,
                               self.compute_dtype, experts=m.num_experts)

    def _measured_ffn(self, tokens: float, ffn_size: int, mats: int,
                      block_glue: bool) -> float | None:
        """A dense FFN's up(+gate) and down GEMMs from GEMM tables (this rank's TP shard), the
        activation, casts and block glue as modelled."""
        if not hasattr(self.tables, "gemm"):
            return None
        h, f = self.model.hidden_size, ffn_size / self.tp
        gemms = self._gemms(tokens, [((mats - 1) * f, h), (h, f)])
        if gemms is None:
            return None
        activation = tokens * (3 if mats == 3 else 2) * f * self._ab
        glue = self.ffn_glue(tokens) / self.tp if block_glue else 0.0
        cast = self._cast(tokens * (h + ffn_size) / self.tp)
        return gemms + self.elementwise(activation) + cast + glue


def kv_bytes_per_token(model: ModelSpec, dtype: str) -> float:
    """KV-cache bytes per token per attention layer (MLA caches the latent, not full heads)."""
    a = model.attention
    if a.kind == "mla":
        return (a.kv_lora_rank + a.qk_rope_head_dim) * dtype_bytes(dtype)
    return 2 * model.kv_heads * model.head_dim * dtype_bytes(dtype)
