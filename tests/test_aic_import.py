"""`moesim calibrate --import aiconfigurator`: a tiny data folder in aiconfigurator 0.12's real
layout (same folders, file names and columns as its h100_sxm tables) becomes a moesim profile whose
shaped tables the compute model reads. aiconfigurator itself is not needed: pyarrow writes the
parquet files here."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from moesim import cli
from moesim.aic_import import version_key
from moesim.calibration import MeasuredTables
from moesim.compute import ATTENTION_GLUE_KERNELS, KernelTimer, glue_bytes_attention
from moesim.errors import CalibrationError
from moesim.spec.hardware import load_hardware
from moesim.spec.models import load_model

DEVICE = "NVIDIA H100 80GB HBM3"
# tiny-cpu: hidden 256, GQA 4 heads / 2 KV heads of 64, 8 SwiGLU experts of 512, top-2.
GEMM_M = [1, 4, 16, 64, 256, 1024]
GEMM_MS = {(512, 256): [0.010, 0.011, 0.012, 0.020, 0.050, 0.150],   # QKV: (4 + 2 * 2) * 64
           (256, 256): [0.008, 0.008, 0.009, 0.012, 0.030, 0.090],   # O projection
           (8, 256): [0.004, 0.004, 0.005, 0.006, 0.010, 0.030]}     # router


def _write(folder: Path, name: str, rows: list[dict], framework: str, version: str,
           op_name: str) -> None:
    """One parquet file with aiconfigurator's leading provenance columns, then ``rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    head = {"framework": framework, "version": version, "device": DEVICE, "op_name": op_name,
            "kernel_source": "test"}
    columns = {k: [head[k]] * len(rows) for k in head}
    for key in rows[0]:
        columns[key] = [r[key] for r in rows]
    pq.write_table(pa.table(columns), folder / name)


def _moe_row(num_tokens: int, latency: float, **kw) -> dict:
    row = {"moe_dtype": "bfloat16", "num_tokens": num_tokens, "hidden_size": 256,
           "inter_size": 512, "topk": 2, "num_experts": 8, "moe_tp_size": 1, "moe_ep_size": 4,
           "distribution": "balanced", "latency": latency}
    return row | kw


def _attention_row(isl: int, step: int, batch: int, latency: float, **kw) -> dict:
    row = {"batch_size": batch, "isl": isl, "num_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "beam_width": 1, "attn_dtype": "bfloat16",
           "kv_cache_dtype": "bfloat16", "step": step, "window_size": 0, "latency": latency}
    return row | kw


