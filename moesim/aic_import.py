"""Import NVIDIA aiconfigurator's measured kernel tables into a moesim hardware profile.

aiconfigurator (Apache-2.0, PyPI ``aiconfigurator``; its ``aiconfigurator-core`` wheel) ships
per-kernel timings measured on real GPUs as parquet tables under
``aiconfigurator_core/systems/data/<system>/<op>/<backend>/<version>/*.parquet``. This module reads
the ones moesim can use and writes them as ``calibration.kernels`` / ``calibration.collectives``
tables in moesim's own format (seconds, SI), on top of a datasheet profile (device, links and
their sources unchanged). moesim never needs aiconfigurator at run time: only this import reads
its files (with ``pyarrow``; ``pip install 'moesim[aic]'``).

What is converted (aiconfigurator ``latency`` columns are milliseconds, ``*_us`` columns are
microseconds; both become seconds):

=========================  =====================================  ================================
aiconfigurator table       moesim kind, key                       token axis
=========================  =====================================  ================================
gemm_perf                  kernels.gemm (n, k, dtype)             m
moe_perf (even routing)    kernels.moe (hidden, ffn,              num_tokens * topk / ep: routed
                           experts_per_device, top_k, experts,    copies one device computes
                           dtype); ffn = inter_size /
                           moe_tp_size, the slice a rank runs
wideep_generation_moe /    kernels.moe_deepep_decode /            the same
wideep_context_moe         moe_deepep_prefill (same keys)
context_attention_perf     kernels.attention_context (heads,      isl (sequence length)
(full attention)           kv_heads, head_dim, batch, kv_dtype)
generation_attention_perf  kernels.attention_generation (same)    isl + step (KV length)
context/generation_mla     kernels.mla_context / mla_generation   isl / isl + step
                           (heads, batch, kv_dtype)
mla_context/generation_    kernels.mla_module_context /           isl / isl + step
module (TRT-LLM, vLLM)     mla_module_generation (heads, batch,
                           kv_dtype, dtype: the projections')
mla_bmm_perf (decode)      kernels.mla_bmm (heads, op: pre|post,  num_tokens
                           dtype): absorbed MLA's per-head BMMs
wideep_context/generation_ kernels.mla_wideep_context /           isl / isl + step
mla (SGLang)               mla_wideep_generation (same keys; the
                           module without the q_a + kv_a down-
                           projection; flashinfer rows first)
nccl_perf                  collectives.<op> (ranks, dtype)        bytes (message_size x element)
custom_allreduce_perf      collectives.all_reduce (implementation) bytes
wideep_deepep_*, moe_a2a   collectives.moe_dispatch / moe_combine tokens per rank
=========================  =====================================  ================================

Versions: a backend's tables live in per-version folders, and not every op is re-measured for
every release. For ``--version V`` (default: the newest version present) each table takes, shape
by shape, the newest version <= V that measured it (aiconfigurator's own "backward fill"); every
stored table records its ``version``. The same shape measured twice in one file (another kernel
source, another TP size of the same per-device heads) keeps the smaller time: noise only adds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import CalibrationError

__all__ = ["BACKENDS", "data_root", "version_key", "list_systems", "list_backends",
           "list_versions", "check_request", "import_tables", "memory_op_model", "wide_ep_mla",
           "build_profile_text"]

BACKENDS = ("trtllm", "sglang", "vllm")
_INSTALL = "pip install 'moesim[aic]' (aiconfigurator==0.12.0, pyarrow)"
# aiconfigurator dtype labels -> moesim's; labels not listed (int4_wo, nvfp4, mxfp4...) are
# precisions moesim does not model and are skipped.
GEMM_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "fp8": "fp8", "fp8_block": "fp8_block"}
KV_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "fp8": "fp8"}
NCCL_DTYPES = {"half": ("fp16", 2), "int8": ("int8", 1)}
EVEN_ROUTING = ("balanced", "uniform")   # preferred first
# Shipped moesim profile with the same device, per aiconfigurator system.
DEFAULT_BASE = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "a100_sxm": "a100-sxm-80gb",
                "b200_sxm": "b200", "gb200": "gb200-nvl72", "gb300": "gb300-nvl72",
                "b300_sxm": "b300"}
_MS, _US = 1e-3, 1e-6
# Significant digits written per time: run-to-run noise of a kernel timing is ~1%, so 4 digits
# (rounding <= 0.05%) lose nothing and keep the profile small enough to load quickly.
SECONDS_DIGITS = 4


@dataclass(frozen=True)
class _Table:
    """One aiconfigurator parquet file and how its rows become moesim tables."""

    op: str                 # folder under <system>/
    file: str               # parquet file name
    section: str            # "kernels" or "collectives"
    convert: Callable[[dict[str, list[Any]], Mapping[str, Any]], dict[tuple[Any, ...], dict]]
    columns: tuple[str, ...]
    own_backend: str | None = None   # folder name when not the serving backend (comm/nccl)


# ---- finding the data ------------------------------------------------------------------------

def data_root(data: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The ``systems/data`` folder to read and a label for its provenance.

    ``data`` overrides the installed package (a folder laid out like aiconfigurator's
    ``systems/data``: ``<system>/<op>/<backend>/<version>/*.parquet``).

    Raises
    ------
    CalibrationError
        aiconfigurator is not installed (and no folder was given), or the folder is missing.
    """
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise CalibrationError(f"--aic-data {root}: not a folder (expected aiconfigurator's "
                                   "systems/data layout: <system>/<op>/<backend>/<version>/)")
        return root, f"aiconfigurator data folder {root}"
    spec = importlib.util.find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"aiconfigurator is not installed in this Python: {_INSTALL}, "
                               "or pass --aic-data DIR (a copy of its systems/data folder)")
    root = Path(next(iter(spec.submodule_search_locations))) / "systems" / "data"
    if not root.is_dir():
        raise CalibrationError(f"aiconfigurator_core has no systems/data folder at {root}")
    try:
        version = importlib.metadata.version("aiconfigurator-core")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return root, f"aiconfigurator {version}"


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key of a release label: 0.5.6.post2 > 0.5.6 > 0.5.6rc1 > 0.5.6.dev3; 0.5.10 > 0.5.9.

    >>> sorted(["0.5.10", "0.5.9", "0.5.6.post2", "1.3.0rc20", "1.3.0rc3", "1.3.0"], key=version_key)
    ['0.5.6.post2', '0.5.9', '0.5.10', '1.3.0rc3', '1.3.0rc20', '1.3.0']
    """
    match = re.match(r"v?(\d+(?:\.\d+)*)(.*)$", version)
    if not match:
        return ((), (-3, 0), version)
    release = tuple(int(p) for p in match.group(1).split("."))
    rest = match.group(2).lstrip(".-_").lower()
    number = int(m.group(1)) if (m := re.search(r"(\d+)$", rest)) else 0
    if not rest:
        stage = 0
    elif rest.startswith("post"):
        stage = 1
    elif rest.startswith(("rc", "a", "b")):
        stage = -1
    else:  # dev and anything unknown sorts first
        stage = -2
    return (release, (stage, number), version)


def _dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def list_systems(root: Path) -> list[str]:
    return [s for s in _dirs(root) if not s.startswith((".", "_"))]


def list_backends(root: Path, system: str) -> list[str]:
    """Serving backends with a version folder under any op of ``system``."""
    found = {b for op in _dirs(root / system) for b in _dirs(root / system / op)}
    return [b for b in BACKENDS if b in found]


def list_versions(root: Path, system: str, backend: str) -> list[str]:
    """Every version folder of ``backend`` under any op of ``system``, oldest first."""
    found = {v for op in _dirs(root / system) for v in _dirs(root / system / op / backend)}
    return sorted(found, key=version_key)


# ---- converters: rows (column -> list) to {key: table entry} ---------------------------------

def _points(out: dict[tuple[Any, ...], dict], key: tuple[Any, ...], fields: Mapping[str, Any],
            x: float, seconds: float, rank: int = 0) -> None:
    """Add one (x, seconds) point to the table ``key``; same x: lower rank, then smaller time."""
    entry = out.setdefault(key, {**fields, "_points": {}})
    old = entry["_points"].get(x)
    if old is None or (rank, seconds) < old:
        entry["_points"][x] = (rank, seconds)


def _rows(cols: dict[str, list[Any]]) -> Iterable[dict[str, Any]]:
    names = list(cols)
    for values in zip(*(cols[n] for n in names), strict=True):
        yield dict(zip(names, values, strict=True))


def _gemm(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
    out: dict[tuple[Any, ...], dict] = {}
    for r in _rows(cols):
        dtype = GEMM_DTYPES.get(r["gemm_dtype"])
        if dtype is None:
            continue
        n, k = int(r["n"]), int(r["k"])
        _points(out, (n, k, dtype), {"n": n, "k": k, "dtype": dtype}, int(r["m"]),
                r["latency"] * _MS)
    return out


def _moe(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
    out: dict[tuple[Any, ...], dict] = {}
    for r in _rows(cols):
        dtype = GEMM_DTYPES.get(r["moe_dtype"])
        tp = int(r["moe_tp_size"])
        if (dtype is None or r["distribution"] not in EVEN_ROUTING or tp < 1
                or int(r["inter_size"]) % tp or int(r["num_experts"]) % int(r["moe_ep_size"])):
            continue
        # A rank of a TP-split MoE (moe_tp_size > 1) runs every expert's 1/tp FFN slice: the
        # table of that slice's width, which expert tensor parallelism (etp) looks up.
        hidden, ffn, top_k = int(r["hidden_size"]), int(r["inter_size"]) // tp, int(r["topk"])
        experts, ep = int(r["num_experts"]), int(r["moe_ep_size"])
        fields = {"hidden": hidden, "ffn": ffn, "experts_per_device": experts // ep,
                  "top_k": top_k, "experts": experts, "ep": ep, "dtype": dtype,
                  "routing": "even"}
        copies = int(r["num_tokens"]) * top_k / ep
        _points(out, (hidden, ffn, experts // ep, top_k, experts, dtype), fields, copies,
                r["latency"] * _MS, EVEN_ROUTING.index(r["distribution"]))
    return out


def _attention(generation: bool) -> Callable[..., dict[tuple[Any, ...], dict]]:
    def convert(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
        out: dict[tuple[Any, ...], dict] = {}
        for r in _rows(cols):
            kv = KV_DTYPES.get(r["kv_cache_dtype"])
            if (kv is None or r["attn_dtype"] not in ("bfloat16", "float16")
                    or int(r.get("window_size") or 0) != 0 or int(r.get("beam_width") or 1) != 1):
                continue
            heads, kv_heads = int(r["num_heads"]), int(r["num_key_value_heads"])
            head_dim, batch = int(r["head_dim"]), int(r["batch_size"])
            fields = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                      "batch": batch, "kv_dtype": kv}
            x = int(r["isl"]) + (int(r["step"]) if generation else 0)
            _points(out, (heads, kv_heads, head_dim, batch, kv), fields, x, r["latency"] * _MS)
        return out
    return convert


# aiconfigurator's default SGLang attention backend (its ``attention_backend``): where a wide-EP
# MLA table measured several kernel sources for one shape, that one's row is kept, as its
# estimate reads it.
_DEFAULT_ATTENTION_SOURCE = "flashinfer"


def _mla(generation: bool, module: bool = False,
         wide_ep: bool = False) -> Callable[..., dict[tuple[Any, ...], dict]]:
    """MLA core tables; ``module``: the whole MLA sub-layer (projections, latent norms, rotary,
    core, output projection; not the block's add+norm), keyed also by the projections' GEMM
    dtype; ``wide_ep``: SGLang's wide-EP module (its DP-attention sub-layer in a DeepEP
    deployment, timed at the model runner: everything but the fused q_a + kv_a
    down-projection, which runs outside it), the same keys, any FMHA dtype, the projections'
    dtype from ``mla_dtype`` in releases without a ``gemm_type`` column, and
    :data:`_DEFAULT_ATTENTION_SOURCE`'s rows first."""
    module = module or wide_ep

    def convert(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
        out: dict[tuple[Any, ...], dict] = {}
        for r in _rows(cols):
            kv = KV_DTYPES.get(r["kv_cache_dtype"])
            gemm = (GEMM_DTYPES.get(r.get("gemm_type") or r["mla_dtype"]) if wide_ep
                    else GEMM_DTYPES.get(r["gemm_type"]) if module else None)
            fmha_ok = wide_ep or r["mla_dtype"] in ("bfloat16", "float16")
            if kv is None or (module and gemm is None) or not fmha_ok:
                continue
            heads, batch = int(r["num_heads"]), int(r["batch_size"])
            fields = {"heads": heads, "batch": batch, "kv_dtype": kv}
            key: tuple[Any, ...] = (heads, batch, kv)
            if module:
                fields["dtype"] = gemm
                key = (*key, gemm)
            x = int(r["isl"]) + (int(r["step"]) if generation else 0)
            rank = int(wide_ep and r.get("kernel_source") != _DEFAULT_ATTENTION_SOURCE)
            _points(out, key, fields, x, r["latency"] * _MS, rank)
        return out
    return convert


_BMM_OPS = {"mla_gen_pre": "pre", "mla_gen_post": "post"}


def _mla_bmm(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
    """Absorbed MLA decode's two per-head BMMs: ``pre`` multiplies each head's query into the
    latent space (``[tokens, 128] x [128, 512]`` per head), ``post`` its latent output back
    (``[tokens, 512] x [512, 128]``); one curve per (heads, op, dtype) over tokens."""
    out: dict[tuple[Any, ...], dict] = {}
    for r in _rows(cols):
        op, dtype = _BMM_OPS.get(r["op_name"]), GEMM_DTYPES.get(r["bmm_dtype"])
        if op is None or dtype is None:
            continue
        heads = int(r["num_heads"])
        _points(out, (heads, op, dtype), {"heads": heads, "op": op, "dtype": dtype},
                int(r["num_tokens"]), r["latency"] * _MS)
    return out


def _link(ranks: int, ctx: Mapping[str, Any]) -> str:
    return "intra_node" if ranks <= ctx["devices_per_node"] else "inter_node"


def _nccl(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
    out: dict[tuple[Any, ...], dict] = {}
    names = {"alltoall": "all_to_all", "all_to_all": "all_to_all", "all_reduce": "all_reduce",
             "all_gather": "all_gather", "reduce_scatter": "reduce_scatter"}
    for r in _rows(cols):
        op, dt = names.get(r["op_name"]), NCCL_DTYPES.get(r["nccl_dtype"])
        if op is None or dt is None:
            continue
        ranks = int(r["num_gpus"])
        fields = {"op": op, "implementation": "nccl", "link": _link(ranks, ctx), "ranks": ranks,
                  "dtype": dt[0]}
        _points(out, (op, "nccl", ranks, dt[0]), fields, int(r["message_size"]) * dt[1],
                r["latency"] * _MS)
    return out


def _custom_allreduce(cols: dict[str, list[Any]],
                      ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
    out: dict[tuple[Any, ...], dict] = {}
    for r in _rows(cols):
        dtype = GEMM_DTYPES.get(r["allreduce_dtype"])
        if dtype is None:
            continue
        ranks, impl = int(r["num_gpus"]), f"custom_{r.get('backend') or 'allreduce'}"
        fields = {"op": "all_reduce", "implementation": impl, "link": _link(ranks, ctx),
                  "ranks": ranks, "dtype": dtype}
        _points(out, ("all_reduce", impl, ranks, dtype), fields,
                int(r["message_size"]) * (2 if dtype in ("bf16", "fp16") else 1),
                r["latency"] * _MS)
    return out


def _deepep(mode: str) -> Callable[..., dict[tuple[Any, ...], dict]]:
    """DeepEP dispatch/combine (sglang wide-EP tables): seconds vs tokens per rank."""
    def convert(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
        out: dict[tuple[Any, ...], dict] = {}
        for r in _rows(cols):
            ranks = int(r["node_num"]) * ctx["devices_per_node"]
            for phase in ("dispatch", "combine"):
                if mode == "low_latency":
                    seconds, sms = r[f"{phase}_avg_t_us"] * _US, 0
                else:
                    seconds = (r[f"{phase}_transmit_us"] + (r.get(f"{phase}_notify_us") or 0)) * _US
                    sms = int(r[f"{phase}_sms"])
                op = f"moe_{phase}"
                impl = f"deepep_{mode}"
                fields = {"op": op, "implementation": impl, "link": _link(ranks, ctx),
                          "ranks": ranks, "hidden": int(r["hidden_size"]),
                          "top_k": int(r["num_topk"]), "experts": int(r["num_experts"]),
                          "sms": sms, "dtype": "bf16"}
                key = (op, impl, ranks, fields["hidden"], fields["top_k"], fields["experts"], sms)
                _points(out, key, fields, int(r["num_token"]), seconds)
        return out
    return convert


def _moe_a2a(cols: dict[str, list[Any]], ctx: Mapping[str, Any]) -> dict[tuple[Any, ...], dict]:
    """vLLM / TensorRT-LLM MoE all-to-all (DeepEP and its variants): seconds vs tokens per rank."""
    out: dict[tuple[Any, ...], dict] = {}
    for r in _rows(cols):
        ranks = int(r["ep_size"])
        op = f"moe_{r['phase']}"
        dtype = GEMM_DTYPES.get(r["comm_dtype"], r["comm_dtype"])
        fields = {"op": op, "implementation": str(r["comm_backend"]), "link": _link(ranks, ctx),
                  "ranks": ranks, "hidden": int(r["hidden_size"]), "top_k": int(r["topk"]),
                  "experts": int(r["num_experts"]), "sms": int(r["sms"]), "dtype": dtype}
        key = (op, fields["implementation"], ranks, fields["hidden"], fields["top_k"],
               fields["experts"], fields["sms"], dtype)
        seconds = (r["transmit_us"] + (r.get("notify_us") or 0)) * _US
        _points(out, key, fields, int(r["num_tokens"]), seconds)
    return out


_ATT = ("batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim", "attn_dtype",
        "kv_cache_dtype", "latency")
_MLA = ("batch_size", "isl", "num_heads", "mla_dtype", "kv_cache_dtype", "latency")
TABLES: dict[str, _Table] = {
    "gemm": _Table("gemm", "gemm_perf.parquet", "kernels", _gemm,
                   ("gemm_dtype", "m", "n", "k", "latency")),
    "moe": _Table("moe", "moe_perf.parquet", "kernels", _moe,
                  ("moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts",
                   "moe_tp_size", "moe_ep_size", "distribution", "latency")),
    # Wide-EP expert GEMMs between DeepEP's kernels (SGLang: DeepGEMM masked layout in decode,
    # contiguous in prefill); same columns and token axis as moe_perf.
    "moe_deepep_decode": _Table("moe", "wideep_generation_moe_perf.parquet", "kernels", _moe,
                                ("moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk",
                                 "num_experts", "moe_tp_size", "moe_ep_size", "distribution",
                                 "latency")),
    "moe_deepep_prefill": _Table("moe", "wideep_context_moe_perf.parquet", "kernels", _moe,
                                 ("moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk",
                                  "num_experts", "moe_tp_size", "moe_ep_size", "distribution",
                                  "latency")),
    "attention_context": _Table("attention", "context_attention_perf.parquet", "kernels",
                                _attention(False), _ATT),
    "attention_generation": _Table("attention", "generation_attention_perf.parquet", "kernels",
                                   _attention(True), (*_ATT, "step")),
    "mla_context": _Table("mla", "context_mla_perf.parquet", "kernels", _mla(False), _MLA),
    "mla_generation": _Table("mla", "generation_mla_perf.parquet", "kernels", _mla(True),
                             (*_MLA, "step")),
    # TensorRT-LLM's and vLLM's whole MLA sub-layer.
    "mla_module_context": _Table("mla", "mla_context_module_perf.parquet", "kernels",
                                 _mla(False, module=True), (*_MLA, "gemm_type")),
    "mla_module_generation": _Table("mla", "mla_generation_module_perf.parquet", "kernels",
                                    _mla(True, module=True), (*_MLA, "gemm_type", "step")),
    # SGLang's wide-EP MLA module (without the q_a + kv_a down-projection).
    "mla_wideep_context": _Table("mla", "wideep_context_mla_perf.parquet", "kernels",
                                 _mla(False, wide_ep=True), _MLA),
    "mla_wideep_generation": _Table("mla", "wideep_generation_mla_perf.parquet", "kernels",
                                    _mla(True, wide_ep=True), (*_MLA, "step")),
    "mla_bmm": _Table("mla_bmm", "mla_bmm_perf.parquet", "kernels", _mla_bmm,
                      ("op_name", "bmm_dtype", "num_tokens", "num_heads", "latency")),
    "nccl": _Table("comm", "nccl_perf.parquet", "collectives", _nccl,
                   ("op_name", "nccl_dtype", "num_gpus", "message_size", "latency"),
                   own_backend="nccl"),
    "custom_allreduce": _Table("comm", "custom_allreduce_perf.parquet", "collectives",
                               _custom_allreduce,
                               ("allreduce_dtype", "num_gpus", "message_size", "latency")),
    "deepep_low_latency": _Table("comm", "wideep_deepep_ll_perf.parquet", "collectives",
                                 _deepep("low_latency"),
                                 ("node_num", "hidden_size", "num_token", "num_topk",
                                  "num_experts", "dispatch_avg_t_us", "combine_avg_t_us")),
    "deepep_normal": _Table("comm", "wideep_deepep_normal_perf.parquet", "collectives",
                            _deepep("normal"),
                            ("node_num", "hidden_size", "num_token", "num_topk", "num_experts",
                             "dispatch_sms", "dispatch_transmit_us", "combine_sms",
                             "combine_transmit_us")),
    "moe_a2a": _Table("comm", "moe_a2a_perf.parquet", "collectives", _moe_a2a,
                      ("comm_backend", "phase", "comm_dtype", "ep_size", "hidden_size", "topk",
                       "num_experts", "num_tokens", "sms", "transmit_us")),
}
# Optional columns read when a file has them.
_OPTIONAL = ("window_size", "beam_width", "backend", "dispatch_notify_us", "combine_notify_us",
             "notify_us", "kernel_source", "gemm_type")


def _read(path: Path, columns: tuple[str, ...]) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationError(f"reading aiconfigurator's parquet tables needs pyarrow: "
                               f"{_INSTALL}") from None
    try:
        names = set(pq.read_schema(path).names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise CalibrationError(f"{path}: missing column(s) {', '.join(missing)} (has: "
                                   f"{', '.join(sorted(names))}); not an aiconfigurator "
                                   "0.12 table")
        wanted = [*columns, *(c for c in _OPTIONAL if c in names and c not in columns)]
        data = pq.read_table(path, columns=wanted).to_pydict()
        for name, values in data.items():
            # A measured time is a finite number > 0; DeepEP's notify step (added to the
            # transfer) is 0 or missing where a kernel has none.
            notify = name.endswith("notify_us")
            if name == "latency" or name.endswith("_us"):
                row = next((i for i, v in enumerate(values) if not (
                    (notify and v is None) or (isinstance(v, int | float) and math.isfinite(v)
                                               and (v >= 0 if notify else v > 0)))), None)
                if row is not None:
                    allowed = "a time >= 0 (or empty)" if notify else "a time > 0"
                    raise CalibrationError(f"{path}: column {name}, row {row}: "
                                           f"{values[row]!r} is not {allowed}")
        return data
    except CalibrationError:
        raise
    except Exception as exc:  # pyarrow raises its own error types for unreadable files
        raise CalibrationError(f"{path}: cannot read parquet ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from None


def _fmt(values: Iterable[float], digits: int) -> str:
    return " ".join(f"{v:.{digits}g}" for v in values)


def check_request(root: Path, system: str, backend: str, version: str | None) -> str:
    """The version to read (``version``, or the newest present).

    Raises
    ------
    CalibrationError
        Unknown system, backend or version; the message lists what is there.
    """
    systems = list_systems(root)
    if system not in systems:
        raise CalibrationError(f"--system {system!r}: not in {root} (available: "
                               f"{', '.join(systems) or 'none'})")
    backends = list_backends(root, system)
    if backend not in backends:
        raise CalibrationError(f"--backend {backend!r}: no {system} tables for it (available: "
                               f"{', '.join(backends) or 'none'})")
    versions = list_versions(root, system, backend)
    if version is None:
        return versions[-1]
    if version not in versions:
        raise CalibrationError(f"--version {version!r}: no {system}/{backend} folder has it "
                               f"(available: {', '.join(versions)})")
    return version


def import_tables(root: Path, system: str, backend: str, version: str | None, *,
                  devices_per_node: int) -> tuple[dict[str, Any], dict[str, Any], list[str], str]:
    """Read and convert every table of ``system``/``backend`` up to ``version``.

    Returns ``(kernels, collectives, summary lines, version used)``.

    Raises
    ------
    CalibrationError
        Unknown system, backend or version (the message lists what is there), or no usable
        table at all.
    """
    requested = version
    version = check_request(root, system, backend, version)
    limit = version_key(version)
    ctx = {"devices_per_node": devices_per_node}
    kernels: dict[str, Any] = {}
    collectives: dict[str, Any] = {}
    summary: list[str] = []
    for kind, table in TABLES.items():
        folder = root / system / table.op / (table.own_backend or backend)
        # Newest first; NCCL's own versions are not the backend's, so all of them count.
        found = sorted((v for v in _dirs(folder) if (folder / v / table.file).is_file()
                        and (table.own_backend or version_key(v) <= limit)),
                       key=version_key, reverse=True)
        merged: dict[tuple[Any, ...], dict] = {}
        for v in found:
            for key, entry in table.convert(_read(folder / v / table.file, table.columns),
                                            ctx).items():
                if key not in merged:
                    merged[key] = {**entry, "version": v}
        if not merged:
            continue
        used = sorted({e["version"] for e in merged.values()}, key=version_key)
        points = sum(len(e["_points"]) for e in merged.values())
        summary.append(f"{kind:<21} {len(merged):5d} tables, {points:6d} points "
                       f"({table.op}/{table.own_backend or backend} {', '.join(used)})")
        for key in sorted(merged, key=lambda k: tuple(str(x) for x in k)):
            entry = merged[key]
            xs = sorted(entry.pop("_points").items())
            entry["tokens" if table.section == "kernels" or "moe_" in entry.get("op", "")
                  else "bytes"] = _fmt((x for x, _ in xs), 10)
            entry["seconds"] = _fmt((s for _, (_, s) in xs), SECONDS_DIGITS)
            if table.section == "kernels":
                kernels.setdefault(kind, []).append(entry)
            else:
                op = entry.pop("op")
                collectives.setdefault(op, []).append(entry)
    if not kernels:
        raise CalibrationError(f"no usable kernel table for {system}/{backend} up to version "
                               f"{version} under {root}")
    if requested is None:  # name the newest version a kernel table actually came from
        version = max((e["version"] for entries in kernels.values() for e in entries),
                      key=version_key)
    return kernels, collectives, summary, version


def memory_op_model(root: Path, system: str) -> dict[str, Any] | None:
    """aiconfigurator's formula for the memory-bound ops it does not measure (norms, residual
    adds, activations, embedding: ``bytes / (mem_bw * mem_bw_empirical_scaling_factor) +
    mem_empirical_constant_latency``), from ``systems/<system>.yaml`` beside the data folder, as
    ``{bandwidth: bytes/s, fixed: seconds, source}``; None when that file or a field is absent.
    An imported profile prices those ops the way its source does (``calibration.memory_op``)."""
    from moesim.spec.fields import read_yaml

    path = root.parent / f"{system}.yaml"
    if not path.is_file():
        return None
    gpu = (read_yaml(path) or {}).get("gpu") or {}
    try:
        bandwidth = float(gpu["mem_bw"]) * float(gpu["mem_bw_empirical_scaling_factor"])
        fixed = float(gpu["mem_empirical_constant_latency"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (bandwidth > 0 and fixed >= 0):
        return None
    return {"bandwidth": bandwidth, "fixed": fixed,
            "source": f"{path.name} gpu: mem_bw x mem_bw_empirical_scaling_factor, "
                      "mem_empirical_constant_latency (aiconfigurator's formula for "
                      "memory-bound ops it has no table for)"}


# Backends whose wide-EP deployments (DeepEP dispatch, attention data-parallel) do not run the
# MLA module that the module tables measured: aiconfigurator 0.12's DeepSeek graph for TensorRT-LLM
# wide EP (``aiconfigurator_core/sdk/models/deepseek.py``, the large-EP TRT-LLM branch) is the
# granular MLA stack (core, per-head BMMs, GEMMs), never its ``MLAModule`` op; its SGLang wide-EP
# graph has its own module table (``mla_wideep_*``), and vLLM keeps the module.
WIDE_EP_MLA = {"trtllm": "kernels"}


def wide_ep_mla(backend: str) -> dict[str, str] | None:
    """``calibration.wide_ep_mla`` of a profile imported from ``backend``: how its wide-EP
    deployments run MLA attention (``kernels``: the core and projection tables, not the module
    table), with the source; None where the module serves them too."""
    mode = WIDE_EP_MLA.get(backend)
    if mode is None:
        return None
    return {"mode": mode,
            "source": "aiconfigurator 0.12 sdk/models/deepseek.py: the TensorRT-LLM wide-EP graph "
                      "runs the granular MLA stack, not the MLA module op"}


# ---- the profile -----------------------------------------------------------------------------

def build_profile_text(base_text: str, base_name: str, name: str, calibration: Mapping[str, Any],
                       header: Iterable[str]) -> str:
    """The base profile's text (its comments, which carry the sources, kept) renamed, plus the
    ``calibration`` section."""
    import yaml

    text, count = re.subn(r"^name:.*$", f"name: {json.dumps(name)}", base_text, count=1,
                          flags=re.M)
    if not count:
        raise CalibrationError(f"base profile {base_name!r} has no top-level `name:` line")
    lines = [f"# {line}".rstrip() for line in header]
    dumped = yaml.safe_dump({"calibration": dict(calibration)}, sort_keys=False,
                            default_flow_style=None, width=1 << 30, allow_unicode=True)
    return "\n".join(lines) + "\n" + text.rstrip("\n") + "\n\n" + dumped


