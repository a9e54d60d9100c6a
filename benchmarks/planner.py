"""Expert placement planners compared: contiguous, round-robin, EPLB (two variants) and moesim.

For each setting: a routing trace (synthetic with skew, co-activation and drift, or the recorded
stdlib MoE trace), split in time; every planner plans on the first half and is scored on every
token of the second (held out, :mod:`moesim.placement.heldout`): cross-node sends per token (vs
EPLB's hierarchical policy), max/mean device load, and the predicted MoE layer time (dispatch +
combine by flow simulation, plus the slowest device's expert GEMM), with the planning time. The
recorded trace is split once per text domain (its tokens rotated to start at that domain), so
each domain is held out in half of the splits; its figures are pooled over the splits.
Replicas are chosen as engines do (own GPU, own node, least loaded); the ``even`` column is the
max/mean with each expert's tokens split evenly over its replicas instead, so the gap between the
two is the balance a plan gets from the engine levelling loads over replicas at run time. Then
the planning time of 256 experts x 58 layers on 64 GPUs.

    python benchmarks/planner.py           # full table (a few minutes on 2 cores)
    python benchmarks/planner.py --tiny    # seconds: small settings, closed-form pricing
    python benchmarks/planner.py --seeds 3 # mean and range over 3 trace seeds, a line a setting
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim import routing_trace  # noqa: E402
from moesim.placement import heldout, objective, planner  # noqa: E402
from moesim.placement.cli import make_placement  # noqa: E402
from moesim.placement.placement import Placement  # noqa: E402
from moesim.placement.traces import synthetic_groups, synthetic_trace  # noqa: E402
from moesim.pricing.context import PricingContext  # noqa: E402
from moesim.spec.scenario import load_scenario  # noqa: E402

PLANNERS = ("contiguous", "round_robin", "eplb", "eplb_global", "moesim")
GROUPS = 8                   # co-activation groups of the synthetic traces
REAL_TRACE = REPO / "scenarios" / "traces" / "stdlib-moe-32e-top4.npz"
TIME_GOAL = 0.15             # the layer-time goal against the faster EPLB policy


@dataclass(frozen=True)
class Setting:
    name: str
    scenario: str            # shipped scenario file
    overrides: tuple[str, ...]
    trace: str               # "synthetic" or a trace path
    strength: float = 2.0    # co-activation strength (synthetic)
    drift: float = 0.1       # popularity drift between the halves (synthetic)
    tokens: int = 8192       # trace tokens (both halves)


def _dsv3(nodes: int, replicas: int, mode: str, layers: int) -> tuple[str, ...]:
    """DeepSeek-V3 serving on ``nodes`` nodes of 8: decode with the scenario's DeepEP
    low-latency kernels, prefill with DeepEP's normal kernels (one RDMA copy per token and
    destination node, then NVLink), as DeepEP's README assigns them."""
    ep = 8 * nodes
    common = (f"cluster.nodes={nodes}", f"parallelism.dp={ep}", f"parallelism.ep={ep}",
              f"placement.redundant_experts={replicas}", f"model.num_layers={3 + layers}")
    if mode == "decode":
        return common + (f"workload.global_batch={ep * 128}",)
    return common + (f"workload.global_batch={ep}", "workload.mode=prefill",
                     "workload.seq_len=4096", "workload.micro_batch=1", "workload.context_len=0",
                     "communication.alltoall=deepep_normal")


def _mixtral(layers: int) -> tuple[str, ...]:
    return ("cluster.topology=fat_tree", "cluster.nodes=2", "cluster.devices_per_node=4",
            "parallelism.dp=8", "parallelism.ep=8", "placement.redundant_experts=8",
            "communication.alltoall=hierarchical", f"model.num_layers={layers}")


def _real(trace: routing_trace.RoutingTrace) -> tuple[str, ...]:
    """Mixtral-sized experts with the trace's expert count and k, EP16 over 4 nodes of 4."""
    return ("cluster.topology=fat_tree", "cluster.nodes=4", "cluster.devices_per_node=4",
            "parallelism.dp=16", "parallelism.ep=16", "workload.global_batch=1024",
            "placement.redundant_experts=16", "communication.alltoall=hierarchical",
            f"model.num_experts={trace.num_experts}",
            f"model.top_k={trace.expert_ids.shape[2]}", f"model.num_layers={trace.num_layers}")


