"""``moesim plan SCENARIO -o plan.json``: plan expert placements and compare planners.

Each planner named with ``--planner`` places the scenario's experts (plus ``--replicas``
redundant slots) for its first EP group; all are priced by the same objective
(:mod:`moesim.placement.objective`) and printed side by side: cross-node bytes, max/mean device
load, predicted MoE layer time, planning time. The plan with the lowest predicted MoE layer time
is written to ``-o``.

With ``--failed-devices 3,17`` it re-plans instead (:mod:`moesim.placement.failover`): from the
plan in ``--current`` (else the scenario's placement policy's plan), the experts that lived only
on those devices (EP-local indices ``0..ep-1``) move into redundant live slots; it prints the
slots and bytes of expert weights moved per layer and writes the new plan to ``-o``.

Routing: ``--trace FILE`` (a per-token trace is split in time: plan on the first ``--split``
of its tokens, price on the rest; a counts trace or an engine's load dump is used for both),
else the scenario's own routing (planned and priced on the simulator's sample).

Held-out evaluation: ``--eval-trace HELDOUT.npz`` plans on the whole ``--trace`` (unless
``--split`` is given) and scores every plan on every token of the held-out trace
(:mod:`moesim.placement.heldout`; ``--eval-sample N`` scores N of them): cross-node sends per
token, bytes, max/mean load, predicted layer time. Traces may be ``[layers, tokens, k]`` or
``[tokens, layers, k]`` (``--trace-layout``, a ``layout`` array in the file, or the shape).
With ``-o DIR`` (an existing folder, a name ending in ``/`` or without a suffix) every
planner's plan is written as ``DIR/<planner>.<ext>`` with ``DIR/evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moesim import routing, routing_trace
from moesim.errors import ScenarioError
from moesim.placement import advisor, export, failover, heldout, objective, planner
from moesim.placement.placement import REPLICA_RULES, Placement
from moesim.placement.policies import expected_load, resolve_placement, scenario_choices
from moesim.placement.registry import CLI_PLANNERS, PlacementRequest, placer
from moesim.pricing.context import PricingContext
from moesim.results import check_output_dir, discard_output_dir, output_arg, write_text_atomic
from moesim.spec.hardware import dtype_bytes
from moesim.spec.scenario import Scenario

__all__ = ["PLANNERS", "register", "make_placement", "PlanningInputs", "planning_inputs",
           "parse_failed_devices"]

PLANNERS = CLI_PLANNERS


@dataclass(frozen=True, eq=False)
class PlanningInputs:
    """Routing to plan on and routing to price on, for one EP group."""

    layers: list[planner.LayerRouting]          # planning window, per MoE layer
    plan_choices: list[routing.LayerChoices]    # the planning window as the group's tokens
    eval_choices: list[routing.LayerChoices]    # the pricing window
    description: str
    eval_trace: routing_trace.RoutingTrace | None = None   # the pricing window, per token


def planning_inputs(scenario, ctx: PricingContext, trace_path: str | None = None,
                    split: float = 0.5, layout: str = "auto") -> PlanningInputs:
    """Planning and pricing routing from a trace file or from the scenario's routing."""
    m = scenario.model
    if trace_path is None:
        choices = scenario_choices(scenario, ctx)
        return PlanningInputs(planner.routing_from_choices(choices, m.num_experts), choices,
                              choices, "the scenario's routing (planned and priced on it)")
    path = Path(trace_path)
    if path.suffix.lower() in (".json", ".pt") or _is_load_npz(path):
        trace = export.import_load(path, num_experts=m.num_experts, num_layers=m.num_moe_layers)
    else:
        trace = routing_trace.load_trace(path, m.num_experts, m.num_moe_layers, layout=layout)
    if trace.per_token and split < 1.0:
        train, test = trace.window(0.0, split), trace.window(split, 1.0)
        what = f"{path}: plan on tokens [0, {split:g}), price on [{split:g}, 1)"
    else:
        train = test = trace
        what = f"{path}: planned and priced on the whole trace"
    return PlanningInputs(planner.routing_from_trace(train),
                          objective.trace_choices(ctx, train, seed=scenario.seed),
                          objective.trace_choices(ctx, test, seed=scenario.seed), what,
                          test if test.per_token else None)


