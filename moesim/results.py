"""What a simulation reports: step time, throughput, MFU, breakdown, per-device, per-link, per-expert.

``Result`` is a plain dataclass of numbers and lists so that it serialises to ``results.json``
byte-for-byte the same for the same scenario; :func:`summary` renders it for humans (the only place
besides the YAML edge where ms, GB/s and TFLOPS appear).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moesim.units import format_quantity

__all__ = ["Result", "summary", "write_json_atomic", "write_text_atomic"]


@dataclass
class Result:
    scenario: str
    mode: str                       # training / prefill / decode
    engine: str                     # aggregated / full
    devices: int
    step_time: float                # seconds
    tokens_per_step: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    model_flops_per_token: float    # convention in moesim.sim.simulate.model_flops_per_token
    mfu: float
    tflops_per_device: float
    breakdown: dict[str, float]     # seconds, of the critical stage's busiest device; sums to step_time
    stages: list[dict[str, Any]]
    memory: list[dict[str, float]]
    links: dict[str, Any]
    experts: dict[str, Any]
    alltoall: dict[str, float]
    dropped_tokens: float
    compute_source: str
    events: int
    notes: list[str] = field(default_factory=list)
    faults: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _round(asdict(self))


def _round(obj: Any) -> Any:
    """Round floats to 12 significant digits so JSON output is stable and readable."""
    if isinstance(obj, float):
        return float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any, *, compact: bool = False) -> None:
    """JSON with sorted keys (stable bytes); ``compact`` drops indentation (large traces)."""
    if compact:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    else:
        text = json.dumps(data, indent=2, sort_keys=True)
    write_text_atomic(path, text + "\n")


def summary(r: Result) -> str:
    """A human-readable table of a result."""
    ms = lambda s: format_quantity(s, "time")  # noqa: E731
    lines = [
        f"scenario        {r.scenario}  ({r.mode}, {r.devices} devices, {r.engine} engine)",
        f"step time       {ms(r.step_time)}",
        f"throughput      {r.tokens_per_s:,.0f} tokens/s  ({r.tokens_per_s_per_device:,.1f} per "
        "device)",
        f"model FLOPs     {r.tflops_per_device:.1f} TFLOPS per device, MFU {100 * r.mfu:.1f}%",
        "breakdown       " + ", ".join(f"{k} {ms(v)} ({100 * v / r.step_time:.0f}%)"
                                       for k, v in r.breakdown.items() if r.step_time > 0),
        f"all-to-all      {format_quantity(r.alltoall['bytes_per_step'], 'bytes')} per step per "
        f"EP group, {100 * r.alltoall['cross_node_fraction']:.0f}% cross-node",
        f"expert load     max/mean {r.experts['max_over_mean']:.2f} (worst layer "
        f"{r.experts['worst_layer_max_over_mean']:.2f}); device max/mean "
        f"{r.experts['device_max_over_mean']:.2f}; dropped tokens {r.dropped_tokens:,.0f}",
        "memory (GiB)    " + ", ".join(f"stage {m['stage']}: {m['total'] / 2**30:.1f}/"
                                       f"{m['capacity'] / 2**30:.0f}" for m in r.memory[:4])
        + (" ..." if len(r.memory) > 4 else ""),
    ]
    busiest = r.links.get("busiest", [])[:3]
    if busiest:
        lines.append("busiest links   " + "; ".join(
            f"{b['link']} {100 * b['utilisation']:.0f}%" for b in busiest))
    if r.faults:
        f = r.faults
        lines.append(f"faults          step {ms(f['healthy_step_time'])} healthy -> "
                     f"{ms(f['step_time'])} ({f['step_time_change_pct']:+.1f}%); "
                     f"{f['dropped_tokens_due_to_faults']:,.0f} tokens dropped by faults")
    lines.append(f"compute model   {r.compute_source}")
    lines += [f"note            {n}" for n in r.notes]
    return "\n".join(lines)
