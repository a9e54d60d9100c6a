"""moesim's per-component kernel times against measured kernel data (aiconfigurator 0.12.0).

    python benchmarks/kernels_vs_measured.py                   # H100, then H200 (no refit)
    python benchmarks/kernels_vs_measured.py --profile P.yaml  # another profile, vs H100 rows
    python benchmarks/kernels_vs_measured.py --profile P.yaml --measured-system h200_sxm
    python benchmarks/kernels_vs_measured.py --profile b200 --measured-system b200_sxm
    python benchmarks/kernels_vs_measured.py --smoke           # tiny scenario, seconds (tests)

The measured side is ``benchmarks/data/measured_kernels_aic012.json`` (written by
``benchmarks/extract_aic_reference.py`` from NVIDIA aiconfigurator 0.12.0, Apache-2.0): for five
serving workloads (W1-W5 of the reference note ``measured_kernels.md``), per GPU system and
serving backend (SGLang, TensorRT-LLM, vLLM), per-op times whose rows were measured on real GPUs,
summed over layers and mapped to moesim's components, with even routing.

The moesim side builds the same workloads from the shipped scenarios plus overrides
(:data:`WORKLOADS`, even routing: ``routing.distribution=balanced``) and reads per-block costs
from moesim's cost model in ONE place, :func:`moesim_components`. Components, ms per step (one
decode step of 64 sequences per GPU, or one 4,096-token prefill per GPU), summed over layers:

=================  ==============================================  ===============================
component          moesim (per block, summed over blocks)          aiconfigurator ops
=================  ==============================================  ===============================
attention block    attention (+ TP all-reduce; norm, RoPE, res.)   add_norm_1, QKV/MLA GEMMs,
                                                                   attention, proj (+ bmm, q_b)
router+norm        gate less its top-k (router GEMM, norm, res.)   router_gemm + add_norm_2
routed experts     max over EP devices of the grouped expert GEMM  moe (the framework's fused MoE
                   + token permute/unpermute + the gate's top-k    call: routes and permutes
                                                                   inside)
shared/dense       dense FFN blocks and shared experts             gate_ffn1, act_gate, ffn2
all-to-all         dispatch + combine (flow-level)                 dispatch/combine (or pre/post)
lm head+embedding  LM head GEMM + embedding (once per micro-batch; logits_gemm + embedding
                   the softmax over the logits is not compared)
=================  ==============================================  ===============================

Both tools count the LM head and the embedding in a step, so the table shows them as a sixth
column and ``total`` sums all six. Printed cells are ``moesim/measured`` ratios with both ms;
notes flag measured components that are not all table rows (``empirical``: a formula, e.g. the
norms; ``estimated``), MoE queries beyond the largest measured token count, and backends without
even-routing rows. H200 runs the same scenarios on ``hardware_profiles/h200-sxm.yaml`` when the
repository has it, else on :func:`h200_variant` of h100-sxm (datasheet figures, no refitting).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim.errors import MoESimError  # noqa: E402
from moesim.spec.fields import read_yaml  # noqa: E402
from moesim.spec.hardware import HardwareProfile  # noqa: E402
from moesim.spec.scenario import Scenario, load_scenario  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "measured_kernels_aic012.json"
COMPONENTS = ("attention", "router_norm", "routed_experts", "shared_dense", "all_to_all",
              "lm_head_embedding")
HEADERS = ("attention", "router+norm", "routed exp.", "shared/dense", "all-to-all", "lm head+emb")
BACKENDS = ("sglang", "trtllm", "vllm")
# Agreement bands the per-component ratios are marked against: the datasheet H100 profile, the
# H200 one without refitting, and a profile imported from the same measured tables (a check that
# the import reads them right).
H100_BAND, H200_BAND, IMPORTED_BAND = (0.8, 1.25), (0.75, 1.33), (0.95, 1.05)
COMPUTE = tuple(c for c in COMPONENTS if c != "all_to_all")   # what an imported profile checks

# Even routing: every expert the same load, each token's experts paired at random (as a real
# router pairs them, and as DeepEP's and aiconfigurator's harnesses draw them).
EVEN = ["routing.distribution=balanced_random"]
DECODE_1NODE = "scenarios/mixtral-8x7b-infer-1node.yaml"   # DP 8 + EP 8, 64 seqs/GPU, ctx 2,048
# Attention-DP + EP without DeepEP (W1, W2, W4) gathers every token to every rank and
# reduce-scatters the outputs (SGLang's DP-attention path, vLLM's allgather_reducescatter): the
# measured dispatch/combine ops are that, not a top-k all-to-all.
GATHER = ["communication.alltoall=allgather"]
DSV3 = "scenarios/deepseek-v3-decode-ep.yaml"
# aiconfigurator builds DeepSeek-V3 with all 61 layers as MoE layers with a shared expert (its
# first 3 dense layers are not modelled; observation in the data file), so the kernel comparison
# runs moesim on the same layer structure: first_dense_layers=0.
DSV3_AT_32 = ["model.first_dense_layers=0",
              "cluster.nodes=4", "parallelism.dp=32", "parallelism.ep=32",
              "workload.global_batch=2048", "workload.micro_batch=64",
              "placement.policy=contiguous", "placement.redundant_experts=0",
              "communication.overlap=none", "precision.kv_cache=fp8"]
QWEN_PREFILL = ["workload={mode: prefill, global_batch: 8, seq_len: 4096, micro_batch: 1}"]
# Prefill runs DeepEP's normal kernels (one copy per destination node over RDMA), decode its
# low-latency kernels (the shipped decode scenario's algorithm), as DeepSeek's serving does.
DSV3_PREFILL = ["workload={mode: prefill, global_batch: 32, seq_len: 4096, micro_batch: 1}",
                "communication.alltoall=deepep_normal"]
# id: (label, scenario, overrides, measured workload). W3/W5 also run with the direct all-to-all.
WORKLOADS: dict[str, tuple[str, str, list[str], str]] = {
    "W1": ("Qwen3-30B-A3B decode", DECODE_1NODE, ["model=qwen3-30b-a3b", *EVEN, *GATHER], "W1"),
    "W2": ("Mixtral-8x7B decode", DECODE_1NODE, [*EVEN, *GATHER], "W2"),
    "W3": ("DeepSeek-V3 decode", DSV3, [*DSV3_AT_32, *EVEN], "W3"),
    "W3d": ("  same, direct a2a", DSV3, [*DSV3_AT_32, *EVEN, "communication.alltoall=direct"],
            "W3"),
    "W4": ("Qwen3-30B-A3B prefill", DECODE_1NODE, ["model=qwen3-30b-a3b", *EVEN, *GATHER,
                                                    *QWEN_PREFILL], "W4"),
    "W5": ("DeepSeek-V3 prefill", DSV3, [*DSV3_AT_32, *EVEN, *DSV3_PREFILL], "W5"),
    "W5d": ("  same, direct a2a", DSV3, [*DSV3_AT_32, *EVEN, *DSV3_PREFILL,
                                         "communication.alltoall=direct"], "W5"),
}
SMOKE = ("scenarios/tiny-cpu.yaml",
         ["parallelism={tp: 1, pp: 1, dp: 4, ep: 2}", *EVEN,
          "workload={mode: decode, global_batch: 8, seq_len: 1, micro_batch: 2, context_len: 64}"])

# NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s; the same Hopper tensor
# cores and FP8/BF16 peaks as H100 SXM; NVLink 900 GB/s (bidirectional, i.e. 450 GB/s per
# direction, as H100's NVLink4). Only capacity and bandwidth change.
H200_MEMORY = 141e9            # bytes
H200_MEMORY_BANDWIDTH = 4.8e12  # bytes/s
H200_NVLINK_PER_DIRECTION = 450e9  # bytes/s (900 GB/s bidirectional)


def moesim_components(scenario: Scenario) -> dict[str, float]:
    """moesim's time per step of each component (seconds), from its per-block cost model.

    The only function here that touches moesim's cost-model API. One EP group (stage 0) is
    priced; every block's costs are summed: attention (+ TP all-reduce), the gate, the largest
    device's routed-expert grouped GEMM plus token permute, the dense FFN or shared experts, the
    dispatch and combine all-to-alls; plus the LM head and embedding. A step runs all
    micro-batches (both halves under two-batch overlap), serially: no overlap is credited.
    ``shared_output_add``: the part of ``shared_dense`` that adds the shared experts' output into
    the routed output (a measured graph without that op is compared without it).
    """
    from moesim.assembly import scenario_placement
    from moesim.pricing.context import PricingContext
    from moesim.pricing.step import logit_tokens, micro_batches
    from moesim.sim.costs import CostModel

    s = scenario
    ctx = PricingContext.from_scenario(s)
    half = ctx.half_batch
    costs = CostModel(ctx, scenario_placement(s))
    total = dict.fromkeys((*COMPONENTS, "shared_output_add"), 0.0)
    # The measured fused-MoE ops route inside (SGLang's select_experts, vLLM's FusedMoE and
    # TensorRT-LLM's MoE module take the router logits): moesim's top-k kernel, part of its gate,
    # is compared inside the routed experts.
    top_k = ctx.timer.top_k(ctx.tokens_per_source)
    for layer in range(s.model.num_layers):
        b = costs.block(layer)
        moved = top_k if b.is_moe else 0.0
        total["attention"] += b.attention + b.tp_comm
        total["router_norm"] += b.gate - moved
        total["routed_experts"] += float(b.experts.max(initial=0.0)) + b.permute + moved
        total["shared_dense"] += b.ffn
        if b.is_moe:   # inside b.ffn; kept apart for graphs that do not count the add
            total["shared_output_add"] += ctx.timer.shared_output_add(ctx.held_tokens)
        total["all_to_all"] += b.dispatch.duration + b.combine.duration
    timer = ctx.timer
    # aiconfigurator's graph ends at the logits GEMM: moesim's softmax over the logits
    # (sampling) is a kernel it does not count, so the LM head is compared as its GEMM.
    total["lm_head_embedding"] = (timer.lm_head_gemm(logit_tokens(ctx))
                                  + timer.embedding(ctx.group_microbatch_tokens)) / (2 if half else 1)
    runs = micro_batches(s) * (2 if half else 1)
    return {k: v * runs for k, v in total.items()}


def h200_variant(h100: HardwareProfile) -> HardwareProfile:
    """H200 SXM from an H100 SXM profile: datasheet memory and HBM bandwidth, all else equal."""
    device = replace(h100.device, name="H200 SXM 141GB (h100-sxm variant)", memory=H200_MEMORY,
                     memory_bandwidth=H200_MEMORY_BANDWIDTH,
                     source="NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s")
    links = dict(h100.links)
    if "scale_up" in links:
        links["scale_up"] = replace(links["scale_up"], bandwidth=H200_NVLINK_PER_DIRECTION)
    return replace(h100, name="h200-sxm (variant of h100-sxm)", device=device, links=links)


def build(wid: str, hardware: str | None = None, variant: bool = False) -> Scenario:
    """Workload ``wid`` in moesim; ``hardware``: a profile name or path for the cluster (default
    h100-sxm); ``variant``: run it on :func:`h200_variant` of the scenario's own profile."""
    _, path, overrides, _ = WORKLOADS[wid]
    s = load_scenario(REPO / path, [*overrides, f"cluster.hardware={hardware or 'h100-sxm'}"])
    return replace(s, hardware=h200_variant(s.hardware)) if variant else s


