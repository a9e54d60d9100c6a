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


# --- YAML fields with a unit kind must carry a unit ---------------------------------------------

@pytest.mark.parametrize("value, kind", [(900, "bandwidth"), ("900", "bandwidth"),
                                         (80, "bytes"), (2.5e-6, "time"), (989e12, "flops")])
def test_a_bare_number_needs_a_unit_where_one_is_required(value, kind):
    with pytest.raises(UnitError, match=f"has no unit: write the {kind} with its unit, e.g. "):
        parse_quantity(value, kind, require_unit=True)
    assert parse_quantity(value, kind) == float(value)          # code paths: SI numbers


def test_counts_never_need_a_unit():
    assert parse_quantity(1500, "count", require_unit=True) == 1500.0
    assert parse_quantity("1.5k", "count", require_unit=True) == 1500.0


def test_bare_bandwidth_in_a_scenario_is_an_error_naming_field_and_example(capsys):
    from moesim.cli import main
    from tests.conftest import REPO
    tiny = str(REPO / "scenarios" / "tiny-cpu.yaml")
    assert main(["validate", tiny, "--set", "cluster.scale_up_bandwidth=900"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (f"{tiny}: cluster.scale_up_bandwidth: 900 has no unit: write the bandwidth with its "
            'unit, e.g. "900 GB/s"') in err
    assert main(["validate", tiny, "--set", "cluster.scale_up_bandwidth=900 GB/s"]) == 0


def test_measured_profiles_hold_si_numbers(tmp_path):
    """The calibration suite writes SI numbers; a profile with a calibration section may."""
    import yaml

    from moesim.errors import ScenarioError
    from moesim.spec.hardware import load_hardware
    profile = {"name": "m", "device": {"name": "cpu", "kind": "cpu", "peak_flops": {"fp32": 1e11},
                                       "memory": 2**34, "memory_bandwidth": 2e10},
               "links": {"scale_up": {"kind": "shm", "bandwidth": 5e9, "latency": 2e-6}},
               "node": {"devices_per_node": 2}}
    by_hand = tmp_path / "by_hand.yaml"
    by_hand.write_text(yaml.safe_dump(profile))
    with pytest.raises(ScenarioError, match="device.peak_flops.fp32: 100000000000.0 has no unit"):
        load_hardware(str(by_hand))
    measured = tmp_path / "measured.yaml"
    measured.write_text(yaml.safe_dump({**profile, "calibration": {"metadata": {}}}))
    hw = load_hardware(str(measured))
    assert hw.links["scale_up"].bandwidth == 5e9 and hw.device.memory == 2**34
