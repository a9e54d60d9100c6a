"""A sweep: one base scenario and the fields to vary, expanded into named points.

A sweep file is YAML in one of two forms::

    # 1. a base scenario by path (relative to this file), fixed overrides, and the sweep
    name: mixtral-ep-x-nodes
    base: ../mixtral-8x7b-train-4node.yaml      # or  scenario: {inline scenario mapping}
    set: {parallelism.pp: 2}                     # applied to every point
    sweep:
      grid: {parallelism.ep: [1, 2, 4, 8]}       # cartesian product of the lists
      zip: {cluster.nodes: [2, 4], parallelism.dp: [8, 16]}   # advanced together

    # 2. a scenario with a ``sweep:`` section (the scenario's own fields at the top level)

Points are the cartesian product of the grid lists and the rows of each zip group (a list of
zip mappings makes several groups), in file order with the last field varying fastest. A point is
named by its swept values (``ep=4,nodes=2``) and keyed by a hash of its resolved overrides, which
is what ``--resume`` matches finished rows on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import ScenarioError
from moesim.spec.fields import read_yaml
from moesim.spec.limits import MAX_NAME_CHARS, MAX_SWEEP_POINTS, check_name
from moesim.spec.model import ModelSpec
from moesim.spec.scenario import Scenario, apply_overrides, scenario_from_mapping

__all__ = ["SweepPoint", "Sweep", "load_sweep", "sweep_from_mapping", "point_key",
           "override_strings"]

_SWEEP_FILE_KEYS = ("name", "description", "base", "scenario", "set", "sweep")
_SWEEP_KEYS = ("grid", "zip")
# Scenario fields a sweep cannot set: derived from others (hardware from cluster.hardware).
_NOT_SETTABLE = ("hardware", "source", "sweep")


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: the swept values and the overrides that make its scenario."""

    index: int                          # position in sweep order
    name: str                           # "ep=4,nodes=2"
    values: tuple[tuple[str, Any], ...]  # (field path, value) per swept field, in file order
    overrides: tuple[str, ...]          # "a.b=<json>" for the fixed `set` and the swept values
    key: str                            # stable hash of the sorted overrides (16 hex digits)


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the base scenario mapping and its expanded points."""

    name: str
    description: str
    source: str                         # the sweep file
    base: dict[str, Any]                # scenario mapping before overrides
    base_dir: str                       # folder relative paths in ``base`` are resolved from
    fields: tuple[str, ...]             # swept field paths, in file order
    axes: tuple[tuple[str, ...], ...]   # fields that move together: one per grid field, zip group
    points: tuple[SweepPoint, ...]

    @property
    def base_digest(self) -> str:
        """Hash of the base scenario mapping: a resumed sweep must have the same base."""
        text = json.dumps(self.base, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def scenario(self, point: SweepPoint) -> Scenario:
        """Build and validate the scenario of ``point`` (raises ScenarioError)."""
        return build_point_scenario(self.base, self.base_dir, self.source, point.overrides)


def build_point_scenario(base: dict, base_dir: str, source: str,
                         overrides: tuple[str, ...] | list[str]) -> Scenario:
    """The scenario of ``base`` with ``overrides`` applied (the body of :meth:`Sweep.scenario`)."""
    data = apply_overrides(base, list(overrides), source=source)
    return scenario_from_mapping(data, source=source, base_dir=Path(base_dir))


def override_strings(values: dict[str, Any] | tuple[tuple[str, Any], ...]) -> tuple[str, ...]:
    """``a.b=<value as JSON>`` strings (JSON is YAML, so apply_overrides reads them back)."""
    items = values.items() if isinstance(values, dict) else values
    return tuple(f"{path}={json.dumps(value, sort_keys=True)}" for path, value in items)


def point_key(overrides: tuple[str, ...] | list[str]) -> str:
    """Stable hash of a point's resolved overrides; independent of their order."""
    text = "\n".join(sorted(overrides))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (see the module docstring for its two forms).

    Raises
    ------
    ScenarioError
        Missing or unreadable file, unknown keys, an unknown swept field, empty value lists,
        zipped lists of unequal length, a field swept twice, duplicate points, an invalid base
        scenario (with ``set``), or a swept value its field never allows.
    """
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ScenarioError("a sweep file must be a YAML mapping with a `sweep:` section",
                            source=str(path))
    return sweep_from_mapping(data, source=str(path), base_dir=path.parent)


def sweep_from_mapping(data: dict, *, source: str, base_dir: Path) -> Sweep:
    """Build a Sweep from a parsed sweep file (the body of :func:`load_sweep`)."""
    if "sweep" not in data:
        raise ScenarioError("required field is missing (grid and/or zip of fields to vary)",
                            source=source, field="sweep")
    if "base" in data or "scenario" in data:
        base, scen_dir = _base_of_sweep_file(data, source, base_dir)
        fixed = _fixed_overrides(data.get("set") or {}, source)
        name = data.get("name") or base.get("name") or Path(source).stem
        description = data.get("description") or base.get("description", "")
    else:  # a scenario with a sweep section
        base = {k: v for k, v in data.items() if k != "sweep"}
        scen_dir, fixed = base_dir, {}
        name, description = data.get("name") or Path(source).stem, data.get("description", "")
    name = _sweep_name(name, explicit=bool(data.get("name")), source=source)
    if "base" not in data and "scenario" not in data:
        base.setdefault("name", name)    # a scenario named by its file, like the sweep
    axes, where = _axes(data["sweep"], source)
    total = 1
    for _, rows in axes:
        total *= len(rows)
    if total > MAX_SWEEP_POINTS:
        sizes = " x ".join(str(len(rows)) for _, rows in axes)
        raise ScenarioError(f"{sizes} = {total:,} points is more than the {MAX_SWEEP_POINTS:,} "
                            "allowed in one sweep; split it", source=source, field="sweep")
    fields = tuple(f for axis in axes for f in axis[0])
    for f in (*fields, *fixed):
        _check_field_path(f, source, "sweep" if f in fields else "set")
    points = _expand(axes, fixed)
    seen: dict[str, str] = {}
    for p in points:
        if p.key in seen:
            raise ScenarioError(f"points {seen[p.key]!r} and {p.name!r} are the same scenario "
                                "(a value is listed twice)", source=source, field="sweep")
        seen[p.key] = p.name
    _check_base(base, scen_dir, source, fixed, fields, data)
    _check_values(base, scen_dir, source, fixed, axes, where)
    return Sweep(name=str(name), description=str(description), source=source, base=base,
                 base_dir=str(scen_dir), fields=fields, axes=tuple(a[0] for a in axes),
                 points=tuple(points))


def _try_build(base: dict, scen_dir: Path, source: str, overrides: tuple[str, ...]
               ) -> ScenarioError | None:
    """The field-level error the scenario loader raises for ``base`` with ``overrides``, or None
    if it builds or fails only a check between fields (which other swept values may satisfy)."""
    try:
        build_point_scenario(base, str(scen_dir), source, overrides)
    except ScenarioError as exc:
        return None if exc.between_fields else exc
    return None


def _within(field: str | None, path: str) -> bool:
    return field is not None and (field == path or field.startswith((path + ".", path + "[")))


def _bare(exc: ScenarioError) -> str:
    """The message of ``exc`` without its "source: field: " prefix."""
    prefix = "".join(f"{p}: " for p in (exc.source, exc.field) if p)
    text = str(exc)
    return text[len(prefix):] if text.startswith(prefix) else text


def _check_base(base: dict, scen_dir: Path, source: str, fixed: dict[str, Any],
                fields: tuple[str, ...], data: dict) -> None:
    """Refuse a base scenario (with ``set``) that no point can make valid: a field-level error
    outside the swept fields would be the same error in every row."""
    exc = _try_build(base, scen_dir, source, override_strings(fixed))
    if exc is None or any(_within(exc.field, f) for f in fields):
        return
    if any(_within(exc.field, k) for k in fixed):
        raise ScenarioError(_bare(exc), source=source, field=f"set.{exc.field}")
    if "base" in data:
        at = f"{exc.field}: " if exc.field else ""
        raise ScenarioError(f"the base scenario {data['base']} is invalid: {at}{_bare(exc)}",
                            source=source, field="base")
    if "scenario" in data:
        raise ScenarioError(_bare(exc), source=source,
                            field="scenario" + (f".{exc.field}" if exc.field else ""))
    hint = ""
    if exc.field in ("name", "model", "cluster", "workload") and "missing" in str(exc):
        hint = (" (a sweep file names its base scenario with `base:` (a file) or `scenario:` "
                "(inline), or is itself a whole scenario with a `sweep:` section)")
    raise ScenarioError(_bare(exc) + hint, source=source, field=exc.field)


def _check_values(base: dict, scen_dir: Path, source: str, fixed: dict[str, Any], axes,
                  where: list[str]) -> None:
    """Refuse a swept value its own field never allows: each applied alone to the base (with
    ``set``) through the scenario loader. Errors that depend on the other swept values (an
    invalid combination, out of memory) stay in the rows of the points that hit them."""
    for (fields, rows), at in zip(axes, where):
        for col, f in enumerate(fields):
            checked: set[str] = set()
            for i, row in enumerate(rows):
                override = override_strings(((f, row[col]),))[0]
                if override in checked:
                    continue
                checked.add(override)
                exc = _try_build(base, scen_dir, source, override_strings(fixed) + (override,))
                if exc is not None and _within(exc.field, f):
                    inner = "" if exc.field == f else f"{exc.field}: "
                    value = override.split("=", 1)[1]
                    raise ScenarioError(f"{value:.60} is not allowed: {inner}{_bare(exc)}",
                                        source=source, field=f"{at}.{f}[{i}]")


def _sweep_name(name: Any, *, explicit: bool, source: str) -> str:
    """The sweep's name, a folder name: checked if the file gave it, made safe if derived."""
    if explicit:
        return check_name(name, source=source, field="name")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))[:MAX_NAME_CHARS].strip(".")
    return safe or "sweep"