@pytest.fixture(scope="module")
def aic_data(tmp_path_factory) -> Path:
    """``systems/data``-style folder: h100_sxm, sglang 0.5.10 and 0.5.14, NCCL 2.29.2."""
    root = tmp_path_factory.mktemp("aic") / "data"
    sys = root / "h100_sxm"
    gemm = [{"gemm_dtype": "bfloat16", "m": m, "n": n, "k": k, "latency": ms}
            for (n, k), lat in GEMM_MS.items() for m, ms in zip(GEMM_M, lat)]
    gemm.append({"gemm_dtype": "int4_wo", "m": 1, "n": 512, "k": 256, "latency": 0.001})
    # The same shape in per-tensor and in block-scaled FP8 (DeepSeek-V3's recipe).
    gemm += [{"gemm_dtype": "fp8", "m": m, "n": 512, "k": 256, "latency": 0.007} for m in GEMM_M]
    gemm += [{"gemm_dtype": "fp8_block", "m": m, "n": 512, "k": 256, "latency": 0.009}
             for m in GEMM_M]
    # DeepSeek-V3's fused q_a + kv_a projection is 2112 wide: the grid has 2048 and 2560.
    gemm += [{"gemm_dtype": "fp8_block", "m": m, "n": n, "k": 7168, "latency": ms}
             for m in GEMM_M for n, ms in ((2048, 0.010), (2560, 0.014))]
    # DeepSeek-V3's query up-projection and output projection (one time at every m).
    gemm += [{"gemm_dtype": "fp8_block", "m": m, "n": n, "k": k, "latency": ms}
             for m in GEMM_M for n, k, ms in ((24576, 1536, 0.020), (7168, 16384, 0.030))]
    _write(sys / "gemm/sglang/0.5.14", "gemm_perf.parquet", gemm, "SGLang", "0.5.14", "gemm")
    # Even routing, 8 experts over ep 4 (2 per device): 32 and 128 tokens -> 16 and 64 copies.
    moe = [_moe_row(32, 0.100), _moe_row(128, 0.200),
           _moe_row(32, 0.500, distribution="power_law_1.2"),   # skewed: not imported
           _moe_row(32, 0.050, moe_tp_size=2)]                  # TP-split: a 256-wide slice
    _write(sys / "moe/sglang/0.5.14", "moe_perf.parquet", moe, "SGLang", "0.5.14", "moe")
    # An older release measured another shape (ep 8) and, slower, the same one.
    old = [_moe_row(32, 0.300, moe_ep_size=8), _moe_row(32, 0.900)]
    _write(sys / "moe/sglang/0.5.10", "moe_perf.parquet", old, "SGLang", "0.5.10", "moe")
    # Wide-EP expert GEMMs between DeepEP's kernels: decode (masked) and prefill (contiguous).
    _write(sys / "moe/sglang/0.5.10", "wideep_generation_moe_perf.parquet",
           [_moe_row(32, 0.070, distribution="uniform"), _moe_row(128, 0.140,
                                                                 distribution="uniform")],
           "SGLang", "0.5.10", "moe_generation")
    _write(sys / "moe/sglang/0.5.10", "wideep_context_moe_perf.parquet",
           [_moe_row(32, 0.060, distribution="uniform"),
            _moe_row(32, 0.010, distribution="power_law_1.01")],   # skewed: not imported
           "SGLang", "0.5.10", "moe_context")
    # TensorRT-LLM-style whole MLA sub-layer (DeepSeek-V3's latent shape), decode: 8 sequences
    # at KV lengths 1,024 and 2,048 (isl 1 + step), FP8 KV cache, block-scaled FP8 projections.
    mla = [{"batch_size": 8, "isl": 1, "num_heads": 128, "mla_dtype": "bfloat16",
            "kv_cache_dtype": "fp8", "gemm_type": "fp8_block", "step": step, "latency": ms}
           for step, ms in ((1023, 0.120), (2047, 0.130))]
    _write(sys / "mla/sglang/0.5.14", "mla_generation_module_perf.parquet", mla, "SGLang",
           "0.5.14", "mla_generation_module")
    # SGLang's wide-EP MLA module (no q_a + kv_a down-projection), decode, in two kernel
    # sources: the import keeps flashinfer's row (aiconfigurator's default), not fa3's faster one.
    wide = [{"batch_size": 8, "isl": isl, "num_heads": 128, "mla_dtype": "fp8_block",
             "kv_cache_dtype": "fp8", "gemm_type": "fp8_block", "step": 0, "latency": ms,
             "kernel_source": source}
            for isl in (1024, 4096) for source, ms in (("flashinfer", 0.100), ("fa3", 0.080))]
    _write(sys / "mla/sglang/0.5.14", "wideep_generation_mla_perf.parquet", wide, "SGLang",
           "0.5.14", "mla_generation")
    # The MLA core alone (32 sequences, 2,048 KV) and absorbed decode's two per-head BMMs.
    core = [{"batch_size": 32, "isl": 1, "num_heads": 128, "mla_dtype": "bfloat16",
             "kv_cache_dtype": "fp8", "step": 2047, "latency": 0.050}]
    _write(sys / "mla/sglang/0.5.14", "generation_mla_perf.parquet", core, "SGLang", "0.5.14",
           "mla_generation")
    bmm = [{"op_name": op, "bmm_dtype": dtype, "num_tokens": n, "num_heads": 128, "latency": ms}
           for op, dtype, n, ms in (("mla_gen_pre", "fp8", 1, 0.004), ("mla_gen_pre", "fp8", 64,
                                                                        0.008),
                                    ("mla_gen_post", "fp8", 1, 0.003),
                                    ("mla_gen_post", "fp8", 64, 0.006),
                                    ("mla_gen_pre", "int4_wo", 1, 0.001))]   # not imported
    _write(sys / "mla_bmm/sglang/0.5.14", "mla_bmm_perf.parquet", bmm, "SGLang", "0.5.14",
           "mla_bmm")
    gen = [_attention_row(1, 127, 8, 0.020), _attention_row(1, 511, 8, 0.040),
           _attention_row(1, 127, 16, 0.032), _attention_row(1, 511, 16, 0.072),
           _attention_row(1, 127, 8, 0.001, window_size=128)]   # sliding window: not imported
    _write(sys / "attention/sglang/0.5.14", "generation_attention_perf.parquet", gen, "SGLang",
           "0.5.14", "generation_attention")
    ctx = [_attention_row(64, 0, 1, 0.030), _attention_row(256, 0, 1, 0.090)]
    _write(sys / "attention/sglang/0.5.14", "context_attention_perf.parquet", ctx, "SGLang",
           "0.5.14", "context_attention")
    nccl = [{"nccl_dtype": "half", "num_gpus": 8, "message_size": n, "latency": ms}
            for n, ms in ((1024, 0.020), (1 << 20, 0.040))]
    _write(sys / "comm/nccl/2.29.2", "nccl_perf.parquet",
           [r | {} for r in nccl], "TRTLLM", "2.29.2", "all_reduce")
    # The system file beside systems/data: its formula for the memory ops it has no table for.
    (root.parent / "h100_sxm.yaml").write_text(
        "gpu:\n  mem_bw: 3350000000000\n  mem_bw_empirical_scaling_factor: 0.8\n"
        "  mem_empirical_constant_latency: 0.000003\n")
    return root


def _import(data: Path, out: Path, *extra: str) -> int:
    return cli.main(["calibrate", "--import", "aiconfigurator", "--system", "h100_sxm",
                     "--backend", "sglang", "--aic-data", str(data), "-o", str(out), *extra])


@pytest.fixture(scope="module")
def profile_path(aic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "h100-aic.yaml"
    assert _import(aic_data, out) == 0
    return out


def _table(kernels: list[dict], **key) -> dict:
    (entry,) = [e for e in kernels if all(e[k] == v for k, v in key.items())]
    return entry


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split()]


