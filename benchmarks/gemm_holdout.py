"""How well an imported profile prices a GEMM shape it has no row for: leave one shape out.

    python benchmarks/gemm_holdout.py PROFILE.yaml [PROFILE.yaml ...]

A profile imported with ``moesim calibrate --import aiconfigurator`` holds measured GEMM rows
keyed by ``(n, k, dtype)``, each a curve over m. A model's GEMM whose ``(n, k)`` was not measured
takes the efficiency of the nearest measured shapes (``MeasuredTables.gemm``,
:func:`moesim.calibration.gemm_sites`). This script removes each measured shape in turn, prices
it at m = 1, 16, 64, 256, 1,024 and 4,096 (where its row covers m) from the others, and compares
with the removed row; beside it, the kernel model alone (what a profile without tables answers).
Printed per profile and dtype: points priced, rms of log(predicted / measured), the share within
0.8-1.25x, for the transfer and for the kernel model's GEMM (for FP8 without the input's
quantize kernel, which the measured FP8 rows include and a run adds beside the model's GEMM).
Shapes nothing is within reach of are skipped (the kernel model answers them in a run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim.calibration import DTYPE_TABLES, MeasuredTables  # noqa: E402
from moesim.errors import MoESimError  # noqa: E402
from moesim.kernels import gemm_time  # noqa: E402
from moesim.spec.hardware import dtype_bytes, load_hardware  # noqa: E402

POINTS = (1, 16, 64, 256, 1024, 4096)
MODEL_DTYPE = {"fp8_block": "fp8"}      # the kernel model's dtype for a table dtype


def holdout(profile: str) -> list[tuple[str, int, float, float, float, float]]:
    """Per table dtype: (dtype, points, transfer rms-log, transfer share in band, model rms-log,
    model share in band)."""
    hw = load_hardware(profile)
    rows = MeasuredTables.from_profile(hw).shaped_tables["gemm"]
    out = []
    for dtype in sorted({key[2] for key in rows}):
        compute = MODEL_DTYPE.get(dtype, dtype)
        size = dtype_bytes(compute)

        def model(m: float, n: float, k: float, compute: str = compute, size: float = size
                  ) -> float:
            return gemm_time(m, n, k, hw.device, compute, a_bytes=size, b_bytes=size,
                             c_bytes=2)

        transfer, alone = [], []
        for key in [k for k in rows if k[2] == dtype]:
            curve = rows[key]
            # The shape leaves in every dtype that would serve it (a block-scaled FP8 query
            # falls back to a per-tensor FP8 row of the same shape).
            gone = {(key[0], key[1], d) for d in DTYPE_TABLES.get(dtype, (dtype,))}
            others = MeasuredTables({}, {}, {}, shaped={
                "gemm": {k: c for k, c in rows.items() if k not in gone}})
            for m in POINTS:
                if not curve.tokens[0] <= m <= curve.tokens[-1]:
                    continue
                measured = float(curve(float(m)))
                priced = others.gemm(m, key[0], key[1], dtype, model=model)
                if priced is not None:
                    transfer.append(np.log(priced / measured))
                    alone.append(np.log(model(m, key[0], key[1]) / measured))
        if transfer:
            t, a = np.array(transfer), np.array(alone)
            band = np.log(1.25)
            out.append((dtype, t.size, float(np.sqrt((t ** 2).mean())),
                        float(np.mean(np.abs(t) < band)), float(np.sqrt((a ** 2).mean())),
                        float(np.mean(np.abs(a) < band))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles", nargs="+", help="imported hardware profiles (.yaml)")
    args = ap.parse_args(argv)
    print(f"{'profile':<28} {'dtype':<10} {'points':>6}  {'transfer rms-log':>16} "
          f"{'in 0.8-1.25':>11}  {'model rms-log':>13} {'in 0.8-1.25':>11}")
    try:
        for profile in args.profiles:
            for dtype, n, trms, tin, mrms, min_ in holdout(profile):
                print(f"{Path(profile).name:<28} {dtype:<10} {n:>6}  {trms:>16.3f} "
                      f"{tin:>11.2f}  {mrms:>13.3f} {min_:>11.2f}")
    except MoESimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
