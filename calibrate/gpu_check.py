"""One-GPU check: calibrate this GPU, then hold moesim's MoE-layer predictions to the real layer.

Everything a single CUDA GPU can tell moesim, in one run of a few minutes:

1. **Calibrate** -- ``run_calibration.py`` (in this process, kernels only) once per expert shape:
   the shapes of the layer cases below, then the other shipped MoE models' (hidden, ffn) shapes
   while time allows. The per-shape profiles are merged into ONE measured profile (kernel
   tables of every shape; device peaks and the gemm / memcpy tables of the first run), plus a
   decode-attention table (``attention_decode``: moesim does not read it yet).
2. **Collectives at world size 1** -- an NCCL (gloo on CPU) process group of one rank runs every
   collective of ``bench_collectives`` once, timed by its own ``_timed``: this proves the code
   path; one rank has no link to measure.
3. **The real MoE layer** -- ``moe_layer.py``'s layer (route, dispatch, experts, combine) on the
   same one-rank group, timed by its own ``_timed_pass`` (CUDA events, synchronize) after a
   warm-up, for 8-12 cases (hidden 2048-7168, 8-256 experts, top-1/2/8, 1-8192 tokens, BF16 and
   FP8 where torch supports it). FP8 cases run the layer with FP8 expert GEMMs (per-tensor
   scaled e4m3, ``torch._scaled_mm``); moe_layer.py has no FP8 dtype of its own.
4. **Predict** each case with moesim's own kernel model (:class:`moesim.compute.KernelTimer`),
   composed as :func:`moesim.pricing.block.block_cost` composes an MoE block on one device (gate +
   expert FFNs + token permute; no remote traffic), once with the datasheet profile and once with
   the measured one, using the tokens per expert the real layer routed.

A global deadline (``--budget-s``) stops starting calibrations at 40% of it and layer cases at
100%; the outputs are rewritten after every case, so a killed run still leaves them. Everything
goes under ``--out DIR`` (default ``$OUT``)::

    DIR/hardware_profiles/measured/<name>.yaml   the merged measured profile
    DIR/gpu_check/moe_layer.csv, moe_layer.md    the table (also printed)
    DIR/gpu_check/summary.json                   stages, timings, errors, the |error| summary
    DIR/gpu_check/calibration/*.yaml             the per-shape profiles

``--dry-run`` runs the same code on the CPU at tiny sizes (seconds): the CI test of this file.
Unlike the rest of ``calibrate/`` this script imports moesim (run it from the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: calibrate/ and moesim/ importable
    sys.path.insert(0, str(ROOT))

from calibrate import bench_collectives as bc  # noqa: E402
from calibrate import bench_kernels as bk  # noqa: E402
from calibrate import moe_layer  # noqa: E402
from calibrate.profile_writer import write_profile  # noqa: E402
from calibrate.run_calibration import run as run_calibration  # noqa: E402
from moesim.calibration import MeasuredTables  # noqa: E402
from moesim.compute import KernelTimer  # noqa: E402
from moesim.spec.hardware import DeviceSpec, load_hardware  # noqa: E402
from moesim.spec.models import list_models, load_model  # noqa: E402

__all__ = ["LayerCase", "GPU_CASES", "tiny_case", "merge_profiles", "calibrate", "collective_smoke",
           "bench_decode_attention", "fp8_supported", "Fp8Expert", "fp8_swiglu", "LayerBench", "predict_seconds",
           "summarize", "run", "main"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
CALIBRATION_SHARE = 0.4  # no calibration starts after this share of the budget
# moe_layer draws its weights with torch.randn on a CPU Generator (one thread): ~50 M floats/s
# measured on this project's 2-core VM; 40 M/s leaves room. A shape whose weights cannot be
# drawn before the deadline is skipped instead of started.
RANDN_FLOATS_PER_S = 40e6


@dataclass(frozen=True)
class LayerCase:
    """One MoE layer forward on one GPU: ``tokens`` tokens routed top-``top_k`` of ``experts``."""

    name: str
    model: str  # the shipped model whose expert shape this is
    hidden: int
    ffn: int
    experts: int
    top_k: int
    tokens: int
    dtype: str  # "bf16" | "fp8" (expert GEMMs; routing and activations stay BF16)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.hidden, self.ffn, self.experts)


# Ordered by shape so each shape's weights are built once; the most telling cases first.
GPU_CASES = (
    LayerCase("mixtral-decode-t1", "mixtral-8x7b", 4096, 14336, 8, 2, 1, "bf16"),
    LayerCase("mixtral-t512", "mixtral-8x7b", 4096, 14336, 8, 2, 512, "bf16"),
    LayerCase("mixtral-t8192", "mixtral-8x7b", 4096, 14336, 8, 2, 8192, "bf16"),
    LayerCase("mixtral-t8192-fp8", "mixtral-8x7b", 4096, 14336, 8, 2, 8192, "fp8"),
    LayerCase("mixtral-top1-t2048", "mixtral-8x7b", 4096, 14336, 8, 1, 2048, "bf16"),
    LayerCase("qwen3-t64", "qwen3-30b-a3b", 2048, 768, 128, 8, 64, "bf16"),
    LayerCase("qwen3-t4096", "qwen3-30b-a3b", 2048, 768, 128, 8, 4096, "bf16"),
    # 32 of DeepSeek-V3's 256 experts: what one GPU of an EP8 group holds.
    LayerCase("dsv3-e32-t4096", "deepseek-v3", 7168, 2048, 32, 8, 4096, "bf16"),
    LayerCase("dsv3-e32-t4096-fp8", "deepseek-v3", 7168, 2048, 32, 8, 4096, "fp8"),
    LayerCase("e256-t8192", "qwen3-30b-a3b", 2048, 768, 256, 8, 8192, "bf16"),
)


def tiny_case(case: LayerCase) -> LayerCase:
    """The dry-run stand-in: sizes and tokens / 64 (sizes multiples of 16 for FP8), <= 16
    experts."""
    def size(n: int) -> int:
        return max(32, n // 64 // 16 * 16)
    experts = min(case.experts, 16)
    return replace(case, hidden=size(case.hidden), ffn=size(case.ffn), experts=experts,
                   top_k=min(case.top_k, experts), tokens=max(1, case.tokens // 64))


def _log(message: str, start: float) -> None:
    print(f"[gpu_check] {message} ({time.monotonic() - start:.1f} s)", file=sys.stderr,
          flush=True)


# ---- 1. calibration --------------------------------------------------------------------------

def _calibration_shapes(cases: list[LayerCase], dry_run: bool) -> list[tuple[int, int, int, int]]:
    """(hidden, ffn, experts, top_k) to calibrate: the cases' shapes (one per (hidden, ffn,
    experts): the gate table is keyed without top-k), then (GPU only) every shipped MoE model
    with hidden >= 2048 whose (hidden, ffn) no case covers."""
    first = {c.shape: c.top_k for c in reversed(cases)}  # the first case's top-k per shape
    shapes = [(*shape, first[shape]) for shape in dict.fromkeys(c.shape for c in cases)]
    if not dry_run:
        covered = {(h, f) for h, f, _, _ in shapes}
        for name in list_models():
            m = load_model(name)
            if m.hidden_size >= 2048 and (m.hidden_size, m.expert_ffn_size) not in covered:
                covered.add((m.hidden_size, m.expert_ffn_size))
                shapes.append((m.hidden_size, m.expert_ffn_size, m.num_experts, m.top_k))
    return shapes


def _calibration_argv(shape: tuple[int, int, int, int], path: Path, dry_run: bool) -> list[str]:
    h, f, e, k = shape
    argv = ["-o", str(path), "--no-collectives", "--nprocs", "1", "--dtype", "bfloat16",
            "--hidden", str(h), "--ffn", str(f), "--experts", str(e), "--top-k", str(k),
            "--group-experts", str(min(e, 8)), "--name", f"shape-{h}-{f}-{e}"]
    if dry_run:
        return [*argv, "--device", "cpu", "--tiny", "--threads", "1", "--max-tokens", "64"]
    return [*argv, "--device", "cuda", "--max-tokens", "8192", "--repeats", "10"]


def merge_profiles(paths: list[Path], name: str) -> dict[str, Any]:
    """One profile from several single-shape ones: the first's device, links, node, gemm and
    memcpy; the kernel tables of all, the first table of each key kept.

    Keys: expert_ffn (hidden, ffn, experts), gate (hidden, experts), attention (hidden), as
    :class:`moesim.calibration.MeasuredTables` reads them.
    """
    profiles = [yaml.safe_load(p.read_text()) for p in paths]
    merged = copy.deepcopy(profiles[0])
    merged["name"] = name
    kernels = merged["calibration"]["kernels"]
    keys = {"expert_ffn": ("hidden", "ffn", "experts"), "gate": ("hidden", "experts"),
            "attention": ("hidden",)}
    for table, fields in keys.items():
        seen, rows = set(), []
        for profile in profiles:
            for row in profile["calibration"]["kernels"].get(table, []):
                key = tuple(row.get(f, 1) for f in fields)
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
        kernels[table] = rows
    merged["calibration"]["metadata"]["gpu_check_shapes"] = [
        p["calibration"]["metadata"]["command"] for p in profiles]
    return merged


def calibrate(cases: list[LayerCase], out: Path, name: str, dry_run: bool, stop_at: float,
              start: float) -> tuple[Path | None, list[dict[str, Any]]]:
    """Run the suite per shape until ``stop_at`` (monotonic); returns (merged profile, log)."""
    folder = out / "gpu_check" / "calibration"
    done, log = [], []
    for shape in _calibration_shapes(cases, dry_run):
        entry: dict[str, Any] = {"shape": list(shape)}
        if time.monotonic() > stop_at:
            log.append(entry | {"status": "skipped (calibration deadline)"})
            continue
        path = folder / f"shape-{'-'.join(map(str, shape))}.yaml"
        t0 = time.monotonic()
        _log(f"calibrating hidden {shape[0]} ffn {shape[1]} experts {shape[2]}", start)
        code = run_calibration(_calibration_argv(shape, path, dry_run))
        entry |= {"status": "ok" if code == 0 else f"failed (exit {code})",
                  "seconds": round(time.monotonic() - t0, 1)}
        log.append(entry)
        if code == 0:
            done.append(path)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not done:
        return None, log
    merged = merge_profiles(done, name)
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    try:
        merged["calibration"]["kernels"]["attention_decode"] = bench_decode_attention(
            device, dry_run)
        log.append({"attention_decode": "ok"})
    except (RuntimeError, TypeError) as exc:  # keep the profile without the table
        log.append({"attention_decode": f"failed: {exc}"[:300]})
    target = out / "hardware_profiles" / "measured" / f"{name}.yaml"
    header = (f"moesim hardware profile measured by calibrate/gpu_check.py ({len(done)} "
              "run_calibration.py runs, one per expert shape, merged)\n"
              "device, gemm and memcpy: the first run; kernel tables: every run (first per key)\n"
              "attention_decode: one new token per sequence against a KV cache of `context` "
              "tokens (GQA)")
    write_profile(target, merged, header=header)
    return target, log


@torch.inference_mode()
def bench_decode_attention(device: torch.device, dry_run: bool) -> list[dict[str, Any]]:
    """Decode attention (run_calibration times prefill only): ``batch`` sequences, one new token
    each, attending to a KV cache of ``context`` tokens; QKV and output projections included.

    Mixtral 8x7B's attention (hidden 4096, 32 query / 8 KV heads of 128), batch 1 and 32,
    contexts 512..32768; tiny in the dry run. Seconds per call, one table per batch.
    """
    h, nh, nkv, hd = (64, 4, 2, 16) if dry_run else (4096, 32, 8, 128)
    contexts = bk.log2_grid(16, 128) if dry_run else bk.log2_grid(512, 32768)
    policy = (bk.TimingPolicy(warmup=1, repeats=5, min_repeats=3, budget_s=0.1)
              if dry_run else bk.TimingPolicy(repeats=10, budget_s=1.0))
    dt = torch.bfloat16
    w_qkv = torch.randn((nh + 2 * nkv) * hd, h, device=device, dtype=dt) * h**-0.5
    w_out = torch.randn(h, nh * hd, device=device, dtype=dt) * (nh * hd) ** -0.5
    tables = []
    for batch in (1, 32):
        x = torch.randn(batch, 1, h, device=device, dtype=dt)
        seconds = []
        for ctx in contexts:
            cache = torch.randn(2, batch, nkv, ctx, hd, device=device, dtype=dt)  # K, V

            def step(x: torch.Tensor = x, cache: torch.Tensor = cache) -> torch.Tensor:
                q = F.linear(x, w_qkv)[..., : nh * hd].view(-1, 1, nh, hd).transpose(1, 2)
                y = F.scaled_dot_product_attention(q, cache[0], cache[1], enable_gqa=True)
                return F.linear(y.transpose(1, 2).reshape(-1, 1, nh * hd), w_out)

            seconds.append(bk.measure(step, device, policy).median)
            del cache
        tables.append({"hidden": h, "heads": nh, "kv_heads": nkv, "head_dim": hd,
                       "batch": batch, "dtype": "bfloat16", "context": contexts,
                       "seconds": seconds})
    return tables


# ---- 2. collectives at world size 1 ----------------------------------------------------------

def collective_smoke(device: torch.device) -> dict[str, Any]:
    """Every collective of ``bench_collectives`` once on the one-rank group, result checked.

    At world size 1 each op is the identity (all-reduce sums one buffer, all-to-all and
    all-gather keep it); ``seconds`` is bench_collectives' own median of the slowest rank.
    """
    cfg = bc.CollectiveConfig((1 << 20,), dist.get_backend(), warmup=2, repeats=5)
    numel = (1 << 20) // 4
    src = torch.arange(numel, device=device, dtype=torch.float32)
    out: dict[str, Any] = {"backend": cfg.backend, "world_size": dist.get_world_size(),
                           "bytes": numel * 4, "ops": {}}
    splits = bc.zipf_splits(numel, 1)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    ops = {
        "all_to_all": lambda dst: dist.all_to_all_single(dst, src),
        "all_to_all_uneven": lambda dst: dist.all_to_all_single(dst, src, splits[0], splits[0]),
        "all_reduce": lambda dst: (dst.copy_(src), dist.all_reduce(dst)),
        "all_gather": lambda dst: gather(dst, src),
    }
    for name, op in ops.items():
        dst = torch.empty_like(src)
        seconds = bc._timed(lambda op=op, dst=dst: op(dst), dist.group.WORLD, device, cfg)
        out["ops"][name] = {"seconds": seconds, "correct": bool(torch.equal(dst, src))}
    return out


# ---- 3. the real layer -----------------------------------------------------------------------

def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether this torch and device run ``torch._scaled_mm`` on e4m3 (probe on a tiny GEMM)."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False, f"compute capability {torch.cuda.get_device_capability(device)} < 8.9"
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError) as exc:
        return False, f"_scaled_mm probe failed: {exc}"[:200]
    return True, "ok"


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: ``(q, scale)`` with ``t ~ q * scale``; q keeps t's layout."""
    scale = (t.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


@dataclass(frozen=True)
class Fp8Expert:
    """One expert's SwiGLU weights in FP8: gate, up ``[F, H]``, down ``[H, F]``, with scales."""

    gate: tuple[torch.Tensor, torch.Tensor]
    up: tuple[torch.Tensor, torch.Tensor]
    down: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, weights: tuple[torch.Tensor, ...]) -> Fp8Expert:
        return cls(*(_quantize(w) for w in weights))


