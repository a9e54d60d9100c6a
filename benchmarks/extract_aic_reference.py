"""Extract per-component kernel times of five MoE serving workloads from NVIDIA aiconfigurator.

Writes ``benchmarks/data/measured_kernels_aic012.json``, the reference that
``benchmarks/kernels_vs_measured.py`` compares moesim against. Runs only where aiconfigurator 0.12.0
is installed (its own venv; moesim never imports it)::

    python3 -m venv .aic-venv && .aic-venv/bin/pip install aiconfigurator==0.12.0
    .aic-venv/bin/python benchmarks/extract_aic_reference.py [-o PATH]

aiconfigurator (NVIDIA, Apache-2.0) sums per-kernel timings measured on real GPUs for TensorRT-LLM,
SGLang and vLLM (parquet tables in its ``aiconfigurator-core`` wheel). For each workload W1-W5 of
the reference note ``measured_kernels.md`` (this project's shared reference folder), each system (h100_sxm, h200_sxm, b200_sxm) and each backend,
this calls ``aiconfigurator.cli.api.cli_estimate`` in a static mode (the equivalent of
``aiconfigurator cli estimate --estimate-mode static_gen|static_ctx``) with two interventions:

- **Even routing.** The model config's ``workload_distribution`` (default ``power_law``, which the
  CLI does not expose) is set before the model is built: ``balanced`` (fused-MoE tables) is tried
  first, then ``uniform`` (wide-EP tables); the first whose routed-expert op is served from a
  measured (``silicon``) row is kept, after checking the op's per-layer time against the table
  rows at its token count (``moe_served_by``): aiconfigurator silently serves a missing
  distribution from another one (TensorRT-LLM wide-EP: ``power_law_1.01_eplb``). Backends whose
  tables hold no even-routing rows for the workload are recorded with the reason, not with
  skewed numbers; where such an estimate still ran, its routing-independent components
  (attention, router+norm, shared/dense, LM head) are kept as a ``partial`` entry, the routed
  experts and the all-to-all left empty.
- **Overlap split.** Where aiconfigurator models two op groups on parallel streams (``OverlapOp``,
  latency = max of the two sums; TensorRT-LLM's shared-expert/routed-expert overlap), the groups
  are flattened into their ops so each op's time is visible; ``step_ms`` is still the unsplit
  estimate.

Each op's time (ms per step, already multiplied by aiconfigurator's per-op layer count) goes to one
moesim component by :data:`COMPONENT_OPS`; ops not listed there land in ``unmapped_ms``. The op
shapes that key the measured tables (GEMM n/k, heads, expert sizes, EP, dtypes, layer count) are
recorded per op.
"""

from __future__ import annotations

import argparse
import enum
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "data" / "measured_kernels_aic012.json"
AIC_VERSION = "0.12.0"
SYSTEMS = ("h100_sxm", "h200_sxm", "b200_sxm")
BACKENDS = ("sglang", "trtllm", "vllm")
DISTRIBUTIONS = ("balanced", "uniform")   # even routing: fused-MoE tables, then wide-EP tables

# Components whose measured time depends on how tokens are routed: an entry without an
# even-routing estimate keeps only the others ("partial").
ROUTING_DEPENDENT = ("routed_experts", "all_to_all")
# aiconfigurator op name (without its generation_/context_ prefix) -> moesim component.
COMPONENT_OPS = {
    "attention": ("add_norm_1", "qkv_gemm", "qkv_a_proj_gemm", "downscale_gemm",
                  "q_a_layernorm", "q_b_proj_gemm", "bmm_pre", "bmm_post", "rope_kvcache",
                  "attention", "proj_gemm", "mla_block", "tp_allreduce"),
    "router_norm": ("router_gemm", "add_norm_2"),
    "routed_experts": ("moe",),
    # moe_reduce_add adds the shared experts' output to the routed experts' (TensorRT-LLM).
    "shared_dense": ("gate_ffn1_gemm", "act_gate", "ffn2_gemm", "shared_gate_up_gemm",
                     "shared_act_gate", "shared_ffn2_gemm", "moe_reduce_add"),
    "all_to_all": ("moe_pre_dispatch", "moe_post_dispatch", "moe_dispatch", "moe_combine"),
    # Not one of the five components, but counted in aiconfigurator's step: lm head, embedding.
    "lm_head_embedding": ("logits_gemm", "embedding", "embedding_ar"),
    "pipeline_p2p": ("p2p",),
}
OP_COMPONENT = {op: comp for comp, ops in COMPONENT_OPS.items() for op in ops}

