"""Kernel physics (moesim/kernels.py) and how KernelTimer uses it, on made-up devices by hand.

The toy GPU has 4 SMs, 2 x 2 output tiles and 16 FLOP/s: one tile of k = 1 is 2*2*2 = 8 FLOPs,
and one SM runs at 16/4 = 4 FLOP/s, so a wave of tiles with k = 1 takes 2 s.
"""

from __future__ import annotations

import numpy as np
import pytest

from moesim.compute import KernelTimer, roofline
from moesim.errors import ScenarioError
from moesim.kernels import (
    attention_head_dim_factor,
    gemm_time,
    grouped_gemm_time,
    grouped_gemm_times,
    memory_time,
    overlapped_compute_slowdown,
    waves,
)
from moesim.spec.fields import build
from moesim.spec.hardware import DeviceSpec, load_hardware
from moesim.spec.models import load_model


def toy(**changes) -> DeviceSpec:
    fields = dict(name="toy", peak_flops={"bf16": 16.0}, memory=1e9, memory_bandwidth=1e30,
                  sm_count=4, gemm_tile_m=2, gemm_tile_n=2, gemm_scheduler="waves")
    return DeviceSpec(**{**fields, **changes})


NO_BYTES = dict(a_bytes=0.0, b_bytes=0.0, c_bytes=0.0)


def test_tile_and_wave_quantisation_m_just_above_a_tile_multiple():
    d = toy()
    # m = 4, n = 4: 2 x 2 = 4 tiles = one wave = 2 s.
    assert gemm_time(4, 4, 1, d, "bf16", **NO_BYTES) == pytest.approx(2.0)
    # m = 5: 3 tile rows x 2 = 6 tiles = 1.5 waves -> 2 whole waves = 4 s, as much as m = 8.
    assert gemm_time(5, 4, 1, d, "bf16", **NO_BYTES) == pytest.approx(4.0)
    assert gemm_time(8, 4, 1, d, "bf16", **NO_BYTES) == pytest.approx(4.0)
    # A stream-K scheduler spreads the half wave: 1.5 waves = 3 s.
    assert gemm_time(5, 4, 1, toy(gemm_scheduler="stream_k"), "bf16",
                     **NO_BYTES) == pytest.approx(3.0)
    # Below one wave split-K fills the idle SMs: 1 tile = a quarter wave = 0.5 s.
    assert gemm_time(1, 1, 1, d, "bf16", **NO_BYTES) == pytest.approx(0.5)
    assert waves(6, d) == 2 and waves(1, d) == 0.25


def test_contraction_scales_tile_time():
    # k = 3: each tile is 2*2*2*3 = 24 FLOPs at 4 FLOP/s = 6 s per wave.
    assert gemm_time(4, 4, 3, toy(), "bf16", **NO_BYTES) == pytest.approx(6.0)


def test_tile_overhead_is_paid_once_per_tile_per_wave():
    d = toy(gemm_tile_overhead=0.5)
    # k = 1: 2 s of math per wave + 0.5 s for the wave's tiles (each SM runs one) = 2.5 s;
    # m = 8: 8 tiles = 2 waves = 5 s; k = 3: 6 s of math + 0.5 s.
    assert gemm_time(4, 4, 1, d, "bf16", **NO_BYTES) == pytest.approx(2.5)
    assert gemm_time(8, 4, 1, d, "bf16", **NO_BYTES) == pytest.approx(5.0)
    assert gemm_time(4, 4, 3, d, "bf16", **NO_BYTES) == pytest.approx(6.5)
    # A short contraction reaches less of the main loop's rate than a long one: k = 1 at
    # 2 / 2.5 = 0.8 of it, k = 3 at 6 / 6.5; FP8 (twice the FLOP/s, same tile time) lower still:
    # 1 s of math + 0.5 s.
    fp8 = toy(gemm_tile_overhead=0.5, peak_flops={"bf16": 16.0, "fp8": 32.0})
    assert gemm_time(4, 4, 1, fp8, "fp8", **NO_BYTES) == pytest.approx(1.5)
    # The grouped GEMM pays it per tile too: 2 experts x 2 tokens = 2 tile rows x 2 tile
    # columns = 4 tiles = 1 wave: 2 s + 0.5 s.
    assert grouped_gemm_time(np.array([2.0, 2.0]), 4, 1, d, "bf16",
                             **NO_BYTES) == pytest.approx(2.5)


