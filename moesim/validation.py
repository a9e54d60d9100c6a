"""Validation against a real MoE layer: the same scenario, simulated and run for real.

``calibrate/moe_layer.py`` runs one expert-parallel MoE layer forward (route, dispatch all-to-all,
expert FFNs, combine all-to-all) on N torch ranks and times it. This module makes its input and
moesim's prediction describe the same thing:

- :func:`layer_config` writes the layer's config from a scenario, with the token -> expert ids of
  moesim's own routing sample (every token sampled: ``routing.max_tokens_per_source`` is raised to
  the tokens per rank) and moesim's own placement, so both see identical assignments;
- :func:`predict_layer` / :func:`predict_phases` price ONE MoE layer forward with the simulator's
  own functions: :class:`moesim.sim.costs.CostModel` builds the block, attention and tensor-parallel
  traffic are zeroed, and :func:`moesim.sim.streams.run_ops` schedules gate, dispatch, experts and
  combine on each device's two streams;
- :func:`layer_scenario` builds such a scenario whose cluster mirrors the emulated one of
  ``calibrate/emulated_cluster.py``: each node is a switch joining its ranks over the calibrated
  ``scale_up`` (loopback) link, and each node reaches the bridge over ONE shaped egress at the
  calibrated ``scale_out`` rate, shared by the node's ranks as the namespace's tc qdisc is;
- :func:`run_layer` runs the real layer (locally, or on an emulated cluster) in a subprocess.

A replicated expert is refused: the real layer splits its tokens round-robin over all replicas,
moesim prefers the local replica, so the two would route differently.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import CalibrationError, ScenarioError
from moesim.placement.placement import Placement
from moesim.placement.policies import resolve_placement
from moesim.pricing.context import PricingContext
from moesim.sim.costs import CostModel
from moesim.sim.streams import chunk_ops, run_ops
from moesim.spec.hardware import HardwareProfile, load_hardware
from moesim.spec.scenario import Scenario, scenario_from_mapping

__all__ = ["PHASES", "emulated_scale_out", "layer_scenario", "cost_model", "layer_config", "predict_layer",
           "predict_phases", "layer_phases", "measured_phases", "run_layer"]

PHASES = ("route", "dispatch", "expert", "combine")
_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def layer_scenario(*, hardware: str | Path, hidden: int, ffn: int, num_experts: int, top_k: int,
                   tokens_per_rank: int, nodes: int = 1, ranks_per_node: int = 2,
                   routing: Mapping[str, Any] | None = None, placement: str = "contiguous",
                   scale_out_bandwidth: float | None = None, seed: int = 0,
                   name: str = "layer") -> Scenario:
    """A one-MoE-layer scenario on ``nodes`` x ``ranks_per_node`` ranks of an emulated cluster.

    ``scale_out_bandwidth`` (bytes/s) overrides the profile's node egress rate (another tc rate).

    Raises
    ------
    ScenarioError
        Fewer than 2 ranks, or several nodes on a profile without a ``scale_out`` link.
    """
    ranks = nodes * ranks_per_node
    if ranks < 2:
        raise ScenarioError(f"nodes x ranks_per_node = {ranks}: a layer needs >= 2 ranks")
    profile = load_hardware(str(hardware))
    up = profile.link("scale_up")
    out = profile.link("scale_out") if nodes > 1 else up
    out_bw = scale_out_bandwidth or out.bandwidth
    devices = [{"name": f"r{r}", "node": r // ranks_per_node} for r in range(ranks)]
    links = []
    for r in range(ranks):
        sw = f"node{r // ranks_per_node}"
        links += [_link(f"r{r}", sw, up.bandwidth, up.latency, "scale_up"),
                  _link(sw, f"r{r}", up.bandwidth, 0.0, "scale_up")]
    for n in range(nodes if nodes > 1 else 0):
        # egress shaped (tc on the namespace's veth), ingress not: the bridge forwards freely
        links += [_link(f"node{n}", "bridge", out_bw, max(0.0, out.latency - up.latency),
                        "scale_out"),
                  _link("bridge", f"node{n}", up.bandwidth, 0.0, "scale_out")]
    data = {
        "name": name, "seed": seed,
        "model": {"base": "tiny-cpu", "hidden_size": hidden, "expert_ffn_size": ffn,
                  "num_experts": num_experts, "top_k": top_k, "num_layers": 1,
                  "capacity_factor": None},
        "cluster": {"hardware": str(Path(hardware).resolve()), "topology": "explicit",
                    "devices": devices, "links": links},
        "parallelism": {"tp": 1, "pp": 1, "dp": ranks, "ep": ranks},
        "workload": {"mode": "prefill", "global_batch": ranks, "seq_len": tokens_per_rank},
        "precision": {k: "fp32" for k in ("compute", "weights", "activations", "dispatch",
                                          "combine")},
        "routing": {**(routing or {}), "max_tokens_per_source": tokens_per_rank},
        "placement": {"policy": placement},
    }
    return scenario_from_mapping(data, source=f"<{name}>", bare_si=True)  # links in SI


def emulated_scale_out(profile: HardwareProfile, rate_bytes_per_s: float) -> float | None:
    """Node egress bytes/s of an emulated cluster shaped at ``rate_bytes_per_s``: the profile's
    calibrated emulated link scaled by the ratio of tc rates; None when the profile was not
    calibrated on emulated nodes (keep its own link)."""
    emulated = ((profile.calibration or {}).get("metadata") or {}).get("emulated")
    if not emulated or "scale_out" not in profile.links:
        return None
    return profile.links["scale_out"].bandwidth * rate_bytes_per_s / emulated["rate_bytes_per_s"]


def _link(a: str, b: str, bandwidth: float, latency: float, kind: str) -> dict[str, Any]:
    return {"a": a, "b": b, "bandwidth": bandwidth, "latency": latency, "kind": kind,
            "bidirectional": False}


def cost_model(scenario: Scenario, profile: HardwareProfile | str | Path | None = None,
               placement: Placement | None = None) -> CostModel:
    """The simulator's cost model of ``scenario`` (``profile`` replaces its hardware).

    Built as :func:`moesim.assembly.simulate` builds it: topology, layout, the scenario's
    placement for the first EP group (unless ``placement`` is given).
    """
    s = scenario
    if profile is not None:
        hw = profile if isinstance(profile, HardwareProfile) else load_hardware(str(profile))
        s = replace(s, hardware=hw)
    ctx = PricingContext.from_scenario(s)
    if placement is None:
        placement = resolve_placement(s, ctx)
    return CostModel(ctx, placement)


def _first_moe(costs: CostModel) -> tuple[int, int]:
    """(block index, MoE index) of the first MoE layer."""
    layer = costs.scenario.model.moe_layer_ids[0]
    moe = costs.ctx.layout.moe_index(layer)
    assert moe is not None   # the first of the MoE layer ids
    return layer, moe


def layer_config(scenario: Scenario, *, placement: Placement | None = None, warmup: int = 2,
                 iters: int = 10, threads_per_rank: int = 1) -> dict[str, Any]:
    """The ``calibrate/moe_layer.py`` config (JSON-able) of the scenario's first MoE layer.

    ``routing.expert_ids: [ranks, tokens_per_rank, top_k]`` are moesim's sampled choices.

    Raises
    ------
    ScenarioError
        Tokens are subsampled (raise routing.max_tokens_per_source), the placement replicates an
        expert, or the compute dtype has no torch counterpart.
    """
    costs = cost_model(scenario, placement=placement)
    s, (_, moe) = costs.scenario, _first_moe(costs)
    choices = costs.choices[moe]
    ep, tokens = s.parallelism.ep, int(round(costs.tokens))
    if choices.weight != 1.0 or choices.num_tokens != ep * tokens:
        raise ScenarioError(f"routing samples {choices.num_tokens // ep} of {tokens} tokens per "
                            f"rank; set routing.max_tokens_per_source >= {tokens}",
                            field="routing.max_tokens_per_source")
    slots = costs.placement.slot_expert[moe]                       # [ep, slots]
    if np.bincount(slots.ravel(), minlength=s.model.num_experts).max() > 1:
        raise ScenarioError("the real layer splits a replicated expert's tokens round-robin over "
                            "all replicas, moesim prefers the local one: use a placement with "
                            "each expert on one slot (redundant_experts: 0)", field="placement")
    if s.precision.compute not in _DTYPE:
        raise ScenarioError(f"compute dtype {s.precision.compute!r} has no torch layer dtype "
                            f"(allowed: {', '.join(_DTYPE)})", field="precision.compute")
    ids = choices.experts.reshape(ep, tokens, choices.top_k)      # tokens grouped by source
    return {"hidden": s.model.hidden_size, "ffn": s.model.expert_ffn_size,
            "num_experts": s.model.num_experts, "top_k": choices.top_k,
            "tokens_per_rank": tokens, "dtype": _DTYPE[s.precision.compute],
            "placement": slots.tolist(),
            "routing": {"kind": "expert_ids", "expert_ids": ids.tolist()},
            "warmup": warmup, "iters": iters, "seed": s.seed,
            "threads_per_rank": threads_per_rank}


def predict_phases(scenario: Scenario, profile: HardwareProfile | str | Path | None = None,
                   placement: Placement | None = None) -> dict[str, float]:
    """Predicted seconds of one MoE layer forward: ``{route, dispatch, expert, combine, total}``.

    A phase is, per device, the time from the end of the previous phase to the end of this one
    (so it includes waiting at the all-to-all barriers), maximised over devices, as
    :func:`measured_phases` reads the real layer; ``total`` is the makespan.
    """
    return layer_phases(cost_model(scenario, profile, placement))


def layer_phases(costs: CostModel) -> dict[str, float]:
    """:func:`predict_phases` from an already built cost model (its timer keeps the counters)."""
    layer, _ = _first_moe(costs)
    block = replace(costs.block(layer), attention=0.0, tp_comm=0.0)
    ep = costs.scenario.parallelism.ep
    ops = chunk_ops([block], ep, backward=False, recompute=False,
                    overlap=costs.scenario.communication.overlap)
    run = run_ops(ops, ep)
    end = {op.name: run.end[i] for i, op in enumerate(ops)}       # name -> float[ep]
    marks = [np.zeros(ep), end["gate"], end["dispatch"], end["experts"], end["combine"]]
    phases = {p: float((b - a).max()) for p, a, b in zip(PHASES, marks, marks[1:])}
    return phases | {"total": run.makespan}


def predict_layer(scenario: Scenario, profile: HardwareProfile | str | Path | None = None,
                  placement: Placement | None = None) -> float:
    """Predicted seconds of one MoE layer forward (gate + dispatch + experts + combine)."""
    return predict_phases(scenario, profile, placement)["total"]


def measured_phases(report: Mapping[str, Any], stat: str = "median") -> dict[str, float]:
    """``{route, dispatch, expert, combine, total}`` of a ``moe_layer.py`` report.

    Phases: the largest per-rank ``stat``; total: the ``stat`` over iterations of the slowest
    rank's time. ``stat``: "median", "p10", or "best" (total: the fastest iteration, phases:
    p10). On a machine shared with other work the fast iterations estimate the uncontended time,
    which is what a profile describes.
    """
    if stat not in ("median", "p10", "best"):
        raise ValueError(f"stat={stat!r} must be 'median', 'p10' or 'best'")
    ranks, key = report["ranks"], "p10" if stat == "best" else stat
    out = {p: max(r["phases_s"][p][key] for r in ranks) for p in PHASES}
    if stat == "best":
        return out | {"total": min(report["step_max_total_per_iter_s"])}
    return out | {"total": report["step_max_total_s"][stat]}


def run_layer(config: Mapping[str, Any], *, nodes: int = 1, ranks_per_node: int | None = None,
              rate: str | None = None, suite: str | Path | None = None,
              timeout: float = 600.0) -> dict[str, Any]:
    """Run ``calibrate/moe_layer.py`` on ``config`` and return rank 0's report.

    One node: ranks spawned locally (gloo on 127.0.0.1). Several: ``calibrate/emulated_cluster.py``
    with ``ranks_per_node`` ranks in each of ``nodes`` namespaces, egress shaped to ``rate``.

    Raises
    ------
    CalibrationError
        The run failed or timed out (the message holds the end of its stderr).
    """
    from moesim.calibration_cli import find_suite

    folder = find_suite(suite)
    world = len(config["placement"])
    per_node = ranks_per_node or world // nodes
    if per_node * nodes != world:
        raise ScenarioError(f"{world} ranks do not fill {nodes} nodes of {per_node}")
    with tempfile.TemporaryDirectory(prefix="moesim-layer-") as tmp:
        cfg, out = Path(tmp) / "config.json", Path(tmp) / "report.json"
        cfg.write_text(json.dumps(config))
        layer = [sys.executable, str(folder / "moe_layer.py"), str(cfg), "--out", str(out)]
        if nodes == 1:
            cmd = [*layer, "--nprocs", str(world)]
        else:
            cmd = [sys.executable, str(folder / "emulated_cluster.py"), "--nodes", str(nodes),
                   "--ranks-per-node", str(per_node), "--rate", rate or "none",
                   "--timeout", str(timeout), "--", *layer]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            raise CalibrationError(f"moe_layer.py did not finish in {timeout:.0f} s") from None
        if done.returncode != 0 or not out.exists():
            raise CalibrationError(f"moe_layer.py failed (exit {done.returncode}): "
                                   f"{done.stderr[-1500:]}")
        return json.loads(out.read_text())
