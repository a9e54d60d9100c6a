"""benchmarks/planner_real.py --tiny: both placements run for real on the same routing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def test_tiny_run_compares_both_placements_on_identical_tokens(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "planner_real.py"),
                           "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] in (["contiguous"], ["moesim"])]
    assert [r[0] for r in rows] == ["contiguous", "moesim"]
    for r in rows:       # predicted, measured median, p10: positive times in ms
        assert all(float(x) > 0 for x in r[1:4]), r
    assert "tokens per expert identical across placements: yes" in done.stdout
    res = json.loads((tmp_path / "planner_real.json").read_text())
    a, b = res["contiguous"], res["moesim"]
    # The real layer computed exactly the same tokens per expert under both placements, and
    # they are moesim's own routing sample (an independent count, from the choices).
    assert np.array_equal(a["expert_tokens"], b["expert_tokens"])
    assert np.array_equal(a["expert_tokens"], a["moesim_tokens"])
    assert sum(a["expert_tokens"]) == 4 * 128 * 4          # ranks x tokens/rank x top-k
    # Each placement holds every expert exactly once, and the two differ.
    for r in (a, b):
        assert sorted(e for row in r["placement"] for e in row) == list(range(16))
    assert a["placement"] != b["placement"]
    assert len(a["steps"]) == len(b["steps"]) == 3             # one round x 3 timed passes
