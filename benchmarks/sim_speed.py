"""Simulator speed: wall time, CPU time, peak memory and events per second, and how they scale.

Tables: every shipped scenario (``scenarios/*.yaml``); DeepSeek-V3 training at 256 ... 4096 GPUs
and with 16 ... 61 layers; Mixtral 8x7B training on 64 GPUs. Then whether wall time grows no
faster than linearly in devices x layers, and (``--profile``) where the time of the 2,048-GPU
DeepSeek-V3 step goes.

    python benchmarks/sim_speed.py              # full tables (about two minutes on 2 cores)
    python benchmarks/sim_speed.py --tiny       # a few seconds: small cases (the test suite)
    python benchmarks/sim_speed.py --profile    # plus a cProfile summary
    python benchmarks/sim_speed.py --repeat 3   # each case 3 times, the fastest reported

How it measures. Each case runs in a forked child of this process (imports done once, before),
so that its memory is its own: ``peak MB`` is the child's maximum resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the interpreter and the imported
modules, about the ``base MB`` column), ``+sim MB`` the growth over that base. ``wall s`` is
``time.perf_counter`` around :func:`moesim.assembly.simulate` (topology, routing, flows,
pipeline and report; not loading the YAML, not writing results or the trace); ``cpu s`` is
``time.process_time`` over the same span. On a shared machine wall time includes waiting for a
core and CPU time does not, so scaling is judged on CPU time. ``events`` = the pipeline's SimPy
events (``Result.events``) + the flow model's rate recomputations (``FlowResult.events`` of every
all-to-all it simulated; a combine mirrored from its dispatch adds none); ``events/s`` divides by
CPU seconds.

DeepSeek-V3 family (:func:`deepseek_at`): weak scaling around the published 2,048-GPU setup.
EP64 over 8 nodes and 120 micro-batches per step throughout; PP = min(16, GPUs / 64) and
DP = GPUs / PP, so 2,048 GPUs with 61 layers is exactly ``scenarios/deepseek-v3-train-2048.yaml``.
Below 1,024 GPUs the model does not fit in 80 GB, so the family sets ``memory.on_overflow: warn``
(what is timed is the simulator, not a feasible plan).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import pstats
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim import network, routing  # noqa: E402
from moesim.assembly import simulate  # noqa: E402
from moesim.spec.scenario import load_scenario  # noqa: E402

SCENARIOS = REPO / "scenarios"
DEEPSEEK = SCENARIOS / "deepseek-v3-train-2048.yaml"
MIXTRAL = SCENARIOS / "mixtral-8x7b-train-4node.yaml"
SHIPPED_TINY = ("tiny-cpu.yaml", "mixtral-8x7b-infer-1node.yaml")


@dataclass(frozen=True)
class Case:
    """One simulation to time: a scenario file with ``--set`` style overrides."""

    table: str                      # which table it belongs to
    name: str
    scenario: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    """What one case measured."""

    table: str
    name: str
    devices: int
    layers: int
    moe_layers: int
    wall_s: float
    cpu_s: float
    peak_mb: float
    base_mb: float
    events: int
    step_time_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.cpu_s if self.cpu_s > 0 else 0.0


def deepseek_at(devices: int, num_layers: int | None = None) -> tuple[str, ...]:
    """Overrides of ``deepseek-v3-train-2048.yaml`` for ``devices`` GPUs (a multiple of 64, at
    least 256) and ``num_layers`` layers (default the model's 61; at least the 16 pipeline
    stages from 1,024 GPUs up)."""
    if devices % 64 or devices < 256:
        raise ValueError(f"devices={devices} must be a multiple of 64 and >= 256")
    pp = min(16, devices // 64)
    dp = devices // pp
    # Fewer layers than the shipped 61: one block per stage at 16, so the ends are not counted.
    layers = () if num_layers is None else (f"model.num_layers={num_layers}",
                                            "parallelism.account_for_embedding=false",
                                            "parallelism.account_for_loss=false")
    return (f"cluster.nodes={devices // 8}", f"parallelism.pp={pp}", f"parallelism.dp={dp}",
            f"workload.global_batch={120 * dp}", "memory.on_overflow=warn", *layers)


def mixtral_at(devices: int, num_layers: int = 32) -> tuple[str, ...]:
    """Overrides of ``mixtral-8x7b-train-4node.yaml``: PP4 x DP(devices/4) on devices/8 nodes
    (devices a multiple of 32, for EP8), 32 micro-batches per step."""
    dp = devices // 4
    return (f"cluster.nodes={devices // 8}", f"parallelism.dp={dp}",
            f"workload.global_batch={32 * dp}", f"model.num_layers={num_layers}")


def cases(tiny: bool) -> list[Case]:
    """The cases of the full run, or of ``--tiny`` (small ones only)."""
    shipped = sorted(SCENARIOS.glob("*.yaml"))
    if tiny:
        shipped = [p for p in shipped if p.name in SHIPPED_TINY]
    out = [Case("shipped", p.stem, p) for p in shipped]
    if tiny:   # the same tables, on Mixtral at a few GPUs and layers
        out += [Case("devices", f"mixtral-8x7b-{d}gpu", MIXTRAL, mixtral_at(d, 8))
                for d in (32, 64)]
        out += [Case("layers", f"mixtral-8x7b-{n}layers", MIXTRAL, mixtral_at(32, n))
                for n in (4, 8)]
        return out
    out.append(Case("models", "mixtral-8x7b-64gpu", MIXTRAL, mixtral_at(64)))
    out += [Case("devices", f"deepseek-v3-{d}gpu", DEEPSEEK, deepseek_at(d))
            for d in (256, 512, 1024, 2048, 4096)]
    out += [Case("layers", f"deepseek-v3-{n}layers", DEEPSEEK, deepseek_at(2048, n))
            for n in (16, 32, 48)]
    return out


# ----------------------------------------------------------------------------- measuring


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def measure(case: Case) -> Row:
    """Time one case in this process (call it in a fresh child for a meaningful peak)."""
    base = _rss_mb()
    scenario = load_scenario(case.scenario, list(case.overrides))
    flow_events = 0
    simulate_flows = network.simulate_flows

    def counting(*args, **kwargs):
        nonlocal flow_events
        result = simulate_flows(*args, **kwargs)
        flow_events += result.events
        return result

    network.simulate_flows = counting
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        sim = simulate(scenario)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        network.simulate_flows = simulate_flows
    r = sim.result
    return Row(case.table, case.name, r.devices, scenario.model.num_layers,
               scenario.model.num_moe_layers, wall, cpu, _rss_mb(), base,
               r.events + flow_events, r.step_time)


def _child(case: Case, conn) -> None:
    try:
        conn.send(("ok", asdict(measure(case))))
    except BaseException as exc:   # report any failure to the parent, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_in_child(case: Case) -> Row:
    """:func:`measure` in a forked child, so that ``peak_mb`` is this case's own."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, child))
    proc.start()
    child.close()
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{case.name}: {payload}")
    return Row(**payload)


