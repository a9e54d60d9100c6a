"""The full engine (every device a SimPy process) and the aggregated engine agree."""

from __future__ import annotations

import pytest

from moesim.assembly import simulate


@pytest.mark.parametrize("changes", [
    {},
    {"parallelism": {"pp": 2, "dp": 2, "ep": 2}, "model": {"num_experts": 4},
     "workload": {"global_batch": 8}, "routing": {"distribution": "zipf", "zipf_s": 1.0}},
    {"parallelism": {"dp": 4, "ep": 2}, "communication": {"overlap": "shared_expert"},
     "model": {"num_shared_experts": 1}, "routing": {"distribution": "zipf", "zipf_s": 0.7}},
    {"model": {"num_experts": 8, "top_k": 2}, "communication": {"overlap": "two_batch",
                                                              "alltoall": "hierarchical"},
     "routing": {"distribution": "dirichlet", "dirichlet_alpha": 0.5}},
])
def test_full_and_aggregated_step_times_agree(make_scenario, changes):
    s = make_scenario(changes)
    full = simulate(s, engine="full").result
    aggregated = simulate(s, engine="aggregated").result
    assert full.step_time == pytest.approx(aggregated.step_time, rel=1e-3)
    assert full.engine == "full" and aggregated.engine == "aggregated"