def _fp8_linear(xq: torch.Tensor, xs: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
    """``x @ W.t()`` from FP8 ``xq [T, K]`` and ``W [N, K]`` (row-major, so ``W.t()`` is the
    column-major operand cuBLASLt wants); BF16 out."""
    return torch._scaled_mm(xq, w[0].t(), scale_a=xs, scale_b=w[1], out_dtype=torch.bfloat16)


def fp8_swiglu(x: torch.Tensor, w: Fp8Expert) -> torch.Tensor:
    """The layer's SwiGLU with FP8 GEMMs: inputs quantized per call (x once, the product once)."""
    if x.shape[0] == 0:
        return x.new_empty(0, w.down[0].shape[0])
    xq, xs = _quantize(x)
    h = F.silu(_fp8_linear(xq, xs, w.gate)) * _fp8_linear(xq, xs, w.up)
    hq, hs = _quantize(h)
    return _fp8_linear(hq, hs, w.down).to(x.dtype)


@contextlib.contextmanager
def _fp8_experts() -> Iterator[None]:
    """moe_layer's expert call accepts :class:`Fp8Expert` weights while the block runs.

    ``moe_layer._swiglu`` is the layer's one expert kernel; it is wrapped (and restored after),
    so the FP8 cases run the real layer's routing, permutation and all-to-alls unchanged.
    """
    plain = moe_layer._swiglu

    def either(x: torch.Tensor, w: Any) -> torch.Tensor:
        return fp8_swiglu(x, w) if isinstance(w, Fp8Expert) else plain(x, w)

    moe_layer._swiglu = either
    try:
        yield
    finally:
        moe_layer._swiglu = plain


class LayerBench:
    """Builds moe_layer ``_Layer`` s on one rank, reusing each shape's weights across cases."""

    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters
        self._shape: tuple[int, int, int] | None = None
        self._base: Any = None
        self._fp8: list[Fp8Expert] | None = None

    def _config(self, case: LayerCase) -> moe_layer.LayerConfig:
        return moe_layer.load_config({
            "hidden": case.hidden, "ffn": case.ffn, "num_experts": case.experts,
            "top_k": case.top_k, "tokens_per_rank": case.tokens, "dtype": "bfloat16",
            "placement": [list(range(case.experts))], "warmup": self.warmup,
            "iters": self.iters})

    def build_seconds(self, case: LayerCase) -> float:
        """Estimated seconds to draw ``case``'s weights (0 when its shape is already built)."""
        if case.shape == self._shape:
            return 0.0
        return 3 * case.hidden * case.ffn * case.experts / RANDN_FLOATS_PER_S

    def layer(self, case: LayerCase) -> Any:
        """A ``_Layer`` for ``case``: the shape's weights (built once), this case's tokens."""
        cfg = self._config(case)
        if self._shape != case.shape:
            self._base = self._fp8 = None  # free the previous shape's weights first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._base = moe_layer._Layer(cfg, 0, self.device)
            self._shape = case.shape
        layer = copy.copy(self._base)  # shares the weight tensors; cfg and tokens are per case
        layer.cfg = cfg
        layer.x = moe_layer._tokens(cfg, 0).to(self.device, torch.bfloat16)
        if case.dtype == "fp8":
            if self._fp8 is None:
                self._fp8 = [Fp8Expert.of(w) for w in self._base.local]
            layer.local = self._fp8
        return layer

    def time(self, case: LayerCase, deadline: float) -> dict[str, Any]:
        """Warm up, then time passes (moe_layer._timed_pass) until ``iters`` or the deadline."""
        layer = self.layer(case)
        totals, counts = [], {}
        with _fp8_experts() if case.dtype == "fp8" else contextlib.nullcontext():
            for i in range(self.warmup + self.iters):
                phases, _, counts = moe_layer._timed_pass(layer)
                if i >= self.warmup:
                    totals.append(phases[-1])
                if len(totals) >= 3 and time.monotonic() > deadline:
                    break
        return {"median_s": statistics.median(totals), "min_s": min(totals),
                "iters": len(totals), "slot_tokens": list(counts["expert_rows"])}


# ---- 4. moesim's prediction ------------------------------------------------------------------

def predict_seconds(case: LayerCase, device: DeviceSpec, tables: MeasuredTables | None,
                    slot_tokens: list[int]) -> float:
    """moesim's seconds for one MoE layer forward of ``case`` on one device.

    As :func:`moesim.pricing.block.block_cost` prices an MoE block at EP 1 (no token leaves the device, so dispatch
    and combine move nothing): gate + grouped expert FFNs over ``slot_tokens: [experts]`` +
    permute/unpermute (4 passes over the routed copies, memory-bound).
    """
    model = load_model({"base": "tiny-cpu", "name": case.name, "hidden_size": case.hidden,
                        "expert_ffn_size": case.ffn, "num_experts": case.experts,
                        "top_k": case.top_k, "num_layers": 1, "capacity_factor": None})
    timer = KernelTimer(model, device, compute_dtype=case.dtype, weight_dtype="bf16",
                        act_dtype="bf16", tables=tables)
    tokens = np.asarray(slot_tokens, dtype=float)
    return timer.gate(case.tokens) + timer.experts(tokens) + timer.permute(float(tokens.sum()))


# ---- outputs ---------------------------------------------------------------------------------

COLUMNS = ("case", "model", "dtype", "hidden", "ffn", "experts", "top_k", "tokens",
           "measured_ms", "measured_min_ms", "datasheet_ms", "datasheet_ratio", "measured_prof_ms",
           "measured_prof_ratio", "status")


def _row(case: LayerCase, result: dict[str, Any] | None, status: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: v for k, v in asdict(case).items() if k != "name"}
    row = {"case": case.name, **row}
    for key in COLUMNS[8:-1]:
        row[key] = None
    if result:
        row["measured_ms"] = result["median_s"] * 1e3
        row["measured_min_ms"] = result["min_s"] * 1e3
        for key, pred in (("datasheet", result.get("datasheet_s")),
                          ("measured_prof", result.get("measured_prof_s"))):
            if pred is not None:
                row[f"{key}_ms"] = pred * 1e3
                row[f"{key}_ratio"] = pred / result["median_s"]
    row["status"] = status
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst |predicted / measured - 1| per profile, over the rows that have both."""
    out: dict[str, Any] = {}
    for key in ("datasheet", "measured_prof"):
        errors = [abs(r[f"{key}_ratio"] - 1) for r in rows if r[f"{key}_ratio"] is not None]
        out[key] = ({"cases": len(errors), "median_abs_error": statistics.median(errors),
                     "worst_abs_error": max(errors)} if errors else {"cases": 0})
    return out


def summary_line(summary: dict[str, Any]) -> str:
    parts = []
    for key, label in (("datasheet", "datasheet profile"), ("measured_prof", "measured profile")):
        s = summary[key]
        parts.append(f"{label}: median |error| {100 * s['median_abs_error']:.1f}%, worst "
                     f"{100 * s['worst_abs_error']:.1f}% ({s['cases']} cases)" if s["cases"]
                     else f"{label}: no prediction")
    return "; ".join(parts)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c not in ("case", "model", "dtype", "status") else "---"
                            for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "ratio = predicted / measured (median of the timed passes); "
              "|error| = |ratio - 1|.", "", summary_line(summary), ""]
    return "\n".join(lines)


def write_outputs(folder: Path, rows: list[dict[str, Any]], state: dict[str, Any],
                  title: str) -> None:
    """CSV, Markdown and summary.json; rewritten after every case (a kill keeps the last)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "moe_layer.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    (folder / "moe_layer.md").write_text(markdown(rows, summary, title))
    (folder / "summary.json").write_text(json.dumps(state | {"summary": summary}, indent=1,
                                                    default=str) + "\n")


# ---- driver ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="output folder (default $OUT); everything is written under it")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds (CI)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="global deadline in seconds (default 420: done within 8 minutes)")
    p.add_argument("--name", help="measured profile name (default from the device name)")
    p.add_argument("--datasheet", default="h200-sxm", help="datasheet profile to compare")
    p.add_argument("--profile", help="reuse this measured profile: skip the calibration")
    p.add_argument("--warmup", type=int, default=3, help="untimed layer passes per case")
    p.add_argument("--iters", type=int, default=20, help="timed layer passes per case")
    return p


def _profile_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu-dry-run-measured"
    gpu = torch.cuda.get_device_name(device)
    if "H200" in gpu:
        return "h200-sxm-measured"
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + "-measured"


def _init_group(device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def run(argv: list[str] | None = None) -> int:
    """The whole check; returns 0, 1 if no layer case was measured, 2 on bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out DIR is required when $OUT is not set")
    if args.iters < 1 or args.warmup < 0 or args.budget_s <= 0:
        parser.error("--iters must be >= 1, --warmup >= 0, --budget-s > 0")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU node, or use --dry-run on the CPU")
    start = time.monotonic()
    deadline = start + args.budget_s
    out = Path(args.out).resolve()
    folder = out / "gpu_check"
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cases = [tiny_case(c) for c in GPU_CASES] if args.dry_run else list(GPU_CASES)
    name = args.name or _profile_name(device)
    state: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                             "dry_run": args.dry_run, "budget_s": args.budget_s,
                             "argv": sys.argv[1:] if argv is None else argv}
    if device.type == "cuda":
        state["gpu"] = torch.cuda.get_device_name(device)
    title = f"MoE layer on {state.get('gpu', 'CPU (dry run)')}: measured vs moesim"

    # Step 1: calibrate (or reuse a profile).
    if args.profile:
        measured_path: Path | None = Path(args.profile).resolve()
    else:
        measured_path, state["calibration"] = calibrate(
            cases, out, name, args.dry_run, start + CALIBRATION_SHARE * args.budget_s, start)
    state["measured_profile"] = str(measured_path) if measured_path else None
    predictors = {"datasheet": (load_hardware(args.datasheet).device, None)}
    if measured_path:
        profile = load_hardware(str(measured_path))
        predictors["measured_prof"] = (profile.device, MeasuredTables.from_profile(profile))

    # Step 2: one-rank process group, every collective once (a failure is recorded, the layer
    # cases still try: each reports its own failure).
    _init_group(device)
    try:
        try:
            state["collectives"] = collective_smoke(device)
            _log(f"collectives at world size 1 on {dist.get_backend()}: ok", start)
        except (RuntimeError, ValueError) as exc:
            state["collectives"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        # Steps 3 and 4: the real layer per case, and moesim's predictions.
        state["fp8"] = dict(zip(("supported", "reason"), fp8_supported(device)))
        bench = LayerBench(device, args.warmup, args.iters)
        rows: list[dict[str, Any]] = []
        for case in cases:
            rows.append(_one_case(case, bench, deadline, predictors, state, start))
            write_outputs(folder, rows, state | {"elapsed_s": time.monotonic() - start}, title)
    finally:
        dist.destroy_process_group()
    if "measured_prof" in predictors:
        state["measured_tables"] = predictors["measured_prof"][1].summary()
    write_outputs(folder, rows, state | {"elapsed_s": time.monotonic() - start}, title)
    print(markdown(rows, summarize(rows), title))
    _log(f"wrote {folder} and {measured_path}", start)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _one_case(case: LayerCase, bench: LayerBench, deadline: float,
              predictors: dict[str, tuple[DeviceSpec, MeasuredTables | None]],
              state: dict[str, Any], start: float) -> dict[str, Any]:
    """Time one case (or say why not) and predict it with each profile; its table row."""
    if time.monotonic() + bench.build_seconds(case) > deadline:
        return _row(case, None, "skipped (deadline)")
    if case.dtype == "fp8" and not state["fp8"]["supported"]:
        return _row(case, None, f"skipped ({state['fp8']['reason']})")
    _log(f"layer {case.name}", start)
    try:
        result = bench.time(case, deadline)
    except (RuntimeError, ValueError, TypeError) as exc:  # fails this case, not the run
        return _row(case, None, f"failed: {type(exc).__name__}: {exc}"[:300])
    for key, (spec, tables) in predictors.items():
        result[f"{key}_s"] = predict_seconds(case, spec, tables, result["slot_tokens"])
    state.setdefault("cases", {})[case.name] = {
        k: result[k] for k in ("slot_tokens", "iters", "datasheet_s", "measured_prof_s")
        if k in result}
    return _row(case, result, "ok")


def main() -> None:
    """Console entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
