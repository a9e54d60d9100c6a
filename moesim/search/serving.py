"""Request-level serving metrics of one layout: TTFT, TPOT, tokens/s per GPU and per user, the
KV-cache-bound batch, and the Pareto frontier of throughput against per-user speed.

Assumptions (kept simple, see docs/search.md): every DP replica runs a static batch of ``B``
sequences (the ``workload.micro_batch`` knob); a request arrives when a slot frees and waits for
no queue. TPOT is the decode step time at batch ``B`` with the average context of a request's
life (``input_len + output_len / 2`` tokens in the KV cache). TTFT is the prefill step of one
batch of ``prefill_batch`` prompts of ``input_len`` tokens per replica (its LM head gives the
first token). The KV cache must hold ``B`` sequences at their longest (``input_len +
output_len``). Throughput counts decode tokens only: ``dp x B / TPOT`` over the devices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from moesim.layout import Layout
from moesim.memory import check_memory, stage_memory
from moesim.spec.scenario import Scenario, output_tokens_per_sequence

__all__ = ["RequestShape", "decode_workload", "prefill_workload", "decode_scenario",
           "prefill_scenario", "kv_max_batch",
           "decode_tokens_per_step", "serving_metrics", "pareto_front"]


@dataclass(frozen=True)
class RequestShape:
    """Tokens of a request: its prompt, its answer; prompts per replica in one prefill."""

    input_len: int
    output_len: int
    prefill_batch: int = 1


def decode_workload(shape: RequestShape, batch: int, dp: int, *, longest: bool = False
                    ) -> dict[str, Any]:
    """The workload fields of one decode step of ``batch`` sequences per DP replica, at the
    average context (``longest``: at the longest context, for memory); the scenario's own
    speculative decoding is kept. :func:`decode_scenario` and the search's simulated points
    both take these."""
    context = shape.input_len + (shape.output_len if longest else shape.output_len // 2)
    return {"mode": "decode", "seq_len": 1, "micro_batch": batch, "global_batch": batch * dp,
            "context_len": max(1, context)}


def prefill_workload(shape: RequestShape, dp: int) -> dict[str, Any]:
    """The workload fields of one prefill of ``prefill_batch`` prompts per DP replica (which
    drafts nothing)."""
    b = shape.prefill_batch
    return {"mode": "prefill", "seq_len": shape.input_len, "micro_batch": b,
            "global_batch": b * dp, "context_len": 0, "speculative_tokens": 0,
            "acceptance_rate": 0.0}


def decode_scenario(s: Scenario, shape: RequestShape, batch: int, *, longest: bool = False
                    ) -> Scenario:
    """``s`` as :func:`decode_workload`."""
    fields = decode_workload(shape, batch, s.parallelism.dp, longest=longest)
    return replace(s, workload=replace(s.workload, **fields))


def prefill_scenario(s: Scenario, shape: RequestShape) -> Scenario:
    """``s`` as :func:`prefill_workload`."""
    fields = prefill_workload(shape, s.parallelism.dp)
    return replace(s, workload=replace(s.workload, **fields))


def kv_max_batch(s: Scenario, shape: RequestShape, limit: int = 1 << 16) -> int:
    """Largest batch per DP replica whose KV cache (longest context), weights and buffers fit
    every stage's devices (0 if not even one sequence fits)."""
    layout = Layout.for_scenario(s)

    def fits(b: int) -> bool:
        d = decode_scenario(s, shape, b, longest=True)
        return all(stage_memory(d, layout, st).fits for st in range(s.parallelism.pp))

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:                    # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_kv(s: Scenario, shape: RequestShape, batch: int) -> None:
    """Raise OutOfMemory if ``batch`` sequences at their longest context do not fit."""
    d = decode_scenario(s, shape, batch, longest=True)
    check_memory(d, Layout.for_scenario(d))


def decode_tokens_per_step(s: Scenario) -> float:
    """Tokens per sequence one decode step of ``s`` yields (speculative decoding's expected
    accepted drafts plus one; 1 without)."""
    return output_tokens_per_sequence(replace(s, workload=replace(s.workload, mode="decode")))


def serving_metrics(decode_step: float, ttft: float, batch: int, dp: int, devices: int,
                    tokens_per_step: float = 1.0) -> dict[str, float]:
    """Per-layout serving figures from its decode step and prefill step (TTFT); a decode step
    yields ``tokens_per_step`` tokens per sequence (more than 1 with speculative decoding), so
    TPOT is the step over them."""
    tpot = decode_step / tokens_per_step
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens_per_s_per_user": 1.0 / tpot,
            "tokens_per_s_per_gpu": dp * batch / tpot / devices}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point beats on both coordinates (both larger is better); equal
    points are all kept."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    keep = [False] * len(points)
    best = float("-inf")
    kept: set[tuple[float, float]] = set()
    for i in order:
        if points[i][1] > best or points[i] in kept:
            keep[i] = True
            kept.add(points[i])
            best = max(best, points[i][1])
    return keep
