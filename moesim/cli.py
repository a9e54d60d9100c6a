"""The ``moesim`` command line: run, validate, info (plan, sweep, plot, calibrate as they land).

Every user error is a :class:`moesim.errors.MoESimError`: printed on one line as
``moesim: error: <file>: <field>: <what is wrong and what is allowed>`` with exit code 2. Other
exceptions are bugs; ``--debug`` shows the traceback of either kind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from moesim.errors import MoESimError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags: exit 2 with one line, as argparse does
        self.exit(2, f"moesim: error: {message}\n")


def _cmd_run(args: argparse.Namespace) -> int:
    from moesim.report.trace import chrome_trace
    from moesim.results import summary, write_json_atomic
    from moesim.sim.simulate import simulate
    from moesim.spec.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.set)
    sim = simulate(scenario, engine=args.engine)
    print(summary(sim.result))
    out = Path(args.output) if args.output else Path("results") / scenario.name
    write_json_atomic(out / "results.json", sim.result.to_dict())
    written = [out / "results.json"]
    if scenario.outputs.trace and not args.no_trace:
        write_json_atomic(out / "trace.json", chrome_trace(sim), compact=True)
        written.append(out / "trace.json")
    print(f"wrote           {', '.join(str(p) for p in written)}  "
          f"(simulated in {sim.wall_seconds:.2f} s)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from moesim.layout import Layout
    from moesim.memory import check_memory, stage_memory
    from moesim.sim.simulate import scenario_topology
    from moesim.spec.fields import to_plain
    from moesim.spec.scenario import load_scenario

    s = load_scenario(args.scenario, args.set)
    topo = scenario_topology(s)
    layout = Layout(s.parallelism, s.model.num_layers, s.model.moe_layer_ids)
    plain = to_plain(s)
    plain["hardware"] = {"name": s.hardware.name, "path": s.hardware.path}
    plain["model"] = {k: v for k, v in plain["model"].items()}
    if args.verbose:
        print(yaml.safe_dump(plain, sort_keys=False), end="")
    counts = s.model.param_counts()
    print(f"{s.source}: valid")
    print(f"  model     {s.model.name}: {counts.total / 1e9:.1f}B parameters, "
          f"{counts.active / 1e9:.1f}B active per token, {s.model.num_moe_layers} MoE layers "
          f"x {s.model.num_experts} experts, top-{s.model.effective_top_k}")
    print(f"  cluster   {s.num_devices} x {s.hardware.device.name} ({s.cluster.topology}, "
          f"{topo.num_nodes} nodes, {topo.num_links} links)")
    par = s.parallelism
    print(f"  layout    tp={par.tp} pp={par.pp} dp={par.dp} ep={par.ep} vp={par.vp} "
          f"zero={par.zero_stage}; expert-DP {layout.expert_dp}")
    print("  memory per device (GiB), busiest device of each pipeline stage:")
    header = ("stage", "dense_w", "expert_w", "grads", "optim", "activ", "kv", "buffers",
              "reserved", "total", "capacity")
    print("   " + " ".join(f"{h:>8}" for h in header))
    worst = None
    for stage in range(par.pp):
        m = stage_memory(s, layout, stage)
        vals = [m.dense_weights, m.expert_weights, m.gradients, m.optimizer, m.activations,
                m.kv_cache, m.comm_buffers, m.reserved, m.total, m.capacity]
        print("   " + f"{stage:>8}" + "".join(f"{v / 2**30:>9.1f}" for v in vals))
        if not m.fits:
            worst = m
    if worst is not None:
        print(f"  warning: stage {worst.stage} needs {worst.total / 2**30:.1f} GiB of "
              f"{worst.capacity / 2**30:.1f} GiB")
        check_memory(s, layout)  # raises OutOfMemory with the breakdown unless on_overflow: warn
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


def _scenario_files() -> list[Path]:
    here = Path(__file__).resolve().parent
    for base in (here / "_data" / "scenarios", here.parent / "scenarios"):
        if base.exists():
            return sorted(p for p in base.rglob("*.yaml") if "models" not in p.parts
                          and "sweeps" not in p.parts)
    return []


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "validate": _cmd_validate, "info": _cmd_info,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moesim", description="Simulate and plan MoE training and serving.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="simulate one step of a scenario")
    run.add_argument("scenario")
    run.add_argument("-o", "--output", help="output directory (default results/<scenario name>)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario field, e.g. --set parallelism.ep=16")
    run.add_argument("--engine", choices=("aggregated", "full"), default=None)
    run.add_argument("--no-trace", action="store_true", help="skip trace.json")
    val = sub.add_parser("validate", help="check a scenario and print its memory table")
    val.add_argument("scenario")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("-v", "--verbose", action="store_true", help="print the resolved scenario")
    sub.add_parser("info", help="list shipped models, hardware profiles and scenarios")
    _extend(sub)
    return parser


def _extend(sub) -> None:
    """Subcommands that live in their own modules register here."""
    for module in ("moesim.placement.cli", "moesim.sweep.cli", "moesim.report.cli",
                   "moesim.calibration_cli", "moesim.collective"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("moesim"):
                continue
            raise
        mod.register(sub, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MoESimError as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())
        print(f"moesim: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