def measured_row(data: dict[str, Any], wid: str, system: str, backend: str) -> dict[str, Any]:
    return data["workloads"][WORKLOADS[wid][3]]["results"][system][backend]


def kernel_components(entry: dict[str, Any], component_ops: dict[str, list[str]],
                      layers: int) -> dict[str, float | None]:
    """The entry's components with every per-layer op at its kernel time x ``layers``.

    aiconfigurator's step estimate multiplies each layer op by a scale factor, the layer count,
    except where its estimator folds a discount in: its TensorRT-LLM wide-EP DeepSeek model
    scales every decode-layer op by 0.9 ("PDL overlap discount", a factor of the estimator, not
    a measurement: 61 x 0.9 = 54.9). Kernels are compared with kernels, so such ops are rescaled
    to ``layers``; entries at the layer count are unchanged.

    Its SGLang wide-EP DeepSeek graph also lists the fused q_a + kv_a down-projection twice, as
    ``qkv_a_proj_gemm`` and ``downscale_gemm`` (the same [tokens, 7168] x [7168, 2112] GEMM,
    "transcribed verbatim" from an older model): one layer runs it once, so it counts once.
    """
    measured: dict[str, float | None] = dict(entry["components_ms"])
    comps = {op: comp for comp, ops in component_ops.items() for op in ops}
    for op, ms in entry["ops_ms"].items():
        scale = (entry.get("shapes", {}).get(op) or {}).get("scale_factor", 1.0)
        comp = comps.get(op.split("_", 1)[1])
        current = measured.get(comp) if comp else None
        if scale > 1 and abs(scale - layers) > 1e-9 and current is not None:
            measured[comp] = current + ms * (layers / scale - 1)   # type: ignore[index]
    twice = duplicated_projection(entry)
    if twice is not None and measured.get("attention") is not None:
        measured["attention"] -= entry["ops_ms"][twice]   # type: ignore[operator]
    return measured


