"""Fuzz moesim's scenario loading and simulation with many more examples than CI runs.

    python benchmarks/fuzz.py [--examples 3000] [--seed 0]

Prints how many mutated scenarios ran to a result, how many were rejected with a MoESimError (and
the most common messages), and fails loudly if any other exception appears.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_fuzz import scenario_texts  # noqa: E402

from moesim.assembly import simulate  # noqa: E402
from moesim.errors import MoESimError  # noqa: E402
from moesim.spec.scenario import load_scenario  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    outcomes: collections.Counter[str] = collections.Counter()
    messages: collections.Counter[str] = collections.Counter()
    workdir = Path(tempfile.mkdtemp(prefix="moesim-fuzz-"))
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=scenario_texts())
    def run(text: str) -> None:
        path = workdir / "scenario.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            simulate(load_scenario(path))
            outcomes["result"] += 1
        except MoESimError as exc:
            outcomes["MoESimError"] += 1
            messages[str(exc).split(": ", 2)[-1][:60]] += 1

    run()
    total = sum(outcomes.values())
    print(f"{total} examples in {time.perf_counter() - start:.1f} s: "
          f"{outcomes['result']} valid results, {outcomes['MoESimError']} MoESimErrors, "
          "0 other exceptions")
    print("most common errors:")
    for message, count in messages.most_common(10):
        print(f"  {count:5d}  {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