# Read off aiconfigurator 0.12.0's model code and tables while writing this extraction.
OBSERVATIONS = [
    "SGLang wide-EP MoE rows (DeepSeek-V3 at EP 32, DeepEP) are labelled 'uniform'; a 'balanced' "
    "request is served from them: W3 h100_sxm sglang gives 9.3712 ms either way, 61 x 0.1536 ms, "
    "the 2,048-token 'uniform' row of wideep_generation_moe_perf (sglang 0.5.10)",
    "TensorRT-LLM wide-EP DeepSeek-V3 decode multiplies every decode op by 0.9 (_PDL_FACTOR: "
    "scale_factor 54.9 = 61 x 0.9) and, like the other backends, counts all 61 layers as MoE "
    "layers with a shared expert (DeepSeek-V3's first 3 layers are dense)",
    "TensorRT-LLM's wide-EP MoE table (wideep_moe_perf, DeepSeek-V3 at EP 32) holds power-law "
    "rows only; asked for 'balanced' it silently serves the 'power_law_1.01_eplb' row (W3 "
    "h100_sxm: 0.2858 ms/layer), so those entries are recorded as errors (moe_served_by checks "
    "every entry against the table rows)",
    "moe_query_tokens: the MoE tables are keyed by the tokens of the whole attention-DP group; "
    "beyond moe_table_tokens[1] aiconfigurator extrapolates",
]

MIXTRAL_CONFIG = "mistralai--Mixtral-8x7B-v0.1_config.json"   # bundled in aiconfigurator-core

DECODE = {"mode": "static_gen", "isl": 2048, "osl": 2, "batch_size": 64}
PREFILL = {"mode": "static_ctx", "isl": 4096, "osl": 1, "batch_size": 1}
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"description": "Qwen3-30B-A3B decode, 1 node x 8, attention-DP 8 + EP 8, 64 seqs/GPU, "
                          "2,048-token context",
           "model_path": "Qwen/Qwen3-30B-A3B", "dp": 8, **DECODE},
    "W2": {"description": "Mixtral-8x7B decode, 1 node x 8, attention-DP 8 + EP 8, 64 seqs/GPU, "
                          "2,048-token context",
           "model_path": "local folder with aiconfigurator's " + MIXTRAL_CONFIG + " as config.json",
           "dp": 8, **DECODE},
    "W3": {"description": "DeepSeek-V3 decode, 4 nodes x 8, attention-DP 32 + EP 32, 64 seqs/GPU, "
                          "2,048-token context, FP8 weights (checkpoint) and KV",
           "model_path": "deepseek-ai/DeepSeek-V3", "dp": 32, **DECODE},
    "W4": {"description": "Qwen3-30B-A3B prefill, one 4,096-token prompt per GPU, DP 8 + EP 8",
           "model_path": "Qwen/Qwen3-30B-A3B", "dp": 8, **PREFILL},
    "W5": {"description": "DeepSeek-V3 prefill, one 4,096-token prompt per GPU, DP 32 + EP 32",
           "model_path": "deepseek-ai/DeepSeek-V3", "dp": 32, **PREFILL},
}


def cli_line(w: dict[str, Any], system: str, backend: str) -> str:
    """The equivalent ``aiconfigurator cli estimate`` command (which cannot set the routing)."""
    path = "MIXTRAL_DIR" if w["model_path"].startswith("local") else w["model_path"]
    return (f"aiconfigurator cli estimate --model-path {path} --system {system} --backend "
            f"{backend} --estimate-mode {w['mode']} --isl {w['isl']} --osl {w['osl']} "
            f"--batch-size {w['batch_size']} --tp 1 --dp {w['dp']} --ep {w['dp']} --detail all")


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar of an op attribute, or None to leave it out."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return round(value, 6)
    return None


