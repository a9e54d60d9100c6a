"""``moesim compare A B``: two simulated steps side by side.

A and B are ``results.json`` files or the run folders holding them. The table shows, for each,
step time, throughput, MFU, dropped tokens, the step-time breakdown, the fullest stage's memory
and the busiest links, with B's change relative to A.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NoReturn

from moesim.errors import MoESimError, ScenarioError
from moesim.spec.limits import load_json_text, read_text_bounded
from moesim.units import format_quantity

__all__ = ["load_result", "check_result", "compare_rows", "compare_table", "compare_json",
           "COMPARE_FIELDS", "RUN_FIELDS", "MISSING", "expect", "expect_number",
           "expect_mapping", "expect_list", "expect_text", "is_int"]

_RESULT_BYTES = 256 * 2**20

# the top-level fields of a results.json that compare (and plot) read
COMPARE_FIELDS = ("scenario", "step_time", "tokens_per_s", "mfu", "breakdown", "memory")
RUN_FIELDS = COMPARE_FIELDS + ("alltoall", "experts", "links", "devices",
                               "tokens_per_s_per_device", "tflops_per_device", "dropped_tokens")
MISSING: Any = object()          # a field that is absent (``mapping.get(key, MISSING)``)


def expect(expected: str, value: Any, source: str, field: str | None) -> NoReturn:
    """Raise the one-line ScenarioError "source: field: expected X, got Y"."""
    if value is MISSING:
        got = "nothing (the field is missing)"
    elif isinstance(value, dict | list):
        got = f"a {'JSON object' if isinstance(value, dict) else 'list'}"
    else:
        got = json.dumps(value, default=str)
        got = got if len(got) <= 40 else got[:37] + "..."
    raise ScenarioError(f"expected {expected}, got {got}", source=source, field=field)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expect_number(value: Any, source: str, field: str, *, null: bool = False,
                  low: float | None = None, positive: bool = False) -> None:
    """``value`` must be a finite number (>= ``low``, > 0 if ``positive``; or null if ``null``)."""
    if value is None and null:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(float(value))
    except OverflowError:
        ok = False
    if ok and ((low is not None and value < low) or (positive and value <= 0)):
        ok = False
    if not ok:
        what = "a positive" if positive else "a non-negative" if low == 0 else "a"
        expect(f"{what} finite number{' or null' if null else ''}", value, source, field)


def expect_mapping(value: Any, source: str, field: str | None,
                   what: str = "a JSON object") -> dict[str, Any]:
    if not isinstance(value, dict):
        expect(what, value, source, field)
    return value


def expect_list(value: Any, source: str, field: str, what: str = "a list") -> list[Any]:
    if not isinstance(value, list):
        expect(what, value, source, field)
    return value


def expect_text(value: Any, source: str, field: str) -> str:
    if not isinstance(value, str):
        expect("a string", value, source, field)
    return value


def load_result(path: str | Path) -> dict[str, Any]:
    """The results.json at ``path`` (a file, or a run folder holding one).

    Raises
    ------
    MoESimError
        Missing, unreadable, not JSON, or not a moesim results.json (:func:`check_result`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise MoESimError(f"{path}: no results.json here (give a `moesim run` output folder or "
                          "its results.json)")
    data = load_json_text(read_text_bounded(path, limit=_RESULT_BYTES), source=str(path))
    return check_result(data, str(path))


def check_result(data: Any, source: str,
                 needed: tuple[str, ...] = COMPARE_FIELDS) -> dict[str, Any]:
    """``data`` (a loaded results.json) if it has the ``needed`` fields and every field that
    compare and plot read has the type they use (numbers finite).

    Raises
    ------
    ScenarioError
        One line naming ``source``, the field and what it must be.
    """
    if not isinstance(data, dict) or any(k not in data for k in needed):
        missing = [k for k in needed if not isinstance(data, dict) or k not in data]
        raise ScenarioError(f"not a moesim results.json (no {', '.join(missing)})", source=source)
    for key in ("step_time", "tokens_per_s", "mfu", "devices", "tflops_per_device"):
        if key in data:
            expect_number(data[key], source, key)
    for key in ("tokens_per_s_per_device", "dropped_tokens"):
        if key in data:
            expect_number(data[key], source, key, null=True)
    if "scenario" in data:
        expect_text(data["scenario"], source, "scenario")
    for i, text in enumerate(expect_list(data.get("overrides") or [], source, "overrides")):
        expect_text(text, source, f"overrides[{i}]")
    breakdown = expect_mapping(data.get("breakdown", {}), source, "breakdown",
                               "a JSON object of step-time parts in seconds")
    for part, secs in breakdown.items():
        expect_number(secs, source, f"breakdown.{part}")
    if "memory" in data:
        what = "a non-empty list of per-stage memory objects"
        if not expect_list(data["memory"], source, "memory", what):
            expect(what, data["memory"], source, "memory")
        stages = data["memory"]
        for i, stage in enumerate(stages):
            stage = expect_mapping(stage, source, f"memory[{i}]")
            expect_number(stage.get("total", MISSING), source, f"memory[{i}].total")
            expect_number(stage.get("capacity", MISSING), source, f"memory[{i}].capacity",
                          positive=True)
    alltoall = expect_mapping(data.get("alltoall", {}), source, "alltoall")
    for key in ("cross_node_fraction", "bytes_per_step") if "alltoall" in data else ():
        expect_number(alltoall.get(key, MISSING), source, f"alltoall.{key}")
    links = expect_mapping(data.get("links", {}), source, "links",
                           "a JSON object with busiest (and all) link lists")
    for key in ("busiest", "all"):
        for i, entry in enumerate(expect_list(links.get(key, []), source, f"links.{key}")):
            where = f"links.{key}[{i}]"
            entry = expect_mapping(entry, source, where)
            expect_text(entry.get("link", MISSING), source, f"{where}.link")
            expect_text(entry.get("class", MISSING), source, f"{where}.class")
            expect_number(entry.get("utilisation", MISSING), source, f"{where}.utilisation")
    if "experts" in data:
        _check_experts(expect_mapping(data["experts"], source, "experts"), source)
    return data


def _check_experts(experts: dict[str, Any], source: str) -> None:
    """The per-MoE-layer loads [layers][experts] and placement [layers][devices][slots]."""
    for key in ("max_over_mean", "worst_layer_max_over_mean", "device_max_over_mean"):
        expect_number(experts.get(key, MISSING), source, f"experts.{key}")
    layers = expect_list(experts.get("layers", MISSING), source, "experts.layers")
    for i, layer in enumerate(layers):
        if not is_int(layer):
            expect("an integer block index", layer, source, f"experts.layers[{i}]")
    width = 0
    for key in ("tokens_per_expert", "placement"):
        rows = expect_list(experts.get(key, MISSING), source, f"experts.{key}")
        if len(rows) != len(layers):
            expect(f"one entry per MoE layer ({len(layers)} in experts.layers)", len(rows),
                   source, f"experts.{key} length")
        for i, row in enumerate(rows):
            row = expect_list(row, source, f"experts.{key}[{i}]")
            if key == "tokens_per_expert":
                width = width or len(row)
                if not row or len(row) != width:
                    expect(f"{width or 'at least 1'} per-expert token counts", len(row), source,
                           f"experts.{key}[{i}] length")
                for j, tokens in enumerate(row):
                    expect_number(tokens, source, f"experts.{key}[{i}][{j}]", low=0)
                continue
            slots = None
            for d, hosted in enumerate(row):
                hosted = expect_list(hosted, source, f"experts.{key}[{i}][{d}]")
                slots = len(hosted) if slots is None else slots
                if len(hosted) != slots:
                    expect(f"{slots} slots like device 0", len(hosted), source,
                           f"experts.{key}[{i}][{d}] length")
                for s, expert in enumerate(hosted):
                    if not is_int(expert) or not 0 <= expert < width:
                        expect(f"an expert id in 0..{width - 1}", expert, source,
                               f"experts.{key}[{i}][{d}][{s}]")
            if not row:
                expect("a list of devices' expert slots", row, source, f"experts.{key}[{i}]")


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
                      indent=2, sort_keys=True, allow_nan=False)
