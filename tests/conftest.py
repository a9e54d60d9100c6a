"""Shared helpers: build small scenarios from mappings, with a hand-made hardware profile."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

from moesim.spec.models import merge_mappings
from moesim.spec.scenario import load_scenario

# Property tests draw the same examples on every run (a red CI is then reproducible);
# benchmarks/fuzz.py explores at random.
settings.register_profile("moesim", derandomize=True, database=None)
settings.load_profile("moesim")

REPO = Path(__file__).resolve().parent.parent

# A profile with round numbers, so tests can compute times by hand: 100 GB/s NVLink-like links
# with 1 us latency, 10 GB/s NICs with 5 us latency, efficiencies 1.
HAND_PROFILE = {
    "name": "hand",
    "device": {"name": "hand-gpu", "kind": "gpu", "peak_flops": {"bf16": "100 TFLOPS"},
               "memory": "80 GB", "memory_bandwidth": "1 TB/s"},
    "links": {"scale_up": {"kind": "nvlink", "bandwidth": "100 GB/s", "latency": "1 us"},
              "scale_out": {"kind": "infiniband", "bandwidth": "10 GB/s", "latency": "5 us"}},
    "node": {"devices_per_node": 2},
}

SMALL = {
    "name": "small",
    "seed": 0,
    "model": {"base": "tiny-cpu", "num_experts": 4, "top_k": 1},
    "cluster": {"hardware": "hand.yaml", "topology": "fat_tree", "nodes": 2},
    "parallelism": {"tp": 1, "pp": 1, "dp": 4, "ep": 4},
    "workload": {"mode": "training", "global_batch": 4, "seq_len": 256, "micro_batch": 1},
    "routing": {"distribution": "balanced"},
}


def merge(base: dict, changes: dict) -> dict:
    return merge_mappings(copy.deepcopy(base), changes)


@pytest.fixture
def make_scenario(tmp_path):
    """make_scenario(changes, profile_changes=None) -> Scenario (written to tmp_path)."""
    counter = [0]

    def make(changes: dict | None = None, profile_changes: dict | None = None):
        counter[0] += 1
        profile = merge(HAND_PROFILE, profile_changes or {})
        (tmp_path / "hand.yaml").write_text(yaml.safe_dump(profile))
        path = tmp_path / f"scenario{counter[0]}.yaml"
        path.write_text(yaml.safe_dump(merge(SMALL, changes or {})))
        return load_scenario(path)

    return make


def screened_alone_and_shared(spec, cands) -> list[tuple[float, float]]:
    """(step time screened after the search's other layouts, screened alone) of each candidate:
    the search screen's shared caches must not change a layout's price."""
    from moesim.pricing.context import scenario_topology
    from moesim.search.screen import screen_layout
    from moesim.search.space import candidate_scenario

    topology = scenario_topology(spec.scenario)
    shared: dict = {}
    out = []
    for cand in cands:
        s = candidate_scenario(spec, cand)
        out.append((screen_layout(s, topology, shared).step_time,
                    screen_layout(s, topology, {}).step_time))
    return out