def op_shape(op: Any) -> dict[str, Any]:
    """The scalar attributes of one aiconfigurator op (shape, dtypes, layer count)."""
    shape: dict[str, Any] = {"class": type(op).__name__}
    for name in dir(op):
        if not name.startswith("_") or name.startswith("__") or name.isupper():
            continue
        if any(word in name for word in ("cache", "count", "CP_AWARE", "ENGINE", "spec_json")):
            continue
        try:
            value = _plain(getattr(op, name))
        except Exception:  # noqa: BLE001 - a property that cannot be read is simply left out
            continue
        if value is not None and not callable(value):
            shape[name.lstrip("_")] = value
    return shape


def leaves(op: Any) -> list[Any]:
    """The leaf ops of an op: an OverlapOp's two groups, flattened; anything else itself."""
    groups = [getattr(op, g, None) for g in ("_group_a", "_group_b")]
    if type(op).__name__ == "OverlapOp" and all(g is not None for g in groups):
        return [leaf for group in groups for child in group for leaf in leaves(child)]
    return [op]


class Estimator:
    """Wraps ``cli_estimate`` with the two interventions (routing, overlap split)."""

    def __init__(self) -> None:
        import aiconfigurator.cli.api as api
        import aiconfigurator.sdk.models as models

        self.api = api
        self.distribution = "power_law"
        self.split = False
        self.model: Any = None
        original = models.get_model

        def get_model(model_path: Any, model_config: Any, backend: Any, *args: Any,
                      **kwargs: Any) -> Any:
            model_config.workload_distribution = self.distribution
            model = original(model_path, model_config, backend, *args, **kwargs)
            if self.split:
                for attr in ("generation_ops", "context_ops"):
                    ops = getattr(model, attr)
                    ops[:] = [leaf for op in ops for leaf in leaves(op)]
            self.model = model
            return model

        models.get_model = get_model

    def run(self, w: dict[str, Any], model_path: str, system: str, backend: str,
            distribution: str, split: bool) -> tuple[Any, dict[str, float], dict[str, str],
                                                      list[Any]]:
        """(result, ms per op, source per op, the phase's ops) of one estimate."""
        self.distribution, self.split = distribution, split
        result = self.api.cli_estimate(
            model_path, system, mode=w["mode"], backend_name=backend, isl=w["isl"],
            osl=w["osl"], batch_size=w["batch_size"], tp_size=1, attention_dp_size=w["dp"],
            moe_ep_size=w["dp"])
        s = result.summary
        decode = w["mode"] == "static_gen"
        times = s._generation_latency_dict if decode else s._context_latency_dict
        sources = s._generation_source_dict if decode else s._context_source_dict
        ops = self.model.generation_ops if decode else self.model.context_ops
        return result, dict(times), dict(sources), list(ops)


def moe_rows(system: str, backend: str, shape: dict[str, Any]) -> Any:
    """The measured MoE rows (every table and version of ``backend`` on ``system``) with this
    op's hidden/inter size, experts, top-k and EP, as one DataFrame with a ``table`` column."""
    import aiconfigurator_core
    import pandas as pd

    root = Path(aiconfigurator_core.__file__).parent / "systems" / "data" / system / "moe" / backend
    keys = ("hidden_size", "inter_size", "num_experts", "topk", "moe_ep_size")
    frames = []
    for table in sorted(root.glob("*/*.parquet")):
        rows = pd.read_parquet(table)
        mask = pd.Series(True, index=rows.index)
        for key in keys:
            if key in shape and key in rows:
                mask &= rows[key] == shape[key]
        frames.append(rows.loc[mask].assign(table=str(table.relative_to(root.parent.parent))))
    return pd.concat(frames, ignore_index=True)


def moe_check(system: str, backend: str, shape: dict[str, Any], query_tokens: int,
              per_layer_ms: float) -> dict[str, Any]:
    """Which measured row served the MoE op: the token range of the even-routing rows of its
    shape, and the rows at exactly ``query_tokens`` whose latency equals the op's per-layer time
    (``served_by``; empty when aiconfigurator interpolated or extrapolated)."""
    rows = moe_rows(system, backend, shape)
    even = rows[rows["distribution"].isin(DISTRIBUTIONS)]
    hit = rows[(rows["num_tokens"] == query_tokens)
               & ((rows["latency"] - per_layer_ms).abs() <= 1e-4 * per_layer_ms)]
    return {
        "moe_table_tokens": ([int(even["num_tokens"].min()), int(even["num_tokens"].max())]
                             if len(even) else None),
        "served_by": [{"table": t, "distribution": d, "latency_ms": round(float(v), 6)}
                      for t, d, v in zip(hit["table"], hit["distribution"], hit["latency"],
                                         strict=True)],
    }


