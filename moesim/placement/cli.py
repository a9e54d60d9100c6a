"""``moesim plan SCENARIO -o plan.json``: plan expert placements and compare planners.

Each planner named with ``--planner`` places the scenario's experts (plus ``--replicas``
redundant slots) for its first EP group; all are priced by the same objective
(:mod:`moesim.placement.objective`) and printed side by side: cross-node bytes, max/mean device
load, predicted MoE layer time, planning time. The first planner's plan is written to ``-o``.

Routing: ``--trace FILE`` (a per-token trace is split in time: plan on the first ``--split``
of its tokens, price on the rest; a counts trace or an engine's load dump is used for both),
else the scenario's own routing (planned and priced on the simulator's sample).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim import routing
from moesim.errors import ScenarioError
from moesim.placement import baselines, export, objective, planner
from moesim.placement.eplb import eplb_rebalance
from moesim.placement.placement import Placement

__all__ = ["PLANNERS", "register", "make_placement", "PlanningInputs", "planning_inputs"]

PLANNERS = ("moesim", "eplb", "eplb_global", "contiguous", "round_robin", "random")


@dataclass(frozen=True, eq=False)
class PlanningInputs:
    """Routing to plan on and routing to price on, for one EP group."""

    layers: list[planner.LayerRouting]          # planning window, per MoE layer
    plan_choices: list[routing.LayerChoices]    # the planning window as the group's tokens
    eval_choices: list[routing.LayerChoices]    # the pricing window
    description: str


def planning_inputs(scenario, ctx: objective.CostContext, trace_path: str | None = None,
                    split: float = 0.5) -> PlanningInputs:
    """Planning and pricing routing from a trace file or from the scenario's routing."""
    m = scenario.model
    if trace_path is None:
        choices = objective.scenario_choices(scenario, ctx)
        return PlanningInputs(planner.routing_from_choices(choices, m.num_experts), choices,
                              choices, "the scenario's routing (planned and priced on it)")
    path = Path(trace_path)
    if path.suffix.lower() in (".json", ".pt") or _is_load_npz(path):
        trace = export.import_load(path, num_experts=m.num_experts, num_layers=m.num_moe_layers)
    else:
        trace = routing.load_trace(path, num_experts=m.num_experts, num_layers=m.num_moe_layers)
    if trace.per_token and split < 1.0:
        train, test = trace.window(0.0, split), trace.window(split, 1.0)
        what = f"{path}: plan on tokens [0, {split:g}), price on [{split:g}, 1)"
    else:
        train = test = trace
        what = f"{path}: planned and priced on the whole trace"
    return PlanningInputs(planner.routing_from_trace(train),
                          objective.trace_choices(ctx, train, seed=scenario.seed),
                          objective.trace_choices(ctx, test, seed=scenario.seed), what)


def _is_load_npz(path: Path) -> bool:
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return any(k in archive.files for k in ("logical_count", "logical_expert_load"))
    except Exception:  # an unreadable archive is reported by load_trace
        return False