def load_recorded(path: Path) -> routing_trace.RoutingTrace:
    """The recorded trace's ``expert_ids``. Tokens are in recording order, domain by domain,
    so the second half is text of other stdlib packages than the first: a real drift."""
    with np.load(path, allow_pickle=False) as archive:
        ids = archive["expert_ids"].astype(np.int32)
        experts = int(archive["num_experts"]) if "num_experts" in archive.files \
            else int(ids.max()) + 1
    return routing_trace.RoutingTrace(str(path), experts, expert_ids=ids)


def domain_starts(path: Path) -> np.ndarray:
    """First token of each text domain of a recorded trace (its ``domain`` array, one block a
    domain in recording order); ``[0]`` without one."""
    with np.load(path, allow_pickle=False) as archive:
        if "domain" not in archive.files:
            return np.zeros(1, dtype=np.int64)
        domain = np.asarray(archive["domain"])
    return np.flatnonzero(np.r_[True, domain[1:] != domain[:-1]])


def domain_splits(trace: routing_trace.RoutingTrace, starts: np.ndarray
                  ) -> list[tuple[routing_trace.RoutingTrace, routing_trace.RoutingTrace]]:
    """(plan, held-out) halves of the trace, one pair per domain: the tokens rotated to start
    at that domain, the first half planned on and the second scored, so every domain is held
    out in half of the splits (split by source file, not only by one cut in time)."""
    out = []
    for start in starts:
        ids = np.roll(trace.expert_ids, -int(start), axis=1)
        rotated = replace(trace, path=f"{trace.path}[from token {start}]", expert_ids=ids)
        out.append((rotated.window(0.0, 0.5), rotated.window(0.5, 1.0)))
    return out


def settings(tiny: bool) -> list[Setting]:
    dsv3 = "scenarios/deepseek-v3-decode-ep.yaml"
    mixtral = "scenarios/mixtral-8x7b-infer-1node.yaml"
    if tiny:
        return [Setting("dsv3-like decode, 64 experts, 32 GPUs/4 nodes (tiny)", dsv3,
                        _dsv3(4, 32, "decode", 2) + ("model.num_experts=64",), "synthetic",
                        tokens=4096),
                Setting("mixtral-like 8 GPUs/2 nodes (tiny)", mixtral, _mixtral(2),
                        "synthetic", tokens=2048)]
    layers = 12
    out = [Setting("dsv3-decode 32 GPUs/4 nodes", dsv3, _dsv3(4, 32, "decode", layers),
                   "synthetic"),
           Setting("dsv3-decode 64 GPUs/8 nodes", dsv3, _dsv3(8, 64, "decode", layers),
                   "synthetic"),
           Setting("dsv3-prefill 32 GPUs/4 nodes", dsv3, _dsv3(4, 32, "prefill", layers),
                   "synthetic", tokens=16384),
           Setting("dsv3-prefill 64 GPUs/8 nodes", dsv3, _dsv3(8, 64, "prefill", layers),
                   "synthetic", tokens=32768),
           Setting("dsv3-prefill 64/8, drift 0", dsv3, _dsv3(8, 64, "prefill", layers),
                   "synthetic", drift=0.0, tokens=32768),
           Setting("dsv3-prefill 64/8, no co-activation", dsv3,
                   _dsv3(8, 64, "prefill", layers), "synthetic", strength=0.0, tokens=32768),
           Setting("mixtral-like decode 8 GPUs/2 nodes", mixtral, _mixtral(32), "synthetic",
                   tokens=16384)]
    if REAL_TRACE.exists():
        out.append(Setting("recorded stdlib MoE trace, 16 GPUs/4 nodes", mixtral,
                           _real(load_recorded(REAL_TRACE)), str(REAL_TRACE)))
    return out