def _base_of_sweep_file(data: dict, source: str, base_dir: Path) -> tuple[dict, Path]:
    """The base scenario mapping (from ``base:`` path or inline ``scenario:``) and its folder."""
    unknown = [k for k in data if k not in _SWEEP_FILE_KEYS]
    if unknown:
        raise ScenarioError(f"unknown field {unknown[0]!r} (allowed: "
                            f"{', '.join(_SWEEP_FILE_KEYS)})", source=source, field=str(unknown[0]))
    if "base" in data and "scenario" in data:
        raise ScenarioError("give either `base` (a scenario file) or `scenario` (inline), not "
                            "both", source=source, field="base")
    if "scenario" in data:
        if not isinstance(data["scenario"], dict):
            raise ScenarioError("expected a mapping of scenario fields", source=source,
                                field="scenario")
        return dict(data["scenario"]), base_dir
    ref = data["base"]
    if not isinstance(ref, str):
        raise ScenarioError(f"expected a scenario file path, got {ref!r:.60}", source=source,
                            field="base")
    path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
    if not path.is_file():
        raise ScenarioError(f"scenario file {ref!r} not found (looked in {base_dir})",
                            source=source, field="base")
    if path.resolve() == Path(source).resolve():
        raise ScenarioError(f"{ref!r} is this sweep file itself; give the scenario file to "
                            "sweep (or drop `base:` and write the scenario's fields here)",
                            source=source, field="base")
    base = read_yaml(path)
    if not isinstance(base, dict):
        raise ScenarioError("a scenario must be a YAML mapping", source=str(path))
    if "base" in base or "scenario" in base:
        raise ScenarioError(f"{ref!r} is a sweep file (it has `base:` or `scenario:`), not a "
                            "scenario; give the scenario file to sweep", source=source,
                            field="base")
    base.pop("sweep", None)     # a base scenario's own sweep section is not this sweep's
    return base, path.parent


