"""Strict loading of frozen dataclasses from YAML mappings.

Every configuration kind (model, hardware, cluster, scenario, sweep) is a frozen dataclass. This module
turns a parsed YAML mapping into one, field by field, and rejects anything it does not understand with
a ``ScenarioError`` that names the file, the field path (``cluster.links[2].bandwidth``), the bad value
and what is allowed. Defaults live in the dataclasses only.

Field metadata understood by :func:`build`:

- ``unit``: a kind for :func:`moesim.units.parse_quantity` ("bytes", "bandwidth", "flops", "time");
  the YAML must then say ``"900 GB/s"`` (a bare number is an error naming the field and giving an
  example, since ``900`` could mean B/s or GB/s) and the field holds bytes/s. Only files written
  by moesim's calibration suite (profiles with a ``calibration`` section) hold bare SI numbers:
  :func:`build` with ``bare_si=True``.
- ``min`` / ``max``: inclusive bounds; ``gt``: exclusive lower bound.
- ``doc``: one line shown in error messages and ``moesim validate``.
- ``path``: the string is a file path (checked against the OS's length limits).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from moesim.errors import ScenarioError
from moesim.spec.limits import check_path_text, check_text, load_yaml_text, read_text_bounded
from moesim.units import UnitError, parse_quantity

__all__ = ["build", "read_yaml", "spec_field", "join_path", "to_plain"]

T = TypeVar("T")


def spec_field(default: Any = dataclasses.MISSING, *, unit: str | None = None,
               min: float | None = None, max: float | None = None, gt: float | None = None,
               doc: str = "", default_factory: Any = dataclasses.MISSING,
               path: bool = False) -> Any:
    """A dataclass field with validation metadata (see the module docstring)."""
    meta = {"unit": unit, "min": min, "max": max, "gt": gt, "doc": doc, "path": path}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def join_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file within the limits of :mod:`moesim.spec.limits` (size, regular file,
    nesting, alias expansion, integer digits); every problem is a ScenarioError naming the file."""
    text = read_text_bounded(path)
    return load_yaml_text(text, source=str(path))


def relative_file(path: str | Path, folder: str | Path | None) -> Path:
    """A file named in a scenario: a relative ``path`` is looked up in the scenario's ``folder``
    first, then in the working directory (as model and profile paths are); where neither has it,
    the scenario-folder path (for the error message)."""
    path = Path(path)
    if path.is_absolute() or folder is None:
        return path
    beside = Path(folder) / path
    return path.resolve() if not beside.exists() and path.exists() else beside


def build(cls: type[T], data: Any, *, source: str | None, path: str = "",
          bare_si: bool = False) -> T:
    """Build the frozen dataclass ``cls`` from ``data`` (a mapping), validating every field.

    ``bare_si`` accepts plain numbers (taken as SI) in fields with a unit; only for files that
    moesim itself wrote in SI (measured hardware profiles).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ScenarioError(f"expected a mapping with fields {_names(cls)}, got "
                            f"{_describe(data)}", source=source, field=path or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ScenarioError(f"unknown field {unknown[0]!r} (allowed: {_names(cls)})",
                            source=source, field=join_path(path, str(unknown[0])) if path else None)
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        fpath = join_path(path, name)
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                doc = fld.metadata.get("doc")
                raise ScenarioError("required field is missing" + (f" ({doc})" if doc else ""),
                                    source=source, field=fpath)
            continue
        values[name] = _convert(hints[name], data[name], fld.metadata, source, fpath, bare_si)
    try:
        return cls(**values)
    except ScenarioError as exc:
        # A class's own check names its field generically ("faults.slowdown"); an item of a
        # list is at a concrete path ("faults[2]"): name that one.
        field = exc.field
        head, _, rest = (field or "").partition(".")
        if field and path and path != head and path.rpartition(".")[2].split("[")[0] == head:
            field = join_path(path, rest) if rest else path
        if field != exc.field or (exc.source is None and source is not None):
            said = str(exc).removeprefix(f"{exc.source}: " if exc.source else "")
            said = said.removeprefix(f"{exc.field}: " if exc.field else "")
            exc = ScenarioError(said, source=exc.source or source, field=field)
        exc.between_fields = True   # a class's own check relates its fields
        raise exc from None


def _names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if f.init)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _convert(hint: Any, value: Any, meta: Any, source: str | None, path: str,
             bare_si: bool = False) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, meta, source, path, bare_si)
        errors = []
        for option in inner:
            try:
                return _convert(option, value, meta, source, path, bare_si)
            except ScenarioError as exc:
                errors.append(str(exc))
        raise ScenarioError(f"{_describe(value)} fits none of the allowed forms", source=source,
                            field=path)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ScenarioError(f"{value!r} is not allowed (allowed: {allowed})", source=source,
                                field=path)
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ScenarioError(f"expected a list, got {_describe(value)}", source=source,
                                field=path)
        item_hint = args[0] if args else Any
        return tuple(_convert(item_hint, v, meta, source, join_path(path, i), bare_si)
                     for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ScenarioError(f"expected a mapping, got {_describe(value)}", source=source,
                                field=path)
        key_hint, val_hint = args if args else (Any, Any)
        return {_convert(key_hint, k, {}, source, path): _convert(val_hint, v, meta, source,
                                                                     join_path(path, str(k)),
                                                                     bare_si)
                for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, source=source, path=path, bare_si=bare_si)
    if hint is Any:
        return value
    return _scalar(hint, value, meta, source, path, bare_si)


def _scalar(hint: Any, value: Any, meta: Any, source: str | None, path: str,
            bare_si: bool = False) -> Any:
    unit = meta.get("unit") if meta else None
    if hint is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"expected true or false, got {_describe(value)}", source=source,
                                field=path)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ScenarioError(f"expected a string, got {_describe(value)}", source=source,
                                field=path)
        if meta and meta.get("path"):
            return check_path_text(value, source=source, field=path)
        return check_text(value, source=source, field=path)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ScenarioError(f"expected an integer, got {_describe(value)}",
                                    source=source, field=path)
    elif hint is float:
        if unit:
            try:
                value = parse_quantity(value, unit, require_unit=not bare_si)
            except UnitError as exc:
                raise ScenarioError(str(exc), source=source, field=path) from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"expected a number, got {_describe(value)}", source=source,
                                field=path)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ScenarioError(f"expected a finite number, got {value}", source=source,
                                field=path)
    else:
        raise TypeError(f"unsupported field type {hint!r} at {path}")
    _check_bounds(value, meta, source, path)
    return value


def _check_bounds(value: float, meta: Any, source: str | None, path: str) -> None:
    if not meta:
        return
    lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
    if gt is not None and not value > gt:
        raise ScenarioError(f"{value!r} must be > {gt}", source=source, field=path)
    if lo is not None and value < lo:
        raise ScenarioError(f"{value!r} must be >= {lo}", source=source, field=path)
    if hi is not None and value > hi:
        raise ScenarioError(f"{value!r} must be <= {hi}", source=source, field=path)


# The SI unit a quantity field is written back with, so a resolved scenario reads back as it was
# (a bare number in a unit field is refused as ambiguous).
SI_UNITS = {"bytes": "B", "bandwidth": "B/s", "flops": "FLOP/s", "time": "s"}


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for printing the resolved scenario and results);
    a quantity field's number is written with its SI unit (``"17179869184.0 B"``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            unit = SI_UNITS.get(f.metadata.get("unit") or "")
            if unit and isinstance(value, int | float) and not isinstance(value, bool):
                out[f.name] = f"{float(value)!r} {unit}"
            else:
                out[f.name] = to_plain(value)
        return out
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