def test_import_converts_milliseconds_and_token_axes(profile_path):
    data = yaml.safe_load(profile_path.read_text())
    cal = data["calibration"]
    assert cal["source"].endswith("h100_sxm/sglang/0.5.14")
    kernels = cal["kernels"]
    qkv = _table(kernels["gemm"], n=512, k=256, dtype="bf16")
    assert _floats(qkv["tokens"]) == GEMM_M
    assert _floats(qkv["seconds"]) == pytest.approx([ms * 1e-3 for ms in GEMM_MS[(512, 256)]])
    assert {e["dtype"] for e in kernels["gemm"]} == {"bf16", "fp8", "fp8_block"}  # int4 dropped
    # MoE: copies per device = num_tokens * top_k / ep = 32 * 2 / 4 = 16 and 128 * 2 / 4 = 64.
    moe = _table(kernels["moe"], experts_per_device=2, ffn=512)
    assert (moe["hidden"], moe["ffn"], moe["top_k"], moe["experts"], moe["ep"]) == (
        256, 512, 2, 8, 4)
    # The TP-split row (moe_tp_size 2): each rank runs 512 / 2 = 256 columns of its 2 experts,
    # on the same 16 copies: the table an etp-2 scenario reads.
    split = _table(kernels["moe"], experts_per_device=2, ffn=256)
    assert (_floats(split["tokens"]), _floats(split["seconds"])) == ([16], [5.0e-5])
    assert _floats(moe["tokens"]) == [16, 64]
    assert _floats(moe["seconds"]) == pytest.approx([1.0e-4, 2.0e-4])    # not the skewed 0.5 ms
    assert moe["version"] == "0.5.14"
    # The ep-8 shape only 0.5.10 measured is filled in from it: 32 * 2 / 8 = 8 copies, 1 expert.
    older = _table(kernels["moe"], experts_per_device=1)
    assert (older["version"], _floats(older["tokens"]), _floats(older["seconds"])) == (
        "0.5.10", [8], [3.0e-4])
    # Decode attention: KV length = isl + step = 1 + 127 and 1 + 511; the windowed row is gone.
    gen = _table(kernels["attention_generation"], heads=4, kv_heads=2, head_dim=64, batch=8)
    assert (_floats(gen["tokens"]), _floats(gen["seconds"])) == ([128, 512], [2e-5, 4e-5])
    ctx = _table(kernels["attention_context"], batch=1)
    assert (_floats(ctx["tokens"]), _floats(ctx["seconds"])) == ([64, 256], [3e-5, 9e-5])
    # NCCL: message_size counts fp16 elements, so bytes = 2 x; 8 GPUs fit one 8-GPU node.
    (ar,) = cal["collectives"]["all_reduce"]
    assert (ar["ranks"], ar["link"], ar["dtype"]) == (8, "intra_node", "fp16")
    assert _floats(ar["bytes"]) == [2048, 2 << 20]
    assert _floats(ar["seconds"]) == [2e-5, 4e-5]


def test_profile_keeps_the_datasheet_device_and_its_sources(profile_path):
    imported, datasheet = load_hardware(str(profile_path)), load_hardware("h100-sxm")
    assert imported.device == datasheet.device and imported.links == datasheet.links
    assert imported.name == "h100-sxm-aic-sglang"
    assert "H100 datasheet" in profile_path.read_text()       # the base's source comments


def _timer(profile_path: Path) -> tuple[KernelTimer, MeasuredTables]:
    profile = load_hardware(str(profile_path))
    tables = MeasuredTables.from_profile(profile)
    return KernelTimer(load_model("tiny-cpu"), profile.device, tables=tables), tables


def test_kernel_timer_takes_the_moe_table_and_interpolates_log_log(profile_path):
    timer, tables = _timer(profile_path)
    # 2 slots with 10 + 6 = 16 copies: the grid point, 0.1 ms.
    assert timer.experts(np.array([10.0, 6.0])) == pytest.approx(1.0e-4)
    # 32 copies is the geometric middle of 16 and 64: sqrt(0.1 ms * 0.2 ms) = 0.14142 ms.
    assert timer.experts(np.array([16.0, 16.0])) == pytest.approx(math.sqrt(1e-4 * 2e-4))
    assert tables.shares()["moe"] == {"table": 1.0, "extrapolated": 0.0, "roofline": 0.0}
    # Another expert count per device has no table: the timer's own model answers.
    assert timer.experts(np.array([4.0, 4.0, 4.0, 4.0])) > 0
    assert tables.served["moe", "roofline"] == 1


def test_deepep_scenarios_read_the_wide_ep_moe_tables(profile_path):
    """A scenario whose all-to-all runs DeepEP's kernels takes the wide-EP expert tables (decode:
    generation rows, prefill: context rows), the fused-MoE table where they have no row; the
    others take the fused-MoE table."""
    profile = load_hardware(str(profile_path))
    model = load_model("tiny-cpu")
    kernels = yaml.safe_load(profile_path.read_text())["calibration"]["kernels"]
    decode = _table(kernels["moe_deepep_decode"], ep=4)
    assert _floats(decode["tokens"]) == [16, 64]          # 32 and 128 tokens * top-2 / ep 4
    assert _floats(decode["seconds"]) == pytest.approx([7e-5, 1.4e-4])
    assert len(kernels["moe_deepep_prefill"]) == 1         # the power-law row is not imported
    copies = np.array([10.0, 6.0])                         # 16 copies: a grid point of each
    timers = {kind: KernelTimer(model, profile.device, tables=MeasuredTables.from_profile(profile),
                                moe_kernel=kind)
              for kind in ("moe", "moe_deepep_decode", "moe_deepep_prefill")}
    assert timers["moe"].experts(copies) == pytest.approx(1.0e-4)
    assert timers["moe_deepep_decode"].experts(copies) == pytest.approx(7.0e-5)
    assert timers["moe_deepep_prefill"].experts(copies) == pytest.approx(6.0e-5)
    # Another expert count per device: no wide-EP table, and no fused-MoE one either.
    assert timers["moe_deepep_decode"].tables is not None
    assert timers["moe_deepep_decode"].tables.moe(np.array([4.0] * 4), 256, 512, 4, 2, "bf16",
                                                  experts=8, kind="moe_deepep_decode") is None


