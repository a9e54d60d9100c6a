"""Kernel times on one device: attention, gate, expert FFNs, shared experts, dense FFNs.

Each function is pure: sizes in, seconds out. By default a kernel takes the roofline time, the larger
of its FLOPs over the device's achievable FLOP/s (peak x matmul_efficiency) and its bytes over the
achievable HBM bandwidth (bandwidth x memory_efficiency). So small batches are memory-bound, as they
are on real GPUs: a decode step of an expert reads all its weights for a handful of tokens.

When the hardware profile carries measured tables (``moesim calibrate``), :class:`KernelTimer` uses
them instead, interpolated in log space, and records which source served each kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.spec.hardware import DeviceSpec, dtype_bytes
from moesim.spec.model import ModelSpec

__all__ = ["roofline", "KernelTimer", "kv_bytes_per_token"]


def roofline(flops: float, nbytes: float, device: DeviceSpec, dtype: str) -> float:
    """Seconds for a kernel doing ``flops`` FLOPs and moving ``nbytes`` bytes of HBM traffic.

    >>> from moesim.spec.hardware import DeviceSpec
    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 100.0}, memory=1.0, memory_bandwidth=10.0)
    >>> roofline(200.0, 10.0, d, "bf16"), roofline(10.0, 100.0, d, "bf16")
    (2.0, 10.0)
    """
    compute = flops / (device.flops(dtype) * device.matmul_efficiency)
    memory = nbytes / (device.memory_bandwidth * device.memory_efficiency)
    return max(compute, memory)


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
    tables: object | None = None  # moesim.calibration.MeasuredTables

    @property
    def _wb(self) -> float:
        return dtype_bytes(self.weight_dtype)

    @property
    def _ab(self) -> float:
        return dtype_bytes(self.act_dtype)

    def attention(self, tokens: float, context: float, kv_tokens: float = 0.0) -> float:
        """Forward attention sub-layer for ``tokens`` tokens attending to ``context`` tokens each.

        ``kv_tokens``: tokens of KV cache read (decode); prefill/training read none from HBM beyond
        the activations (flash attention keeps the score matrix on chip).
        """
        if tokens <= 0:
            return 0.0
        m, h = self.model, self.model.hidden_size
        if self.tables is not None:
            measured = self.tables.attention(h, tokens)
            if measured is not None:
                return measured / self.tp
        flops = tokens * m.attention_flops_per_token(context) / self.tp
        weights = (m.attention_params - 2 * h) * self._wb / self.tp
        acts = tokens * h * self._ab * 6
        kv = kv_tokens * kv_bytes_per_token(m, self.act_dtype) / self.tp
        return roofline(flops, weights + acts + kv, self.device, self.compute_dtype)

    def gate(self, tokens: float) -> float:
        """Router: a [tokens, hidden] x [hidden, experts] GEMM plus softmax/top-k (memory-bound)."""
        if tokens <= 0:
            return 0.0
        h, e = self.model.hidden_size, self.model.num_experts
        if self.tables is not None:
            measured = self.tables.gate(h, e, tokens)
            if measured is not None:
                return measured
        flops = 2.0 * tokens * h * e
        nbytes = h * e * self._wb + tokens * h * self._ab + 3 * tokens * e * 4
        return roofline(flops, nbytes, self.device, self.compute_dtype)

    def experts(self, tokens_per_slot: np.ndarray, ffn_size: int | None = None) -> float:
        """Grouped GEMM over a device's expert slots: ``tokens_per_slot: [slots]`` tokens each.

        One grouped kernel: total FLOPs against total bytes (every slot's weights are read once,
        whether it got 1 token or 10,000). A slot with no tokens reads no weights.
        """
        tokens = np.asarray(tokens_per_slot, dtype=float)
        f = ffn_size or self.model.expert_ffn_size
        h = self.model.hidden_size
        if self.tables is not None:
            measured = self.tables.expert_ffn(h, f, tokens)
            if measured is not None:
                return measured
        mats = self.model.ffn_matrices
        active = tokens > 0
        flops = 2.0 * mats * h * f * tokens.sum()
        weights = mats * h * f * self._wb * active.sum()
        acts = tokens.sum() * (2 * h + (mats - 1) * f) * self._ab
        return roofline(flops, weights + acts, self.device, self.compute_dtype)

    def shared_experts(self, tokens: float) -> float:
        m = self.model
        if m.num_shared_experts == 0 or tokens <= 0:
            return 0.0
        f = (m.shared_expert_ffn_size or m.expert_ffn_size) * m.num_shared_experts
        return self.dense_ffn(tokens, f, self.model.ffn_matrices)

    def dense_ffn(self, tokens: float, ffn_size: int, matrices: int | None = None) -> float:
        """A dense FFN (dense blocks, shared experts), split over tensor-parallel ranks."""
        if tokens <= 0:
            return 0.0
        h = self.model.hidden_size
        mats = matrices or self.model.dense_ffn_matrices
        if self.tables is not None:
            measured = self.tables.expert_ffn(h, ffn_size, np.array([tokens]))
            if measured is not None:
                return measured / self.tp
        flops = 2.0 * mats * h * ffn_size * tokens / self.tp
        nbytes = (mats * h * ffn_size * self._wb + tokens * (2 * h + 2 * ffn_size) * self._ab)
        return roofline(flops, nbytes / self.tp, self.device, self.compute_dtype)

    def lm_head(self, tokens: float) -> float:
        """Output projection to the vocabulary plus softmax cross-entropy (training/prefill)."""
        if tokens <= 0:
            return 0.0
        h, v = self.model.hidden_size, self.model.vocab_size
        flops = 2.0 * tokens * h * v / self.tp
        nbytes = (h * v * self._wb + tokens * v * 4 * 2) / self.tp + tokens * h * self._ab
        return roofline(flops, nbytes, self.device, self.compute_dtype)

    def embedding(self, tokens: float) -> float:
        """Embedding lookup: a gather of ``tokens`` rows (memory-bound)."""
        return self.elementwise(2 * tokens * self.model.hidden_size * self._ab)

    def elementwise(self, nbytes: float) -> float:
        """Memory-bound glue (permute/unpermute tokens, norms, residual adds)."""
        return nbytes / (self.device.memory_bandwidth * self.device.memory_efficiency)


def kv_bytes_per_token(model: ModelSpec, dtype: str) -> float:
    """KV-cache bytes per token per attention layer (MLA caches the latent, not full heads)."""
    a = model.attention
    if a.kind == "mla":
        return (a.kv_lora_rank + a.qk_rope_head_dim) * dtype_bytes(dtype)
    return 2 * model.kv_heads * model.head_dim * dtype_bytes(dtype)