def run_setting(setting: Setting, *, exact: bool, seed: int = 0) -> list[tuple]:
    s = load_scenario(REPO / setting.scenario, list(setting.overrides))
    m = s.model
    ctx = PricingContext.from_scenario(s)
    if setting.trace == "synthetic":
        trace = synthetic_trace(m.num_experts, m.num_moe_layers, setting.tokens, m.top_k,
                                coactivation_groups=GROUPS,
                                coactivation_strength=setting.strength,
                                drift=setting.drift, seed=seed)
        splits = [(trace.window(0.0, 0.5), trace.window(0.5, 1.0))]
    else:
        path = Path(setting.trace)
        splits = domain_splits(load_recorded(path), domain_starts(path))
    slots = (m.num_experts + s.placement.redundant_experts) // s.parallelism.ep
    groups = None if setting.trace != "synthetic" else synthetic_groups(
        m.num_experts, m.num_moe_layers, coactivation_groups=GROUPS,
        coactivation_strength=setting.strength, seed=seed)
    scored: dict[str, list[tuple]] = {}     # planner -> (score, seconds, even) per split
    for train, test in splits:
        layers = planner.routing_from_trace(train)
        plan_choices = objective.trace_choices(ctx, train, seed=seed)
        eval_choices = heldout.every_token(ctx, test)
        for name in PLANNERS:
            start = time.perf_counter()
            placement = make_placement(name, layers, ctx, m.num_experts, slots, seed=seed,
                                       plan_choices=plan_choices)
            elapsed = time.perf_counter() - start
            scored.setdefault(name, []).append((
                heldout.score(ctx, eval_choices, placement, exact=exact), elapsed,
                even_balance(ctx, eval_choices, placement)))
            truth = None if name != "moesim" else true_groups(groups, placement, layers, ctx,
                                                                slots)
            if truth is not None:
                scored.setdefault("true groups", []).append((
                    heldout.score(ctx, eval_choices, truth, exact=exact), 0.0,
                    even_balance(ctx, eval_choices, truth)))
    return [(name, *pooled(runs)) for name, runs in scored.items()]


def pooled(splits: list[tuple]) -> tuple:
    """One planner's (score, planning seconds, even balance) over several splits: sends,
    planning time and even balance averaged, the layer costs of every split pooled (so the
    table's means are over layers x splits)."""
    scores = [score for score, _, _ in splits]
    layers = tuple(c for score in scores for c in score.cost.layers)
    score = heldout.HeldOutScore(float(np.mean([x.sends_per_token for x in scores])),
                                 objective.PlanCost(layers))
    return (score, float(np.mean([e for _, e, _ in splits])),
            float(np.mean([b for _, _, b in splits])))


def even_balance(ctx: PricingContext, choices, placement: Placement) -> float:
    """Held-out max/mean device load with every expert's tokens split evenly over its replicas
    (own GPU, then own node, else all), no runtime choice of the least loaded: how much of a
    plan's balance comes from the engine levelling loads over replicas as they arrive."""
    even = replace(placement, replica_rule="even")
    return objective.plan_cost(ctx, choices, even, exact=False).max_over_mean


def true_groups(groups: np.ndarray | None, moesim: Placement, layers, ctx, slots: int
                ) -> Placement | None:
    """Reference plan: the trace generator's own co-activation groups dealt to the nodes
    (group g on node g mod N), the hottest of the experts moesim's plan holds on every node held
    everywhere too (as many as the nodes' slots allow), and EPLB's steps inside each node (as
    moesim's step 3). What a planner that knew the structure would send across the network;
    None if the groups alone do not fit the nodes."""
    if groups is None:
        return None
    shape = planner.ClusterShape(moesim.num_experts, ctx.device_node, slots)
    table = np.empty_like(moesim.slot_expert)
    for layer, info in enumerate(layers):
        part = groups[layer] % shape.num_nodes
        if np.bincount(part).max() > shape.slots_per_node:
            return None
        holders = np.zeros((moesim.num_experts, shape.num_nodes), dtype=bool)
        holders[moesim.slot_expert[layer], shape.device_node[:, None]] = True
        everywhere = np.flatnonzero(holders.all(axis=1))
        everywhere = everywhere[np.argsort(-info.load[everywhere], kind="stable")]
        # Each everywhere-expert frees a slot on its group's node and takes one on every node.
        while everywhere.size:
            trial = part.copy()
            trial[everywhere] = -1
            per_node = np.bincount(trial[trial >= 0], minlength=shape.num_nodes)
            if (per_node + everywhere.size <= shape.slots_per_node).all():
                part = trial
                break
            everywhere = everywhere[:-1]
        table[layer] = planner.fill_nodes(part, info.load, shape)
    return Placement(table, moesim.num_experts, name="true groups")