def duplicated_projection(entry: dict[str, Any]) -> str | None:
    """The op name of a second copy of the fused q_a + kv_a projection (``*_qkv_a_proj_gemm``
    beside a ``*_downscale_gemm`` of the same shape and dtype), or None."""
    shapes = entry.get("shapes", {})
    keys = ("n", "k", "quant_mode")
    for op in entry["ops_ms"]:
        if op.endswith("_qkv_a_proj_gemm"):
            twin = op.replace("_qkv_a_proj_gemm", "_downscale_gemm")
            a, b = shapes.get(op) or {}, shapes.get(twin) or {}
            if twin in entry["ops_ms"] and all(a.get(k) == b.get(k) for k in keys):
                return op
    return None


def counts_shared_add(entry: dict[str, Any]) -> bool:
    """Whether the measured graph has an op adding the shared experts' output into the routed
    output (aiconfigurator's ``moe_reduce_add``)."""
    return any(op.endswith("moe_reduce_add") for op in entry["ops_ms"])


def notes_for(entry: dict[str, Any], component_ops: dict[str, list[str]]) -> list[str]:
    """Caveats of one measured entry: non-table sources per component, MoE extrapolation."""
    notes = []
    comps = {op: comp for comp, ops in component_ops.items() for op in ops}
    for op, source in sorted(entry["op_sources"].items()):
        base = op.split("_", 1)[1]
        if source != "silicon" and entry["ops_ms"].get(op, 0) > 0:
            notes.append(f"{comps.get(base, 'unmapped')}: {base} is {source}, not a table row")
    if not counts_shared_add(entry) and any(
            op.endswith("shared_gate_up_gemm") or op.endswith("gate_ffn1_gemm")
            for op in entry["ops_ms"]):
        notes.append("shared_dense: aiconfigurator's graph has no op adding the shared experts' "
                     "output (moe_reduce_add); moesim's add is left out of this row")
    for comp, main_op in (("router_norm", "router_gemm"), ("lm_head_embedding", "logits_gemm")):
        if not any(op.endswith(main_op) for op in entry["ops_ms"]):
            notes.append(f"{comp}: aiconfigurator has no {main_op} op (moesim's time shown alone)")
    if "partial" in entry:
        notes.append("routed experts and all-to-all not measured with even routing (n.a.): "
                     + entry["partial"])
    table = entry.get("moe_table_tokens")
    if table and entry["moe_query_tokens"] > table[1]:
        notes.append(f"routed experts extrapolated: MoE queried at {entry['moe_query_tokens']} "
                     f"tokens, measured rows end at {table[1]}")
    elif "partial" not in entry and not entry.get("moe_served_by"):
        notes.append("routed experts interpolated between even-routing rows")
    if entry.get("overlap_split"):
        notes.append("overlapped op groups split into their ops (aiconfigurator's own step, "
                     "overlapped, is shorter)")
    if (twice := duplicated_projection(entry)) is not None:
        notes.append(f"attention: {twice.split('_', 1)[1]} repeats downscale_gemm (the same "
                     "q_a + kv_a projection): counted once")
    scales = {round(v.get("scale_factor", 1.0), 3) for v in entry.get("shapes", {}).values()}
    if len(scales - {1.0}) == 1 and (scale := max(scales)) != round(scale):
        notes.append(f"layer ops carry aiconfigurator's scale factor {scale:g} (a discount of "
                     "its estimator, e.g. TensorRT-LLM's 0.9 PDL overlap): compared per kernel "
                     "x layers")
    if entry["unmapped_ms"]:
        notes.append(f"unmapped ops: {entry['unmapped_ms']}")
    return notes