def _fixed_overrides(fixed: Any, source: str) -> dict[str, Any]:
    if not isinstance(fixed, dict):
        raise ScenarioError(f"expected a mapping of field.path: value, got {fixed!r:.60}",
                            source=source, field="set")
    return {str(k): v for k, v in fixed.items()}


def _axes(section: Any, source: str
          ) -> tuple[list[tuple[tuple[str, ...], list[tuple[Any, ...]]]], list[str]]:
    """The sweep's axes: (field paths, value rows), and where each is in the file (sweep.grid,
    sweep.zip[1]). A grid field is an axis of one field."""
    if not isinstance(section, dict) or not section:
        raise ScenarioError("expected a mapping with `grid` and/or `zip`", source=source,
                            field="sweep")
    unknown = [k for k in section if k not in _SWEEP_KEYS]
    if unknown:
        raise ScenarioError(f"unknown field {unknown[0]!r} (allowed: grid, zip)", source=source,
                            field=f"sweep.{unknown[0]}")
    axes: list[tuple[tuple[str, ...], list[tuple[Any, ...]]]] = []
    where: list[str] = []
    grid = section.get("grid") or {}
    if not isinstance(grid, dict):
        raise ScenarioError("expected a mapping of field.path: [values]", source=source,
                            field="sweep.grid")
    for f, values in grid.items():
        axes.append(((str(f),), [(v,) for v in _values(values, source, f"sweep.grid.{f}")]))
        where.append("sweep.grid")
    groups = section.get("zip") or []
    groups = [groups] if isinstance(groups, dict) else groups
    if not isinstance(groups, list):
        raise ScenarioError("expected a mapping (or a list of mappings) of field.path: [values]",
                            source=source, field="sweep.zip")
    for i, group in enumerate(groups):
        where.append("sweep.zip" if len(groups) == 1 else f"sweep.zip[{i}]")
        axes.append(_zip_axis(group, source, where[-1]))
    fields = [f for fs, _ in axes for f in fs]
    dup = next((f for f in fields if fields.count(f) > 1), None)
    if dup is not None:
        raise ScenarioError(f"field {dup!r} is swept twice", source=source, field="sweep")
    if not axes:
        raise ScenarioError("no fields to sweep", source=source, field="sweep")
    return axes, where