def planning_time(seed: int = 0) -> list[tuple[float, float]]:
    """(wall, CPU) seconds to plan 256 experts x 58 layers on 64 GPUs (8 nodes): moesim, EPLB.
    CPU seconds show what the wall clock would be on an idle core (the machine is shared)."""
    s = load_scenario(REPO / "scenarios/deepseek-v3-decode-ep.yaml",
                      list(_dsv3(8, 64, "decode", 58)))
    ctx = PricingContext.from_scenario(s)
    trace = synthetic_trace(256, 58, 4096, 8, coactivation_groups=8, drift=0.0, seed=seed)
    layers = planner.routing_from_trace(trace)
    choices = objective.trace_choices(ctx, trace, seed=seed)
    times = []
    for name in ("moesim", "eplb"):
        start, cpu = time.perf_counter(), time.process_time()
        make_placement(name, layers, ctx, 256, 5, seed=seed, plan_choices=choices)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


@dataclass(frozen=True)
class Summary:
    """moesim against EPLB in one setting: layer time vs the faster EPLB policy (%), sends/token
    vs EPLB hierarchical, max/mean of moesim and of the better balanced EPLB policy."""

    time_change: float
    sends_ratio: float
    balance: float
    eplb_balance: float


def faster_eplb(rows: list[tuple]) -> heldout.HeldOutScore:
    """The held-out score of the EPLB policy (hierarchical or global) with the shorter layer."""
    return min((r for n, r, _, _ in rows if n.startswith("eplb")),
               key=lambda r: r.cost.layer_time)


def summarize(rows: list[tuple]) -> Summary:
    eplbs = [r.cost for n, r, _, _ in rows if n.startswith("eplb")]
    hier = next(r for n, r, _, _ in rows if n == "eplb")
    moesim = next(r for n, r, _, _ in rows if n == "moesim")
    return Summary(100 * (moesim.cost.layer_time / faster_eplb(rows).cost.layer_time - 1),
                   moesim.sends_per_token / max(hier.sends_per_token, 1e-12),
                   moesim.cost.max_over_mean, min(c.max_over_mean for c in eplbs))


def table(name: str, rows: list[tuple]) -> str:
    best_eplb = faster_eplb(rows).cost.layer_time
    hier = next(r for n, r, _, _ in rows if n == "eplb")
    lines = [f"\n{name}",
             f"  {'planner':<12} {'sends/tok':>9} {'vs hier':>7} {'cross MB':>9} {'max/mean':>9} "
             f"{'even':>6} {'layer us':>9} {'a2a us':>8} {'GEMM us':>8} {'vs EPLB':>8} "
             f"{'plan s':>7}"]
    for planner_name, r, elapsed, even in rows:
        cost = r.cost
        lines.append(f"  {planner_name:<12} {r.sends_per_token:>9.3f} "
                     f"{r.sends_per_token / max(hier.sends_per_token, 1e-12):>6.2f}x "
                     f"{cost.cross_node_bytes / 1e6:>9.2f} {cost.max_over_mean:>9.3f} {even:>6.3f} "
                     f"{cost.layer_time * 1e6:>9.1f} {cost.alltoall * 1e6:>8.1f} "
                     f"{cost.compute * 1e6:>8.1f} "
                     f"{100 * (cost.layer_time / best_eplb - 1):>+7.1f}% {elapsed:>7.2f}")
    moesim = next(r for n, r, _, _ in rows if n == "moesim")
    truth = next((r for n, r, _, _ in rows if n == "true groups"), None)
    summary = summarize(rows)
    lines.append(f"  moesim vs best EPLB: layer time {summary.time_change:+.1f}%, sends/token "
                 f"{summary.sends_ratio:.2f}x EPLB hierarchical, balance {summary.balance:.3f} "
                 f"vs {summary.eplb_balance:.3f}")
    lines.append(network_line(rows))
    if truth is not None:
        lines.append(f"  sends/token: moesim {moesim.sends_per_token:.3f}, the generator's own "
                     f"groups {truth.sends_per_token:.3f}")
    return "\n".join(lines)