def _is_load_npz(path: Path) -> bool:
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return any(k in archive.files for k in ("logical_count", "logical_expert_load"))
    except Exception:  # an unreadable archive is reported by load_trace
        return False


def make_placement(name: str, layers: list[planner.LayerRouting], ctx: PricingContext,
                   num_experts: int, slots_per_device: int, *, seed: int = 0,
                   max_evaluations: int = 100_000, plan_choices: list[routing.LayerChoices] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Placement:
    """Placement of planner ``name`` (one of :data:`PLANNERS`) for the group of ``ctx``."""
    request = PlacementRequest(ctx, layers, num_experts, slots_per_device, seed=seed,
                               max_evaluations=max_evaluations,
                               plan_choices=plan_choices, progress=progress)
    return placer(name, field="--planner")(request)


def register(sub, commands: dict) -> None:
    """Add ``moesim plan`` to the CLI."""
    p = sub.add_parser("plan", help="plan expert placements and compare planners")
    p.add_argument("scenario", help="scenario file, or a shipped scenario's name")
    p.add_argument("-o", "--output", required=True, type=output_arg,
                   help="plan file (.json or .yaml): the best plan; or a folder (existing, "
                        "ending in /, or no suffix): every planner's plan and evaluation.json")
    p.add_argument("--json", action="store_true",
                   help="print the comparison as one JSON document instead of a table")
    p.add_argument("--trace", help="routing trace (.npz/.csv) or engine load dump "
                                   "(SGLang logical_count / vLLM logical_expert_load)")
    p.add_argument("--split", type=float,
                   help="plan on this leading fraction of a per-token trace (default 0.5, or "
                        "1 with --eval-trace)")
    p.add_argument("--eval-trace", help="held-out per-token trace (.npz/.csv): score every "
                                        "plan on all its tokens")
    p.add_argument("--eval-sample", type=int, metavar="N",
                   help="with --eval-trace: score N tokens drawn with the seed (default: all)")
    p.add_argument("--trace-layout", choices=routing_trace.LAYOUTS, default="auto",
                   help="expert_ids layout of --trace/--eval-trace .npz files (default: what "
                        "the file's layout array says, else by shape against the model)")
    p.add_argument("--replica-rule", choices=REPLICA_RULES, default="least_loaded",
                   help="how tokens pick among an expert's replicas when pricing: own GPU, own "
                        "node, then least_loaded (as engines do, default) or even")
    p.add_argument("--replicas", type=int, help="redundant expert slots per EP group")
    p.add_argument("--planner", action="extend", nargs="+", choices=PLANNERS,
                   help="planners to run (one or more, or repeat the option); the plan with the "
                        "lowest predicted layer time is written (default: moesim, eplb, "
                        "contiguous, round_robin)")
    p.add_argument("--format", choices=export.FORMATS, default="moesim", help="plan file format")
    p.add_argument("--seed", type=int, help="planner seed (default: the scenario's)")
    p.add_argument("--max-evaluations", type=int, default=100_000,
                   help="the moesim planner's budget in objective evaluations (deterministic; "
                        "layers past it get EPLB's plan, and the output says so)")
    p.add_argument("--exact", action="store_true",
                   help="price all-to-alls by flow simulation instead of the closed form")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field (repeatable), e.g. --set parallelism.ep=16")
    p.add_argument("--failed-devices", metavar="D,D,...",
                   help="re-plan around these failed devices (EP-local indices 0..ep-1; "
                        "cluster rank r is index r %% ep) instead of planning afresh")
    p.add_argument("--current", help="the plan running now (any supported plan format): "
                                     "prints the rebalance advice (gain, bytes and time to "
                                     "move, steps to pay off); with --failed-devices the plan "
                                     "to repair (default: the scenario's policy's plan)")
    p.add_argument("--stall", choices=advisor.STALLS,
                   help="with --current: how the engine moves weights (blocking: serving "
                        "stops for the whole copy; layerwise: one layer at a time, overlapped "
                        "with steps; default layerwise)")
    p.add_argument("--same-node", action="store_true",
                   help="with --failed-devices: re-home lost experts on the failed devices' "
                        "nodes first (keeps the plan's node grouping, at some cost in balance)")
    commands["plan"] = _cmd_plan


def _cmd_plan(args: argparse.Namespace) -> int:
    from moesim.spec.scenario import load_scenario

    overrides = list(args.set)
    if args.replicas is not None:
        overrides.append(f"placement.redundant_experts={args.replicas}")
    s = load_scenario(args.scenario, overrides)
    if args.split is not None and args.trace is None:
        raise ScenarioError("splits a --trace into plan and score windows; add --trace",
                            field="--split")
    split = args.split if args.split is not None else (1.0 if args.eval_trace else 0.5)
    if not 0.0 < split <= 1.0:
        raise ScenarioError(f"--split={split} must be in (0, 1]", field="--split")
    if args.stall is not None and args.current is None:
        raise ScenarioError("prices moving to a new plan; add --current (the plan running now)",
                            field="--stall")
    if args.eval_sample is not None and args.eval_trace is None:
        raise ScenarioError("samples the tokens of --eval-trace; add --eval-trace",
                            field="--eval-sample")
    if args.eval_sample is not None and args.eval_sample < 1:
        raise ScenarioError(f"--eval-sample={args.eval_sample} must be >= 1 tokens",
                            field="--eval-sample")
    if args.seed is not None and args.seed < 0:
        raise ScenarioError(f"--seed={args.seed} must be >= 0", field="--seed")
    if args.max_evaluations < 0:
        raise ScenarioError(f"--max-evaluations={args.max_evaluations} must be >= 0 (0: EPLB's "
                            "plan for every layer)", field="--max-evaluations")
    if args.failed_devices is not None:
        if args.planner:
            raise ScenarioError("--failed-devices re-plans the current placement; no planner "
                                "runs", field="--planner")
        return _cmd_failover(args, s)
    if args.same_node:
        raise ScenarioError("is only used with --failed-devices", field="--same-node")
    ctx = PricingContext.from_scenario(s)
    seed = s.seed if args.seed is None else args.seed
    out = Path(args.output)
    to_dir = out.is_dir() or args.output.endswith(("/", "\\")) or not out.suffix
    folder, created = check_output_dir(out if to_dir else (out.parent if str(out.parent) else "."),
                                       what="plan folder" if to_dir else "plan file's folder")
    try:
        return _plan(args, s, ctx, seed, split, out, to_dir)
    except BaseException:
        discard_output_dir(folder, created)   # nothing half-made: the folders this run created
        raise


def _plan(args: argparse.Namespace, s: Scenario, ctx: PricingContext, seed: int, split: float,
          out: Path, to_dir: bool) -> int:
    """Plan with each planner, score, write the plans (and advise with ``--current``)."""
    m = s.model
    current = export.load_plan(args.current, s) if args.current is not None else None
    inputs = planning_inputs(s, ctx, args.trace, split, args.trace_layout)
    eval_choices, eval_what = inputs.eval_choices, inputs.description
    drift_trace, drift_choices = inputs.eval_trace, (
        lambda w: objective.trace_choices(ctx, w, seed=s.seed))
    if args.eval_trace is not None:
        held = routing_trace.load_trace(args.eval_trace, m.num_experts, m.num_moe_layers,
                                        m.top_k, layout=args.trace_layout)
        eval_choices = heldout.every_token(ctx, held, sample=args.eval_sample, seed=seed)
        scored = eval_choices[0].num_tokens
        assert held.expert_ids is not None   # a held-out trace has per-token choices
        eval_what = (f"{args.eval_trace}: {scored} of {held.expert_ids.shape[1]} tokens per "
                     f"layer (held out)")
        drift_trace, drift_choices = held, (lambda w: heldout.every_token(ctx, w))
    names = args.planner or ["moesim", "eplb", "contiguous", "round_robin"]
    slots = (m.num_experts + s.placement.redundant_experts) // s.parallelism.ep
    say = (lambda *_: None) if args.json else print
    say(f"scenario   {s.name}: {m.num_moe_layers} MoE layers x {m.num_experts} "
        f"experts, ep={ctx.ep} over {np.unique(ctx.device_node).size} nodes, {slots} slots "
        f"per device, {ctx.algorithm} all-to-all, replicas chosen {args.replica_rule}")
    say(f"routing    {inputs.description}")
    if args.eval_trace is not None:
        say(f"scored on  {eval_what}")
    rows, plans, written = [], {}, None
    for name in dict.fromkeys(names):
        start = time.perf_counter()
        placement = make_placement(name, inputs.layers, ctx, m.num_experts, slots,
                                   seed=seed, max_evaluations=args.max_evaluations,
                                   plan_choices=inputs.plan_choices,
                                   progress=_Progress(name, sys.stderr))
        elapsed = time.perf_counter() - start
        placement = replace(placement, replica_rule=args.replica_rule)
        result = heldout.score(ctx, eval_choices, placement, exact=args.exact)
        rows.append((name, result, elapsed))
        plans[name] = placement
        for note in placement.notes:
            say(f"note       {name}: {note}")
        if written is None or result.cost.layer_time < written[1].cost.layer_time:
            written = (placement, result, elapsed)
    say(_table(rows))
    assert written is not None   # at least one planner ran
    best, result, elapsed = written
    ids = list(m.moe_layer_ids)

    def meta(placement: Placement, result: heldout.HeldOutScore, secs: float) -> dict:
        return {"planner": placement.name, "scenario": s.name, "routing": inputs.description,
                "scored_on": eval_what, "replica_rule": placement.replica_rule,
                "planning_seconds": secs, "predicted": result.as_dict(),
                "notes": list(placement.notes)}

    if to_dir:
        for name, row, secs in rows:
            path = out / f"{name}.json"
            export.write_plan(path, plans[name], fmt=args.format, moe_layer_ids=ids,
                              metadata=meta(plans[name], row, secs))
        summary = {"scenario": s.name, "routing": inputs.description, "scored_on": eval_what,
                   "best": best.name, "format": args.format,
                   "planners": [{"planner": name, **row.as_dict(), "planning_seconds": secs,
                                 "file": f"{name}.json"} for name, row, secs in rows]}
        write_text_atomic(out / "evaluation.json", json.dumps(summary, indent=1) + "\n")
        where = f"{out}/ ({len(rows)} plans and evaluation.json; best {best.name})"
    else:
        export.write_plan(args.output, best, fmt=args.format, moe_layer_ids=ids,
                          metadata=meta(best, result, elapsed))
        where = f"{args.output} ({best.name}, {args.format} format)"
    say(f"wrote      {where}")
    advice = None
    if current is not None:
        current = replace(current, replica_rule=args.replica_rule)
        expert_bytes = float(m.expert_params * dtype_bytes(s.precision.weights))
        windows, passes = _drift_windows(ctx, drift_trace, drift_choices)
        advice = advisor.advise(ctx, current, best, eval_choices, expert_bytes,
                                stall=args.stall or "layerwise", exact=args.exact,
                                windows=windows,
                                passes_per_window=passes)
        say(_advice_text(args.current, best.name, advice))
    if args.json:
        doc = {"scenario": s.name, "routing": inputs.description, "scored_on": eval_what,
               "written": str(args.output), "best": best.name, "format": args.format,
               "notes": list(best.notes),
               "planners": [{"planner": name, **row.as_dict(), "planning_seconds": secs}
                            for name, row, secs in rows]}
        if advice is not None:
            doc["advice"] = advice.as_dict()
        print(json.dumps(doc, indent=1))
    return 0


# Consecutive time windows of the pricing trace the advisor measures the gain's fading on.
DRIFT_WINDOWS = 4


def _drift_windows(ctx: PricingContext, trace: routing_trace.RoutingTrace | None,
                   choices: Callable[[routing_trace.RoutingTrace], list[routing.LayerChoices]]
                   ) -> tuple[list[list[routing.LayerChoices]] | None, float]:
    """The pricing trace cut into :data:`DRIFT_WINDOWS` consecutive windows (each as the
    group's tokens) and the passes one window lasts (its tokens over the group's tokens per
    pass); ``(None, 0)`` without a per-token trace long enough."""
    if trace is None or trace.expert_ids is None or trace.expert_ids.shape[1] < DRIFT_WINDOWS:
        return None, 0.0
    windows = [trace.window(i / DRIFT_WINDOWS, (i + 1) / DRIFT_WINDOWS)
               for i in range(DRIFT_WINDOWS)]
    per_pass = ctx.ep * ctx.tokens_per_source
    passes = trace.expert_ids.shape[1] / DRIFT_WINDOWS / per_pass
    return [choices(w) for w in windows], passes


def _advice_text(current: str, name: str, a: advisor.Advice) -> str:
    payoff = ("never" if a.payoff_passes == float("inf") else f"after {a.payoff_passes:.0f}")
    lines = [
        f"advice     from {current} to the {name} plan:",
        f"  MoE time per pass   {a.current_time * 1e6:.1f} us -> {a.new_time * 1e6:.1f} us "
        f"(gain {a.gain * 1e6:+.1f} us per micro-batch forward)",
        f"  weights to move     {a.moved_slots} slots, {a.moved_bytes / 1e9:.3f} GB over the "
        f"network, {a.move_time * 1e3:.2f} ms over the scenario's links"]
    d = a.decay
    if d is not None:
        fade = ("does not fade" if d.tau == float("inf") else
                f"fades as exp(-t / {d.tau:,.0f} passes) from {d.g0 * 1e6:+.1f} us")
        lines.append(f"  drift               gain per window of {d.passes_per_window:,.1f} "
                     f"passes: {', '.join(f'{g * 1e6:+.1f}' for g in d.gains)} us; {fade}")
        payoff += " passes at the trace's drift rate"
    else:
        payoff += " passes" + (" (no gain)" if payoff == "never" else "")
    lines.append(f"  stall ({a.stall_model:<9})  {a.stall * 1e3:.2f} ms; pays off {payoff}")
    return "\n".join(lines)


def _cmd_failover(args: argparse.Namespace, s) -> int:
    """``moesim plan --failed-devices``: re-plan the current placement around failed devices."""

    ctx = PricingContext.from_scenario(s)
    failed = parse_failed_devices(args.failed_devices, ctx.ep)
    if args.current is not None:
        current, origin = export.load_plan(args.current, s), f"plan {args.current}"
    else:
        current = resolve_placement(s, ctx)  # as ``moesim run`` resolves it
        origin = f"placement policy {s.placement.policy!r}"
    if args.trace is None:
        load, routing_what = expected_load(s, ctx.tokens_per_source), "the scenario's routing"
    else:
        inputs = planning_inputs(s, ctx, args.trace, args.split or 0.5, args.trace_layout)
        load = np.stack([info.load for info in inputs.layers])
        routing_what = inputs.description
    m = s.model
    expert_bytes = float(m.expert_params * dtype_bytes(s.precision.weights))
    plan = failover.replan_failed(current, failed, load, expert_bytes,
                                  ctx.device_node if args.same_node else None)
    nodes = sorted({int(ctx.device_node[d]) for d in failed})
    print(f"scenario   {s.name}: {m.num_moe_layers} MoE layers x {m.num_experts} experts, "
          f"ep={ctx.ep}, {current.slots_per_device} slots per device")
    print(f"current    {origin}")
    print(f"routing    {routing_what}")
    print(f"failed     EP devices {','.join(map(str, failed))} (node {','.join(map(str, nodes))}); "
          f"donor replicas: {'same node first, then ' if args.same_node else ''}"
          "least load per replica")
    print(_failover_table(current, plan, load, list(m.moe_layer_ids), expert_bytes))
    print(f"total      moved {plan.total_moved_slots} slots = {plan.moved_bytes / 1e9:.3f} GB of "
          f"expert weights ({m.expert_params / 1e6:.2f}M params x "
          f"{dtype_bytes(s.precision.weights):g} B {s.precision.weights} per expert); "
          f"{sum(map(len, plan.lost_experts))} experts left without a slot")
    lost = {str(i): experts for i, experts in enumerate(plan.lost_experts) if experts}
    export.write_plan(args.output, plan.placement, fmt=args.format,
                      moe_layer_ids=list(m.moe_layer_ids),
                      metadata={"scenario": s.name, "current": origin,
                                "failover": {"failed_devices": list(plan.failed),
                                             "moved_slots": plan.total_moved_slots,
                                             "moved_bytes": plan.moved_bytes,
                                             "lost_experts": lost}})
    print(f"wrote      {args.output} ({plan.placement.name}, {args.format} format)")
    return 0


def parse_failed_devices(text: str, ep: int) -> list[int]:
    """``"3,17"`` as sorted unique EP-local device indices, each in ``0..ep-1``, at least one
    device left alive; errors name ``--failed-devices`` and the allowed range."""
    allowed = f"comma-separated EP-local device indices in 0..{ep - 1}"
    failed = set()
    for item in text.split(","):
        try:
            device = int(item.strip())
        except ValueError:
            raise ScenarioError(f"{item.strip()!r} is not an integer; expected {allowed}",
                                field="--failed-devices") from None
        if not 0 <= device < ep:
            raise ScenarioError(f"device {device} is out of range; expected {allowed} (cluster "
                                f"rank r is EP-local index r % {ep})", field="--failed-devices")
        if device in failed:
            raise ScenarioError(f"device {device} is listed twice; expected {allowed}",
                                field="--failed-devices")
        failed.add(device)
    if len(failed) == ep:
        raise ScenarioError(f"all {ep} devices of the EP group failed; at least one must stay "
                            "alive", field="--failed-devices")
    return sorted(failed)


def _failover_table(before: Placement, plan: failover.FailoverPlan, load: np.ndarray,
                    block_ids: list[int], expert_bytes: float) -> str:
    """Per MoE layer: experts lost, re-homed and dropped, slots and MB moved, and max/mean
    live-device load before the failure and after the re-plan."""
    healthy = failover.live_device_load(before, [], load)
    after = failover.live_device_load(plan.placement, plan.failed, load)
    alive = np.setdiff1d(np.arange(before.ep), plan.failed)
    lines = [f"{'layer':>5} {'block':>5} {'lost':>5} {'moved':>5} {'dropped':>7} "
             f"{'moved MB':>9} {'max/mean before -> after':>25}"]
    for i in range(before.num_layers):
        dropped = len(plan.lost_experts[i])
        moved = int(plan.moved_slots[i])
        ratio = [h.max() / max(h.mean(), 1e-300) for h in (healthy[i], after[i][alive])]
        lines.append(f"{i:>5} {block_ids[i]:>5} {moved + dropped:>5} {moved:>5} {dropped:>7} "
                     f"{moved * expert_bytes / 1e6:>9.1f} {ratio[0]:>15.3f} -> {ratio[1]:.3f}")
    lines.append("(lost: experts with no live copy; moved: re-homed into a redundant slot, one "
                 "copy each; dropped: no redundant slot left, their tokens are dropped)")
    return "\n".join(lines)


def _table(rows: list[tuple[str, heldout.HeldOutScore, float]]) -> str:
    header = (f"{'planner':<12} {'sends/token':>11} {'cross-node MB':>13} {'max/mean':>9} "
              f"{'layer us':>9} {'a2a us':>8} {'compute us':>10} {'plan s':>7}")
    lines = [header]
    for name, result, elapsed in rows:
        cost = result.cost
        lines.append(f"{name:<12} {result.sends_per_token:>11.3f} "
                     f"{cost.cross_node_bytes / 1e6:>13.2f} "
                     f"{cost.max_over_mean:>9.3f} {cost.layer_time * 1e6:>9.1f} "
                     f"{cost.alltoall * 1e6:>8.1f} {cost.compute * 1e6:>10.1f} {elapsed:>7.2f}")
    lines.append("(per MoE layer, mean over layers; sends/token = other nodes a token's dispatch "
                 "reaches; cross-node MB = dispatch + combine)")
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
