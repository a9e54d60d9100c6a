"""Physical quantities at the human edge: parse "900 GB/s", "400 Gb/s", "80 GiB", "989 TFLOPS", "2 us".

moesim computes in SI base units only: bytes, seconds, FLOP/s and bytes/s. Humans write hardware
figures with prefixes and mixed bits/bytes; this module is the one place where such strings become
numbers (``parse_quantity``) and numbers become readable strings (``format_quantity``).

Rules:
- decimal prefixes (k, M, G, T, P) are powers of 1000; binary prefixes (Ki, Mi, Gi, Ti, Pi) are
  powers of 1024;
- a lower-case ``b`` is a bit (``Gb/s``, ``Gbps``, ``Gbit/s``), an upper-case ``B`` a byte; bits are
  divided by 8 so bandwidths always come out in bytes/s;
- a plain number (``3.35e12`` or ``42``) is taken as already in SI units, except where a unit is
  required (``require_unit=True``, every YAML field with a unit kind): there ``900`` could mean
  B/s or GB/s, so a bare number is an error that gives an example. Counts never need a unit.
"""

from __future__ import annotations

import math
import re

__all__ = ["KINDS", "UnitError", "parse_quantity", "format_quantity"]

KINDS = ("bytes", "bandwidth", "flops", "time", "count")

_DECIMAL = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_TIME = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9,
         "min": 60.0, "h": 3600.0}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_QUANTITY = re.compile(rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[^\s].*?)?\s*$")
_PREFIXED = re.compile(r"^(?P<prefix>Ki|Mi|Gi|Ti|Pi|[kKMGTPE]?)(?P<base>.+)$")


class UnitError(ValueError):
    """A quantity string could not be parsed; the caller wraps it with the file and field."""


def _scale(prefix: str) -> float:
    return _BINARY[prefix] if prefix in _BINARY else _DECIMAL[prefix]


def _unit_factor(unit: str, kind: str) -> float:
    """SI factor of ``unit`` for a quantity of ``kind``; raises UnitError if it does not fit."""
    if kind == "time":
        if unit in _TIME:
            return _TIME[unit]
        raise UnitError(f"unknown time unit {unit!r} (allowed: {', '.join(_TIME)})")
    if kind == "count":
        if unit in _DECIMAL or unit in _BINARY:
            return _scale(unit)
        raise UnitError(f"unknown count suffix {unit!r} (allowed: k, M, G, T or Ki, Mi, Gi)")
    match = _PREFIXED.match(unit)
    if not match:
        raise UnitError(f"unknown unit {unit!r}")
    prefix, base = match["prefix"], match["base"]
    bases = {
        "bytes": {"B": 1.0, "byte": 1.0, "bytes": 1.0, "b": 0.125, "bit": 0.125, "bits": 0.125},
        "bandwidth": {"B/s": 1.0, "Bps": 1.0, "b/s": 0.125, "bps": 0.125, "bit/s": 0.125},
        "flops": {"FLOPS": 1.0, "FLOP/s": 1.0, "flops": 1.0, "FLOPs": 1.0, "flop/s": 1.0},
    }[kind]
    if base not in bases:
        # "M" alone (count kind) or a prefix that ate the base, e.g. "GB" when kind mismatches.
        raise UnitError(f"unit {unit!r} is not a {kind} unit (allowed: {', '.join(bases)} "
                        "with k/M/G/T/P or Ki/Mi/Gi/Ti prefixes)")
    return _scale(prefix) * bases[base]


def parse_quantity(value: object, kind: str, *, require_unit: bool = False) -> float:
    """Parse a human quantity into SI units.

    Parameters
    ----------
    value : str | int | float
        ``"900 GB/s"``, ``"400 Gb/s"``, ``"80 GiB"``, ``"989 TFLOPS"``, ``"2 us"`` or a plain number
        (taken as SI: bytes, bytes/s, FLOP/s or seconds).
    kind : {"bytes", "bandwidth", "flops", "time", "count"}
    require_unit : bool
        Refuse a number without a unit (except for ``count``).

    Returns
    -------
    float in bytes, bytes/s, FLOP/s, seconds, or a plain count.

    Raises
    ------
    UnitError if the string is malformed, the unit does not fit ``kind``, or the value is not finite.

    Examples
    --------
    >>> parse_quantity("400 Gb/s", "bandwidth")
    50000000000.0
    >>> parse_quantity("80 GiB", "bytes")
    85899345920.0
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")
    if isinstance(value, bool):
        raise UnitError(f"expected a number or a quantity string, got {value!r}")
    needs_unit = require_unit and kind != "count"
    if isinstance(value, int | float):
        if needs_unit:
            raise UnitError(f"{value!r} has no unit: write the {kind} with its unit, e.g. "
                            f"{_example(kind)}")
        number = float(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if not match:
            raise UnitError(f"cannot read {value!r} as a {kind} quantity (e.g. {_example(kind)})")
        unit = match["unit"] or ""
        if needs_unit and not unit:
            raise UnitError(f"{value!r} has no unit: write the {kind} with its unit, e.g. "
                            f"{_example(kind)}")
        factor = _unit_factor(unit, kind) if unit else 1.0
        number = float(match["num"]) * factor
    else:
        raise UnitError(f"expected a number or a quantity string, got {type(value).__name__}")
    if not math.isfinite(number):
        raise UnitError(f"{value!r} is not a finite number")
    return number


def _example(kind: str) -> str:
    return {"bytes": '"80 GiB"', "bandwidth": '"900 GB/s" or "400 Gb/s"', "flops": '"989 TFLOPS"',
            "time": '"2 us"', "count": '"1.5M"'}[kind]


def format_quantity(value: float, kind: str, digits: int = 3) -> str:
    """Format an SI value for a report: 9e11 bytes/s -> "900 GB/s", 2e-6 s -> "2 us"."""
    if kind == "time":
        for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
            if abs(value) >= factor or unit == "ns":
                return f"{value / factor:.{digits}g} {unit}"
    suffix = {"bytes": "B", "bandwidth": "B/s", "flops": "FLOPS", "count": ""}[kind]
    for prefix in ("P", "T", "G", "M", "k", ""):
        factor = _DECIMAL[prefix]
        if abs(value) >= factor or prefix == "":
            return f"{value / factor:.{digits}g} {prefix}{suffix}".rstrip()
    raise AssertionError("unreachable")
