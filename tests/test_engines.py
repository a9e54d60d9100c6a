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


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_engines_agree_with_realistic_link_costs(make_scenario, schedule):
    """Links with a message-size curve and a fixed cost per collective, two EP groups per stage,
    two-batch overlap, a pipeline: the full engine prices every group's all-to-all as the
    representative group's (algorithm, curve, fixed cost), shifted only by what its own links
    change, so on alike groups both engines give one step time."""
    links = {"scale_up": {"collective_overhead": "10 us", "half_efficiency_size": "40 KB"},
             "scale_out": {"collective_overhead": "20 us", "half_efficiency_size": "73 KB"}}
    s = make_scenario({"cluster": {"nodes": 4},
                       "parallelism": {"pp": 2, "dp": 4, "ep": 2, "schedule": schedule},
                       "model": {"num_experts": 4, "top_k": 2},
                       "workload": {"global_batch": 16},
                       "communication": {"overlap": "two_batch"}},
                      profile_changes={"links": links})
    full = simulate(s, engine="full").result
    aggregated = simulate(s, engine="aggregated").result
    assert full.step_time == pytest.approx(aggregated.step_time, rel=1e-3)