def cell(model_s: float, measured_ms: float | None) -> str:
    """``ratio (moesim ms/measured ms)``; measured 0: aiconfigurator has no such op; None: not
    measured with even routing (a partial entry)."""
    ms = model_s * 1e3
    if measured_ms is None:
        return f"({ms:.3g}/n.a.)"
    if not measured_ms:
        return "-" if ms <= 0 else f"({ms:.3g}/-)"
    return f"{ms / measured_ms:.2f} ({ms:.3g}/{measured_ms:.3g})"


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def closest(ratios: dict[str, dict[str, dict[str, float]]], band: tuple[float, float],
            components: tuple[str, ...] = COMPONENTS) -> None:
    """Per workload and component, the backend whose measured time is closest to moesim's
    (``ratios[wid][component][backend]``), marked against ``band`` for ``components`` (the
    others shown unmarked); then the misses."""
    lo, hi = band
    print(f"closest backend per component (moesim/measured; band {lo}-{hi}, * outside):")
    print(f"{'workload':<22} " + " ".join(f"{h:<19}" for h in HEADERS))
    inside, misses = 0, []
    for wid, comps in ratios.items():
        cells = []
        for comp, head in zip(COMPONENTS, HEADERS, strict=True):
            by_backend = comps.get(comp, {})
            if not by_backend:
                cells.append("-")
                continue
            backend, r = min(by_backend.items(), key=lambda kv: abs(math.log(kv[1])))
            if comp not in components:
                cells.append(f"({r:.2f} {backend})")
                continue
            ok = lo <= r <= hi
            inside += ok
            if not ok:
                misses.append(f"{wid} {head} {r:.2f}")
            cells.append(f"{r:.2f} {backend}{'' if ok else ' *'}")
        print(f"{WORKLOADS[wid][0]:<22} " + " ".join(f"{c:<19}" for c in cells))
    print(f"within {lo}-{hi}: {inside} of {inside + len(misses)} components; "
          f"outside: {', '.join(misses) or 'none'}")