def test_a_fused_moe_table_routes_and_permutes_inside(profile_path):
    """The measured fused-MoE op takes the router logits and permutes the tokens itself: beside
    it moesim charges no top-k kernel and no permute; the datasheet profile charges both."""
    timer, _ = _timer(profile_path)
    datasheet = KernelTimer(load_model("tiny-cpu"), load_hardware("h100-sxm").device)
    assert timer.moe_fused and not datasheet.moe_fused
    assert timer.top_k(64) == 0.0 and timer.permute(128) == 0.0
    d = datasheet.device
    # top-k: FP32 logits of 8 experts read, weights and ids written (3 x 4 bytes), one floor.
    assert datasheet.top_k(64) == pytest.approx(
        3 * 64 * 8 * 4 / (d.memory_bandwidth * d.memory_efficiency) + d.kernel_overhead)
    # The gate is the router GEMM and the norm: with the table, exactly the top-k less.
    assert timer.gate(64) == pytest.approx(
        _table_gemm(timer, 64, 8, 256) + timer.ffn_glue(64))


def _table_gemm(timer: KernelTimer, m: float, n: int, k: int) -> float:
    assert timer.tables is not None
    measured = timer.tables.gemm(m, n, k, "bf16")
    assert measured is not None
    return measured


def test_decode_attention_is_the_core_table_plus_projection_gemms(profile_path):
    timer, tables = _timer(profile_path)
    model = load_model("tiny-cpu")
    # 8 sequences, 128 cached tokens each: core 0.020 ms; QKV and O GEMMs at m = 8, between the
    # m = 4 and m = 16 grid points: 0.011 * (0.012 / 0.011) ** 0.5 and 0.008 * (0.009 / 0.008)
    # ** 0.5 ms (8 is their geometric middle); BF16 needs no FP8 casts.
    core = 2e-5
    qkv = math.sqrt(0.011 * 0.012) * 1e-3
    out = math.sqrt(0.008 * 0.009) * 1e-3
    glue = timer.elementwise(8 * glue_bytes_attention(model, 2), kernels=ATTENTION_GLUE_KERNELS)
    assert timer.attention(8, 128, kv_tokens=8 * 128) == pytest.approx(core + qkv + out + glue)
    # KV 320 between 128 and 512: 0.020 * (320 / 128) ** (log 2 / log 4) ms = 0.020 * 2.5 ** 0.5.
    assert timer.attention(8, 320, kv_tokens=8 * 320) == pytest.approx(
        2e-5 * 2.5 ** 0.5 + qkv + out + glue)
    # Prefill of one 256-token sequence (context = 128 on average): core 0.090 ms, GEMMs at m=256.
    prefill = 9e-5 + (0.050 + 0.030) * 1e-3 + timer.elementwise(
        256 * glue_bytes_attention(model, 2), kernels=ATTENTION_GLUE_KERNELS)
    assert timer.attention(256, 128) == pytest.approx(prefill)
    shares = tables.shares()
    assert shares["attention_generation"]["table"] == 1.0
    assert shares["attention_context"]["table"] == 1.0 and shares["gemm"]["table"] == 1.0


