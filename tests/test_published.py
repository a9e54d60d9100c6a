"""The published-measurement benchmark (benchmarks/published.py) and the compute refinements it needs.

Every published scenario must stay runnable (its tiny variant runs here), and the error table's
arithmetic must be the publisher's: Megatron's FLOP formula, the nccl-tests bus bandwidth and
Tutel's closed-form all-to-all are checked against numbers derived by hand in the comments.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim import network
from moesim.compute import KernelTimer, glue_bytes_attention
from moesim.spec.hardware import DeviceSpec
from moesim.spec.models import load_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import published  # noqa: E402


def _case(case_id: str) -> published.Case:
    return next(c for c in published.CASES if c.id == case_id)


def test_one_case_per_published_scenario_and_p1_to_p9_present():
    files = sorted(p.name for p in published.SCENARIOS.glob("*.yaml"))
    assert sorted(c.scenario for c in published.CASES) == files
    assert [c.id for c in published.CASES if not c.supplementary] == [f"P{i}" for i in
                                                                       range(1, 10)]


@pytest.mark.parametrize("case", published.CASES, ids=lambda c: c.id)
def test_every_published_scenario_runs_in_its_tiny_variant(case):
    full = published.load_case(case)                 # the real file validates as published
    assert full.name == Path(case.scenario).stem
    row = published.run_case(case, tiny=True)
    assert math.isfinite(row.prediction.value) and row.prediction.value > 0
    assert math.isfinite(row.error)


def test_megatron_flops_per_token_mixtral_8x7b_by_hand():
    # 12 L h^2 [(1 + g/a + S/h) q/h + (f/h) k 3/2 + V/(2 L h)], Mixtral 8x7B at S = 4096, TP1:
    # (1 + 8/32 + 4096/4096) * 1 = 2.25; 14336/4096 * 2 * 1.5 = 10.5; 32000 / (2*32*4096).
    s = published.load_case(_case("P1"))
    hand = 12 * 32 * 4096**2 * (2.25 + 10.5 + 32000 / (2 * 32 * 4096))
    assert published.megatron_flops_per_token(s) == pytest.approx(hand, rel=1e-12)
    assert hand == pytest.approx(82.93e9, rel=1e-3)
    # P1's table conversion: 468 TFLOPS per GPU is 468e12 / 82.93e9 = 5,643 tokens/s per GPU.
    assert 468e12 / hand == pytest.approx(5643, rel=1e-3)


def test_megatron_causal_count_of_qwen3_235b_at_128k_by_hand():
    """S10 (Qwen3-235B, 128K, TP4), as Megatron-LM counts since March 2025: the score term
    halved. q/h = 64 x 128 / 4096 = 2; (1 + 4/64 + 131072 / 4096 / 2) * 2 = 34.125 against the
    unhalved 66.125; 1536/4096 * 8 * 1.5 = 4.5; vocab 151936 padded to 512 -> 152064."""
    s = published.load_case(_case("S10"))
    logits = 152064 / (2 * 94 * 4096)
    hand = 12 * 94 * 4096**2 * (34.125 + 4.5 + logits)
    assert published.megatron_flops_per_token(s, causal=True) == pytest.approx(hand, rel=1e-12)
    unhalved = 12 * 94 * 4096**2 * (66.125 + 4.5 + logits)
    assert published.megatron_flops_per_token(s) == pytest.approx(unhalved, rel=1e-12)


def test_megatron_mfu_mixtral_8x22b_pads_the_vocabulary_to_128_x_tp():
    # TP4: vocab 32000 padded to a multiple of 512 -> 32256. (1 + 8/48 + 4096/6144) * 1;
    # 16384/6144 * 2 * 1.5 = 8.0; 32256 / (2*56*6144).
    s = published.load_case(_case("P5"))
    hand = 12 * 56 * 6144**2 * ((1 + 8 / 48 + 4096 / 6144) + 8.0 + 32256 / (2 * 56 * 6144))
    assert published.megatron_flops_per_token(s) == pytest.approx(hand, rel=1e-12)
    # 46.3% MFU <-> 46.3% of 989.4 TFLOPS / 250.6 GFLOP = 1,828 tokens/s per GPU.
    assert 0.463 * published.H100_BF16_PEAK / hand == pytest.approx(1828, rel=2e-3)


def test_error_percent_is_signed_relative_to_the_published_figure():
    assert published.error_percent(514.0, 468.0) == pytest.approx(100 * 46 / 468)
    assert published.error_percent(1.4, 4.25) == pytest.approx(-67.0588, rel=1e-4)


def test_alltoall_bus_bandwidth_formula():
    # 1 GiB per rank in 2.54 ms over 8 ranks: algbw 422.7 GB/s, busbw x 7/8 = 369.9 GB/s.
    assert published.alltoall_busbw(2.54e-3, 2**30, 8) == pytest.approx(2**30 / 2.54e-3 * 7 / 8)


def test_flow_level_alltoall_on_one_dgx_gives_the_profiles_nvlink_rate():
    # Every GPU sends 1/8 GiB to each of 7 peers through its own 450 x 0.822 GB/s egress and
    # ingress: t = (7/8 GiB) / 369.9 GB/s + 2 us latency, so busbw = 369.9 GB/s.
    s = published.load_case(_case("P8"))
    seconds, nic = published.uniform_alltoall(s, 2**30)
    assert nic == 0.0
    assert seconds == pytest.approx(7 / 8 * 2**30 / (450e9 * 0.822) + 2e-6, rel=1e-6)


def test_multi_node_alltoall_is_nic_bound_with_the_n_over_n_minus_1_bus_factor():
    # 2 DGX nodes: each GPU sends half of its buffer off-node through its 400 Gb/s x 0.97 NIC,
    # t = (2^30 / 2) / 48.5 GB/s (+ us latencies); busbw = 2^30 / t * 15/16 = 2 x 48.5 x 15/16.
    s = published.load_case(_case("P7"), overrides=("cluster.nodes=2", "parallelism.dp=16"))
    seconds, nic = published.uniform_alltoall(s, 2**30)
    assert nic == pytest.approx(2**30 / 2)
    assert nic / seconds == pytest.approx(48.5e9, rel=1e-3)
    busbw = published.alltoall_busbw(seconds, 2**30, 16)
    assert busbw == pytest.approx(48.5e9 * 2 * 15 / 16, rel=1e-3)


def test_tutel_closed_form_by_hand():
    # 16384 tokens x 2 x 1.0 x 2048 x 4 B = 268,435,456 B per GPU. Every message also pays its
    # link's per-message cost h / B_eff (IB: h = 73 KB; NVLink: h = 40 KB). Direct: 2047 x
    # (4 us + 73 KB / 24.25 GB/s) + 2047/2048 x B / (25 GB/s x 0.97). 2DH: 7 x (2 us + h_nvl /
    # (300 x 0.767 GB/s)) + 7/8 B / (300 x 0.767 GB/s), then 255 x (4 us + 73 KB / 24.25 GB/s)
    # + 255/256 B / 24.25 GB/s, then two read+write passes over B at 2039 x 0.87 GB/s.
    s = published.load_case(_case("P6"))
    t = published.tutel_alltoall_times(s)
    b = 16384 * 2 * 2048 * 4
    h_ib, h_nvl = 73e3, 40e3                   # a100-sxm-80gb.yaml: IB and NVLink h
    assert t["bytes"] == b
    assert t["direct"] == pytest.approx(2047 * (4e-6 + h_ib / 24.25e9) + 2047 / 2048 * b / 24.25e9)
    nvl = 300e9 * 0.767
    two_dh = (7 * (2e-6 + h_nvl / nvl) + 7 / 8 * b / nvl + 255 * (4e-6 + h_ib / 24.25e9)
              + 255 / 256 * b / 24.25e9 + 4 * b / (2039e9 * 0.87))
    assert t["2dh"] == pytest.approx(two_dh)


def test_closed_form_alltoall_bandwidth_term_matches_the_flow_model():
    # Independent check of the closed form P6 uses: with one rank per node (every byte on the
    # NIC), the flow-level time of a uniform all-to-all on 4 nodes equals the alpha-beta
    # bandwidth term (n-1)/n x B / bw, up to the flow model's single latency.
    s = published.load_case(_case("P7"), overrides=(
        "cluster.devices_per_node=1", "parallelism.dp=4", "parallelism.ep=4"))
    seconds, _ = published.uniform_alltoall(s, 2**30)
    nic = s.hardware.link("scale_out")
    closed = network.all_to_all_alpha_beta(2**30, 4, nic.effective_bandwidth, 0.0)
    assert seconds == pytest.approx(closed, rel=1e-3)


def test_sliding_window_context_against_brute_force():
    # gpt-oss: window 128 on every other layer, causal S = 4096 (mean full context S/2 = 2048).
    m = load_model({"base": "gpt-oss-120b", "attention": {"sliding_window": 128,
                                                          "full_attention_every": 2}})
    S, W = 4096, 128
    windowed = np.minimum(np.arange(1, S + 1), W).mean()        # 126.0 tokens, brute force
    full = np.arange(1, S + 1).mean() - 0.5                      # S/2, as moesim counts it
    assert m.attended_context(S / 2) == pytest.approx((full + windowed) / 2, rel=1e-4)
    assert load_model("gpt-oss-120b").attended_context(S / 2) == m.attended_context(S / 2)
    no_window = load_model({"base": "gpt-oss-120b", "attention": {"sliding_window": 0}})
    assert no_window.attended_context(S / 2) == S / 2


def _hand_device(**changes) -> DeviceSpec:
    # Compute-bound by construction: HBM so fast that glue and casts cost ~nothing.
    fields = dict(name="hand", kind="gpu", peak_flops={"bf16": 100e12, "fp8": 200e12},
                  memory=80e9, memory_bandwidth=1e30, attention_efficiency=0.46)
    return DeviceSpec(**{**fields, **changes})


def test_fp8_speeds_up_attention_projections_but_not_the_bf16_attention_core():
    # tiny-cpu: h 256, 4 heads of 64, 2 KV heads. Projection params 256*256 + 2*256*128 +
    # 256*256 = 196,608 -> 393,216 FLOPs per token; core 2 * 4 * (64 + 64) * context.
    m = load_model("tiny-cpu")
    tokens, context = 1000, 100
    proj, core = tokens * 393216, tokens * 1024 * context
    eff = 0.46                                   # the device's attention_efficiency
    bf16 = KernelTimer(m, _hand_device(), "bf16").attention(tokens, context)
    fp8 = KernelTimer(m, _hand_device(), "fp8").attention(tokens, context)
    assert bf16 == pytest.approx(proj / 100e12 + core / (100e12 * eff), rel=1e-9)
    assert fp8 == pytest.approx(proj / 200e12 + core / (100e12 * eff), rel=1e-9)


def test_glue_kernels_add_to_memory_bound_time_by_hand():
    # Attention glue per token, tiny-cpu in BF16: 2 B x (fused residual add + norm 4h: read
    # input and residual, write both; RoPE 2(q + k)) = 2 x (1,024 + 2 x (256 + 128)) = 3,584 B;
    # on a 10 TB/s x 0.5 device (the GEMMs stay compute-bound) 1000 tokens take 3.584 MB / 5 TB/s
    # = 0.72 us on top of them.
    m = load_model("tiny-cpu")
    assert glue_bytes_attention(m, 2) == 3584
    slow = _hand_device(memory_bandwidth=10e12, memory_efficiency=0.5)
    fast = _hand_device()
    with_glue = KernelTimer(m, slow, "bf16").attention(1000, 100)
    without = KernelTimer(m, fast, "bf16").attention(1000, 100)
    assert with_glue - without == pytest.approx(3584 * 1000 / 5e12, rel=1e-6)
