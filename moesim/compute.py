"""Kernel times on one device: attention, gate, expert FFNs, shared experts, dense FFNs.

Each method is pure: sizes in, seconds out. Every GEMM goes through the tile-and-wave model of
:mod:`moesim.kernels` (the larger of its tiled compute time and its HBM bytes over achievable
bandwidth, plus a fixed per-kernel floor); a profile without ``sm_count`` gets the plain roofline.
So small batches are memory-bound, as they are on real GPUs: a decode step of an expert reads all
its weights for a handful of tokens, and a one-token decode step pays every kernel's floor.

Refinements that make a block's kernels add up to what frameworks measure:

- **Kernels counted one by one.** A block launches its GEMMs (QKV, output projection, router,
  expert or FFN up/gate and down), the fused attention core, and small memory-bound kernels:
  add+norm (fused, once per sub-layer), rotary embedding with the KV-cache write, router
  softmax/top-k, the FFN activation, FP8 casts. Each pays ``kernel_overhead``.
- **Grouped GEMM for routed experts** (:func:`moesim.kernels.grouped_gemm_time`): each expert
  pads its tokens to whole tile rows; its own efficiencies.
- **Precision per kernel.** With ``compute: fp8`` only the GEMMs run in FP8 (Transformer Engine,
  DeepSeek-V3); the fused attention core stays in BF16, and every FP8 GEMM input is first
  quantized by a memory-bound cast kernel.
- **Attention by phase and kind.** Training flash attention reaches ``attention_efficiency`` of
  peak (forward and backward together), an inference prefill's forward
  ``prefill_attention_efficiency``; decode streams the KV cache at ``decode_attention_efficiency``
  of HBM bandwidth; MLA decode runs absorbed (queries multiplied into the latent space, so the
  core is compute-heavy, at ``mla_decode_efficiency``). Devices without a fused-attention figure
  (TPUs, CPUs) run attention as matmuls with head dims padded to the matmul tile.

Backward kernels cost twice the forward (the engine's convention), glue included.

When the hardware profile carries measured tables (``moesim calibrate``), :class:`KernelTimer` uses
them instead, interpolated in log space, and records which source served each kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moesim.calibration import MeasuredTables
from moesim.kernels import (
    attention_head_dim_factor,
    gemm_time,
    grouped_gemm_times,
    memory_time,
    padded,
)
from moesim.spec.hardware import DeviceSpec, dtype_bytes
from moesim.spec.model import ModelSpec

__all__ = ["roofline", "KernelTimer", "kv_bytes_per_token", "kv_shards", "kv_heads_per_rank",
           "add_norm_bytes",
           "glue_bytes_attention", "glue_bytes_ffn"]


def roofline(flops: float, nbytes: float, device: DeviceSpec, dtype: str,
             efficiency: float | None = None) -> float:
    """Seconds for a kernel doing ``flops`` FLOPs and moving ``nbytes`` bytes of HBM traffic.

    The plain roofline, no tiles and no floor. ``efficiency`` replaces ``matmul_efficiency``.

    >>> from moesim.spec.hardware import DeviceSpec
    >>> d = DeviceSpec(name="x", peak_flops={"bf16": 100.0}, memory=1.0, memory_bandwidth=10.0)
    >>> roofline(200.0, 10.0, d, "bf16"), roofline(10.0, 100.0, d, "bf16")
    (2.0, 10.0)
    """
    eff = device.matmul_efficiency if efficiency is None else efficiency
    compute = flops / (device.flops(dtype) * eff)
    memory = nbytes / (device.memory_bandwidth * device.memory_efficiency)
    return max(compute, memory)


def add_norm_bytes(model: ModelSpec, act_bytes: float) -> float:
    """HBM bytes per token of the fused residual add + norm before a sub-layer (vLLM/SGLang
    ``fused_add_rms_norm``, TensorRT-LLM's fused add+norm): read the input and the residual,
    write the new residual and the normed input, ``4 h`` elements."""
    return act_bytes * 4 * model.hidden_size


def glue_bytes_attention(model: ModelSpec, act_bytes: float) -> float:
    """HBM bytes per token of the attention sub-layer's memory-bound kernels (forward).

    The fused residual add + pre-norm (:func:`add_norm_bytes`) and the rotary embedding of
    queries and keys (read and write both).
    """
    q, k = model.query_width, model.key_width
    return add_norm_bytes(model, act_bytes) + act_bytes * 2 * (q + k)


def glue_bytes_ffn(model: ModelSpec, act_bytes: float, copies: float, ffn_size: int,
                   matrices: int) -> float:
    """HBM bytes per token of an FFN sub-layer's memory-bound kernels (forward).

    The fused residual add + pre-norm once per token (:func:`add_norm_bytes`); the activation
    (gated: read two f, write f; plain: read f, write f) once per routed copy (``copies`` =
    top-k for experts, 1 for a dense FFN).
    """
    activation = (3 if matrices == 3 else 2) * ffn_size
    return add_norm_bytes(model, act_bytes) + act_bytes * copies * activation


# Bytes per weight of the router and the LM head: FP8 recipes keep them in BF16 (DeepSeek-V3
# technical report, sec. 3.3.1: the embedding, the output head and the MoE gating modules stay
# in their original precision), and BF16 models hold them in BF16 anyway.
HIGH_PRECISION_BYTES = 2.0

# Small kernels per sub-layer: attention glue = fused residual add + norm, and rotary embedding
# with the KV-cache write; FFN glue = fused residual add + norm. MLA adds the norm of its latents.
ATTENTION_GLUE_KERNELS = 2
MLA_EXTRA_GLUE_KERNELS = 1
FFN_GLUE_KERNELS = 1


@dataclass(frozen=True)
class KernelTimer:
    """Kernel times of one model on one device type, in one precision.

    ``calibration`` is the ``calibration`` mapping of a measured profile (or None); ``tp`` divides the
    dense parts (attention heads, shared experts) over tensor-parallel ranks. ``inference``: the
    forward runs alone (prefill attention at ``prefill_attention_efficiency``), not as the first
    third of a training step.
    """

    model: ModelSpec
    device: DeviceSpec
    compute_dtype: str = "bf16"
    weight_dtype: str = "bf16"
    act_dtype: str = "bf16"
    tp: int = 1
    tables: MeasuredTables | None = None
    inference: bool = False         # serving: prefill attention at its own efficiency
    kv_dtype: str | None = None     # KV-cache dtype (None: the activation dtype)
    # Measured fused-MoE table kind tried first (calibration.MOE_KINDS): the DeepEP kinds for a
    # scenario whose all-to-all runs DeepEP's kernels; the framework's fused MoE ("moe") after.
    moe_kernel: str = "moe"
    fp8_block: bool = False         # FP8 GEMMs block-scaled (DeepSeek-V3): their tables first
    etp: int = 1                    # expert tensor parallelism: each expert's FFN split etp ways

    @property
    def _table_dtype(self) -> str:
        """The dtype measured GEMM/MoE tables are looked up by."""
        if self.fp8_block and dtype_bytes(self.compute_dtype) == 1:
            return "fp8_block"
        return self.compute_dtype

    @property
    def _high_dtype(self) -> str:
        """The dtype of the kernels kept in high precision (attention core, router, LM head):
        BF16 under BF16 and FP8 recipes, the compute dtype where that is wider (an FP32 or TF32
        model runs them at its own rate, not at BF16's)."""
        return self.compute_dtype if dtype_bytes(self.compute_dtype) > 2 else "bf16"

    @property
    def _high_bytes(self) -> float:
        """Bytes per router / LM head weight: :data:`HIGH_PRECISION_BYTES`, or wider ones."""
        return max(HIGH_PRECISION_BYTES, dtype_bytes(self._high_dtype))

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

    @property
    def _gemm_ab(self) -> float:
        """Bytes per input activation a GEMM reads (FP8 GEMMs read the cast copy)."""
        return min(self._ab, dtype_bytes(self.compute_dtype))

    def _gemm(self, m: float, n: float, k: float, batch: int = 1) -> float:
        """One GEMM (or BMM of ``batch``) in the compute dtype: activations in, weights, out."""
        return gemm_time(m, n, k, self.device, self.compute_dtype, a_bytes=self._gemm_ab,
                         b_bytes=self._gemm_wb, c_bytes=self._ab, batch=batch)

    def _cast(self, elements: float, kernels: int) -> float:
        """Seconds to quantize ``elements`` GEMM inputs to FP8 (0 unless computing in FP8), in
        ``kernels`` cast kernels (one per FP8 GEMM input).

        Read the activation, write a row-wise and a column-wise (transposed, for the weight
        gradient) FP8 copy, as Transformer Engine does on Hopper. Measured FP8 GEMMs of inference
        stacks include their quantize kernel (aiconfigurator's H100 rows at m <= 16 cost about
        one more kernel floor than BF16 ones), so each cast pays a floor.
        """
        if dtype_bytes(self.compute_dtype) >= self._ab or elements <= 0:
            return 0.0
        return self.elementwise(elements * (self._ab + 2 * dtype_bytes(self.compute_dtype)),
                                kernels=kernels)

    # ---- attention --------------------------------------------------------------------------
    def _projection_shapes(self, absorbed: bool) -> list[tuple[float, float, int]]:
        """(n, k, batch) of the attention sub-layer's projection GEMMs on one TP rank.

        GQA/MHA: fused QKV and the output projection. MLA: the fused query/KV down-projection
        (replicated on every TP rank, as Megatron-Core, SGLang and vLLM run it), the query
        up-projection, the KV up-projection (absorbed decode: two per-head BMMs that multiply
        queries into, and outputs out of, the latent space, ``batch`` = this rank's heads), the
        output projection.
        """
        m, h, a, tp = self.model, self.model.hidden_size, self.model.attention, self.tp
        heads = a.num_heads
        if a.kind != "mla":   # a rank projects its query heads and the KV heads they read
            qkv = (heads / tp + 2 * kv_heads_per_rank(m, tp)) * m.head_dim
            return [(qkv, h, 1), (h, heads * m.head_dim / tp, 1)]
        nope, rope = m.head_dim, a.qk_rope_head_dim
        v = a.v_head_dim or m.head_dim
        latent = a.kv_lora_rank + rope
        shapes: list[tuple[float, float, int]] = (
            [(a.q_lora_rank + latent, h, 1), (heads * (nope + rope) / tp, a.q_lora_rank, 1)]
            if a.q_lora_rank else [(heads * (nope + rope) / tp + latent, h, 1)])
        local_heads = max(1, round(heads / tp))
        if absorbed:
            shapes += [(a.kv_lora_rank, nope, local_heads), (v, a.kv_lora_rank, local_heads)]
        else:
            shapes.append((heads * (nope + v) / tp, a.kv_lora_rank, 1))
        shapes.append((h, heads * v / tp, 1))
        return shapes

    def attention_core(self, tokens: float, context: float, kv_tokens: float = 0.0) -> float:
        """The fused attention kernel alone (what selective recomputation re-runs)."""
        return self._attention_core(tokens, context, kv_tokens) if tokens > 0 else 0.0

    def gemm(self, m: float, n: float, k: float) -> float:
        """One ``[m, k] x [k, n]`` GEMM in the compute dtype (e.g. the MTP projection)."""
        return self._gemm(m, n, k) + self._cast(m * k, kernels=1) if m > 0 else 0.0

    def _attention_core(self, tokens: float, context: float, kv_tokens: float) -> float:
        """The fused attention kernel (BF16): prefill/training flash attention, or decode
        reading ``kv_tokens`` tokens of KV cache."""
        m, dev, a = self.model, self.device, self.model.attention
        qk = m.head_dim + a.qk_rope_head_dim
        v = a.v_head_dim or m.head_dim
        attended = m.attended_context(context)
        if kv_tokens > 0:   # decode: KV-cache streaming
            kv = (kv_tokens * kv_bytes_per_token(m, self.kv_dtype or self.act_dtype)
                  / kv_shards(m, self.tp))
            q_io = tokens * 2 * m.query_width * self._ab / self.tp
            memory = memory_time(kv + q_io, dev, kernels=0,
                                 efficiency=dev.decode_attention_efficiency)
            if a.kind == "mla":
                # Absorbed: every head scores against the latent (kv_lora + rope) and sums
                # values in it (kv_lora).
                per_pair = 2.0 * a.num_heads * (2 * a.kv_lora_rank + a.qk_rope_head_dim)
                eff = (dev.mla_decode_efficiency or dev.attention_efficiency
                       or dev.matmul_efficiency)
            else:
                per_pair = 2.0 * a.num_heads * (qk + v)
                eff = dev.attention_efficiency or dev.matmul_efficiency
            compute = tokens * per_pair * attended / self.tp / (dev.flops(self._high_dtype)
                                                                 * eff)
            return max(compute, memory) + dev.kernel_overhead
        fused = dev.attention_efficiency
        forward_share = 1.0
        if self.inference and dev.prefill_attention_efficiency:
            fused = dev.prefill_attention_efficiency
        elif not self.inference:
            # Training: forward and backward take 3 forwards' time at the mixed efficiency; the
            # forward alone runs at the prefill efficiency, which gives its share of the time
            # (without one: its FLOP share, 1 of the 1 + 2.5 forwards' worth of the two passes).
            prefill = dev.prefill_attention_efficiency
            forward_share = min(1.0, fused / (3 * prefill)) if fused and prefill else 1 / 3.5
        if fused:
            flops = tokens * m.attention_core_flops_per_token(context) / self.tp
            eff = fused * attention_head_dim_factor(qk, v, dev, forward_share=forward_share)
        else:
            # Attention as matmuls: QK^T contracts over the head dim, AV outputs head-dim
            # columns; both are padded to the matmul tile (a 64-wide head half-fills a 128 MXU).
            qk_pad, v_pad = padded(qk, dev.gemm_tile_k), padded(v, dev.gemm_tile_n)
            flops = 2.0 * tokens * a.num_heads * (qk_pad + v_pad) * attended / self.tp
            eff = dev.matmul_efficiency
        core_io = tokens * (2 * m.query_width + 2 * m.key_width) * self._ab / self.tp
        compute = flops / (dev.flops(self._high_dtype) * eff)
        return max(compute, memory_time(core_io, dev, kernels=0)) + dev.kernel_overhead

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
        mla = m.attention.kind == "mla"
        shapes = self._projection_shapes(absorbed=mla and kv_tokens > 0)
        projections = sum(self._gemm(tokens, n, k, batch) for n, k, batch in shapes)
        core = self._attention_core(tokens, context, kv_tokens)
        kernels = ATTENTION_GLUE_KERNELS + (MLA_EXTRA_GLUE_KERNELS if mla else 0)
        glue = self.elementwise(tokens * glue_bytes_attention(m, self._ab) / self.tp,
                                kernels=kernels)
        cast = self._cast(tokens * (h + m.query_width) / self.tp, kernels=2)
        return projections + core + glue + cast

    # ---- MoE layer --------------------------------------------------------------------------
    def gate(self, tokens: float) -> float:
        """Router: a [tokens, hidden] x [hidden, experts] GEMM (BF16 weights and inputs) plus a
        softmax/top-k kernel, after the MoE sub-layer's add+norm (counted here too)."""
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
        return self._head_gemm(tokens, e, h) + self.top_k(tokens) + self.ffn_glue(tokens)

    def top_k(self, tokens: float) -> float:
        """The router's softmax/top-k kernel over FP32 logits (read the logits, write the
        weights and the expert ids): part of :meth:`gate`.

        0 when a measured fused-MoE table serves the routed experts (:attr:`moe_fused`): the
        frameworks' fused MoE calls route inside the measured op (SGLang's ``select_experts``,
        vLLM's ``FusedMoE`` and TensorRT-LLM's MoE module all take the router logits).
        """
        if tokens <= 0 or self.moe_fused:
            return 0.0
        return self.elementwise(3 * tokens * self.model.num_experts * 4)

    @cached_property
    def moe_fused(self) -> bool:
        """Whether a measured fused-MoE table of this model's expert shape serves the routed
        experts. Such a table times the framework's whole MoE call: routing (top-k), token
        permute, both grouped GEMMs, the activation and the weighted unpermute, so
        :meth:`top_k` and :meth:`permute` charge nothing beside it."""
        m = self.model
        return self.tables is not None and self.tables.has_moe(
            m.hidden_size, m.expert_ffn_size, m.effective_top_k, m.num_experts,
            self._table_dtype, tuple(dict.fromkeys((self.moe_kernel, "moe"))))

    def experts(self, tokens_per_slot: np.ndarray, ffn_size: int | None = None) -> float:
        """Grouped GEMMs over a device's expert slots: ``tokens_per_slot: [slots]`` tokens each.

        Two grouped kernels (up/gate projection, then down projection): each slot's tokens are
        padded to whole tile rows, every active slot's weights are read once, whether it got 1
        token or 10,000; a slot with no tokens reads no weights. Plus the activation kernel and
        the FP8 casts of both GEMMs' inputs, per routed token copy.
        """
        tokens = np.asarray(tokens_per_slot, dtype=float)
        f = ffn_size or self.model.expert_ffn_size // self.etp
        h = self.model.hidden_size
        if self.tables is not None:  # shaped tables (aiconfigurator import): fused MoE layer
            measured = self._measured_moe(tokens, f)
            if measured is not None:
                return measured
        if self.tables is not None:
            measured = self.tables.expert_ffn(h, f, tokens)
            if measured is not None:
                return measured
        return float(self._modelled_experts(tokens.reshape(1, -1), f)[0])

    def experts_per_device(self, tokens_per_slot: np.ndarray) -> np.ndarray:
        """float[devices]: :meth:`experts` of each row of ``tokens_per_slot: [devices, slots]``
        (the modelled kernels priced for all devices at once; measured tables row by row)."""
        tokens = np.asarray(tokens_per_slot, dtype=float)
        if self.tables is not None:
            return np.array([self.experts(row) for row in tokens])
        return self._modelled_experts(tokens, self.model.expert_ffn_size // self.etp)

    def _modelled_experts(self, tokens: np.ndarray, f: int) -> np.ndarray:
        """The kernel model's :meth:`experts` for each row of ``tokens: [devices, slots]``."""
        h, mats = self.model.hidden_size, self.model.ffn_matrices
        kw = dict(a_bytes=self._gemm_ab, b_bytes=self._gemm_wb, c_bytes=self._ab)
        up = grouped_gemm_times(tokens, (mats - 1) * f, h, self.device, self.compute_dtype, **kw)
        down = grouped_gemm_times(tokens, h, f, self.device, self.compute_dtype, **kw)
        out = up + down
        for i, copies in enumerate(np.where(tokens > 0, tokens, 0.0).sum(axis=1)):
            if copies > 0:
                activation = copies * (3 if mats == 3 else 2) * f * self._ab
                out[i] += (self.elementwise(activation)
                           + self._cast(copies * (h + f), kernels=2))
        return out

    def permute(self, token_copies: float) -> float:
        """Permute routed token copies into expert order and back (two memory-bound kernels:
        each reads and writes every copy's hidden vector); inside the measured op (0 here) when
        a fused-MoE table serves the experts (:attr:`moe_fused`)."""
        if token_copies <= 0 or self.moe_fused:
            return 0.0
        return self.elementwise(4 * token_copies * self.model.hidden_size * self._ab, kernels=2)

    def ffn_glue(self, tokens: float) -> float:
        """The fused residual add + norm before a block's FFN sub-layer, once per token
        (:func:`add_norm_bytes`)."""
        return self.elementwise(tokens * add_norm_bytes(self.model, self._ab),
                                kernels=FFN_GLUE_KERNELS)

    def shared_experts(self, tokens: float) -> float:
        m = self.model
        if m.num_shared_experts == 0 or tokens <= 0:
            return 0.0
        f = (m.shared_expert_ffn_size or m.expert_ffn_size) * m.num_shared_experts
        return self.dense_ffn(tokens, f, self.model.ffn_matrices, block_glue=False)

    def shared_output_add(self, tokens: float) -> float:
        """Summing the shared experts' output into the routed experts' combined output on this
        device's ``tokens``: one element-wise kernel (read two hidden vectors, write one) that
        frameworks run after the combine (0 without shared experts)."""
        if self.model.num_shared_experts == 0 or tokens <= 0:
            return 0.0
        return self.elementwise(tokens * 3 * self.model.hidden_size * self._ab)

    def dense_ffn(self, tokens: float, ffn_size: int, matrices: int | None = None, *,
                  block_glue: bool = True) -> float:
        """A dense FFN (dense blocks, shared experts), split over tensor-parallel ranks.

        Up/gate GEMM (column-parallel), activation, down GEMM (row-parallel). ``block_glue``: add
        the sub-layer's add+norm (a dense block's FFN; the gate carries it in an MoE block,
        whose shared experts pass False).
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
        f = ffn_size / self.tp
        gemms = self._gemm(tokens, (mats - 1) * f, h) + self._gemm(tokens, h, f)
        activation = tokens * (3 if mats == 3 else 2) * f * self._ab
        cast = self._cast(tokens * (h + ffn_size) / self.tp, kernels=2)
        glue = self.ffn_glue(tokens / self.tp) if block_glue else 0.0
        return gemms + self.elementwise(activation) + cast + glue

    # ---- model ends -------------------------------------------------------------------------
    def lm_head(self, tokens: float) -> float:
        """Output projection to the vocabulary (BF16 weights, also under FP8 recipes) plus the
        softmax over the FP32 logits (cross-entropy in training, sampling in inference)."""
        if tokens <= 0:
            return 0.0
        v = self.model.vocab_size
        return self.lm_head_gemm(tokens) + self.elementwise(tokens * v * 4 / self.tp)

    def lm_head_gemm(self, tokens: float) -> float:
        """The output projection's GEMM alone: a measured BF16 GEMM table where the profile has
        the width (beyond its widest row, scaled by the kernel model), else the kernel model."""
        if tokens <= 0:
            return 0.0
        h, v = self.model.hidden_size, self.model.vocab_size

        width = v / self.tp
        head = None
        if self.tables is not None and width == int(width):
            head = self.tables.gemm(tokens, int(width), h, self._high_dtype,
                                    model=self._head_gemm)
        return self._head_gemm(tokens, width, h) if head is None else head

    def _head_gemm(self, m: float, n: float, k: float) -> float:
        """The kernel model of a high-precision GEMM with FP32 output (router, LM head)."""
        return gemm_time(m, n, k, self.device, self._high_dtype, a_bytes=self._ab,
                         b_bytes=self._high_bytes, c_bytes=4)

    def embedding(self, tokens: float) -> float:
        """Embedding lookup: a gather of ``tokens`` rows (memory-bound)."""
        return self.elementwise(2 * tokens * self.model.hidden_size * self._ab)

    def elementwise(self, nbytes: float, kernels: int = 1) -> float:
        """Memory-bound glue (permute/unpermute tokens, norms, residual adds): ``nbytes`` over
        achievable HBM bandwidth plus one ``kernel_overhead`` per kernel (none for no bytes).
        A profile imported from measured tables whose source models these ops by a formula
        (``calibration.memory_op``) uses that formula's bandwidth and fixed cost instead."""
        if nbytes <= 0:
            return 0.0
        if self.tables is not None and self.tables.memory_op is not None:
            bandwidth, fixed = self.tables.memory_op
            return memory_time(nbytes, self.device, kernels=kernels,
                               efficiency=bandwidth / self.device.memory_bandwidth,
                               overhead=fixed)
        return memory_time(nbytes, self.device, kernels=kernels)

    # ---- measured shaped tables (moesim calibrate --import aiconfigurator) --------------------
    # Each helper answers from the profile's shaped tables or returns None (a shape, batch or
    # dtype the tables do not hold): the caller then takes its own model. Table times replace
    # the kernels they measured; the memory-bound glue around them stays modelled as above.
    # The frameworks' FP8 GEMM calls quantize their input inside the timed call, so a measured
    # FP8 GEMM carries no separate cast kernel.

    def _gemms(self, tokens: float, shapes: list[tuple[float, float]]) -> float | None:
        """Seconds of GEMMs ``[tokens, k] x [k, n]`` for ``shapes: [(n, k)]``, None if any
        shape is fractional or has no table."""
        if self.tables is None:
            return None
        total = 0.0
        for n, k in shapes:
            if n != int(n) or k != int(k):
                return None
            measured = self.tables.gemm(tokens, int(n), int(k), self._table_dtype,
                                        model=self._gemm)
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
        if t is None:
            return None
        heads = a.num_heads / tp
        kv_dtype = self.kv_dtype or self.act_dtype
        kv = "fp8" if dtype_bytes(kv_dtype) == 1 else kv_dtype
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
            # The whole sub-layer measured as one module, where the profile has it: then only
            # the block's fused residual add + norm (4h per token) is modelled beside it. A
            # DeepEP (wide-EP) deployment reads SGLang's wide-EP module first, whose fused
            # q_a + kv_a down-projection runs outside it (a GEMM from the tables).
            glue = self.elementwise(tokens * add_norm_bytes(m, self._ab) / tp, kernels=1)
            if self.moe_kernel != "moe":
                wide = t.mla_module(batch, length, int(heads), kv, self._table_dtype,
                                    generation=decode, wide_ep=True)
                down = self._gemms(tokens, [(
                    (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim, h)])
                if wide is not None and down is not None:
                    return wide + down + glue
            module = None
            if self.moe_kernel == "moe" or t.wide_ep_mla == "module":
                # (a wide-EP deployment of a backend that runs MLA as separate kernels there,
                # calibration.wide_ep_mla, takes the core and projection tables below)
                module = t.mla_module(batch, length, int(heads), kv, self._table_dtype,
                                      generation=decode)
            if module is not None:
                return module + glue
            mla_core = t.mla_generation if decode else t.mla_context
            core = mla_core(batch, length, int(heads), kv)
            # The model's projections (decode absorbed: its two per-head BMMs from their own
            # tables, the GEMMs from the GEMM tables).
            projected = self._projection_shapes(absorbed=decode)
            shapes = [(n, k) for n, k, b in projected if b == 1]
            if core is not None and decode:
                core += self._mla_bmms(tokens, [(n, k, b) for n, k, b in projected if b > 1])
        else:
            kv_heads = kv_heads_per_rank(m, tp)
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
        kernels = ATTENTION_GLUE_KERNELS + (MLA_EXTRA_GLUE_KERNELS if a.kind == "mla" else 0)
        glue = self.elementwise(tokens * glue_bytes_attention(m, self._ab) / tp, kernels=kernels)
        return core + projections + glue   # measured FP8 GEMMs include their input cast

    def _mla_bmms(self, tokens: float, bmms: list[tuple[float, float, int]]) -> float:
        """Absorbed MLA decode's two per-head BMMs ``[(n, k, heads)]`` (into the latent space,
        then out of it) on ``tokens`` tokens: measured tables where the profile has them, else
        the kernel model's batched GEMMs."""
        total = 0.0
        for post, (n, k, heads) in enumerate(bmms):
            measured = (self.tables.mla_bmm(tokens, heads, self._table_dtype, post=bool(post))
                        if self.tables is not None else None)
            total += self._gemm(tokens, n, k, batch=heads) if measured is None else measured
        return total

    def _measured_gate(self, tokens: float) -> float | None:
        """Router GEMM from the BF16 GEMM table; softmax/top-k and the FFN glue as modelled."""
        if self.tables is None:
            return None
        h, e = self.model.hidden_size, self.model.num_experts
        gemm = self.tables.gemm(tokens, e, h, self._high_dtype, model=self._head_gemm)
        if gemm is None:
            return None
        return gemm + self.top_k(tokens) + self.ffn_glue(tokens)

    def _measured_moe(self, tokens_per_slot: np.ndarray, ffn_size: int) -> float | None:
        """A device's routed experts from the fused-MoE table (grouped GEMMs, activation and
        the kernel's own routing glue), priced at the device's total token copies."""
        if self.tables is None:
            return None
        m = self.model
        tokens = np.asarray(tokens_per_slot, dtype=float).ravel()
        for kind in dict.fromkeys((self.moe_kernel, "moe")):
            measured = self.tables.moe(tokens, m.hidden_size, ffn_size, tokens.size,
                                       m.effective_top_k, self._table_dtype,
                                       experts=m.num_experts, kind=kind)
            if measured is not None:
                return measured
        return None

    def _measured_ffn(self, tokens: float, ffn_size: int, mats: int,
                      block_glue: bool) -> float | None:
        """A dense FFN's up(+gate) and down GEMMs from GEMM tables (this rank's TP shard), the
        activation, casts and block glue as modelled."""
        if self.tables is None:
            return None
        h, f = self.model.hidden_size, ffn_size / self.tp
        gemms = self._gemms(tokens, [((mats - 1) * f, h), (h, f)])
        if gemms is None:
            return None
        activation = tokens * (3 if mats == 3 else 2) * f * self._ab
        glue = self.ffn_glue(tokens) / self.tp if block_glue else 0.0
        return gemms + self.elementwise(activation) + glue   # GEMM rows include the FP8 cast


def kv_bytes_per_token(model: ModelSpec, dtype: str) -> float:
    """KV-cache bytes per token per attention layer (MLA caches the latent, not full heads)."""
    a = model.attention
    if a.kind == "mla":
        return (a.kv_lora_rank + a.qk_rope_head_dim) * dtype_bytes(dtype)
    return 2 * model.kv_heads * model.head_dim * dtype_bytes(dtype)


def kv_shards(model: ModelSpec, tp: int) -> int:
    """Ways the KV cache of a sequence is split over ``tp`` tensor-parallel ranks: each rank
    keeps the key/value heads its query heads read, at least one (vLLM, SGLang and TensorRT-LLM
    replicate a KV head over ranks when ``tp`` exceeds the KV heads), so ``min(tp, kv_heads)``;
    MLA's latent is read by every head, so each rank keeps all of it (1).

    >>> from types import SimpleNamespace as N
    >>> gqa = N(attention=N(kind="gqa"), kv_heads=4)
    >>> kv_shards(gqa, 2), kv_shards(gqa, 8), kv_shards(N(attention=N(kind="mla")), 8)
    (2, 4, 1)
    """
    if model.attention.kind == "mla":
        return 1
    return max(1, min(tp, model.kv_heads))


def kv_heads_per_rank(model: ModelSpec, tp: int) -> float:
    """Key/value heads one of ``tp`` tensor-parallel ranks keeps and reads (GQA/MHA):
    ``kv_heads / tp``, at least one (:func:`kv_shards`).

    >>> from types import SimpleNamespace as N
    >>> gqa = N(attention=N(kind="gqa"), kv_heads=4)
    >>> kv_heads_per_rank(gqa, 2), kv_heads_per_rank(gqa, 8)
    (2.0, 1.0)
    """
    return model.kv_heads / kv_shards(model, tp)