def test_moesim_run_reports_the_imported_tables_as_its_source(profile_path, tmp_path):
    # tiny-cpu decode, dp 4 x ep 4 (2 experts per device), 8 sequences per device with 127 tokens
    # of context: KV 128, balanced routing -> 8 * 2 = 16 copies per device, all grid points.
    scenario = {"name": "aic", "model": "tiny-cpu",
                "cluster": {"hardware": str(profile_path), "topology": "nvswitch", "nodes": 1,
                            "devices_per_node": 4},
                "parallelism": {"tp": 1, "pp": 1, "dp": 4, "ep": 4},
                "workload": {"mode": "decode", "global_batch": 32, "micro_batch": 8,
                             "seq_len": 1, "context_len": 127},
                "routing": {"distribution": "balanced"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    assert cli.main(["run", str(path), "-o", str(tmp_path / "out"), "--no-trace"]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    # GEMM calls: QKV, output projection and router in each of 4 layers (12, on the grid) and
    # the LM head [8, 256] x [256, 1000], wider than the widest row (512): 1 of 13 beyond it.
    assert result["compute_source"] == ("calibrated tables (gemm 100% (8% beyond grid), "
                                        "moe 100%, attention_generation 100%)")


def test_an_older_version_reads_only_its_own_and_older_tables(aic_data, tmp_path):
    out = tmp_path / "old.yaml"
    assert _import(aic_data, out, "--version", "0.5.10") == 0
    cal = yaml.safe_load(out.read_text())["calibration"]
    assert cal["source"].endswith("h100_sxm/sglang/0.5.10")
    # nothing else existed by 0.5.10 (the wide-EP tables are 0.5.10's)
    assert set(cal["kernels"]) == {"moe", "moe_deepep_decode", "moe_deepep_prefill"}
    same = _table(cal["kernels"]["moe"], experts_per_device=2)
    assert _floats(same["seconds"]) == [9e-4]                   # 0.5.10's own measurement


@pytest.mark.parametrize("args, words", [
    (["--backend", "tensorflow"], ["--backend 'tensorflow'", "available: sglang"]),
    (["--backend", "sglang", "--version", "9.9"], ["--version '9.9'", "0.5.10, 0.5.14"]),
    (["--backend", "sglang", "--system", "tpu_v9"], ["--system 'tpu_v9'", "h100_sxm"]),
])
def test_unknown_backend_version_or_system_is_one_line_exit_2(aic_data, tmp_path, capsys,
                                                              args, words):
    argv = ["calibrate", "--import", "aiconfigurator", "--system", "h100_sxm",
            "--aic-data", str(aic_data), "-o", str(tmp_path / "x.yaml"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("moesim: error:")
    assert all(w in err for w in words), err
    assert not (tmp_path / "x.yaml").exists()


def test_missing_aiconfigurator_is_a_user_error(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "aiconfigurator_core" else real(name, *a))
    argv = ["calibrate", "--import", "aiconfigurator", "--system", "h100_sxm", "--backend",
            "sglang", "-o", str(tmp_path / "x.yaml")]
    assert cli.main(argv) == 2
    assert "moesim[aic]" in capsys.readouterr().err


def test_release_labels_sort_like_releases():
    labels = ["1.3.0rc20", "0.5.6.post2", "0.5.10", "1.3.0", "0.5.9", "1.3.0rc3", "0.5.6"]
    assert sorted(labels, key=version_key) == [
        "0.5.6", "0.5.6.post2", "0.5.9", "0.5.10", "1.3.0rc3", "1.3.0rc20", "1.3.0"]


def test_a_block_scaled_recipe_reads_block_scaled_fp8_tables_first(profile_path, make_scenario):
    """Both FP8 tables of one shape are imported; precision.fp8_scaling picks which serves
    first (block: DeepSeek-V3's 1x128 / 128x128 scales), the other one where it has no row."""
    _, tables = _timer(profile_path)
    assert tables.gemm(64, 512, 256, "fp8") == pytest.approx(7e-6)
    assert tables.gemm(64, 512, 256, "fp8_block") == pytest.approx(9e-6)
    from moesim.pricing.context import kernel_timer
    for scaling, table in (("tensor", "fp8"), ("block", "fp8_block")):
        s = make_scenario({"precision": {"compute": "fp8", "fp8_scaling": scaling}})
        assert kernel_timer(s)._table_dtype == table
    bf16 = make_scenario({"precision": {"fp8_scaling": "block"}})
    assert kernel_timer(bf16)._table_dtype == "bf16"          # no FP8 GEMM: nothing to scale


def test_a_measured_mla_module_is_the_whole_attention_sub_layer(profile_path):
    """DeepSeek-V3 decode, 8 sequences at 2,048 cached tokens each: the module row (0.130 ms:
    projections, latent norms, rotary, core, output projection) plus the block's fused residual
    add + norm (read input and residual, write both: 4 hidden vectors per token, BF16) as one
    memory-bound kernel at the source's memory-op formula (2.68 TB/s + 3 us); no module row
    for 16 sequences, so the timer's own model answers there."""
    profile = load_hardware(str(profile_path))
    model = load_model("deepseek-v3")
    timer = KernelTimer(model, profile.device, "fp8", "fp8", "bf16",
                        tables=MeasuredTables.from_profile(profile), inference=True,
                        kv_dtype="fp8", fp8_block=True)
    glue = 8 * 4 * model.hidden_size * 2 / 2.68e12 + 3e-6
    assert timer.attention(8, 2048, 8 * 2048) == pytest.approx(1.3e-4 + glue)
    no_tables = MeasuredTables({}, {}, {}, memory_op=(2.68e12, 3e-6))   # the same glue formula
    plain = KernelTimer(model, profile.device, "fp8", "fp8", "bf16", tables=no_tables,
                        inference=True, kv_dtype="fp8", fp8_block=True)
    assert timer.attention(16, 2048, 16 * 2048) == pytest.approx(
        plain.attention(16, 2048, 16 * 2048))


def test_memory_ops_follow_the_sources_own_formula(profile_path, tmp_path):
    """aiconfigurator prices the memory-bound ops it does not measure (norms, residual adds,
    embedding) as bytes / (3.35 TB/s x 0.8) + 3 us: the imported profile carries that formula,
    so 1 MB in two kernels takes 1e6 / 2.68e12 + 2 x 3 us; without it, the device model."""
    profile = load_hardware(str(profile_path))
    assert profile.calibration["memory_op"]["bandwidth"] == pytest.approx(2.68e12)
    assert profile.calibration["memory_op"]["fixed"] == pytest.approx(3e-6)
    model = load_model("tiny-cpu")
    timer = KernelTimer(model, profile.device, tables=MeasuredTables.from_profile(profile))
    assert timer.elementwise(1e6, kernels=2) == pytest.approx(1e6 / 2.68e12 + 6e-6, rel=1e-12)
    data = yaml.safe_load(profile_path.read_text())
    del data["calibration"]["memory_op"]
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(data))
    plain = load_hardware(str(bare))
    d = plain.device
    timer = KernelTimer(model, d, tables=MeasuredTables.from_profile(plain))
    assert timer.elementwise(1e6, kernels=2) == pytest.approx(
        1e6 / (d.memory_bandwidth * d.memory_efficiency) + 2 * d.kernel_overhead, rel=1e-12)
    data["calibration"]["memory_op"] = {"bandwidth": -1.0, "fixed": 3e-6}
    bare.write_text(yaml.safe_dump(data))
    with pytest.raises(CalibrationError, match=r"memory_op\.bandwidth.*> 0"):
        MeasuredTables.from_profile(load_hardware(str(bare)))


def _transfer(model, m: float, query: tuple[int, int],
              anchors: list[tuple[tuple[int, int], float, float]]) -> float:
    """Expected time of an unmeasured GEMM: ``anchors`` are (shape, distance in octaves,
    measured seconds at m); each carries its efficiency against ``model``, weighted 1/d^2."""
    w = [1 / d ** 2 for _, d, _ in anchors]
    ratio = [model(m, *shape) / t for shape, _, t in anchors]
    return model(m, *query) * sum(w) / sum(wi * ri for wi, ri in zip(w, ratio))


def test_a_batch_between_two_measured_ones_blends_them_linearly(profile_path):
    """Decode attention rows at 8 and 16 sequences: 0.020 / 0.032 ms at KV 128 and 0.040 /
    0.072 ms at KV 512. 12 sequences lie halfway: 0.026 and 0.056 ms; 10 a quarter of the way:
    0.023 ms at KV 128. Outside the measured batches (4 or 32 sequences) there is no table."""
    tables = MeasuredTables.from_profile(load_hardware(str(profile_path)))
    args = (4, 2, 64, "bf16")                    # heads, KV heads, head dim, KV dtype
    assert tables.attention_generation(12, 128, *args) == pytest.approx(0.026e-3, rel=1e-9)
    assert tables.attention_generation(12, 512, *args) == pytest.approx(0.056e-3, rel=1e-9)
    assert tables.attention_generation(10, 128, *args) == pytest.approx(0.023e-3, rel=1e-9)
    assert tables.attention_generation(16, 128, *args) == pytest.approx(0.032e-3, rel=1e-9)
    assert tables.served["attention_generation", "table"] == 4
    assert tables.attention_generation(4, 128, *args) is None
    assert tables.attention_generation(32, 128, *args) is None
    assert tables.served["attention_generation", "roofline"] == 2


def test_an_unmeasured_gemm_shape_takes_its_neighbours_efficiency(profile_path):
    """BF16 rows of k = 256 at n = 8, 256, 512; at m = 64 they took 0.006, 0.012, 0.020 ms. A
    made-up model of 1 ns per column: the 512-wide row runs at 0.512 / 20 of it, the 256-wide
    at 0.256 / 12. n = 384 lies log2(512/384) = 0.415 and log2(384/256) = 0.585 octaves from
    them (the 8-wide row, 5.6 octaves away, is out of reach); counted from the table."""
    tables = MeasuredTables.from_profile(load_hardware(str(profile_path)))

    def model(m: float, n: float, k: float) -> float:
        return 1e-9 * n

    between = [((512, 256), math.log2(512 / 384), 20e-6), ((256, 256), math.log2(1.5), 12e-6)]
    assert tables.gemm(64, 384, 256, "bf16", model=model) == pytest.approx(
        _transfer(model, 64, (384, 256), between), rel=1e-12)
    assert tables.served["gemm", "table"] == 1
    # Measured shapes answer from their own row; no model, no transfer.
    assert tables.gemm(64, 512, 256, "bf16", model=model) == pytest.approx(0.020e-3, rel=1e-9)
    assert tables.gemm(64, 384, 256, "bf16") is None
    # k = 300 is off the rows: the same two shapes, now sqrt(d_n^2 + log2(300/256)^2) away, and
    # beyond their k: extrapolated.
    dk = math.log2(300 / 256)
    off = [((512, 256), math.hypot(math.log2(512 / 384), dk), 20e-6),
           ((256, 256), math.hypot(math.log2(1.5), dk), 12e-6)]
    assert tables.gemm(64, 384, 300, "bf16", model=model) == pytest.approx(
        _transfer(model, 64, (384, 300), off), rel=1e-12)
    assert tables.served["gemm", "extrapolated"] == 1
    # Narrower than every row (4 < 8 columns): near the launch floor, the model's own business.
    assert tables.gemm(64, 4, 256, "bf16", model=model) is None
    # No tokens, no work: the transfer does not divide by the model's zero.
    assert tables.gemm(0, 384, 256, "bf16", model=lambda m, n, k: 1e-9 * n * m) == 0.0


def test_the_gemm_holdout_benchmark_prices_each_shape_from_the_others(profile_path, capsys):
    """benchmarks/gemm_holdout.py on the fixture: BF16 rows at n = 8, 256, 512 (k 256, m up to
    1,024). Without its own row, 512 is priced from 256 and 256 from 512 (one octave) at m = 1,
    16, 64, 256, 1,024: 10 points; 8 is narrower than every other row, so it is skipped."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gemm_holdout
    rows = {r[0]: r for r in gemm_holdout.holdout(str(profile_path))}
    assert rows["bf16"][1] == 10
    assert gemm_holdout.main([str(profile_path)]) == 0
    assert "bf16" in capsys.readouterr().out


def test_a_gemm_far_past_the_widest_row_holds_the_frontier_efficiency(profile_path):
    """n = 65,536 at k = 256 is 7 octaves past the widest row (512): out of reach, but beyond
    the rows along n alone, so every row within reach along k (all three, k = 256) prices it,
    weighted by their full distance 7, 8 and 13 octaves. Beyond both n and k: no table."""
    tables = MeasuredTables.from_profile(load_hardware(str(profile_path)))

    def model(m: float, n: float, k: float) -> float:
        return 1e-6 + 1e-9 * n

    frontier = [((512, 256), 7.0, 20e-6), ((256, 256), 8.0, 12e-6), ((8, 256), 13.0, 6e-6)]
    assert tables.gemm(64, 65536, 256, "bf16", model=model) == pytest.approx(
        _transfer(model, 64, (65536, 256), frontier), rel=1e-12)
    assert tables.served["gemm", "extrapolated"] == 1
    assert tables.gemm(64, 65536, 65536, "bf16", model=model) is None


def test_imported_rows_are_read_as_measured_not_smoothed(profile_path, tmp_path):
    """An imported row slower at m = 16 than at m = 64 (a framework's kernel choice at that
    shape) is what that framework runs: the import keeps it, while a ``moesim calibrate`` table
    of this machine's own timings takes its running minimum (timing noise only adds time)."""
    from moesim.calibration import Curve
    data = yaml.safe_load(profile_path.read_text())
    row = _table(data["calibration"]["kernels"]["gemm"], n=512, k=256, dtype="bf16")
    seconds = [float(x) for x in str(row["seconds"]).split()]
    seconds[GEMM_M.index(16)] = 0.030e-3            # above m = 64's 0.020 ms
    row["seconds"] = " ".join(repr(x) for x in seconds)
    spiked = tmp_path / "spiked.yaml"
    spiked.write_text(yaml.safe_dump(data))
    tables = MeasuredTables.from_profile(load_hardware(str(spiked)))
    assert tables.gemm(16, 512, 256, "bf16") == pytest.approx(0.030e-3, rel=1e-9)
    own = Curve(np.array(GEMM_M, dtype=float), np.array(seconds))
    assert own(16.0) == pytest.approx(0.020e-3, rel=1e-9) and own(4.0) == pytest.approx(
        0.011e-3, rel=1e-9)


# The fixture's FP8 rows nearest DeepSeek-V3's 2112-wide q_a + kv_a down-projection (k 7168):
# (shape, octaves away, ms at every m).
_DOWN_PROJECTION = [((2048, 7168), math.log2(2112 / 2048), 10e-6),
                    ((2560, 7168), math.log2(2560 / 2112), 14e-6)]


def test_wide_ep_decode_reads_sglangs_wide_ep_mla_module(profile_path):
    """DeepSeek-V3 decode with DeepEP, 8 sequences at 2,048 cached tokens: SGLang's wide-EP
    module row (flashinfer's 0.100 ms) plus the fused q_a + kv_a down-projection [8, 7168] x
    [7168, 2112], priced from the 2048- and 2560-wide rows (0.010 and 0.014 ms, 0.044 and 0.278
    octaves away), plus the block's fused add+norm at the source's memory-op formula.
    Without DeepEP the whole-module table serves (0.130 ms at 2,048)."""
    profile = load_hardware(str(profile_path))
    model = load_model("deepseek-v3")
    tables = MeasuredTables.from_profile(profile)
    glue = 8 * 4 * model.hidden_size * 2 / 2.68e12 + 3e-6
    wide = KernelTimer(model, profile.device, "fp8", "fp8", "bf16", tables=tables,
                       inference=True, kv_dtype="fp8", fp8_block=True,
                       moe_kernel="moe_deepep_decode")
    down = _transfer(wide._gemm, 8, (2112, 7168), _DOWN_PROJECTION)
    assert wide.attention(8, 2048, 8 * 2048) == pytest.approx(1.0e-4 + down + glue)
    plain = KernelTimer(model, profile.device, "fp8", "fp8", "bf16", tables=tables,
                        inference=True, kv_dtype="fp8", fp8_block=True)
    assert plain.attention(8, 2048, 8 * 2048) == pytest.approx(1.3e-4 + glue)


def test_a_backend_running_wide_ep_mla_as_kernels_skips_the_module(profile_path, tmp_path):
    """``calibration.wide_ep_mla: {mode: kernels}`` (the import writes it for TensorRT-LLM,
    whose wide-EP graph runs MLA as separate kernels): without a wide-EP module table, a DeepEP
    deployment prices MLA decode as it would with no module table at all (core, BMMs and
    projections), while a deployment without DeepEP still reads the module row (0.130 ms).
    Without the field the DeepEP deployment falls back to the module."""
    from moesim import aic_import

    assert aic_import.wide_ep_mla("trtllm")["mode"] == "kernels"
    assert aic_import.wide_ep_mla("sglang") is None and aic_import.wide_ep_mla("vllm") is None
    model = load_model("deepseek-v3")
    data = yaml.safe_load(profile_path.read_text())
    kernels = data["calibration"]["kernels"]
    for kind in ("mla_wideep_generation", "mla_wideep_context"):
        kernels.pop(kind, None)

    def timers(changes: dict, name: str) -> tuple[KernelTimer, KernelTimer]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(changes))
        profile = load_hardware(str(path))
        tables = MeasuredTables.from_profile(profile)
        return tuple(KernelTimer(model, profile.device, "fp8", "fp8", "bf16", tables=tables,
                                 inference=True, kv_dtype="fp8", fp8_block=True, moe_kernel=k)
                     for k in ("moe", "moe_deepep_decode"))

    glue = 8 * 4 * model.hidden_size * 2 / 2.68e12 + 3e-6
    module = 1.3e-4 + glue
    plain, deepep = timers(data, "module")
    assert plain.attention(8, 2048, 8 * 2048) == deepep.attention(8, 2048, 8 * 2048) == \
        pytest.approx(module)
    flagged = data | {"calibration": data["calibration"] | {"wide_ep_mla": {"mode": "kernels"}}}
    plain, deepep = timers(flagged, "kernels")
    no_module = {kind: v for kind, v in kernels.items() if not kind.startswith("mla_module")}
    bare = data | {"calibration": data["calibration"] | {"kernels": no_module}}
    _, reference = timers(bare, "bare")
    assert plain.attention(8, 2048, 8 * 2048) == pytest.approx(module)
    separate = deepep.attention(8, 2048, 8 * 2048)
    assert separate == pytest.approx(reference.attention(8, 2048, 8 * 2048), rel=1e-12)
    assert separate != pytest.approx(module)
    flagged["calibration"]["wide_ep_mla"] = {"mode": "fused"}
    with pytest.raises(CalibrationError, match=r"wide_ep_mla\.mode: 'fused' must be one of"):
        timers(flagged, "bad")
    flagged["calibration"]["wide_ep_mla"] = ["kernels"]
    with pytest.raises(CalibrationError, match=r"wide_ep_mla: expected a mapping"):
        timers(flagged, "bad")


def test_an_unwritable_output_is_refused_before_any_table_is_read(aic_data, tmp_path, capsys,
                                                                  monkeypatch):
    # The output is checked first: the import (and the torch suite) never run only to fail
    # writing the profile, and a folder given as -o is named as such.
    from moesim import aic_import

    def never(*args, **kwargs):
        raise AssertionError("tables read before the output was checked")

    monkeypatch.setattr(aic_import, "import_tables", never)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):      # root ignores the mode: use a path under a file
            target = tmp_path / "a-file" / "p.yaml"
            (tmp_path / "a-file").write_text("x")
        else:
            target = locked / "p.yaml"
        assert _import(aic_data, target) == 2
        assert "-o folder" in capsys.readouterr().err
        assert _import(aic_data, tmp_path) == 2
        assert "is a folder" in capsys.readouterr().err
        assert cli.main(["calibrate", "--tiny", "-o", str(target)]) == 2
        assert "-o folder" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert not target.exists()


def test_absorbed_mla_decode_reads_the_core_and_per_head_bmm_tables(profile_path):
    """DeepSeek-V3 decode, 32 sequences at 2,048 cached tokens, no module row: the MLA core row
    (0.050 ms), the fused q_a + kv_a down-projection (2112 wide: from the 2048 and 2560 rows, as
    in the wide-EP test), the query up-projection (0.020) and output projection (0.030),
    and absorbed decode's two per-head BMMs at 32 tokens, log-log between 1 and 64 tokens:
    pre 0.004 x 2 ** (5/6), post 0.003 x 2 ** (5/6) ms; no KV up-projection GEMM; plus the
    modelled glue."""
    from moesim.compute import MLA_EXTRA_GLUE_KERNELS
    profile = load_hardware(str(profile_path))
    model = load_model("deepseek-v3")
    tables = MeasuredTables.from_profile(profile)
    timer = KernelTimer(model, profile.device, "fp8", "fp8", "bf16", tables=tables,
                        inference=True, kv_dtype="fp8", fp8_block=True)
    bmms = (0.004 + 0.003) * 2 ** (5 / 6)
    gemms = 0.020 + 0.030
    down = _transfer(timer._gemm, 32, (2112, 7168), _DOWN_PROJECTION)
    glue = timer.elementwise(32 * glue_bytes_attention(model, 2),
                             kernels=ATTENTION_GLUE_KERNELS + MLA_EXTRA_GLUE_KERNELS)
    assert timer.attention(32, 2048, 32 * 2048) == pytest.approx(
        (0.050 + gemms + bmms) * 1e-3 + down + glue)
    assert tables.shares()["mla_bmm"]["table"] == 1.0
    assert tables.mla_bmm(32, 128, "bf16", post=False) is None   # only FP8 rows were imported


def test_a_table_with_a_bad_time_is_named_and_nothing_is_left(aic_data, tmp_path, capsys):
    # A copy of the fixture data whose GEMM table holds a negative and a NaN latency.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(aic_data, data)
    table = next(data.glob("h100_sxm/gemm/sglang/*/gemm_perf.parquet"))
    rows = pq.read_table(table).to_pydict()
    rows["latency"][0], rows["latency"][1] = -1.0, float("nan")
    pq.write_table(pa.table(rows), table)
    out = tmp_path / "made" / "sub" / "p.yaml"
    assert _import(data, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{table}: column latency, row 0: -1.0 is not a time > 0" in err[0]
    assert not (tmp_path / "made").exists()


def _with_deepep_normal(aic_data: Path, tmp_path: Path, notify: list) -> Path:
    """A copy of the fixture data with one DeepEP normal-kernel table (SGLang 0.5.14), whose
    dispatch notify step is ``notify`` (aiconfigurator's real tables hold 0.0 there)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(aic_data, data)
    rows = [{"node_num": 1, "hidden_size": 256, "num_token": n, "num_topk": 2, "num_experts": 8,
             "dispatch_sms": 24, "dispatch_transmit_us": t, "dispatch_notify_us": u,
             "combine_sms": 24, "combine_transmit_us": 2 * t}
            for n, t, u in zip((128, 256), (50.0, 90.0), notify)]
    _write(data / "h100_sxm/comm/sglang/0.5.14", "wideep_deepep_normal_perf.parquet", rows,
           "SGLang", "0.5.14", "deepep_normal")
    return data


def test_a_zero_or_missing_deepep_notify_step_is_read_as_none(aic_data, tmp_path):
    out = tmp_path / "p.yaml"
    assert _import(_with_deepep_normal(aic_data, tmp_path, [0.0, None]), out) == 0
    coll = yaml.safe_load(out.read_text())["calibration"]["collectives"]
    (dispatch,) = coll["moe_dispatch"]
    (combine,) = coll["moe_combine"]
    # transmit + notify: 50 + 0 and 90 + nothing microseconds; the combine has no notify column.
    assert _floats(dispatch["seconds"]) == [5e-5, 9e-5]
    assert _floats(combine["seconds"]) == [1e-4, 1.8e-4]
    assert (dispatch["implementation"], dispatch["sms"], dispatch["ranks"]) == (
        "deepep_normal", 24, 8)


def test_a_negative_deepep_notify_step_is_refused(aic_data, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert _import(_with_deepep_normal(aic_data, tmp_path, [-1.0, 0.0]), out) == 2
    err = capsys.readouterr().err
    assert "column dispatch_notify_us, row 0: -1.0 is not a time >= 0 (or empty)" in err
    assert not out.exists()


def test_every_system_with_a_default_base_maps_to_a_shipped_profile_of_that_gpu():
    from moesim.aic_import import DEFAULT_BASE

    # aiconfigurator's system names start with the GPU's (h100_sxm, gb200): the shipped
    # profile named for it must load and be that GPU.
    for system, profile in DEFAULT_BASE.items():
        gpu = system.split("_")[0]
        assert gpu in load_hardware(profile).device.name.lower().replace(" ", ""), system
