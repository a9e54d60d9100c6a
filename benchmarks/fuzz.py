"""Fuzz moesim's scenario loading and simulation with many more examples than CI runs.

    python benchmarks/fuzz.py [--examples 5000] [--seed 0] [--limit 20] [--only hostile]

The examples are tests/test_fuzz.py's: mutated scenarios (dropped, retyped, negated, enlarged,
misspelled fields, truncated text, random bytes) and hostile ones (alias bombs in typed fields,
deep nesting, huge integers, bad names, bad paths). Each runs with a wall-clock limit (SIGALRM).
Prints the counts of valid results, MoESimErrors, other exceptions and examples over the limit,
the most common error messages, and every other exception or hang (kind, message, input head).
Exit code 1 if there is any other exception or hang.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import yaml  # noqa: E402
from test_fuzz import BASE, HOSTILE, hostile_line, scenario_texts  # noqa: E402

from moesim.assembly import simulate  # noqa: E402
from moesim.errors import MoESimError, describe_internal, is_internal  # noqa: E402
from moesim.spec.scenario import load_scenario  # noqa: E402


class Hang(BaseException):
    """An example ran past the time limit."""


def _alarm(signum, frame):  # noqa: ANN001
    raise Hang


@st.composite
def hostile_texts(draw) -> str:
    return yaml.safe_dump(BASE) + hostile_line(draw(st.sampled_from(HOSTILE)), draw) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="examples to run")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--limit", type=float, default=20.0,
                        help="seconds one example may take before it counts as a hang")
    parser.add_argument("--only", choices=("all", "hostile"), default="all",
                        help="all categories (default) or only the hostile ones")
    args = parser.parse_args(argv)
    outcomes: collections.Counter[str] = collections.Counter()
    messages: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="moesim-fuzz-"))
    slowest = [0.0]
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    strategy = hostile_texts() if args.only == "hostile" else scenario_texts()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=strategy)
    def run(text: str) -> None:
        path = workdir / "scenario.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        began = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.limit)
        try:
            simulate(load_scenario(path))
            outcomes["result"] += 1
        except Hang:
            outcomes["hang"] += 1
            bad.append(f"HANG > {args.limit:g} s: {text[-160:]!r}")
        except Exception as exc:  # noqa: BLE001 - counting, not handling
            if is_internal(exc):
                outcomes["other"] += 1
                bad.append(f"{describe_internal(exc)} <- {text[-160:]!r}")
            else:
                outcomes["MoESimError"] += 1
                message = str(exc).split(": ", 2)[-1][:60]
                messages[message] += 1
                assert isinstance(exc, MoESimError)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            slowest[0] = max(slowest[0], time.perf_counter() - began)

    run()
    total = sum(outcomes.values())
    print(f"{total} examples ({args.only}) in {time.perf_counter() - start:.1f} s: "
          f"{outcomes['result']} valid results, {outcomes['MoESimError']} MoESimErrors, "
          f"{outcomes['other']} other exceptions, {outcomes['hang']} hangs over "
          f"{args.limit:g} s; slowest example {slowest[0]:.2f} s")
    print("most common errors:")
    for message, count in messages.most_common(10):
        print(f"  {count:5d}  {message}")
    for line in bad:
        print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
