"""``moesim search SCENARIO -o DIR``: the best parallel layouts of a scenario (docs/search.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from moesim.results import output_arg

__all__ = ["register"]


def register(sub, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``search`` subcommand to the ``moesim`` parser."""
    p = sub.add_parser(
        "search", help="search the parallel layouts of a scenario (training or serving)",
        description="Enumerate the layouts (TP, PP, VP, EP, DP, micro-batch, ZeRO, recompute, "
        "overlap, all-to-all) the scenario's `search:` section leaves open, drop those that "
        "break divisibility or memory, screen the rest in closed form and simulate the best "
        "fully. Writes search.csv, top/*.yaml, search.json and summary.txt.")
    p.add_argument("scenario", help="scenario YAML file, or the name of a shipped one")
    p.add_argument("-o", "--output", required=True, type=output_arg, help="output folder")
    p.add_argument("--gpus", type=int, help="search on this many devices (whole nodes) "
                   "instead of the scenario's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field before searching; repeat for more")
    p.add_argument("--top", type=int, help="layouts simulated fully (default: search.top or 8)")
    p.add_argument("--objective", choices=("throughput", "latency"), default="throughput",
                   help="rank by tokens/s per GPU (default) or, serving, tokens/s per user")
    p.add_argument("--max-tpot", metavar="TIME", help="serving: time per output token limit, "
                   "e.g. 50ms")
    p.add_argument("--max-ttft", metavar="TIME", help="serving: time to first token limit, "
                   "e.g. 2s")
    p.add_argument("-j", "--jobs", type=int, help="local worker processes for the full "
                   "simulations (default: one per CPU this process may use)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the full simulations run (as in `moesim sweep`)")
    p.add_argument("--address", help="Ray cluster address (--executor ray)")
    p.add_argument("--resume", action="store_true", help="reuse the simulations an earlier "
                   "(killed) search left in the output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    commands["search"] = _cmd_search


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _time(text: str | None, flag: str) -> float | None:
    from moesim.errors import ScenarioError
    from moesim.units import parse_quantity

    if text is None:
        return None
    try:
        value = parse_quantity(text, "time", require_unit=True)
    except (ValueError, ScenarioError) as exc:
        raise ScenarioError(f"{flag} {text!r}: {exc} (a time such as 50ms or 2s)") from None
    if value <= 0:
        raise ScenarioError(f"{flag} {text!r} must be a positive time such as 50ms")
    return value


def _cmd_search(args: argparse.Namespace) -> int:
    from moesim.cli import resolve_scenario
    from moesim.errors import ScenarioError
    from moesim.search.runner import run_search, summary
    from moesim.search.serving import RequestShape
    from moesim.search.space import load_search

    max_tpot, max_ttft = _time(args.max_tpot, "--max-tpot"), _time(args.max_ttft, "--max-ttft")
    if args.top is not None and args.top < 1:
        raise ScenarioError(f"--top {args.top} must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        raise ScenarioError(f"-j/--jobs {args.jobs} must be >= 1")
    spec = load_search(resolve_scenario(args.scenario), args.set, gpus=args.gpus)
    if not spec.serving and (max_tpot or max_ttft):
        raise ScenarioError("--max-tpot/--max-ttft apply to serving (prefill/decode) scenarios",
                            source=spec.source, field="workload.mode")
    jobs = args.jobs if args.jobs is not None else _usable_cpus()
    outcome = run_search(spec, args.output, top=args.top, jobs=jobs,
                         executor=args.executor, address=args.address,
                         objective=args.objective, max_tpot=max_tpot, max_ttft=max_ttft,
                         resume=args.resume, progress=None if args.quiet else sys.stderr)
    from moesim.search.runner import request_shape
    shape: RequestShape | None = request_shape(spec) if spec.serving else None
    print(summary(outcome, spec, shape))
    print(f"wrote {args.output}/search.csv, search.json, summary.txt and "
          f"{sum(1 for f in outcome.files if f.parent.name == 'top')} scenarios in "
          f"{args.output}/top/")
    return 0
