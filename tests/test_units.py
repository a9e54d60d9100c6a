"""Units at the human edge: decimal vs binary prefixes, bits vs bytes, errors that say why."""

from __future__ import annotations

import pytest

from moesim.units import UnitError, format_quantity, parse_quantity


@pytest.mark.parametrize("text, kind, expected", [
    ("900 GB/s", "bandwidth", 900e9),
    ("400 Gb/s", "bandwidth", 50e9),          # bits: / 8
    ("400 Gbps", "bandwidth", 50e9),
    ("3.35 TB/s", "bandwidth", 3.35e12),
    ("1 GiB/s", "bandwidth", 2**30),
    ("80 GiB", "bytes", 80 * 2**30),          # binary prefix
    ("80 GB", "bytes", 80e9),                 # decimal prefix
    ("8 Mb", "bytes", 1e6),
    ("989 TFLOPS", "flops", 989e12),
    ("1.979 PFLOP/s", "flops", 1.979e15),
    ("2 us", "time", 2e-6),
    ("2 µs", "time", 2e-6),
    ("1.5 ms", "time", 1.5e-3),
    ("10 ns", "time", 1e-8),
    ("1.5M", "count", 1.5e6),
    (3.35e12, "bandwidth", 3.35e12),          # plain numbers are SI already
    (42, "bytes", 42.0),
    ("1e3", "time", 1000.0),
])
def test_parse(text, kind, expected):
    assert parse_quantity(text, kind) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text, kind, message", [
    ("900 GB", "bandwidth", "not a bandwidth unit"),
    ("5 parsecs", "time", "unknown time unit"),
    ("fast", "bandwidth", "cannot read 'fast'"),
    ("nan", "bytes", "cannot read"),
    (float("inf"), "bytes", "not a finite number"),
    (True, "bytes", "expected a number"),
    ([1], "bytes", "expected a number"),
    ("1 TFLOPS", "bytes", "not a bytes unit"),
])
def test_parse_errors(text, kind, message):
    with pytest.raises(UnitError, match=message):
        parse_quantity(text, kind)


def test_format_round_trips():
    assert format_quantity(9e11, "bandwidth") == "900 GB/s"
    assert format_quantity(2e-6, "time") == "2 us"
    assert format_quantity(0.0123, "time") == "12.3 ms"
    for value, kind in ((4.5e10, "bandwidth"), (8e10, "bytes"), (9.89e14, "flops"),
                        (3e-3, "time")):
        assert parse_quantity(format_quantity(value, kind, digits=6), kind) == pytest.approx(value)