def table(data: dict[str, Any], system: str, label: str, make: Any,
          workloads: list[str], band: tuple[float, float] | None = None,
          backends: tuple[str, ...] = BACKENDS,
          banded: tuple[str, ...] = COMPONENTS) -> list[float]:
    """Print one system's comparison; return the total ratios of the rows printed. ``band``:
    also print the closest backend per component against it (``banded`` components)."""
    print(f"\n{label} vs aiconfigurator {system}, even routing. Cells: moesim/measured "
          "(moesim ms/measured ms), per step")
    head = f"{'workload':<22} {'backend':<7} " + " ".join(f"{h:<19}" for h in HEADERS)
    print(head + f" {'total (6)':<19} total (first 5)")
    ratios: list[float] = []
    per_comp: dict[str, list[float]] = {c: [] for c in COMPONENTS}
    notes: dict[str, list[str]] = {}
    best: dict[str, dict[str, dict[str, float]]] = {}
    for wid in workloads:
        scenario = make(wid)
        base = moesim_components(scenario)
        for backend in backends:
            entry = measured_row(data, wid, system, backend)
            row = f"{wid} {backend}"
            if "error" in entry:
                if not wid.endswith("d"):
                    notes.setdefault(entry["error"], []).append(row)
                continue
            measured = kernel_components(entry, data["component_ops"],
                                         scenario.model.num_layers)
            if not any(op.endswith("logits_gemm") for op in entry["ops_ms"]):
                measured["lm_head_embedding"] = 0.0   # only an embedding: no lm head to compare
            comps = dict(base)
            if not counts_shared_add(entry):
                comps["shared_dense"] -= comps["shared_output_add"]   # compare the same ops
            cells = [cell(comps[c], measured[c]) for c in COMPONENTS]
            five = COMPONENTS[:5]
            if any(v is None for v in measured.values()):   # partial: no totals
                total, total5 = "-", "-"
            else:
                ours, theirs = sum(comps[c] for c in COMPONENTS), sum(measured.values())
                ours5, theirs5 = sum(comps[c] for c in five), sum(measured[c] for c in five)
                ratios.append(ours * 1e3 / theirs)
                total, total5 = cell(ours, theirs), cell(ours5, theirs5)
            print(f"{WORKLOADS[wid][0]:<22} {backend:<7} " + " ".join(f"{c:<19}" for c in cells)
                  + f" {total:<19} {total5}")
            if wid.endswith("d"):
                continue
            table_end = (entry.get("moe_table_tokens") or [0, math.inf])[1]
            extrapolated = entry.get("moe_query_tokens", 0) > table_end
            for c in COMPONENTS:
                if c == "routed_experts" and extrapolated:
                    continue   # beyond the measured rows: not a measurement
                if measured[c] and comps[c] > 0:
                    r = comps[c] * 1e3 / measured[c]
                    per_comp[c].append(r)
                    best.setdefault(wid, {}).setdefault(c, {})[backend] = r
            for n in notes_for(entry, data["component_ops"]):
                notes.setdefault(n, []).append(row)
    if ratios:
        print(f"total moesim/measured: geometric mean {geomean(ratios):.2f} over {len(ratios)} "
              f"rows, range {min(ratios):.2f}-{max(ratios):.2f}")
        print("per component, geometric mean (range) over W1-W5 rows (routed experts: "
              "measured range only): " + "; ".join(
            f"{h} {geomean(v):.2f} ({min(v):.2f}-{max(v):.2f})"
            for h, v in zip(HEADERS, per_comp.values(), strict=True) if v))
    for text, rows in notes.items():
        print(f"  note: {text} [{', '.join(rows)}]")
    if band and best:
        closest(best, band, banded)
    return ratios