# ----------------------------------------------------------------------------- scaling


def growth_ratios(rows: Sequence[Row], key: str = "cpu_s") -> list[float]:
    """Per row: (time / first row's time) / (size / first row's size), size = devices x MoE
    layers (a dense layer costs the simulator next to nothing: no routing, no flows).

    At most 1 for every row means the time grew no faster than linearly in the size.
    """
    first = rows[0]
    size0 = first.devices * first.moe_layers
    t0 = getattr(first, key)
    return [(getattr(r, key) / t0) / (r.devices * r.moe_layers / size0) for r in rows]


def _table(rows: Sequence[Row], scaling: bool) -> str:
    head = (f"{'case':30s} {'GPUs':>5s} {'layers':>6s} {'MoE':>4s} {'wall s':>7s} {'cpu s':>6s} "
            f"{'peak MB':>7s} {'+sim MB':>7s} {'events':>8s} {'events/s':>9s} {'step s':>7s}")
    if scaling:
        head += f" {'growth':>6s}"
    lines = [head, "-" * len(head)]
    ratios = growth_ratios(rows) if scaling else [None] * len(rows)
    for r, ratio in zip(rows, ratios):
        line = (f"{r.name:30s} {r.devices:5d} {r.layers:6d} {r.moe_layers:4d} {r.wall_s:7.2f} "
                f"{r.cpu_s:6.2f} "
                f"{r.peak_mb:7.0f} {r.peak_mb - r.base_mb:7.0f} {r.events:8d} "
                f"{r.events_per_s:9.0f} {r.step_time_s:7.3g}")
        if ratio is not None:
            line += f" {ratio:6.2f}"
        lines.append(line)
    return "\n".join(lines)


