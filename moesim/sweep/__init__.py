"""Sweeps: run a scenario over grids or zipped lists of field values, one table row per point.

- :mod:`moesim.sweep.spec`: the sweep file and its expansion into named, keyed points;
- :mod:`moesim.sweep.runner`: running the points, crash-safe results.jsonl / results.csv, resume;
- :mod:`moesim.sweep.executors`: in-process, local process pool, or Ray;
- :mod:`moesim.sweep.cli`: ``moesim sweep``.
"""

from moesim.sweep.runner import SweepOutcome, run_sweep
from moesim.sweep.spec import Sweep, SweepPoint, load_sweep

__all__ = ["Sweep", "SweepPoint", "SweepOutcome", "load_sweep", "run_sweep"]