def test_tile_overhead_needs_a_tile_model():
    with pytest.raises(ScenarioError, match="gemm_tile_overhead.*tile model"):
        toy(gemm_tile_overhead=1e-6, gemm_tile_m=1, gemm_tile_n=1)
    with pytest.raises(ScenarioError, match="gemm_tile_overhead"):
        toy(gemm_tile_overhead=1e-6, sm_count=0)


def test_launch_floor_tiny_gemm_costs_floor_plus_its_bytes():
    d = toy(peak_flops={"bf16": 1e30}, memory_bandwidth=10.0, kernel_overhead=0.25)
    # 1 x 1 x 1 in BF16: read A (2 B) and B (2 B), write C (2 B) = 6 B at 10 B/s + 0.25 s.
    assert gemm_time(1, 1, 1, d, "bf16", a_bytes=2, b_bytes=2, c_bytes=2) == pytest.approx(0.85)
    # Memory-bound kernels pay one floor each.
    assert memory_time(20.0, d, kernels=3) == pytest.approx(2.0 + 0.75)


def test_memory_bound_to_compute_bound_crossover():
    # n = k = 4, 1 byte per weight, free activations: 16 B at 2 B/s = 8 s of weight reads.
    d = toy(memory_bandwidth=2.0)
    kw = dict(a_bytes=0.0, b_bytes=1.0, c_bytes=0.0)
    # Tiles of k = 4 take 8 s per wave; m <= 4 is at most one wave (m = 2: 2 tiles = half a
    # wave = 4 s): the weight read (8 s) bounds. m = 6: 6 tiles = 2 waves = 16 s, compute-bound.
    assert gemm_time(2, 4, 4, d, "bf16", **kw) == pytest.approx(8.0)
    assert gemm_time(4, 4, 4, d, "bf16", **kw) == pytest.approx(8.0)
    assert gemm_time(6, 4, 4, d, "bf16", **kw) == pytest.approx(16.0)


def test_grouped_gemm_uneven_tokens_cost_more_tiles_than_even():
    d = toy()
    # n = 2, k = 1: one tile column per expert; a tile row per 2 tokens.
    even = grouped_gemm_time(np.array([2, 2, 2, 2]), 2, 1, d, "bf16", **NO_BYTES)
    hot = grouped_gemm_time(np.array([5, 1, 1, 1]), 2, 1, d, "bf16", **NO_BYTES)
    cold = grouped_gemm_time(np.array([1] * 8), 2, 1, d, "bf16", **NO_BYTES)
    assert even == pytest.approx(2.0)     # 4 tiles: one wave
    assert hot == pytest.approx(4.0)      # 3 + 1 + 1 + 1 = 6 tiles: two waves
    assert cold == pytest.approx(4.0)     # 8 half-empty tiles: two waves
    # Weight reads: each active expert's 2 weights once (1 B each), idle experts none.
    mem = toy(peak_flops={"bf16": 1e30}, memory_bandwidth=1.0)
    kw = dict(a_bytes=0.0, b_bytes=1.0, c_bytes=0.0)
    assert grouped_gemm_time(np.array([8, 0, 0, 0]), 2, 1, mem, "bf16",
                             **kw) == pytest.approx(2.0)
    assert grouped_gemm_time(np.array([2, 2, 2, 2]), 2, 1, mem, "bf16",
                             **kw) == pytest.approx(8.0)


