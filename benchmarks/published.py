"""Predict published MoE measurements (P1-P9) from datasheet hardware profiles: the accuracy table.

    python benchmarks/published.py            # all nine cases, a few minutes on 2 cores
    python benchmarks/published.py --tiny     # every case on a cut-down scenario, seconds (tests)
    python benchmarks/published.py --cases P1,P7

Each case is a scenario in ``scenarios/published/`` (model, cluster, parallel layout, batch and
precision as published; hardware only from the shipped datasheet profiles) and a published figure,
copied below with its source. Training cases (P1-P5, P9) run ``moesim.assembly.simulate`` and convert
the simulated tokens/s into the published metric *with the publisher's own FLOP convention*:

- tokens/s per GPU (P2, P3, P4, P9) needs no convention;
- Megatron-Core's TFLOPS and MFU (P1, P5) use Megatron-LM's ``num_floating_point_operations``
  (:func:`megatron_flops_per_token`: 6 FLOPs per GEMM weight per token, attention scores over the
  full sequence, no causal halving, logits included), against the 989.4 TFLOPS BF16 peak; the
  model zoo's TFLOPS (S7-S10, run on Megatron-LM from May 2025 on) use the same function with
  the causal halving Megatron-LM has counted since March 2025.

Communication cases run moesim's network model alone: P7 and P8 push a uniform 1 GiB-per-GPU
all-to-all through the flow-level solver (``moesim.pricing.alltoall.alltoall``); P6 prices Tutel's
dispatch buffer with the closed-form all-to-all (``moesim.network.all_to_all_alpha_beta``),
because the flow-level solver would need 4.2M flows at 2,048 GPUs.

Supplementary rows are printed as cross-checks and left out of the statistics: S1, S2 (P2's and
P3's model and GPUs in NeMo Automodel), S3-S6 (one model, Qwen3-235B-A22B, on one 256-H100
cluster in four Megatron-Core layouts), S7 (S6's layout at a 16K context, the whole MoE layer
recomputed) and S8-S10 (the same at 32K-128K with context parallelism 2-8). docs/accuracy.md
discusses every row.

Printed: case, metric, published, predicted, error % (predicted vs published), and the biggest
predicted components (shares of the simulated step, or the collective's parts); then the median
and largest absolute error over P1-P9.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim import network  # noqa: E402
from moesim.assembly import simulate  # noqa: E402
from moesim.pricing.alltoall import alltoall  # noqa: E402
from moesim.pricing.context import scenario_topology  # noqa: E402
from moesim.spec.hardware import dtype_bytes  # noqa: E402
from moesim.spec.scenario import Scenario, load_scenario  # noqa: E402

__all__ = ["CASES", "Case", "Prediction", "megatron_flops_per_token", "error_percent",
           "alltoall_busbw", "tutel_alltoall_times", "run_case", "accuracy_table", "main"]

SCENARIOS = REPO / "scenarios" / "published"
H100_BF16_PEAK = 989.4e12   # FLOP/s; what Megatron-Core and the folding paper divide by
NCCL_TEST_BYTES = 2.0**30   # per GPU: nccl-tests' large-message regime, where busbw is quoted


@dataclass(frozen=True)
class Prediction:
    """A predicted figure, its parts (name -> seconds or share, for the table) and a note."""

    value: float
    parts: dict[str, float] = field(default_factory=dict)
    unit_of_parts: str = "share"   # "share" of the step, or "ms"
    note: str = ""


@dataclass(frozen=True)
class Case:
    """One published measurement: where it comes from, and how moesim predicts it."""

    id: str
    scenario: str                       # file name in scenarios/published/
    metric: str
    published: float
    source: str
    predict: Callable[[Scenario], Prediction]
    tiny: tuple[str, ...] = ()          # key=value overrides for the cut-down variant
    supplementary: bool = False         # a cross-check, outside the P1-P9 statistics


# ----------------------------------------------------------------------------- conventions


def megatron_flops_per_token(s: Scenario, causal: bool = False) -> float:
    """Model FLOPs per token as Megatron-LM's ``num_floating_point_operations`` counts them.

    ``12 L h^2 [(1 + g/a + S/h) q/h + (f/h) k m + V/(2 L h)]``: q = heads x head_dim, g/a = KV
    groups over heads, f the (expert) FFN size, k the routed experts per token, m = 3/2 for gated
    (SwiGLU) FFNs, V the vocabulary padded to a multiple of 128 x TP (the MCore v0.8/v0.9 formula
    behind P1's 468 TFLOPS; attention scores over the full sequence, no causal halving).
    ``causal``: the formula since Megatron-LM commit 8873b55 (March 2025, "Fixes in number of
    floating-point operation estimates for MoE and attention layer"), which counts half the
    score matrix (``S/(2h)``), as the Megatron-Core MoE model zoo's runs (main at 1e05700, May
    2025, and later) report their TFLOPS.
    """
    m, wl = s.model, s.workload
    h, layers, seq = m.hidden_size, m.num_layers, wl.seq_len
    heads = m.attention.num_heads
    q_ratio = heads * m.head_dim / h
    attention = (1.0 + m.kv_heads / heads + seq / h / (2.0 if causal else 1.0)) * q_ratio
    gated = 1.5 if m.ffn_matrices == 3 else 1.0
    mlp = m.expert_ffn_size / h * m.effective_top_k * gated
    pad = 128 * s.parallelism.tp
    vocab = math.ceil(m.vocab_size / pad) * pad
    logits = vocab / (2.0 * layers * h)
    return 12.0 * layers * h * h * (attention + mlp + logits)


def error_percent(predicted: float, published: float) -> float:
    """Signed error of a prediction, in percent of the published figure."""
    return 100.0 * (predicted - published) / published


# ----------------------------------------------------------------------------- training cases


def _step_parts(result) -> dict[str, float]:
    """Shares of the simulated step: compute, exposed all-to-all, other comm, imbalance, bubble."""
    names = {"compute": "compute", "exposed_alltoall": "a2a", "exposed_other_comm": "other comm",
             "imbalance_wait": "imbalance", "pipeline_bubble": "bubble"}
    return {names[k]: v / result.step_time for k, v in result.breakdown.items() if k in names}


def _tokens_per_gpu(s: Scenario) -> Prediction:
    r = simulate(s).result
    return Prediction(r.tokens_per_s_per_device, _step_parts(r),
                      note=f"step {r.step_time:.2f} s")


def _megatron_tflops(s: Scenario, causal: bool = False) -> Prediction:
    """TFLOPS per GPU in Megatron-LM's count (``causal``: the halved one since March 2025)."""
    r = simulate(s).result
    tflops = r.tokens_per_s_per_device * megatron_flops_per_token(s, causal) / 1e12
    return Prediction(tflops, _step_parts(r),
                      note=f"{r.tokens_per_s_per_device:,.0f} tok/s/GPU")


def _megatron_causal_tflops(s: Scenario) -> Prediction:
    return _megatron_tflops(s, causal=True)


def _megatron_mfu(s: Scenario) -> Prediction:
    r = simulate(s).result
    mfu = 100.0 * r.tokens_per_s_per_device * megatron_flops_per_token(s) / H100_BF16_PEAK
    return Prediction(mfu, _step_parts(r), note=f"{r.tokens_per_s_per_device:,.0f} tok/s/GPU")


# ----------------------------------------------------------------------------- communication cases


def uniform_alltoall(s: Scenario, nbytes_per_device: float) -> tuple[float, float]:
    """Flow-level time of a uniform all-to-all over all devices of ``s``'s cluster.

    Every device sends ``nbytes_per_device / n`` to each of the n devices (itself included, as
    nccl-tests does; the self-copy costs nothing). Returns (seconds, NIC bytes per device), the
    latter being what each device sends to other nodes.
    """
    topology = scenario_topology(s)
    n = topology.num_devices
    src, dst = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    keep = src != dst
    pairs = np.stack([src[keep], dst[keep]], axis=1)
    sizes = np.full(len(pairs), nbytes_per_device / n)
    coll = alltoall(topology, pairs, sizes)
    return coll.duration, coll.cross_node_bytes / n


def alltoall_busbw(seconds: float, nbytes_per_device: float, n: int) -> float:
    """nccl-tests bus bandwidth of an all-to-all: algbw x (n - 1) / n, algbw = bytes / time."""
    return nbytes_per_device / seconds * (n - 1) / n


def _nvlink_busbw(s: Scenario) -> Prediction:
    seconds, _ = uniform_alltoall(s, NCCL_TEST_BYTES)
    n = s.num_devices
    busbw = alltoall_busbw(seconds, NCCL_TEST_BYTES, n) / 1e9
    return Prediction(busbw, {"a2a 1 GiB": seconds * 1e3}, "ms",
                      note=f"algbw {NCCL_TEST_BYTES / seconds / 1e9:.0f} GB/s")


def _nic_throughput(s: Scenario) -> Prediction:
    seconds, nic_bytes = uniform_alltoall(s, NCCL_TEST_BYTES)
    nodes = s.cluster.nodes
    busbw = alltoall_busbw(seconds, NCCL_TEST_BYTES, s.num_devices) / 1e9
    nic = nic_bytes / seconds / 1e9
    return Prediction(nic, {"a2a 1 GiB": seconds * 1e3}, "ms",
                      note=f"busbw {busbw:.1f} GB/s = {busbw / nic:.2f} x NIC; "
                           f"N/(N-1) = {nodes / (nodes - 1):.2f}")


def tutel_alltoall_times(s: Scenario) -> dict[str, float]:
    """Closed-form seconds of Tutel's dispatch all-to-all, direct and 2D hierarchical (2DH).

    Buffer per GPU: tokens x top-k x capacity factor x hidden x dispatch bytes. Direct: one
    pairwise all-to-all over all n GPUs, bound by the NIC (the 7 of n - 1 peers on NVLink are a
    rounding error at n = 2048). 2DH: an all-to-all inside each node over NVLink, then one over
    the nodes between GPUs of equal local rank, each carrying the whole buffer, plus Tutel's two
    local layout transforms (read and write the buffer in HBM).
    """
    m, hw = s.model, s.hardware
    tokens = s.workload.micro_batch * s.workload.seq_len
    nbytes = tokens * m.effective_top_k * (m.capacity_factor or 1.0) * m.hidden_size
    nbytes *= dtype_bytes(s.precision.dispatch)
    n, per_node = s.num_devices, s.devices_per_node
    nodes = n // per_node
    nvl, nic = hw.link("scale_up"), hw.link("scale_out")
    dev = hw.device
    # Each message also pays its link's per-message cost (the size curve's h bytes at B_eff, as
    # network.link_time charges one message): n - 1 messages per rank.
    def a2a(ranks: int, link) -> float:
        return (network.all_to_all_alpha_beta(nbytes, ranks, link.effective_bandwidth,
                                              link.latency)
                + (ranks - 1) * link.half_efficiency_size / link.effective_bandwidth)
    direct, intra, inter = a2a(n, nic), a2a(per_node, nvl), a2a(nodes, nic)
    transforms = 2 * 2 * nbytes / (dev.memory_bandwidth * dev.memory_efficiency)
    return {"direct": direct, "direct latency": (n - 1) * nic.latency, "2dh": intra + inter
            + transforms, "2dh nvlink": intra, "2dh nic": inter, "2dh transforms": transforms,
            "bytes": nbytes}


def _tutel_speedup(s: Scenario) -> Prediction:
    t = tutel_alltoall_times(s)
    parts = {k: v * 1e3 for k, v in t.items() if k != "bytes"}
    return Prediction(t["direct"] / t["2dh"], parts, "ms",
                      note=f"{t['bytes'] / 1e6:.0f} MB per GPU")


# ----------------------------------------------------------------------------- the cases

_SMALL_TRAINING = ("routing.max_tokens_per_source=32",)
_MODEL_ZOO = ("yanring/Megatron-MoE-ModelZoo best_practice/Qwen3/readme.md "
              "(Megatron-Core, Qwen3-235B-A22B, 256 H100)")

CASES: tuple[Case, ...] = (
    Case("P1", "p1-mixtral-8x7b-mcore-64xh100.yaml", "TFLOPS/GPU (Megatron)", 468.0,
         "NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md (MCore v0.9)",
         _megatron_tflops, ("workload.global_batch=64", *_SMALL_TRAINING)),
    Case("P2", "p2-qwen3-30b-a3b-bridge-16xh100-fp8.yaml", "tokens/s/GPU", 5113.0,
         "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary (26.02, DGX-H100)",
         _tokens_per_gpu, ("workload.global_batch=32", *_SMALL_TRAINING)),
    Case("P3", "p3-gpt-oss-120b-bridge-64xh100.yaml", "tokens/s/GPU", 5993.0,
         "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary (26.02, DGX-H100)",
         _tokens_per_gpu, ("model.num_layers=8", "workload.global_batch=256",
                           *_SMALL_TRAINING)),
    Case("P4", "p4-deepseek-v3-automodel-1024xh100.yaml", "tokens/s/GPU", 865.0,
         "NVIDIA-NeMo/Automodel docs/performance-summary.md (DGX-H100, BF16)",
         _tokens_per_gpu, ("workload.global_batch=1024", *_SMALL_TRAINING)),
    Case("P5", "p5-mixtral-8x22b-mcore-128xh100.yaml", "MFU % (Megatron)", 46.3,
         "MoE Parallel Folding, arXiv 2504.14960, Table 1 (without folding)",
         _megatron_mfu, ("workload.global_batch=32", *_SMALL_TRAINING)),
    Case("P6", "p6-tutel-2dh-alltoall-2048xa100.yaml", "speedup 2DH/direct", 4.25,
         "Tutel, arXiv 2206.03382 (2,048 A100)", _tutel_speedup),
    Case("P7", "p7-nccl-alltoall-4xdgx-h100.yaml", "NIC GB/s per GPU", 48.5,
         "NVIDIA/nccl-tests issues 130, 267 (48-49 GB/s)", _nic_throughput,
         ("cluster.nodes=2", "parallelism.dp=16")),
    Case("P8", "p8-nccl-alltoall-1xdgx-h100.yaml", "busbw GB/s", 370.0,
         "NVIDIA/nccl-tests issue 212", _nvlink_busbw),
    Case("P9", "p9-glam-64e-tpuv4-1024.yaml", "tokens/s/chip", 132.0,
         "GLaM, arXiv 2112.06905: 280B tokens in 574 h on 1024 TPU v4 (derived)",
         _tokens_per_gpu, ("model.num_layers=2", *_SMALL_TRAINING)),
    # Cross-checks: P2's and P3's model and GPU in another framework (NeMo Automodel).
    Case("S1", "s1-qwen3-30b-a3b-automodel-8xh100.yaml", "tokens/s/GPU", 12040.0,
         "NVIDIA-NeMo/Automodel docs/performance-summary.md (DGX-H100, BF16)",
         _tokens_per_gpu, ("workload.global_batch=32", *_SMALL_TRAINING), supplementary=True),
    Case("S2", "s2-gpt-oss-120b-automodel-64xh100.yaml", "tokens/s/GPU", 7626.0,
         "NVIDIA-NeMo/Automodel docs/performance-summary.md (DGX-H100, BF16)",
         _tokens_per_gpu, ("model.num_layers=2", "workload.global_batch=128", *_SMALL_TRAINING),
         supplementary=True),
    # Cross-checks: one model, one cluster, four layouts in Megatron-Core (NVIDIA's MoE model
    # zoo); tokens/s per GPU = 2048 x 4096 / step seconds / 256.
    Case("S3", "s3-qwen3-235b-mcore-deepep-ep32-256xh100.yaml", "tokens/s/GPU", 1663.0,
         _MODEL_ZOO, _tokens_per_gpu,
         ("model.num_layers=32", "workload.global_batch=128", *_SMALL_TRAINING),
         supplementary=True),
    Case("S4", "s4-qwen3-235b-mcore-fsdp-ep8-256xh100.yaml", "tokens/s/GPU", 1862.0,
         _MODEL_ZOO, _tokens_per_gpu,
         ("model.num_layers=2", "workload.global_batch=512", *_SMALL_TRAINING),
         supplementary=True),
    Case("S5", "s5-qwen3-235b-mcore-a2a-pp32-256xh100.yaml", "tokens/s/GPU", 1354.0,
         _MODEL_ZOO, _tokens_per_gpu, ("workload.global_batch=128", *_SMALL_TRAINING),
         supplementary=True),
    Case("S6", "s6-qwen3-235b-mcore-tp4-ep8-256xh100.yaml", "tokens/s/GPU", 1130.0,
         _MODEL_ZOO, _tokens_per_gpu,
         ("model.num_layers=32", "workload.global_batch=64", *_SMALL_TRAINING),
         supplementary=True),
    # The same layout at a 16K context (the model zoo's long-context table, forced balance).
    Case("S7", "s7-qwen3-235b-mcore-16k-tp4-ep8-256xh100.yaml", "TFLOPS/GPU (Megatron, causal)",
         295.0, _MODEL_ZOO, _megatron_causal_tflops, ("model.num_layers=32", *_SMALL_TRAINING),
         supplementary=True),
    # Cross-checks: S7's long-context table, the rows with context parallelism.
    *(Case(f"S{n}", f"s{n}-qwen3-235b-mcore-{k}k-tp4-cp{cp}-ep8-256xh100.yaml",
           "TFLOPS/GPU (Megatron, causal)", tflops, _MODEL_ZOO, _megatron_causal_tflops,
           ("model.num_layers=32", *_SMALL_TRAINING), supplementary=True)
      for n, k, cp, tflops in ((8, 32, 2, 335.0), (9, 64, 4, 368.0), (10, 128, 8, 389.0))),
)


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Row:
    case: Case
    prediction: Prediction
    seconds: float

    @property
    def error(self) -> float:
        return error_percent(self.prediction.value, self.case.published)


def load_case(case: Case, tiny: bool = False, overrides: tuple[str, ...] = ()) -> Scenario:
    """The case's scenario, cut down to the tiny variant when asked, plus ``key=value`` changes."""
    return load_scenario(SCENARIOS / case.scenario, [*(case.tiny if tiny else ()), *overrides])


def run_case(case: Case, tiny: bool = False) -> Row:
    start = time.perf_counter()
    prediction = case.predict(load_case(case, tiny))
    return Row(case, prediction, time.perf_counter() - start)


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _parts_text(p: Prediction, top: int = 3) -> str:
    if p.unit_of_parts == "ms":
        items = list(p.parts.items())[:top]
        return ", ".join(f"{k} {v:.2f} ms" for k, v in items)
    items = sorted(p.parts.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in items)


def accuracy_table(rows: list[Row]) -> str:
    """The error table as Markdown, then the median and largest absolute error of the P cases
    (supplementary rows are shown but not counted)."""
    lines = ["| case | metric | published | predicted | error % | biggest predicted parts | note |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.case.id} | {r.case.metric} | {_number(r.case.published)} | "
                     f"{_number(r.prediction.value)} | {r.error:+.1f} | {_parts_text(r.prediction)} "
                     f"| {r.prediction.note} |")
    counted = [r for r in rows if not r.case.supplementary]
    if counted:
        errors = [abs(r.error) for r in counted]
        worst = max(counted, key=lambda r: abs(r.error))
        lines.append("")
        lines.append(f"P cases: median |error| {statistics.median(errors):.1f}%, largest "
                     f"{worst.case.id} {abs(worst.error):.1f}%, over 35%: "
                     + (", ".join(r.case.id for r in counted if abs(r.error) > 35) or "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="cut-down scenarios (seconds)")
    parser.add_argument("--cases", default="", help="comma-separated ids, e.g. P1,P7")
    args = parser.parse_args(argv)
    wanted = {c.strip().upper() for c in args.cases.split(",") if c.strip()}
    unknown = wanted - {c.id for c in CASES}
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; valid: "
                     + ", ".join(c.id for c in CASES))
    rows = []
    for case in CASES:
        if wanted and case.id not in wanted:
            continue
        row = run_case(case, tiny=args.tiny)
        print(f"{case.id}: {_number(row.prediction.value)} vs {_number(case.published)} "
              f"({row.error:+.1f}%) in {row.seconds:.1f} s", file=sys.stderr)
        rows.append(row)
    print(accuracy_table(rows))
    if args.tiny:
        print("(tiny: cut-down scenarios; the figures are not predictions of the cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
