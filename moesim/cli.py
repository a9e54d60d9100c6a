"""The ``moesim`` command line: run, validate, info (plan, sweep, plot, calibrate as they land).

Every user error is a :class:`moesim.errors.MoESimError`: printed on one line as
``moesim: error: <file>: <field>: <what is wrong and what is allowed>`` with exit code 2. An
:class:`moesim.errors.InternalError` or any other exception is a bug in moesim: one line saying so,
naming the failing check, exit code 3. ``--debug`` (before or after the subcommand) shows the
traceback of either kind before that line; the exit code stays 2 or 3.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from moesim.errors import describe_internal, is_internal
from moesim.results import output_arg

__all__ = ["main", "EXIT_OK", "EXIT_INPUT", "EXIT_INTERNAL"]

EXIT_OK, EXIT_INPUT, EXIT_INTERNAL = 0, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags: exit 2 with one line, as argparse does
        self.exit(2, f"moesim: error: {message}\n")


def _cmd_run(args: argparse.Namespace) -> int:
    from moesim.assembly import simulate
    from moesim.report.trace import chrome_trace
    from moesim.results import (
        check_output_dir,
        default_run_dir,
        discard_output_dir,
        json_text,
        provenance,
        summary,
        write_files_together,
    )
    from moesim.spec.scenario import load_scenario, scenario_warnings

    scenario = load_scenario(resolve_scenario(args.scenario), args.set)
    for line in scenario_warnings(scenario):
        _say(f"moesim: warning: {line}")
    out = Path(args.output) if args.output else default_run_dir(scenario.name, args.set)
    out, created = check_output_dir(out)          # before any work: fail fast on a bad -o
    try:
        sim = simulate(scenario, engine=args.engine)
        text = summary(sim.result, args.set)
        data = {**sim.result.to_dict(), **provenance(scenario, args.set)}
        files = {"results.json": json_text(data)}
        if scenario.outputs.trace and not args.no_trace:
            files["trace.json"] = json_text(chrome_trace(sim), compact=True)
        files["summary.txt"] = text + "\n"
        # all or nothing; a trace.json of an earlier run would not match these results
        written = write_files_together(out, files, remove=("trace.json",))
    except BaseException:
        discard_output_dir(out, created)
        raise
    if args.json:
        print(json_text({**data, "written": [str(p) for p in written]}), end="")
        return 0
    print(text)
    print(f"wrote           {', '.join(str(p) for p in written)}  "
          f"(simulated in {sim.wall_seconds:.2f} s)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import json

    import yaml

    from moesim.layout import Layout
    from moesim.memory import check_memory, stage_memory
    from moesim.pricing.context import scenario_topology
    from moesim.sim.faults import faulty_topology
    from moesim.spec.fields import to_plain
    from moesim.spec.scenario import load_scenario, scenario_warnings
    from moesim.units import format_quantity

    s = load_scenario(resolve_scenario(args.scenario), args.set)
    topo = faulty_topology(s, scenario_topology(s))   # link faults name real links
    layout = Layout.for_scenario(s)
    plain = to_plain(s)
    plain["hardware"] = {"name": s.hardware.name, "path": s.hardware.path}
    counts = s.model.param_counts()
    par = s.parallelism
    parts = ("dense_weights", "expert_weights", "gradients", "optimizer", "activations",
             "kv_cache", "comm_buffers", "reserved", "total", "capacity")
    stages = [stage_memory(s, layout, stage) for stage in range(par.pp)]
    worst = next((m for m in reversed(stages) if not m.fits), None)
    if args.json:
        if worst is not None:
            check_memory(s, layout)   # raises OutOfMemory unless memory.on_overflow: warn
        print(json.dumps({
            "valid": True, "source": s.source, "overrides": list(args.set),
            "model": {"name": s.model.name, "parameters": counts.total,
                      "active_parameters": counts.active, "moe_layers": s.model.num_moe_layers,
                      "experts": s.model.num_experts, "top_k": s.model.effective_top_k},
            "cluster": {"devices": s.num_devices, "device": s.hardware.device.name,
                        "topology": s.cluster.topology, "nodes": topo.num_nodes,
                        "links": topo.num_links},
            "layout": {"tp": par.tp, "cp": par.cp, "pp": par.pp, "dp": par.dp, "ep": par.ep,
                       "etp": par.etp, "vp": par.vp,
                       "zero_stage": par.zero_stage, "expert_dp": layout.expert_dp,
                       "schedule": par.schedule},
            "memory_bytes": [{"stage": m.stage, **{k: getattr(m, k) for k in parts},
                              "fits": m.fits} for m in stages],
            "warnings": scenario_warnings(s) + ([] if worst is None else [
                f"stage {worst.stage} needs {worst.total / 2**30:.1f} GiB of "
                f"{worst.capacity / 2**30:.1f} GiB"]),
            **({"resolved_scenario": plain} if args.verbose else {})},
            indent=2, sort_keys=True, default=str))
        return 0
    if args.verbose:
        print(yaml.safe_dump(plain, sort_keys=False), end="")
    print(f"{s.source}: valid")
    print(f"  model     {s.model.name}: {format_quantity(counts.total, 'count')} parameters, "
          f"{format_quantity(counts.active, 'count')} active per token, "
          f"{s.model.num_moe_layers} MoE layers "
          f"x {s.model.num_experts} experts, top-{s.model.effective_top_k}")
    print(f"  cluster   {s.num_devices} x {s.hardware.device.name} ({s.cluster.topology}, "
          f"{topo.num_nodes} nodes, {topo.num_links} links)")
    print(f"  layout    tp={par.tp}{f' cp={par.cp}' if par.cp > 1 else ''} pp={par.pp} "
          f"dp={par.dp} ep={par.ep}{f' etp={par.etp}' if par.etp > 1 else ''} vp={par.vp} "
          f"zero={par.zero_stage}; expert-DP {layout.expert_dp}"
          + ("; DualPipe: two stages per device" if layout.dual else ""))
    print("  memory per device (GiB), busiest device of each pipeline stage:")
    header = ("stage", "dense_w", "expert_w", "grads", "optim", "activ", "kv", "buffers",
              "reserved", "total", "capacity")
    print("   " + " ".join(f"{h:>8}" for h in header))
    for m in stages:
        vals = [getattr(m, k) for k in parts]
        print("   " + f"{m.stage:>8}" + "".join(f"{v / 2**30:>9.1f}" for v in vals))
    for line in scenario_warnings(s):
        print(f"  warning: {line}")
    if worst is not None:
        print(f"  warning: stage {worst.stage} needs {worst.total / 2**30:.1f} GiB of "
              f"{worst.capacity / 2**30:.1f} GiB")
        check_memory(s, layout)  # raises OutOfMemory with the breakdown unless on_overflow: warn
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from moesim.report.compare import compare_json, compare_table, load_result

    a, b = load_result(args.a), load_result(args.b)
    if args.json:
        print(compare_json(a, b, (args.a, args.b)))
    else:
        print(compare_table(a, b))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from moesim.spec.hardware import profile_dirs
    from moesim.spec.models import list_models

    print("models:   " + ", ".join(list_models()))
    profiles = sorted({p.stem for d in profile_dirs() if d.exists() for p in d.glob("*.yaml")})
    print("profiles: " + ", ".join(profiles))
    print("scenarios:")
    for path in _scenario_files():
        print(f"  {path}")
    return 0


def resolve_scenario(arg: str) -> str:
    """``arg`` if it names a file; else the shipped scenario of that name (``tiny-cpu``)."""
    if Path(arg).exists() or "/" in arg or arg.endswith((".yaml", ".yml")):
        return arg
    matches = [p for p in _scenario_files() if p.stem == arg]
    if len(matches) == 1:
        return str(matches[0])
    from moesim.errors import ScenarioError
    names = ", ".join(sorted(p.stem for p in _scenario_files()))
    raise ScenarioError(f"no such file, and no shipped scenario of that name (shipped: {names})",
                        source=arg)


def _scenario_files() -> list[Path]:
    here = Path(__file__).resolve().parent
    for base in (here / "_data" / "scenarios", here.parent / "scenarios"):
        if base.exists():
            return sorted(p for p in base.rglob("*.yaml") if "models" not in p.parts
                          and "sweeps" not in p.parts)
    return []


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "validate": _cmd_validate, "info": _cmd_info, "compare": _cmd_compare,
}


def build_parser() -> argparse.ArgumentParser:
    from moesim.version import __version__

    parser = _Parser(prog="moesim", description="Simulate and plan MoE training and serving. "
                     "Exit codes: 0 ok, 2 bad input, 3 a bug in moesim.")
    parser.add_argument("--version", action="version", version=f"moesim {__version__}",
                        help="print the moesim version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                help="what to do (moesim COMMAND -h for its options)")
    scenario_help = "scenario YAML file, or the name of a shipped one (see `moesim info`)"
    set_help = "override a scenario field (value read as YAML), e.g. --set parallelism.ep=16; " \
               "repeat for more"
    run = sub.add_parser("run", help="simulate one step of a scenario")
    run.add_argument("scenario", help=scenario_help)
    run.add_argument("-o", "--output", type=output_arg, help="output folder (default results/<scenario name>, "
                     "or results/<name>-<hash> with --set)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    run.add_argument("--engine", choices=("aggregated", "full"), default=None,
                     help="aggregated (fast) or full (every op as an event); default: the "
                     "scenario's simulation.mode")
    run.add_argument("--no-trace", action="store_true", help="skip trace.json")
    run.add_argument("--json", action="store_true",
                     help="print the results (as in results.json) as JSON instead of a summary")
    val = sub.add_parser("validate", help="check a scenario and print its memory table")
    val.add_argument("scenario", help=scenario_help)
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    val.add_argument("-v", "--verbose", action="store_true", help="print the resolved scenario")
    val.add_argument("--json", action="store_true",
                     help="print the check, sizes and memory table as JSON")
    sub.add_parser("info", help="list shipped models, hardware profiles and scenarios")
    cmp = sub.add_parser("compare", help="two run results side by side",
                         description="Compare two `moesim run` results: step time, throughput, "
                         "MFU, breakdown, memory and busiest links, with B's change vs A.")
    cmp.add_argument("a", help="results.json or run folder (the reference)")
    cmp.add_argument("b", help="results.json or run folder to compare with A")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _extend(sub)
    for subparser in sub.choices.values():  # --debug also after the subcommand
        if "--debug" not in subparser._option_string_actions:
            subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show tracebacks")
    return parser


def _extend(sub) -> None:
    """Subcommands that live in their own modules register here."""
    for module in ("moesim.placement.cli", "moesim.sweep.cli", "moesim.report.cli",
                   "moesim.calibration_cli", "moesim.collective", "moesim.search.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("moesim"):
                continue
            raise
        mod.register(sub, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Run the ``moesim`` command line; return the exit code (0 ok, 2 bad input, 3 a bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        if args.command == "plan":    # plan's handler lives in moesim.placement.cli
            args.scenario = resolve_scenario(args.scenario)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - every exception becomes one line and an exit code
        if debug:   # the traceback, then the same line and exit code as without --debug
            traceback.print_exc()
        return report_error(exc)


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; return its exit code (2 bad input, 3 a bug)."""
    if is_internal(exc):
        _say(f"moesim: internal error (a bug in moesim, not in your input): "
             f"{describe_internal(exc)}; rerun with --debug for the traceback and please "
             "report it")
        return EXIT_INTERNAL
    _say(f"moesim: error: {' '.join(str(exc).split())}")
    return EXIT_INPUT


def _say(line: str) -> None:
    """One line on stderr, whatever it holds (a path with undecodable bytes, a lone surrogate)."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    safe = line.encode(encoding, "backslashreplace").decode(encoding, "replace")
    print(safe, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
