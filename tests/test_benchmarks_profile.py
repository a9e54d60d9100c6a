"""benchmarks/deepseek_profile.py stays runnable: its smoke run prints both sides; the pair it
prices is no longer than its chunks back to back, no shorter than either, and holds its compute."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import deepseek_profile as bench  # noqa: E402


def test_smoke_prints_the_measured_and_the_predicted_chunk(capsys):
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "deepseek-ai/profile-data" in out and "moesim: deepseek-v3-train-2048.yaml" in out


def test_the_chunks_compute_fits_inside_its_spans():
    moe, forward, backward, pair, parts = bench.chunk_times(bench.SMOKE)
    assert moe >= 1 and forward > 0 and backward > forward   # a backward does twice the math
    assert max(forward, backward) <= pair <= (forward + backward) * (1 + 1e-9)
    busy = sum(parts.values())
    assert 0.5 * pair < busy <= pair * (1 + 1e-9)
