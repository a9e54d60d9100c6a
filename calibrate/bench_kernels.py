"""Kernel microbenchmarks: how long the compute pieces of an MoE layer take on this device.

moesim's compute model needs, per device, the time of the kernels one MoE transformer layer runs:
the expert SwiGLU FFN (``down(silu(gate(x)) * up(x))``) as a function of the tokens one expert
receives, the same FFN grouped over several experts (one ``bmm`` per projection, as grouped-GEMM
MoE kernels do), the router gate (linear -> softmax -> top-k), and the attention block
(QKV projection, causal ``scaled_dot_product_attention``, output projection). Two roofline
figures complete the picture: square-GEMM FLOP/s and memory-copy bandwidth.

All timings are of forward passes under ``torch.inference_mode``. A sample times ``inner``
back-to-back calls (enough to last ``min_sample_s``) and divides, so launch-bound tiny kernels are
measured as a stream of calls, the way a training step issues them. CUDA samples use
``torch.cuda.Event`` pairs; CPU samples use ``time.perf_counter``.

Only torch is imported (no moesim), so ``calibrate/`` can be copied to a cluster on its own.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "Timing",
    "TimingPolicy",
    "Progress",
    "measure",
    "percentile",
    "log2_grid",
    "swiglu_ffn",
    "bench_expert_ffn",
    "bench_gate",
    "bench_attention",
    "bench_gemm",
    "bench_memcpy",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Timing:
    """Per-call seconds of one benchmark point: median and the 10th/90th percentiles."""

    median: float
    p10: float
    p90: float
    repeats: int  # samples taken
    inner: int  # calls per sample


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure one point.

    ``repeats`` samples are taken unless that would exceed ``budget_s``, in which case fewer
    (but never fewer than ``min_repeats``): big CPU GEMMs take ~1 s a call and need few samples.
    """

    warmup: int = 2  # untimed calls first: allocator, caches, cuBLAS heuristics
    repeats: int = 15
    min_repeats: int = 3
    budget_s: float = 1.0
    min_sample_s: float = 2e-4  # a sample must last this long: timer and launch noise << signal