def make_placement(name: str, layers: list[planner.LayerRouting], ctx: objective.CostContext,
                   num_experts: int, slots_per_device: int, *, seed: int = 0,
                   time_limit: float = 10.0, plan_choices: list[routing.LayerChoices] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Placement:
    """Placement of planner ``name`` (one of :data:`PLANNERS`) for the group of ``ctx``."""
    load = np.stack([info.load for info in layers])
    num_layers, ep = load.shape[0], ctx.ep
    physical = ep * slots_per_device
    nodes = int(np.unique(ctx.device_node).size)
    if name == "moesim":
        shape = planner.ClusterShape(num_experts, ctx.device_node, slots_per_device)
        score = None if plan_choices is None else objective.layer_scorer(ctx, plan_choices,
                                                                         num_experts)
        config = planner.PlannerConfig(seed=seed, time_limit=time_limit)
        return planner.plan(layers, shape, config, score=score, progress=progress)
    if name == "eplb":
        groups = nodes if num_experts % nodes == 0 else 1
        table = eplb_rebalance(load, physical, groups, nodes, ep).physical_to_logical
    elif name == "eplb_global":
        table = eplb_rebalance(load, physical, 1, 1, ep).physical_to_logical
    elif name == "contiguous":
        table = baselines.contiguous(num_layers, num_experts, ep, physical, load=load)
    elif name == "round_robin":
        table = baselines.round_robin(num_layers, num_experts, ep, physical, load=load)
    elif name == "random":
        table = baselines.random_placement(num_layers, num_experts, ep, physical, seed, load=load)
    else:
        raise ScenarioError(f"unknown planner {name!r}; valid: {', '.join(PLANNERS)}",
                            field="--planner")
    return Placement.from_physical(table, ep, num_experts, name=name)


def register(sub, commands: dict) -> None:
    """Add ``moesim plan`` to the CLI."""
    p = sub.add_parser("plan", help="plan expert placements and compare planners")
    p.add_argument("scenario")
    p.add_argument("-o", "--output", required=True, help="plan file (.json or .yaml)")
    p.add_argument("--trace", help="routing trace (.npz/.csv) or engine load dump "
                                   "(SGLang logical_count / vLLM logical_expert_load)")
    p.add_argument("--split", type=float, default=0.5,
                   help="plan on this leading fraction of a per-token trace (default 0.5)")
    p.add_argument("--replicas", type=int, help="redundant expert slots per EP group")
    p.add_argument("--planner", action="append", choices=PLANNERS,
                   help="planner to run (repeatable; the first one's plan is written; "
                        "default: moesim, eplb, contiguous, round_robin)")
    p.add_argument("--format", choices=export.FORMATS, default="moesim", help="plan file format")
    p.add_argument("--seed", type=int, help="planner seed (default: the scenario's)")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per planner")
    p.add_argument("--exact", action="store_true",
                   help="price all-to-alls by flow simulation instead of the closed form")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    commands["plan"] = _cmd_plan


def _cmd_plan(args: argparse.Namespace) -> int:
    from moesim.spec.scenario import load_scenario

    overrides = list(args.set)
    if args.replicas is not None:
        overrides.append(f"placement.redundant_experts={args.replicas}")
    s = load_scenario(args.scenario, overrides)
    if not 0.0 < args.split <= 1.0:
        raise ScenarioError(f"--split={args.split} must be in (0, 1]", field="--split")
    ctx = objective.CostContext.from_scenario(s)
    inputs = planning_inputs(s, ctx, args.trace, args.split)
    names = args.planner or ["moesim", "eplb", "contiguous", "round_robin"]
    slots = (s.model.num_experts + s.placement.redundant_experts) // s.parallelism.ep
    seed = s.seed if args.seed is None else args.seed
    print(f"scenario   {s.name}: {s.model.num_moe_layers} MoE layers x {s.model.num_experts} "
          f"experts, ep={ctx.ep} over {np.unique(ctx.device_node).size} nodes, {slots} slots "
          f"per device, {ctx.algorithm} all-to-all")
    print(f"routing    {inputs.description}")
    rows, written = [], None
    for name in dict.fromkeys(names):
        start = time.perf_counter()
        placement = make_placement(name, inputs.layers, ctx, s.model.num_experts, slots,
                                   seed=seed, time_limit=args.time_limit,
                                   plan_choices=inputs.plan_choices,
                                   progress=_Progress(name, sys.stderr))
        elapsed = time.perf_counter() - start
        cost = objective.plan_cost(ctx, inputs.eval_choices, placement, exact=args.exact)
        rows.append((name, cost, elapsed))
        if written is None:
            written = (placement, cost, elapsed)
    print(_table(rows))
    placement, cost, elapsed = written
    export.write_plan(args.output, placement, fmt=args.format,
                      moe_layer_ids=list(s.model.moe_layer_ids),
                      metadata={"planner": placement.name, "scenario": s.name,
                                "routing": inputs.description, "planning_seconds": elapsed,
                                "predicted": cost.as_dict()})
    print(f"wrote      {args.output} ({placement.name}, {args.format} format)")
    return 0


def _table(rows: list[tuple[str, objective.PlanCost, float]]) -> str:
    header = (f"{'planner':<12} {'cross-node MB':>13} {'max/mean':>9} {'layer us':>9} "
              f"{'a2a us':>8} {'compute us':>10} {'plan s':>7}")
    lines = [header]
    for name, cost, elapsed in rows:
        lines.append(f"{name:<12} {cost.cross_node_bytes / 1e6:>13.2f} "
                     f"{cost.max_over_mean:>9.3f} {cost.layer_time * 1e6:>9.1f} "
                     f"{cost.alltoall * 1e6:>8.1f} {cost.compute * 1e6:>10.1f} {elapsed:>7.2f}")
    lines.append("(per MoE layer, mean over layers; cross-node MB = dispatch + combine)")
    return "\n".join(lines)


class _Progress:
    """Progress of one planner on stderr: redrawn on a terminal, silent otherwise."""

    def __init__(self, name: str, stream) -> None:
        self.name, self.stream = name, stream
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.live:
            return
        filled = round(20 * done / max(total, 1))
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.name:<12} [{'#' * filled}{'.' * (20 - filled)}] "
                          f"{done}/{total} layers{end}")
        self.stream.flush()