def _zip_axis(group: Any, source: str, where: str):
    if not isinstance(group, dict) or not group:
        raise ScenarioError("expected a mapping of field.path: [values]", source=source,
                            field=where)
    columns = {str(f): _values(v, source, f"{where}.{f}") for f, v in group.items()}
    lengths = {f: len(v) for f, v in columns.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{f}: {n}" for f, n in lengths.items())
        raise ScenarioError(f"zipped lists must have equal lengths (got {listing})",
                            source=source, field=where)
    return tuple(columns), list(zip(*columns.values()))


def _values(values: Any, source: str, where: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ScenarioError(f"expected a non-empty list of values, got {values!r:.60}",
                            source=source, field=where)
    return values


def _check_field_path(path: str, source: str, section: str) -> None:
    """Reject a field path that names no scenario field (a typo would sweep nothing)."""
    where = f"{section}.{path}"
    parts = path.split(".")
    top = {f.name: f for f in dataclasses.fields(Scenario)}
    if parts[0] not in top or parts[0] in _NOT_SETTABLE:
        allowed = ", ".join(n for n in top if n not in _NOT_SETTABLE)
        raise ScenarioError(f"{parts[0]!r} is not a scenario field (allowed: {allowed})",
                            source=source, field=where)
    hint: Any = typing.get_type_hints(Scenario)[parts[0]]
    for depth, part in enumerate(parts[1:], start=1):
        if hint is ModelSpec and part == "base":
            return                                  # model.base: start from another model
        if not dataclasses.is_dataclass(hint):
            return                                  # inside a list or mapping: checked later
        names = {f.name for f in dataclasses.fields(hint) if f.init}
        if part not in names:
            prefix = ".".join(parts[:depth])
            raise ScenarioError(f"{prefix} has no field {part!r} (allowed: "
                                f"{', '.join(sorted(names))})", source=source, field=where)
        hint = typing.get_type_hints(hint)[part]


def _expand(axes, fixed: dict[str, Any]) -> list[SweepPoint]:
    fields = [f for fs, _ in axes for f in fs]
    labels = _short_labels(fields)
    points = []
    for index, combo in enumerate(itertools.product(*(rows for _, rows in axes))):
        values = tuple(zip(fields, (v for row in combo for v in row)))
        overrides = override_strings(fixed) + override_strings(values)
        name = ",".join(f"{labels[f]}={_show(v)}" for f, v in values)
        points.append(SweepPoint(index=index, name=name, values=values, overrides=overrides,
                                 key=point_key(overrides)))
    return points


def _short_labels(fields: list[str]) -> dict[str, str]:
    """The last path component of each field, or the full path where that is ambiguous."""
    last = [f.split(".")[-1] for f in fields]
    return {f: (t if last.count(t) == 1 else f) for f, t in zip(fields, last)}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