@dataclass(frozen=True)
class Progress:
    """Prints ``stage i/n`` lines (and, if ``verbose``, one line per point) to stderr.

    Frozen and picklable so spawned collective workers print on the same clock.
    """

    total: int
    start_time: float  # time.time() when the calibration started
    verbose: bool = False

    def stage(self, index: int, name: str) -> None:
        """Announce stage ``index`` (1-based) of ``total``."""
        elapsed = time.time() - self.start_time
        print(f"[calibrate] stage {index}/{self.total}: {name} ({elapsed:.1f} s elapsed)",
              file=sys.stderr, flush=True)

    def detail(self, message: str) -> None:
        """One per-point line, only in verbose mode."""
        if self.verbose:
            elapsed = time.time() - self.start_time
            print(f"[calibrate]   {message} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def log2_grid(low: int, high: int, step: int = 1) -> list[int]:
    """Powers of two ``2**k`` from ``low`` to ``high`` with ``k`` rising by ``step``, and
    ``high`` itself (appended if the powers miss it)."""
    if not 1 <= low <= high:
        raise ValueError(f"grid bounds (low={low}, high={high}) must satisfy 1 <= low <= high")
    if step < 1:
        raise ValueError(f"grid step (={step}) must be >= 1")
    first, last = math.ceil(math.log2(low)), math.floor(math.log2(high))
    grid = [1 << k for k in range(first, last + 1, step)]
    if not grid or grid[-1] != high:
        grid.append(high)
    return grid


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds for ``calls`` back-to-back calls of ``fn`` (device work included)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], device: torch.device,
            policy: TimingPolicy = TimingPolicy()) -> Timing:
    """Time ``fn`` per call: warm up, size the samples, take them, summarise.

    Returns
    -------
    Timing
        Median, p10 and p90 of the per-call seconds over the samples.
    """
    # Step 1: warm up (the last warm-up call doubles as the first cost estimate).
    for _ in range(max(policy.warmup - 1, 0)):
        fn()
    _sync(device)
    one = max(_time_calls(fn, device, 1), 1e-9)
    # Step 2: batch tiny calls so a sample lasts min_sample_s; cap the count by the budget.
    inner = max(1, min(10_000, math.ceil(policy.min_sample_s / one)))
    fit_in_budget = int(policy.budget_s / (one * inner))
    repeats = max(policy.min_repeats, min(policy.repeats, fit_in_budget))
    # Step 3: sample and summarise.
    samples = [_time_calls(fn, device, inner) / inner for _ in range(repeats)]
    return Timing(median=percentile(samples, 50), p10=percentile(samples, 10),
                  p90=percentile(samples, 90), repeats=repeats, inner=inner)


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
           scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for one expert or a group of experts.

    Shapes: one expert ``x: [T, H]``, ``w_gate, w_up: [F, H]``, ``w_down: [H, F]`` (nn.Linear
    layout); a group ``x: [E, T, H]``, ``w_gate, w_up: [E, H, F]``, ``w_down: [E, F, H]`` (bmm).
    """
    if x.dim() == 2:
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return torch.bmm(F.silu(torch.bmm(x, w_gate)) * torch.bmm(x, w_up), w_down)


def _table(keys: dict[str, Any], tokens: Sequence[int], timings: Sequence[Timing],
           spread: bool) -> dict[str, Any]:
    table = dict(keys, tokens=list(tokens), seconds=[t.median for t in timings])
    if spread:
        table["p10"] = [t.p10 for t in timings]
        table["p90"] = [t.p90 for t in timings]
    return table


def _sweep(name: str, tokens: Sequence[int], make_fn: Callable[[int], Callable[[], Any]],
           device: torch.device, policy: TimingPolicy, progress: Progress | None) -> list[Timing]:
    timings = []
    for t in tokens:
        timing = measure(make_fn(t), device, policy)
        timings.append(timing)
        if progress:
            progress.detail(f"{name} tokens={t}: {timing.median * 1e3:.3f} ms")
    return timings


@torch.inference_mode()
def bench_expert_ffn(hidden: int, ffn: int, tokens: Sequence[int], *, experts: int = 1,
                     device: torch.device, dtype: torch.dtype,
                     policy: TimingPolicy = TimingPolicy(),
                     progress: Progress | None = None) -> dict[str, Any]:
    """Time the SwiGLU expert FFN vs tokens per expert.

    ``experts == 1`` runs ``F.linear`` on ``[T, H]``; ``experts > 1`` runs one ``bmm`` per
    projection over ``[E, T, H]`` (every expert gets ``T`` tokens). ``seconds[i]`` is the time of
    the whole call, i.e. all ``experts`` experts together.
    """
    scale = hidden ** -0.5
    if experts == 1:
        w = (_randn((ffn, hidden), device, dtype, scale), _randn((ffn, hidden), device, dtype, scale),
             _randn((hidden, ffn), device, dtype, ffn ** -0.5))
    else:
        w = (_randn((experts, hidden, ffn), device, dtype, scale),
             _randn((experts, hidden, ffn), device, dtype, scale),
             _randn((experts, ffn, hidden), device, dtype, ffn ** -0.5))

    def make(t: int) -> Callable[[], Any]:
        shape = (t, hidden) if experts == 1 else (experts, t, hidden)
        x = _randn(shape, device, dtype)
        return lambda: swiglu_ffn(x, *w)

    timings = _sweep(f"expert_ffn x{experts}", tokens, make, device, policy, progress)
    keys = {"hidden": hidden, "ffn": ffn, "dtype": _dtype_name(dtype), "experts": experts}
    return _table(keys, tokens, timings, spread=True)


@torch.inference_mode()
def bench_gate(hidden: int, experts: int, top_k: int, tokens: Sequence[int], *,
               device: torch.device, dtype: torch.dtype, policy: TimingPolicy = TimingPolicy(),
               progress: Progress | None = None) -> dict[str, Any]:
    """Time the router: ``linear(H -> E)``, softmax in fp32, top-k, vs tokens."""
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k (={top_k}) must be in 1..experts (={experts})")
    w = _randn((experts, hidden), device, dtype, hidden ** -0.5)

    def make(t: int) -> Callable[[], Any]:
        x = _randn((t, hidden), device, dtype)
        return lambda: torch.topk(torch.softmax(F.linear(x, w), dim=-1, dtype=torch.float32),
                                  top_k, dim=-1)

    timings = _sweep("gate", tokens, make, device, policy, progress)
    keys = {"hidden": hidden, "experts": experts, "top_k": top_k, "dtype": _dtype_name(dtype)}
    return _table(keys, tokens, timings, spread=False)


@torch.inference_mode()
def bench_attention(hidden: int, heads: int, head_dim: int, tokens: Sequence[int], *,
                    device: torch.device, dtype: torch.dtype,
                    policy: TimingPolicy = TimingPolicy(),
                    progress: Progress | None = None) -> dict[str, Any]:
    """Time QKV projection + causal SDPA + output projection on one sequence of T tokens."""
    inner = heads * head_dim
    w_qkv = _randn((3 * inner, hidden), device, dtype, hidden ** -0.5)
    w_out = _randn((hidden, inner), device, dtype, inner ** -0.5)

    def block(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        qkv = F.linear(x, w_qkv).view(1, t, 3, heads, head_dim)  # (1, T, 3, nh, hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (1, nh, T, hd) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (1, nh, T, hd)
        return F.linear(y.transpose(1, 2).reshape(1, t, inner), w_out)  # (1, T, H)

    def make(t: int) -> Callable[[], Any]:
        x = _randn((1, t, hidden), device, dtype)
        return lambda: block(x)

    timings = _sweep("attention", tokens, make, device, policy, progress)
    keys = {"hidden": hidden, "heads": heads, "head_dim": head_dim, "dtype": _dtype_name(dtype)}
    return _table(keys, tokens, timings, spread=False)


@torch.inference_mode()
def bench_gemm(sizes: Sequence[int], *, device: torch.device, dtype: torch.dtype,
               policy: TimingPolicy = TimingPolicy(),
               progress: Progress | None = None) -> dict[str, Any]:
    """Achieved FLOP/s of square ``[n, n] @ [n, n]`` products (2 n^3 FLOP each)."""
    flops_per_s = []
    for n in sizes:
        a, b = _randn((n, n), device, dtype), _randn((n, n), device, dtype)
        timing = measure(lambda a=a, b=b: torch.mm(a, b), device, policy)
        flops_per_s.append(2.0 * n ** 3 / timing.median)
        if progress:
            progress.detail(f"gemm n={n}: {flops_per_s[-1] / 1e9:.1f} GFLOP/s")
    return {"sizes": list(sizes), "flops_per_s": flops_per_s}


@torch.inference_mode()
def bench_memcpy(byte_sizes: Sequence[int], *, device: torch.device,
                 policy: TimingPolicy = TimingPolicy(),
                 progress: Progress | None = None) -> dict[str, Any]:
    """Copy bandwidth of ``dst.copy_(src)``, counting bytes read plus bytes written (2x size).

    That is the STREAM "copy" convention and matches how datasheets quote memory bandwidth.
    """
    rates = []
    for size in byte_sizes:
        src = torch.ones(size, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        timing = measure(lambda s=src, d=dst: d.copy_(s), device, policy)
        rates.append(2.0 * size / timing.median)
        if progress:
            progress.detail(f"memcpy {size} B: {rates[-1] / 1e9:.1f} GB/s")
        del src, dst
    return {"bytes": list(byte_sizes), "bytes_per_s": rates}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")