def network_line(rows: list[tuple]) -> str:
    """How much of the faster EPLB plan's layer time is all-to-all, and so how much shorter the
    all-to-all must get for a ``TIME_GOAL`` shorter layer with the expert GEMM unchanged (none
    can where the all-to-all is under ``TIME_GOAL`` of the layer); moesim's all-to-all and
    sends/token against that plan's."""
    eplb = faster_eplb(rows)
    moesim = next(r for n, r, _, _ in rows if n == "moesim")
    share = eplb.cost.alltoall / eplb.cost.layer_time
    cut = 1 - moesim.cost.alltoall / eplb.cost.alltoall
    sends = moesim.sends_per_token / max(eplb.sends_per_token, 1e-12)
    need = (f"a {TIME_GOAL:.0%} shorter layer needs it {TIME_GOAL / share:.0%} shorter"
            if share > TIME_GOAL else
            f"under {TIME_GOAL:.0%}, so no all-to-all cut gives a {TIME_GOAL:.0%} shorter layer")
    return (f"  network: all-to-all {share:.0%} of the faster EPLB plan's layer time; {need}; "
            f"moesim's all-to-all {-cut:+.0%} against it, at {sends:.2f}x its sends/token")


def seeds_line(name: str, summaries: list[Summary]) -> str:
    """The summaries of one setting over several trace seeds: mean and range of each figure."""
    def spread(values: list[float], fmt: str) -> str:
        return (f"{np.mean(values):{fmt}} ({min(values):{fmt}} .. {max(values):{fmt}})")
    return (f"{name} over {len(summaries)} seeds: layer time "
            f"{spread([s.time_change for s in summaries], '+.1f')} %, sends "
            f"{spread([s.sends_ratio for s in summaries], '.3f')} x hierarchical, balance gap "
            f"{spread([s.balance - s.eplb_balance for s in summaries], '+.3f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="trace seeds seed .. seed+N-1 per setting: with N > 1 one line per "
                             "setting, the mean and range of moesim's figures (a single trace "
                             "moves them by a few percent)")
    parser.add_argument("--only", help="run only the settings whose name contains this")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be >= 1")
    print("Held-out: plan on the first half of each trace, score on every token of the second "
          "(the recorded trace: pooled over one split per text domain).")
    print("layer us = dispatch + combine + slowest device's expert GEMM, mean over MoE layers"
          + (" (closed-form all-to-all)" if args.tiny else " (flow-simulated all-to-all)"))
    for setting in settings(args.tiny):
        if args.only and args.only not in setting.name:
            continue
        if args.seeds > 1:
            print(seeds_line(setting.name, [
                summarize(run_setting(setting, exact=not args.tiny, seed=args.seed + i))
                for i in range(args.seeds)]), flush=True)
            continue
        rows = run_setting(setting, exact=not args.tiny, seed=args.seed)
        print(table(setting.name, rows), flush=True)
    if not args.tiny and not args.only:
        (moesim_s, moesim_cpu), (eplb_s, eplb_cpu) = planning_time(args.seed)
        print(f"\nplanning 256 experts x 58 layers on 64 GPUs: moesim {moesim_s:.2f} s wall "
              f"({moesim_cpu:.2f} s CPU), EPLB {eplb_s:.2f} s wall ({eplb_cpu:.2f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
