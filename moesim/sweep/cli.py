"""``moesim sweep SWEEP -o DIR``: run every point of a sweep file, with progress and resume."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from moesim.results import output_arg

__all__ = ["register"]


def register(sub, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``sweep`` subcommand to the ``moesim`` parser."""
    p = sub.add_parser("sweep", help="run a scenario over a grid / zip of field values",
                       description="Run every point of a sweep file; one row per point in "
                       "DIR/results.csv and DIR/results.jsonl.")
    p.add_argument("sweep", help="sweep file, or the name of a shipped one in scenarios/sweeps/ "
                   "(e.g. mixtral-ep-x-nodes)")
    p.add_argument("-o", "--output", type=output_arg, help="output folder (default results/sweeps/<sweep name>)")
    p.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="local worker processes (default: min(4, CPUs)); 1 = in this process")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local processes (default) or Ray tasks (pip install 'moesim[ray]')")
    p.add_argument("--address", help="Ray cluster address (default: start a local 2-CPU Ray)")
    p.add_argument("--engine", choices=("aggregated", "full"), default=None,
                   help="simulation engine for every point (default: the scenario's)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep finished rows of an earlier run; simulate only missing points")
    again.add_argument("--overwrite", action="store_true", help="discard earlier rows")
    p.add_argument("--list", action="store_true", help="print the points and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    commands["sweep"] = _cmd_sweep


def _resolve_sweep(arg: str) -> str:
    """``arg`` if it names a file; else the shipped sweep of that name."""
    if Path(arg).exists() or "/" in arg or arg.endswith((".yaml", ".yml")):
        return arg
    here = Path(__file__).resolve().parent.parent
    for base in (here / "_data" / "scenarios" / "sweeps", here.parent / "scenarios" / "sweeps"):
        if (base / f"{arg}.yaml").is_file():
            return str(base / f"{arg}.yaml")
    return arg     # load_sweep says "file not found"


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """SIGTERM / SIGHUP end the sweep like Ctrl-C does: finished rows are kept, workers stopped
    (by the executor's cleanup), and the process exits 128 + the signal number."""
    def handler(signum: int, frame) -> None:  # noqa: ANN001
        signal.signal(signum, signal.SIG_IGN)   # one is enough; a second must not cut cleanup
        print(f"moesim: terminated by signal {signum}; stopping the sweep's workers",
              file=sys.stderr)
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from moesim.sweep.executors import check_options
    from moesim.sweep.runner import run_sweep
    from moesim.sweep.spec import load_sweep

    check_options(args.executor, args.jobs, args.address)
    sweep = load_sweep(_resolve_sweep(args.sweep))
    if args.list:
        for p in sweep.points:
            print(f"{p.index:>4}  {p.key}  {p.name}")
        return 0
    out = Path(args.output) if args.output else Path("results") / "sweeps" / sweep.name
    print(f"sweep {sweep.name}: {len(sweep.points)} points over {', '.join(sweep.fields)} "
          f"({args.executor}{f', -j {args.jobs}' if args.executor == 'local' else ''})",
          file=sys.stderr)
    with _exit_on_termination():
        outcome = run_sweep(sweep, out, jobs=args.jobs, executor=args.executor,
                            address=args.address, resume=args.resume, overwrite=args.overwrite,
                            engine=args.engine, progress=None if args.quiet else sys.stderr)
    print(f"{len(outcome.rows)} points ({outcome.computed} simulated, {outcome.skipped} resumed, "
          f"{outcome.failed} with errors); wrote {outcome.csv} and {outcome.jsonl}")
    if outcome.internal:
        print(f"moesim: internal error (a bug in moesim, not in your input): {outcome.internal} "
              f"point(s) hit an internal error (rows whose error starts with 'internal error:' "
              f"in {outcome.csv}); rerun one with `moesim run --debug` for the traceback and "
              "please report it", file=sys.stderr)
        return 3
    return 0
