"""Tests of the shipped hardware profiles and of profile validation (moesim.spec.hardware)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from moesim.errors import ScenarioError
from moesim.spec.hardware import load_hardware

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"
SHIPPED = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def test_the_briefed_profiles_are_shipped():
    expected = {"h100-sxm", "h800-sxm", "a100-sxm-80gb", "tpu-v3", "tpu-v4", "tpu-v5p",
                "cpu-local"}
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_by_name(name):
    profile = load_hardware(name)
    assert profile.name == name
    assert Path(profile.path).resolve() == (PROFILE_DIR / f"{name}.yaml").resolve()
    assert "bf16" in profile.device.peak_flops or "fp32" in profile.device.peak_flops
    # Switched nodes need NVLink-like and NIC links; TPUs need ICI.
    needed = {"ici"} if profile.device.kind == "tpu" else {"scale_up", "scale_out"}
    assert needed <= set(profile.links)
    assert 0 < profile.device.reserved_memory < profile.device.memory


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_in_a_profile_has_a_source_comment(name):
    """A line holding a numeric value carries a comment, or sits under a comment block."""
    lines = (PROFILE_DIR / f"{name}.yaml").read_text().splitlines()
    numeric = re.compile(r'^\s*[a-z_0-9]+:\s*"?[-+]?[\d.]')
    for i, line in enumerate(lines):
        if numeric.match(line) and "#" not in line:
            assert lines[i - 1].strip().startswith("#"), f"{name}.yaml line {i + 1}: {line!r}"


def test_h100_units_convert_to_si():
    h100 = load_hardware("h100-sxm")
    assert h100.device.peak_flops["bf16"] == pytest.approx(989.4e12)
    assert h100.device.peak_flops["fp8"] == pytest.approx(1978.9e12)
    assert h100.device.memory == 80e9                        # "80 GB", decimal
    assert h100.device.memory_bandwidth == pytest.approx(3.35e12)
    assert h100.link("scale_out").bandwidth == pytest.approx(50e9)   # "400 Gb/s" / 8
    assert h100.link("scale_up").bandwidth == pytest.approx(450e9)
    assert h100.link("scale_up").latency == pytest.approx(2e-6)
    # nccl-tests issue 212: ~370 of 450 GB/s.
    assert h100.link("scale_up").effective_bandwidth == pytest.approx(370e9, rel=0.01)
    assert h100.node.devices_per_node == 8


def test_other_profiles_spot_checks():
    assert load_hardware("tpu-v4").device.memory == 32 * 2**30     # "32 GiB", binary
    assert load_hardware("tpu-v5p").link("ici").bandwidth == pytest.approx(90e9)
    h800 = load_hardware("h800-sxm")
    assert h800.link("scale_up").effective_bandwidth == pytest.approx(160e9)  # DeepSeek-V3
    a100 = load_hardware("a100-sxm-80gb")
    assert a100.link("scale_out").bandwidth == pytest.approx(25e9)           # 200 Gb/s
    assert a100.device.memory_bandwidth == pytest.approx(2.039e12)
    cpu = load_hardware("cpu-local")
    assert cpu.device.kind == "cpu"
    assert cpu.link("scale_out").bandwidth == pytest.approx(50e6)           # 400 Mb/s


def _write(tmp_path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    data = yaml.safe_load((PROFILE_DIR / "h100-sxm.yaml").read_text())
    data["name"] = "bad"
    return data


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize("dotted, value, field, words", [
    ("links.scale_out.bandwidth", "-400 Gb/s", "links.scale_out.bandwidth", "must be > 0"),
    ("device.tflops", 3, "device.tflops", "unknown field 'tflops'"),
    ("device.peak_flops.fp99", "1 TFLOPS", "device.peak_flops.fp99", "unknown dtype 'fp99'"),
    ("links.nvlink", {"kind": "nvlink", "bandwidth": "1 GB/s"}, "links.nvlink",
     "unknown link class 'nvlink'"),
    ("device", _DELETE, "device", "required field is missing"),
    ("device.memory", "80 GB/s", "device.memory", "not a bytes unit"),
    ("links.scale_up.ring_protocols", [{"name": "LL", "fixed": "6 us", "efficiency": 0}],
     "links.scale_up.ring_protocols[0].efficiency", "must be > 0"),
    ("links.scale_up.ring_protocols", [{"name": "LL", "fixed": 6, "efficiency": 0.4}],
     "links.scale_up.ring_protocols[0].fixed", "us"),
])
def test_bad_profile_names_the_file_and_the_field(tmp_path, dotted, value, field, words):
    path = _write(tmp_path, _set(_base(), dotted, value))
    with pytest.raises(ScenarioError) as info:
        load_hardware(str(path))
    message = str(info.value)
    assert str(path) in message
    assert f"{field}:" in message
    assert words in message


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ScenarioError, match="unknown hardware profile 'h1000'.*h100-sxm"):
        load_hardware("h1000")


# Datasheet values copied by hand from NVIDIA's pages (dense = the "with sparsity" figure / 2):
# H200 datasheet: 141 GB HBM3e, 4.8 TB/s, BF16 1,979 sparse, FP8 3,958 sparse, NVLink 900 GB/s.
# HGX B200 column of the GB200 NVL72 / HGX B200 table: 180 GB, 7.7 TB/s, BF16 4.5 PF sparse,
# FP8 9 PF sparse, FP4 18 PF sparse, NVLink5 1.8 TB/s. GB200 NVL72 per GPU: 186 GB, 8 TB/s,
# BF16 5 PF sparse, FP8 10 PF sparse, FP4 20 PF sparse; 72 GPUs per NVLink domain.
# NICs: ConnectX-7 400 Gb/s per GPU in all three (DGX H200 / DGX B200 / DGX GB200 guides).
# GB300 NVL72 per GPU (rack figures / 72): BF16 360 PF sparse -> 5, FP8 720 PF sparse -> 10,
# 576 TB/s -> 8 TB/s, 288 GB, NVLink 130 TB/s -> 1.8 TB/s; ConnectX-8 800 Gb/s per GPU.
# HGX B300 per GPU: BF16 4.5 PF sparse, FP8 9 PF sparse, 288 GB, 62 TB/s / 8, NVLink 1.8 TB/s;
# ConnectX-8 800 Gb/s per GPU.
@pytest.mark.parametrize(("name, memory, bandwidth, bf16_sparse, fp8_sparse, nvlink_total, "
                          "per_node"), [
    ("h200-sxm", 141e9, 4.8e12, 1979e12, 3958e12, 900e9, 8),
    ("b200", 180e9, 7.7e12, 4.5e15, 9e15, 1.8e12, 8),
    ("gb200-nvl72", 186e9, 8e12, 5e15, 10e15, 1.8e12, 72),
    ("gb300-nvl72", 288e9, 8e12, 5e15, 10e15, 1.8e12, 72),
    ("b300", 288e9, 7.75e12, 4.5e15, 9e15, 1.8e12, 8),
])
def test_new_gpu_profiles_hold_the_datasheet_numbers(name, memory, bandwidth, bf16_sparse,
                                                      fp8_sparse, nvlink_total, per_node):
    p = load_hardware(name)
    assert p.device.kind == "gpu"
    assert p.device.memory == pytest.approx(memory)
    assert p.device.memory_bandwidth == pytest.approx(bandwidth)
    assert p.device.peak_flops["bf16"] == pytest.approx(bf16_sparse / 2, rel=1e-3)
    assert p.device.peak_flops["fp8"] == pytest.approx(fp8_sparse / 2, rel=1e-3)
    assert p.link("scale_up").bandwidth == pytest.approx(nvlink_total / 2)  # per direction
    nic = 800e9 if name in ("gb300-nvl72", "b300") else 400e9
    assert p.link("scale_out").bandwidth == pytest.approx(nic / 8)           # Gb/s -> bytes/s
    assert p.node.devices_per_node == per_node


def test_blackwell_profiles_have_fp4_at_twice_fp8():
    for name, fp4_sparse in (("b200", 18e15), ("gb200-nvl72", 20e15)):
        flops = load_hardware(name).device.peak_flops
        assert flops["fp4"] == pytest.approx(fp4_sparse / 2)
        assert flops["fp4"] == pytest.approx(2 * flops["fp8"])


def test_h200_computes_like_h100_and_stores_more():
    """Same GH100 silicon: identical tensor peaks; only the memory system differs."""
    h100, h200 = load_hardware("h100-sxm"), load_hardware("h200-sxm")
    assert h200.device.peak_flops == h100.device.peak_flops
    assert h200.device.memory_bandwidth / h100.device.memory_bandwidth == pytest.approx(4.8 / 3.35)


@pytest.mark.parametrize("name, sm_count", [("h200-sxm", 132), ("b200", 148),
                                            ("gb200-nvl72", 148), ("gb300-nvl72", 160),
                                            ("b300", 160)])
def test_new_profiles_carry_the_kernel_model_fields(name, sm_count):
    """The kernel model's SM count and launch floor load for the new GPUs (H200: all of
    h100-sxm's kernel constants, same GH100 silicon, not refitted)."""
    device = load_hardware(name).device
    assert device.sm_count == sm_count and device.kernel_overhead == pytest.approx(4e-6)
    if name == "h200-sxm":
        h100 = load_hardware("h100-sxm").device
        for field in ("gemm_tile_m", "gemm_tile_n", "gemm_scheduler", "fp8_matmul_efficiency",
                      "grouped_gemm_efficiency", "attention_efficiency", "comm_sm_fraction"):
            assert getattr(device, field) == getattr(h100, field), field