def _base(op: str) -> str:
    """An op's name without its generation_/context_ phase prefix."""
    return op.split("_", 1)[1] if op.startswith(("generation_", "context_")) else op


def components(times: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(ms per moesim component, ms of ops no component claims) from ms per op."""
    comp = {name: 0.0 for name in COMPONENT_OPS}
    unmapped: dict[str, float] = {}
    for op, ms in times.items():
        base = _base(op)
        if base in OP_COMPONENT:
            comp[OP_COMPONENT[base]] += ms
        elif ms:
            unmapped[op] = ms
    return comp, unmapped


def extract_one(est: Estimator, w: dict[str, Any], model_path: str, system: str,
                backend: str) -> dict[str, Any]:
    """The reference entry of one (workload, system, backend), or its reason for having none."""
    errors = []
    fallback: tuple[str, Any, dict[str, float], dict[str, str], list[Any]] | None = None
    for distribution in DISTRIBUTIONS:
        try:
            result, times, sources, ops = est.run(w, model_path, system, backend, distribution,
                                                  split=True)
        except Exception as exc:  # noqa: BLE001 - aiconfigurator raises many types for a miss
            reason = str(exc).splitlines()[0].split(" at /")[0]   # no local paths
            errors.append(f"{distribution}: {type(exc).__name__}: {reason}")
            continue
        if fallback is None:
            fallback = (distribution, result, times, sources, ops)
        moe = [op for op in times if op.endswith("_moe")]
        if not moe or any(sources.get(op) != "silicon" for op in moe):
            errors.append(f"{distribution}: routed-expert op not from a measured row "
                          f"({ {op: sources.get(op) for op in moe} })")
            continue
        unsplit, _, _, unsplit_ops = est.run(w, model_path, system, backend, distribution,
                                             split=False)
        overlapped = len(ops) != len(unsplit_ops)
        step_ms = unsplit.tpot if w["mode"] == "static_gen" else unsplit.ttft
        comp, unmapped = components(times)
        shapes = {op._name: op_shape(op) for op in ops if times.get(op._name)}
        moe_op = next(k for k in shapes if k.endswith("_moe"))
        tokens = w["batch_size"] * (w["isl"] if w["mode"] == "static_ctx" else 1)
        check = moe_check(system, backend, shapes[moe_op], tokens * w["dp"],
                          times[moe_op] / shapes[moe_op]["scale_factor"])
        served = {row["distribution"] for row in check["served_by"]}
        if served and not served & set(DISTRIBUTIONS):
            errors.append(f"{distribution}: aiconfigurator served the routed experts from "
                          f"{sorted(served)} rows ({check['served_by'][0]['table']}), not even "
                          "routing")
            continue
        return {
            "backend_version": result.backend_version,
            "workload_distribution": distribution,
            "step_ms": round(float(step_ms), 4),
            "overlap_split": overlapped,
            "components_ms": {k: round(v, 4) for k, v in comp.items()},
            "unmapped_ms": {k: round(v, 4) for k, v in unmapped.items()},
            "ops_ms": {k: round(v, 4) for k, v in times.items() if v},
            "op_sources": {k: sources[k] for k in times if times[k] and k in sources},
            "tokens_per_gpu": tokens,
            # The MoE tables are keyed by the tokens of the whole attention-DP group.
            "moe_query_tokens": tokens * w["dp"],
            "moe_table_tokens": check["moe_table_tokens"],
            "moe_served_by": check["served_by"],
            "shapes": shapes,
        }
    error = "no even-routing estimate: " + "; ".join(errors)
    if fallback is None:
        return {"error": error}
    # The estimate ran but its routed experts are not an even-routing row: keep the components
    # that do not depend on the routing (attention, router+norm, shared/dense, LM head), drop
    # the routed experts and the all-to-all.
    distribution, result, times, sources, ops = fallback
    comp, unmapped = components(times)
    dependent = set(ROUTING_DEPENDENT)
    ops_of = {op for c in dependent for op in COMPONENT_OPS[c]}
    kept = {k: v for k, v in times.items()
            if v and _base(k) not in ops_of}
    return {
        "partial": error,
        "backend_version": result.backend_version,
        "workload_distribution": distribution,
        "components_ms": {k: (None if k in dependent else round(v, 4))
                          for k, v in comp.items()},
        "unmapped_ms": {k: round(v, 4) for k, v in unmapped.items()},
        "ops_ms": {k: round(v, 4) for k, v in kept.items()},
        "op_sources": {k: sources[k] for k in kept if k in sources},
        "tokens_per_gpu": w["batch_size"] * (w["isl"] if w["mode"] == "static_ctx" else 1),
        "shapes": {op._name: op_shape(op) for op in ops if kept.get(op._name)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="e.g. W1,W3")
    args = ap.parse_args(argv)
    try:
        from importlib.metadata import version

        import aiconfigurator  # noqa: F401
        found = version("aiconfigurator")
    except ImportError:
        print("extract_aic_reference.py needs aiconfigurator==0.12.0, which moesim does not depend "
              "on. Install it in its own venv and run this script with that venv's python:\n"
              "  python3 -m venv .aic-venv && .aic-venv/bin/pip install "
              "aiconfigurator==0.12.0\n  .aic-venv/bin/python "
              "benchmarks/extract_aic_reference.py", file=sys.stderr)
        return 2
    if found != AIC_VERSION:
        print(f"aiconfigurator {found} is installed; the reference is defined for {AIC_VERSION}",
              file=sys.stderr)
        return 2
    import aiconfigurator_core

    bundled = Path(aiconfigurator_core.__file__).parent / "model_configs" / MIXTRAL_CONFIG
    est = Estimator()
    workloads = {}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(bundled, Path(tmp) / "config.json")
        for wid in args.workloads.split(","):
            w = WORKLOADS[wid]
            path = tmp if wid == "W2" else w["model_path"]
            call = {"model_path": w["model_path"], "mode": w["mode"], "isl": w["isl"],
                    "osl": w["osl"], "batch_size": w["batch_size"], "tp_size": 1,
                    "attention_dp_size": w["dp"], "moe_ep_size": w["dp"]}
            results: dict[str, dict[str, Any]] = {}
            for system in SYSTEMS:
                for backend in BACKENDS:
                    t0 = time.perf_counter()
                    entry = extract_one(est, w, path, system, backend)
                    results.setdefault(system, {})[backend] = entry
                    print(f"{wid} {system} {backend}: "
                          f"{entry.get('error') or entry['components_ms']} "
                          f"{'(partial) ' if 'partial' in entry else ''}"
                          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            workloads[wid] = {"description": w["description"], "call": call,
                              "cli": cli_line(w, "SYSTEM", "BACKEND"), "results": results}
    data = {
        "source": "NVIDIA aiconfigurator 0.12.0 (aiconfigurator-core 0.12.0), Apache-2.0, "
                  "https://github.com/ai-dynamo/aiconfigurator: per-kernel timings measured on "
                  "real GPUs for TensorRT-LLM, SGLang and vLLM, summed per op by its static "
                  "estimator",
        "license": "Apache-2.0",
        "generated_by": "benchmarks/extract_aic_reference.py",
        "api": "aiconfigurator.cli.api.cli_estimate(model_path, system, mode=call.mode, "
               "backend_name=BACKEND, isl=, osl=, batch_size=, tp_size=1, attention_dp_size=, "
               "moe_ep_size=); the model config's workload_distribution set to the recorded value "
               "before the model is built; OverlapOp groups flattened into their ops "
               "(overlap_split) for ops_ms and components_ms, step_ms from the unsplit model",
        "units": "ms per step: one decode step of batch_size sequences per GPU (static_gen, "
                 "osl=2: the one generation step at isl+1 context), or one prefill of batch_size "
                 "prompts of isl tokens per GPU (static_ctx); each op already multiplied by "
                 "aiconfigurator's layer count for it (shapes.*.scale_factor)",
        "component_ops": {k: list(v) for k, v in COMPONENT_OPS.items()},
        "observations": OBSERVATIONS,
        "workloads": workloads,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
