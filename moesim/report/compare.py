"""``moesim compare A B``: two simulated steps side by side.

A and B are ``results.json`` files or the run folders holding them. The table shows, for each,
step time, throughput, MFU, dropped tokens, the step-time breakdown, the fullest stage's memory
and the busiest links, with B's change relative to A.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moesim.errors import MoESimError
from moesim.spec.limits import load_json_text, read_text_bounded
from moesim.units import format_quantity

__all__ = ["load_result", "compare_rows", "compare_table"]

_RESULT_BYTES = 256 * 2**20


def load_result(path: str | Path) -> dict[str, Any]:
    """The results.json at ``path`` (a file, or a run folder holding one).

    Raises
    ------
    MoESimError
        Missing, unreadable, not JSON, or not a moesim results.json.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise MoESimError(f"{path}: no results.json here (give a `moesim run` output folder or "
                          "its results.json)")
    data = load_json_text(read_text_bounded(path, limit=_RESULT_BYTES), source=str(path))
    needed = ("scenario", "step_time", "tokens_per_s", "mfu", "breakdown", "memory")
    if not isinstance(data, dict) or any(k not in data for k in needed):
        raise MoESimError(f"{path}: not a moesim results.json (needs {', '.join(needed)})")
    return data


def _peak_memory(r: dict[str, Any]) -> float:
    return max((m.get("total", 0.0) for m in r.get("memory", [])), default=0.0)


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (metric, kind, A, B): kind is a unit kind of :func:`format_quantity` or ``""``."""
    rows = [
        ("step time", "time", a["step_time"], b["step_time"]),
        ("tokens/s", "", a["tokens_per_s"], b["tokens_per_s"]),
        ("tokens/s per device", "", a.get("tokens_per_s_per_device"),
         b.get("tokens_per_s_per_device")),
        ("MFU", "%", a["mfu"], b["mfu"]),
        ("dropped tokens", "", a.get("dropped_tokens"), b.get("dropped_tokens")),
    ]
    parts = list(dict.fromkeys([*a["breakdown"], *b["breakdown"]]))
    rows += [(f"  {p}", "time", a["breakdown"].get(p), b["breakdown"].get(p)) for p in parts]
    rows.append(("peak memory per device", "bytes", _peak_memory(a), _peak_memory(b)))
    return [{"metric": m, "kind": k, "a": va, "b": vb} for m, k, va, vb in rows]


def _show(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.1f}%"
    if kind:
        return format_quantity(float(value), kind)
    return f"{value:,.1f}" if isinstance(value, float) and abs(value) < 100 else f"{value:,.0f}"


def _change(a: Any, b: Any) -> str:
    if a is None or b is None:
        return ""
    if a == b:
        return "="
    if a == 0:
        return "new"
    return f"{100 * (b - a) / abs(a):+.1f}%"


def _label(r: dict[str, Any]) -> str:
    overrides = r.get("overrides") or []
    return r["scenario"] + (f" [{', '.join(overrides)}]" if overrides else "")


def compare_table(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B"),
                  links: int = 3) -> str:
    """The side-by-side table as text."""
    rows = compare_rows(a, b)
    width = max(len(r["metric"]) for r in rows) + 2
    lines = [f"{names[0]}: {_label(a)}", f"{names[1]}: {_label(b)}", "",
             f"{'':<{width}}{names[0]:>14}{names[1]:>14}{'change':>10}"]
    for r in rows:
        lines.append(f"{r['metric']:<{width}}{_show(r['a'], r['kind']):>14}"
                     f"{_show(r['b'], r['kind']):>14}{_change(r['a'], r['b']):>10}")
    for name, r in zip(names, (a, b)):
        busiest = (r.get("links") or {}).get("busiest", [])[:links]
        if busiest:
            lines.append(f"busiest links {name}: " + "; ".join(
                f"{x['link']} {100 * x['utilisation']:.0f}%" for x in busiest))
    return "\n".join(lines)


def compare_json(a: dict[str, Any], b: dict[str, Any], paths: tuple[str, str]) -> str:
    """The comparison as JSON (for ``--json``)."""
    return json.dumps({"a": {"path": paths[0], "scenario": _label(a)},
                       "b": {"path": paths[1], "scenario": _label(b)},
                       "rows": compare_rows(a, b),
                       "busiest_links": {"a": (a.get("links") or {}).get("busiest", []),
                                         "b": (b.get("links") or {}).get("busiest", [])}},
                      indent=2, sort_keys=True)