def smoke() -> int:
    """moesim's side on a tiny decode scenario, and the measured file's shape."""
    path, overrides = SMOKE
    comps = moesim_components(load_scenario(REPO / path, overrides))
    print("tiny-cpu decode (moesim ms): " + ", ".join(f"{k} {v * 1e3:.4g}"
                                                      for k, v in comps.items()))
    data = json.loads(DATA.read_text())
    for wid, (_, _, _, key) in WORKLOADS.items():
        for system, rows in data["workloads"][key]["results"].items():
            ok = [b for b in BACKENDS if "error" not in rows[b]]
            print(f"{wid} {system}: measured for {', '.join(ok) or 'no backend'}")
    return 0


def without_tables(profile: str, kinds: list[str], folder: Path) -> str:
    """A copy of the ``profile`` YAML in ``folder`` whose measured tables lack ``kinds``."""
    if not profile.endswith((".yaml", ".yml")):
        raise MoESimError(f"--drop needs a profile .yaml, got {profile!r}")
    data = read_yaml(profile)
    tables = (data.get("calibration") or {}).get("kernels") or {}
    missing = [k for k in kinds if k not in tables]
    if missing:
        raise MoESimError(f"{profile}: no measured tables of kind {', '.join(missing)}; it has "
                          f"{', '.join(sorted(tables))}")
    for kind in kinds:
        del tables[kind]
    out = folder / Path(profile).name
    out.write_text(yaml.safe_dump(data))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", help="hardware profile (name or .yaml) to run instead of the "
                    "datasheet H100/H200 pair")
    ap.add_argument("--measured-system", default="h100_sxm", choices=("h100_sxm", "h200_sxm", "b200_sxm"),
                    help="the measured rows --profile is compared with")
    ap.add_argument("--backend", choices=BACKENDS, help="compare with this backend's rows only "
                    "(e.g. the backend a --profile was imported from)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--drop", default="", metavar="KIND[,KIND]",
                    help="run the --profile .yaml without these measured table kinds (e.g. "
                    "mla_module_generation: read the rows aiconfigurator composes instead)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for tests")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke()
    data = json.loads(args.data.read_text())
    print(f"measured: {data['source']}")
    workloads = args.workloads.split(",")
    backends = (args.backend,) if args.backend else BACKENDS
    try:
        if args.profile:
            profile = str(Path(args.profile).resolve()) if args.profile.endswith(
                (".yaml", ".yml")) else args.profile
            with tempfile.TemporaryDirectory() as tmp:
                label = args.profile
                if args.drop:
                    profile = without_tables(profile, args.drop.split(","), Path(tmp))
                    label += f" without {args.drop}"
                table(data, args.measured_system, f"moesim on {label}",
                      lambda w: build(w, profile), workloads, IMPORTED_BAND, backends,
                      COMPUTE)
            return 0
        table(data, "h100_sxm", "moesim on h100-sxm (datasheet)", build, workloads, H100_BAND,
              backends)
        h200 = REPO / "hardware_profiles" / "h200-sxm.yaml"
        if h200.exists():
            table(data, "h200_sxm", "moesim on hardware_profiles/h200-sxm.yaml (no refit)",
                  lambda w: build(w, str(h200)), workloads, H200_BAND, backends)
        else:
            table(data, "h200_sxm", "moesim on h100-sxm with H200 datasheet memory (no refit)",
                  lambda w: build(w, variant=True), workloads, H200_BAND, backends)
    except MoESimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