def test_grouped_gemm_per_device_prices_each_row_by_hand():
    # The same toy device (4 SMs, 2 x 2 tiles, 4 FLOP/s per SM, whole waves), one row per device:
    # even 4 tiles = one wave (2 s); hot 6 tiles = two waves (4 s); idle = no kernel (0 s, not
    # the launch floor); one token = 1 tile = a quarter wave (0.5 s) + the 0.25 s floor.
    d = toy(kernel_overhead=0.25)
    rows = np.array([[2, 2, 2, 2], [5, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    got = grouped_gemm_times(rows, 2, 1, d, "bf16", **NO_BYTES)
    assert got.tolist() == pytest.approx([2.25, 4.25, 0.0, 0.75])


def test_timer_prices_all_devices_as_it_prices_each():
    from moesim.compute import KernelTimer

    timer = KernelTimer(load_model("mixtral-8x7b"), load_hardware("h100-sxm").device,
                        compute_dtype="fp8")   # FP8: the casts are priced per device too
    rng = np.random.default_rng(0)
    slots = rng.integers(0, 300, size=(16, 4)).astype(float)
    slots[3] = 0.0
    each = [timer.experts(row) for row in slots]
    assert timer.experts_per_device(slots).tolist() == pytest.approx(each, rel=1e-12)
    assert each[3] == 0.0 and min(each[:3] + each[4:]) > 0


def test_fp8_efficiency_scales_dense_and_grouped_gemms_alike():
    # FP8 reaches 0.5 where BF16 reaches 1.0 (matmul_efficiency default): half the rate, dense
    # (4 tiles = 1 wave = 2 s at 32 FLOP/s FP8 peak x 0.5) and grouped (0.8 x 0.5 of 32).
    d = toy(peak_flops={"bf16": 16.0, "fp8": 32.0}, fp8_matmul_efficiency=0.5,
            grouped_gemm_efficiency=0.8)
    assert gemm_time(4, 4, 1, d, "fp8", **NO_BYTES) == pytest.approx(2.0)
    assert gemm_time(4, 4, 1, d, "bf16", **NO_BYTES) == pytest.approx(2.0)
    assert grouped_gemm_time(np.array([2, 2, 2, 2]), 2, 1, d, "fp8",
                             **NO_BYTES) == pytest.approx(2.0 / 0.8)


def test_grouped_gemm_uses_its_own_efficiencies():
    d = toy(grouped_gemm_efficiency=0.5)
    assert grouped_gemm_time(np.array([2, 2, 2, 2]), 2, 1, d, "bf16",
                             **NO_BYTES) == pytest.approx(4.0)
    m = toy(peak_flops={"bf16": 1e30}, memory_bandwidth=1.0, grouped_gemm_memory_efficiency=0.25)
    assert grouped_gemm_time(np.array([1]), 2, 1, m, "bf16", a_bytes=0, b_bytes=1,
                             c_bytes=0) == pytest.approx(8.0)


def test_hot_expert_on_h100_costs_more_than_the_same_tokens_even():
    # DeepSeek-V3 prefill-like (compute-bound): 8 local experts, 8192 token copies, FP8.
    timer = KernelTimer(load_model("deepseek-v3"), load_hardware("h100-sxm").device, "fp8",
                        "fp8")
    even = timer.experts(np.full(8, 1024.0))
    skewed = timer.experts(np.array([1025.0, 1023, 1024, 1024, 1024, 1024, 1024, 1024]))
    hot = timer.experts(np.array([8192.0 - 7 * 64, 64, 64, 64, 64, 64, 64, 64]))
    assert skewed > even          # 1025 tokens need a ninth 128-row tile
    assert hot > even             # 61 + 7 tile rows, the cold experts' half-empty


def test_tpu_padding_wastes_the_mxu():
    # MXU-like: 128 x 128 array, contraction and output columns padded to 128, rows to 8.
    tpu = DeviceSpec(name="mxu", kind="tpu", peak_flops={"bf16": 4 * 2.0 * 8 * 128 * 128},
                     memory=1e9, memory_bandwidth=1e30, sm_count=4, gemm_tile_m=8,
                     gemm_tile_n=128, gemm_tile_k=128)
    # One (8 x 128 x 128) tile per unit per second.
    assert gemm_time(32, 128, 128, tpu, "bf16", **NO_BYTES) == pytest.approx(1.0)
    # k = 64 fills half the array: same time as k = 128, i.e. half the useful FLOP rate.
    assert gemm_time(32, 128, 64, tpu, "bf16", **NO_BYTES) == pytest.approx(1.0)
    # d_model 768 = 6 x 128 fills it: 4 row tiles x 6 = 24 tiles on 4 MXUs = 6 waves.
    assert gemm_time(32, 768, 768, tpu, "bf16", **NO_BYTES) == pytest.approx(6.0 * 6)


def test_tpu_attention_with_64_wide_heads_runs_at_half_rate():
    # tiny-cpu: 4 heads of 64. On an MXU device the attention core pads 64 -> 128 in both
    # QK^T (contraction) and AV (output columns): twice the FLOPs of 128-wide heads.
    m = load_model("tiny-cpu")
    tpu = DeviceSpec(name="mxu", kind="tpu", peak_flops={"bf16": 1e12}, memory=1e9,
                     memory_bandwidth=1e30, sm_count=4, gemm_tile_m=8, gemm_tile_n=128,
                     gemm_tile_k=128)
    tokens, context = 1024, 512
    core = KernelTimer(m, tpu)._attention_core(tokens, context, 0.0)
    assert core == pytest.approx(2 * tokens * 4 * (128 + 128) * context / 1e12)


def test_profile_without_tile_fields_is_the_plain_roofline():
    cpu = load_hardware("cpu-local").device
    assert cpu.sm_count == 0 and cpu.kernel_overhead == 0
    m, n, k = 300, 500, 700
    nbytes = 2 * (m * k + k * n + m * n)
    assert gemm_time(m, n, k, cpu, "bf16", a_bytes=2, b_bytes=2, c_bytes=2) == pytest.approx(
        roofline(2.0 * m * n * k, nbytes, cpu, "bf16"))


def test_h100_one_token_gemm_is_weight_streaming_plus_the_floor():
    # 4096 x 4096 BF16 weights = 33.55 MB at 3.35 TB/s x 0.9 = 11.13 us, + 4 us floor.
    h100 = load_hardware("h100-sxm").device
    t = gemm_time(1, 4096, 4096, h100, "bf16", a_bytes=2, b_bytes=2, c_bytes=2)
    assert t == pytest.approx(2 * (4096 + 4096 * 4096 + 4096) / (3.35e12 * 0.9) + 4e-6)


def test_block_kernels_are_counted_one_floor_each():
    # Free FLOPs and bytes: only the floors are left.
    free = toy(peak_flops={"bf16": 1e30, "fp8": 1e30}, kernel_overhead=1.0)
    gqa = KernelTimer(load_model("tiny-cpu"), free)
    assert gqa.gate(1) == pytest.approx(3.0)          # router GEMM, softmax/top-k, add+norm
    # QKV GEMM, core, output GEMM, add+norm, rotary/KV write.
    assert gqa.attention(1, 10, 10) == pytest.approx(5.0)
    assert gqa.experts(np.array([1.0, 0.0])) == pytest.approx(3.0)   # up, activation, down
    assert gqa.dense_ffn(1, 64) == pytest.approx(4.0)                # + add+norm
    assert gqa.shared_experts(1) == 0.0                               # tiny-cpu has none
    assert gqa.permute(8) == pytest.approx(2.0)
    mla = KernelTimer(load_model("deepseek-v3"), free, "bf16", "bf16")
    # Fused q/kv down, q up, two absorption BMMs, output GEMM, core, 3 glue (incl. latent norm).
    assert mla.attention(1, 10, 10) == pytest.approx(9.0)
    # Prefill: the KV up-projection is one GEMM instead of two BMMs.
    assert mla.attention(1, 10, 0) == pytest.approx(8.0)
    # FP8 GEMMs add one quantize kernel per GEMM input (two per sub-layer).
    fp8 = KernelTimer(load_model("deepseek-v3"), free, "fp8", "fp8")
    assert fp8.attention(1, 10, 10) == pytest.approx(11.0)
    assert fp8.experts(np.array([1.0])) == pytest.approx(5.0)


def test_mla_decode_runs_absorbed_and_compute_heavy():
    # DeepSeek-V3: 128 heads score against the 512 + 64 latent and sum values in the 512
    # latent: 2 * 128 * (512 + 64 + 512) = 278,528 FLOPs per (query, cached token) pair.
    m = load_model("deepseek-v3")
    d = toy(peak_flops={"bf16": 1e15}, mla_decode_efficiency=0.5, sm_count=0)
    tokens, context = 64, 2049
    core = KernelTimer(m, d)._attention_core(tokens, context, tokens * context)
    assert core == pytest.approx(tokens * context * 278_528 / (1e15 * 0.5))


def test_inference_prefill_attention_runs_the_forward_alone():
    # tiny-cpu: core FLOPs per token 2 * 4 heads * (64 + 64) * context; compute-bound device.
    m = load_model("tiny-cpu")
    d = toy(peak_flops={"bf16": 1e12}, sm_count=0, attention_efficiency=0.4,
            prefill_attention_efficiency=0.8)
    tokens, context = 1000, 500
    flops = tokens * 2 * 4 * 128 * context
    assert KernelTimer(m, d)._attention_core(tokens, context, 0) == pytest.approx(
        flops / 0.4e12)
    assert KernelTimer(m, d, inference=True)._attention_core(tokens, context, 0) == (
        pytest.approx(flops / 0.8e12))


def test_narrow_heads_pay_the_softmax_exponentials():
    # Matmul peak 254x the exp rate (H100: 989 / 3.9). Per score element a 64-wide head's
    # forward does 2*64 + 2*64 = 256 matmul FLOPs and one exp: 256 / (256 + 254) of the matmul
    # rate, against 512 / (512 + 254) at the 128-wide heads the efficiencies were measured at;
    # its backward 6*64 + 4*64 = 640 against 1280.
    m = load_model("tiny-cpu")
    d = toy(peak_flops={"bf16": 1e12}, sm_count=0, attention_efficiency=0.4,
            prefill_attention_efficiency=0.8, special_function_rate=1e12 / 254)
    fwd = (256 / 510) / (512 / 766)
    bwd = (640 / 894) / (1280 / 1534)
    tokens, context = 1000, 500
    flops = tokens * 2 * 4 * 128 * context
    assert KernelTimer(m, d, inference=True)._attention_core(tokens, context, 0) == (
        pytest.approx(flops / (0.8e12 * fwd)))
    # Training: the forward is 0.4 / (3 x 0.8) = 1/6 of the two passes' time at 128.
    train = 1 / ((1 / 6) / fwd + (5 / 6) / bwd)
    assert KernelTimer(m, d)._attention_core(tokens, context, 0) == pytest.approx(
        flops / (0.4e12 * train))
    assert attention_head_dim_factor(128, 128, d, forward_share=1 / 6) == pytest.approx(1.0)
    # DeepSeek-V3's MLA (192-wide queries and keys, 128-wide values) runs a little faster.
    assert attention_head_dim_factor(192, 128, d) == pytest.approx((640 / 894) / (512 / 766))
    assert attention_head_dim_factor(64, 64, toy()) == 1.0    # no rate given: not modelled


def test_an_fp32_model_runs_attention_router_and_head_at_the_fp32_rate():
    # BF16 is kept for the attention core, router and LM head under BF16 and FP8 recipes; an
    # FP32 model has no faster dtype to fall back on: at 1/10 of the BF16 peak the attention
    # core takes 10x as long, and the MFU of such a step stays below 1 (it once read 1.2-2.1
    # for Tutel's FP32 layer, P6's scenario, with attention timed at the BF16 peak).
    m = load_model("tiny-cpu")
    d = toy(peak_flops={"bf16": 1e12, "fp32": 1e11}, sm_count=0, attention_efficiency=0.5)
    tokens, context = 1000, 500
    flops = tokens * 2 * 4 * 128 * context
    assert KernelTimer(m, d)._attention_core(tokens, context, 0) == pytest.approx(
        flops / 0.5e12)
    fp32 = KernelTimer(m, d, "fp32", "fp32", "fp32")
    assert fp32._attention_core(tokens, context, 0) == pytest.approx(flops / 0.5e11)
    # The router GEMM [1000, 256] x [256, 4]: FP32 weights and compute.
    assert fp32.gate(tokens) > KernelTimer(m, d).gate(tokens)


def test_decode_attention_streams_the_kv_cache_at_its_own_efficiency():
    # tiny-cpu GQA: 2 KV heads x 64 x 2 (K and V) x 2 B = 512 B per cached token per layer.
    m = load_model("tiny-cpu")
    d = toy(peak_flops={"bf16": 1e30}, memory_bandwidth=1e9, decode_attention_efficiency=0.5,
            kernel_overhead=1e-6)
    tokens, context = 4, 1000
    core = KernelTimer(m, d)._attention_core(tokens, context, tokens * context)
    q_io = tokens * 2 * m.query_width * 2
    assert core == pytest.approx((tokens * context * 512 + q_io) / 0.5e9 + 1e-6)


def test_comm_sms_slow_overlapped_compute():
    h100 = load_hardware("h100-sxm").device
    assert overlapped_compute_slowdown(h100) == pytest.approx(1 / (1 - 0.18))
    assert overlapped_compute_slowdown(toy()) == 1.0


def test_bad_kernel_fields_name_the_field():
    base = {"name": "x", "peak_flops": {"bf16": "1 TFLOPS"}, "memory": "1 GB",
            "memory_bandwidth": "1 TB/s"}
    with pytest.raises(ScenarioError, match=r"gemm_scheduler.*allowed: 'waves', 'stream_k'"):
        build(DeviceSpec, {**base, "gemm_scheduler": "fastest"}, source="p.yaml")
    with pytest.raises(ScenarioError, match="comm_sm_fraction"):
        build(DeviceSpec, {**base, "comm_sm_fraction": 1.5}, source="p.yaml")
    d = build(DeviceSpec, {**base, "kernel_overhead": "3 us"}, source="p.yaml")
    assert d.kernel_overhead == pytest.approx(3e-6)