TITLES = {
    "shipped": "Shipped scenarios (scenarios/*.yaml)",
    "models": "Other model sizes",
    "devices": "Wall time vs devices (same per-GPU work)",
    "layers": "Wall time vs layers",
}


def report(rows: Sequence[Row]) -> str:
    """The tables, and the linear-growth check on the devices and layers tables."""
    parts = []
    for table, title in TITLES.items():
        group = [r for r in rows if r.table == table]
        if not group:
            continue
        scaling = table in ("devices", "layers")
        parts += [f"\n{title}", _table(group, scaling)]
    scans = [[r for r in rows if r.table == t] for t in ("devices", "layers")]
    worst = max((max(growth_ratios(g)) for g in scans if len(g) > 1), default=None)
    if worst is not None:
        verdict = "holds" if worst <= 1.0 else "does NOT hold"
        parts.append(f"\ngrowth = (cpu / first cpu) / (devices x MoE layers / first devices x "
                     f"MoE layers); largest {worst:.2f}: linear growth in devices x MoE layers "
                     f"{verdict}")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- profile


def profile(case: Case, top: int = 20) -> str:
    """cProfile (CPU clock) of one case: the top functions by own time, and own time per
    module."""
    scenario = load_scenario(case.scenario, list(case.overrides))
    simulate(scenario)                                   # warm up: lazy imports, first calls
    routing._DRAWN.clear()                               # ... but draw the routing again
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    simulate(scenario)
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(row[2] for row in stats.stats.values())
    by_module: dict[str, float] = {}
    for (path, _, _), row in stats.stats.items():
        module = _module_of(path)
        by_module[module] = by_module.get(module, 0.0) + row[2]
    lines = [f"\nProfile of {case.name} (cProfile, CPU clock, {total:.2f} s with profiling "
             "overhead); own time by module:"]
    for module, seconds in sorted(by_module.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"  {100 * seconds / total:5.1f}%  {seconds:6.2f} s  {module}")
    lines.append(f"top {top} functions by own time:")
    ranked = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (path, line, func), row in ranked:
        lines.append(f"  {row[2]:6.2f} s  {row[1]:7d} calls  {_module_of(path)}:{line}({func})")
    return "\n".join(lines)


def _module_of(path: str) -> str:
    """``moesim/routing.py`` for the repository's files, the package for installed ones."""
    if path == "~":
        return "C (numpy methods, builtins)"
    p = Path(path)
    if REPO in p.parents:
        return str(p.relative_to(REPO))
    if "site-packages" in p.parts:
        return p.parts[p.parts.index("site-packages") + 1]
    return "python stdlib"


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small cases only (seconds)")
    parser.add_argument("--profile", action="store_true", help="cProfile summary at the end")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each case N times; report the fastest (default 1)")
    args = parser.parse_args(argv)
    todo = cases(args.tiny)
    rows = []
    for case in todo:
        runs = [measure_in_child(case) for _ in range(max(1, args.repeat))]
        rows.append(min(runs, key=lambda r: r.cpu_s))
        print(f"  {case.name}: {rows[-1].wall_s:.2f} s", file=sys.stderr, flush=True)
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if args.profile:
        target = todo[-1] if args.tiny else Case("shipped", DEEPSEEK.stem, DEEPSEEK)
        print(profile(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
