"""Expert tensor parallelism (``parallelism.etp``): every expert's FFN split over the TP group,
as vLLM and SGLang run MoE without expert parallelism. Hand profile (conftest), tiny-cpu model
(hidden 256, 4 experts of 512 here, top-1)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.assembly import scenario_placement, simulate
from moesim.compute import KernelTimer
from moesim.errors import ScenarioError
from moesim.pricing.collectives import _shard_groups
from moesim.pricing.context import PricingContext
from moesim.sim.costs import CostModel

ETP2 = {"parallelism": {"tp": 2, "dp": 2, "ep": 1, "etp": 2}}


def test_expert_tensor_parallel_layouts_name_the_field(make_scenario):
    for changes, match in (({"tp": 2, "dp": 2, "ep": 1, "etp": 4}, "must be 1 or tp=2"),
                           ({"tp": 2, "dp": 2, "ep": 2, "etp": 2}, "without expert parallel")):
        with pytest.raises(ScenarioError, match=match) as exc:
            make_scenario({"parallelism": changes})
        assert exc.value.field == "parallelism.etp"
    with pytest.raises(ScenarioError, match="does not split") as exc:
        make_scenario({**ETP2, "model": {"expert_ffn_size": 513}})
    assert exc.value.field == "parallelism.etp"


def test_each_tp_rank_runs_its_slice_of_every_expert(make_scenario):
    """The grouped GEMMs of an etp-2 rank are those of whole experts half as wide (the same
    kernel model at f / 2); its expert slices are reduced with the ranks holding the same slice
    (0 and 2), as the dense weights are."""
    s = make_scenario(ETP2)
    ctx = PricingContext.from_scenario(s)
    tokens = np.array([64.0, 0.0, 17.0, 300.0])
    whole = KernelTimer(s.model, s.hardware.device, tp=2)
    assert ctx.timer.experts(tokens) == pytest.approx(whole.experts(tokens, ffn_size=256),
                                                      rel=1e-12)
    groups = _shard_groups(ctx, 0, dense=1.0, experts=1.0)
    assert [members.tolist() for _, members in groups] == [[0, 2], [0, 2]]


def test_a_step_with_experts_split_over_tp(make_scenario):
    """TP2 without EP: with etp 1 each TP rank runs whole experts on its half of the group's
    tokens (a token is routed once by its group); with etp 2 every token of the group through
    half of each expert: the same FLOPs, in GEMMs half as wide over twice the tokens, and twice
    the tokens to permute. Nothing else differs (the router runs on the tokens a rank holds,
    no all-to-all either way), so a forward pass differs by exactly the MoE layer's difference
    in each of its 4 blocks, a backward twice that (the rest of the step differs too: half the
    expert gradients to reduce and to update)."""
    plain = simulate(make_scenario({"parallelism": {"tp": 2, "dp": 2, "ep": 1}}))
    split = simulate(make_scenario(ETP2))
    ctxs = [sim.costs.ctx for sim in (plain, split)]
    assert ctxs[0].group_tokens == ctxs[1].group_tokens == ctxs[1].tokens_per_source
    assert ctxs[0].tokens_per_source == ctxs[0].group_tokens / 2
    blocks = [CostModel(sim.costs.ctx, scenario_placement(sim.scenario)).block(0)
              for sim in (plain, split)]
    assert blocks[0].dispatch.duration == blocks[1].dispatch.duration == 0.0
    assert blocks[0].gate == blocks[1].gate
    assert blocks[0].traffic.slot_tokens.sum() * 2 == pytest.approx(
        blocks[1].traffic.slot_tokens.sum(), rel=1e-12)
    moe = [float(b.experts.max()) + b.permute for b in blocks]
    assert moe[0] != moe[1]
    for kind, scale in (("F", 1), ("B", 2)):
        run = [sim.runs[(0, kind, 0)].makespan for sim in (plain, split)]
        assert run[1] - run[0] == pytest.approx(scale * (moe[1] - moe[0]) * 4, rel=1e-9)


def test_search_keeps_experts_split_over_each_layouts_tp(tmp_path):
    """A scenario with etp = tp keeps its experts split over the TP group in every layout the
    search tries (etp = that layout's tp, ep 1); layouts with ep > 1 are dropped."""
    import yaml

    from moesim.search.space import (
        candidate_overrides,
        candidate_scenario,
        enumerate_layouts,
        load_search,
    )

    from .conftest import REPO
    data = yaml.safe_load((REPO / "scenarios" / "tiny-cpu.yaml").read_text())
    data["parallelism"] = {"tp": 2, "pp": 1, "dp": 2, "ep": 1, "etp": 2}
    data["search"] = {"workload.micro_batch": [1], "parallelism.zero_stage": [1],
                      "memory.recompute": ["none"], "communication.overlap": ["none"],
                      "communication.alltoall": ["direct"], "parallelism.schedule": ["1f1b"],
                      "parallelism.vp": [1], "parallelism.pp": [1]}
    path = tmp_path / "etp.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_search(path)
    cands, dropped, _ = enumerate_layouts(spec)
    assert dropped["experts split over TP (etp) need ep 1 and an FFN that splits over tp"] > 0
    assert {c.get("parallelism.tp") for c in cands} == {1, 2}     # nodes of 2 devices
    for cand in cands:
        fast, checked = candidate_scenario(spec, cand), candidate_scenario(spec, cand,
                                                                             validate=True)
        assert fast.parallelism == checked.parallelism
        assert fast.parallelism.etp == fast.parallelism.tp and fast.parallelism.ep == 1
        assert f"parallelism.etp={fast.parallelism.tp}" in candidate_overrides(spec, cand)
