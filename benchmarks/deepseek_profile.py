"""DeepSeek-V3 training: moesim's forward + backward of one pipeline chunk against DeepSeek's own
published kernel profile of that chunk.

DeepSeek published a PyTorch-profiler trace of its training framework (deepseek-ai/profile-data,
``train.json``): one DualPipe pair of a forward and a backward chunk of 4 MoE layers each on an
H800, EP64, TP1, 4K-token sequences, with exactly balanced routing and no pipeline communication.
The figures below were read from that trace (kernel events, microseconds summed by name); the
trace itself is not copied here. moesim prices the same chunk from the shipped scenario
(``scenarios/deepseek-v3-train-2048.yaml``, routing forced exactly balanced with random expert
pairs, node-limited as the scenario's gate): the forward and the backward chunk of a middle
pipeline device (4 MoE layers each), overlapped as DualPipe pairs them (each chunk's ops in
order, the next op whichever can start first, so one chunk's all-to-alls run under the other's
compute).

    python benchmarks/deepseek_profile.py           # the shipped scenario (seconds)
    python benchmarks/deepseek_profile.py --smoke   # a shrunk model, for tests
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moesim.assembly import simulate  # noqa: E402
from moesim.spec.scenario import load_scenario  # noqa: E402

SCENARIO = REPO / "scenarios" / "deepseek-v3-train-2048.yaml"
SOURCE = ("deepseek-ai/profile-data train.json (H800, EP64, TP1, 4K tokens, balanced routing; "
          "a DualPipe forward + backward chunk pair of 4 MoE layers)")
# Read from the trace's kernel events (ms): first to last kernel, and kernel time by kind.
MEASURED_MS = {
    "pair span (first to last kernel)": 129.0,
    "compute-stream kernels": 118.2,
    "GEMMs (FP8 grouped/dense, incl. 11.4 on a second stream)": 75.6,
    "FlashAttention (forward 4.9, backward 15.1, pre/post 1.9)": 22.0,
    "other compute kernels (casts, transposes, norms, SwiGLU, RoPE, permutes)": 32.0,
    "DeepEP dispatch/combine kernels (communication stream)": 114.5,
}
# Compute kernels on both compute streams (the second carries weight-gradient GEMMs).
COMPUTE_MS = 118.2 + 11.4

# A shrunk run for tests: 19 layers over 4 stages of 64 GPUs.
SMOKE = ["model.num_layers=19", "parallelism.account_for_embedding=false",
         "parallelism.account_for_loss=false", "cluster.nodes=64", "parallelism.pp=4",
         "workload.global_batch=1024"]


def chunk_times(overrides: list[str]) -> tuple[int, float, float, float, Counter]:
    """(MoE layers per chunk, forward s, backward s alone, the overlapped pair's s, compute s by
    op in the pair) of a middle device: its direction-0 chunk's forward paired with its
    direction-1 chunk's backward, as DualPipe runs them."""
    s = load_scenario(SCENARIO, ["routing.distribution=balanced_random", *overrides])
    sim = simulate(s)
    stage = s.parallelism.pp // 2 - 1
    layers = list(sim.layout.chunk_layers()[stage][0])
    moe = sum(1 for layer in layers if sim.layout.moe_index(layer) is not None)
    pair = sim.runs[(stage, "f", 0)]
    parts: Counter = Counter()
    for i, op in enumerate(pair.ops):
        if op.stream == "compute":
            parts[op.name.split(".")[0]] += float((pair.end[i] - pair.start[i]).max())
    return (moe, sim.runs[(stage, "F", 0)].makespan, sim.runs[(stage, "B", 1)].makespan,
            pair.makespan, parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="shrunk model (seconds)")
    args = parser.parse_args(argv)
    overrides = SMOKE if args.smoke else []
    moe, forward, backward, pair, parts = chunk_times(overrides)
    print(f"measured: {SOURCE}")
    for name, ms in MEASURED_MS.items():
        print(f"  {name:<75} {ms:7.1f} ms")
    print(f"moesim: {SCENARIO.name}, balanced routing (random pairs, node-limited), a middle "
          f"device's chunks of {moe} MoE layers: forward {forward * 1e3:.1f} ms, backward "
          f"{backward * 1e3:.1f} ms, overlapped as a pair {pair * 1e3:.1f} ms")
    print("  compute by op in the pair (ms): " + ", ".join(f"{k} {v * 1e3:.1f}"
                                                      for k, v in parts.items()))
    if moe == 4:
        ratio = pair * 1e3 / MEASURED_MS["pair span (first to last kernel)"]
        busy = sum(parts.values()) * 1e3 / COMPUTE_MS
        print(f"moesim / measured, a forward + backward pair of 4 MoE layers: span {ratio:.2f}; "
              f"compute {busy:.2f} (moesim's compute ops against the {COMPUTE_MS:.1f} ms of "
              "compute kernels on both compute streams)")
    else:
        print(f"(shrunk run: {moe} MoE layers per chunk, no ratio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
