"""Speculative decoding with the model's MTP module as the draft model: what a decode step
verifies, drafts, reads and yields, each derived by hand on small scenarios."""

from __future__ import annotations

import pytest

from moesim.assembly import simulate
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import stage_memory
from moesim.search.serving import (
    RequestShape,
    decode_tokens_per_step,
    prefill_scenario,
    serving_metrics,
)
from moesim.spec.scenario import output_tokens_per_sequence, scenario_warnings

# Two pipeline stages of 2 devices (EP 2), 2 sequences per micro-batch, 16 tokens cached.
DECODE = {"model": {"mtp_modules": 1},
          "parallelism": {"pp": 2, "dp": 2, "ep": 2},
          "workload": {"mode": "decode", "global_batch": 4, "seq_len": 1, "micro_batch": 2,
                       "context_len": 16}}


def _decode(make_scenario, drafts: int, acceptance: float = 0.5):
    return make_scenario({**DECODE, "workload": {**DECODE["workload"],
                                                 "speculative_tokens": drafts,
                                                 "acceptance_rate": acceptance}})


def _dispatches(sim, stage: int) -> int:
    return sum(op.name == "dispatch" for op in sim.runs[(stage, "F", 0)].ops)


def test_a_step_verifies_the_drafts_and_drafts_again_on_the_last_stage(make_scenario):
    plain, spec = simulate(_decode(make_scenario, 0)), simulate(_decode(make_scenario, 2))
    p, s = plain.costs.ctx, spec.costs.ctx
    # The main model runs each sequence's next token and its 2 drafts: 3 tokens per sequence.
    assert s.microbatch_tokens == 3 * p.microbatch_tokens == 3 * 2
    # Queries sit at positions 17, 18, 19 (mean 18); each sequence reads its 16 + 3 cached
    # tokens once, not once per query.
    assert s.context_length() == (16 + 2, s.tokens_per_source / 3 * 19)
    assert p.context_length() == (17, p.tokens_per_source * 17)
    # The MTP module drafts twice after the last block: 2 more MoE blocks (and dispatches) on the
    # last stage only, each at one token per sequence.
    assert _dispatches(spec, 1) == _dispatches(plain, 1) + 2
    assert _dispatches(spec, 0) == _dispatches(plain, 0)
    # The last stage's heads: the LM head over the 3 x 2 verified tokens, then per draft the
    # [2h -> h] projection and the shared head over the 2 sequences' tokens.
    t, h = s.timer, s.hidden
    head = next(op for op in spec.runs[(1, "F", 0)].ops if op.name == "lm_head")
    assert head.duration[0] == pytest.approx(
        t.lm_head(6) + 2 * (t.lm_head(2) + t.gemm(2, h, 2 * h)), rel=1e-12)
    # Yield: 1 + 0.5 + 0.25 tokens per sequence per step, 4 sequences.
    assert spec.result.tokens_per_step == pytest.approx(4 * 1.75)
    assert plain.result.tokens_per_step == 4
    assert spec.result.step_time > plain.result.step_time


@pytest.mark.parametrize("acceptance, tokens", [(0.0, 1.0), (1.0, 3.0), (0.5, 1.75)])
def test_tokens_per_step_from_the_acceptance_rate(make_scenario, acceptance, tokens):
    # k = 2 drafts: every draft rejected yields the verified token alone; all accepted, 3.
    s = _decode(make_scenario, 2, acceptance)
    assert output_tokens_per_sequence(s) == pytest.approx(tokens)
    assert simulate(s).result.tokens_per_step == pytest.approx(4 * tokens)


def test_the_drafting_module_holds_its_weights_and_its_kv_cache(make_scenario):
    plain, spec = _decode(make_scenario, 0), _decode(make_scenario, 1)
    layout = Layout.for_scenario(plain)
    layers = len(layout.stage_layers(1))
    a, b = (stage_memory(x, layout, 1) for x in (plain, spec))
    # KV: 2 sequences per replica at 16 + 1 (plain) or 16 + 2 (one draft) tokens, over the
    # stage's blocks plus, drafting, the MTP module's own layer.
    assert b.kv_cache / a.kv_cache == pytest.approx((18 * (layers + 1)) / (17 * layers))
    assert b.dense_weights > a.dense_weights and b.expert_weights > a.expert_weights
    # the first stage holds no MTP module
    first = [stage_memory(x, layout, 0) for x in (plain, spec)]
    assert first[1].dense_weights == first[0].dense_weights


def test_speculative_decoding_is_refused_where_it_cannot_run(make_scenario):
    with pytest.raises(ScenarioError, match="workload.speculative_tokens.*not in training"):
        make_scenario({"model": {"mtp_modules": 1}, "workload": {"speculative_tokens": 1}})
    with pytest.raises(ScenarioError,
                       match="workload.speculative_tokens.*multi-token-prediction"):
        make_scenario({**DECODE, "model": {"mtp_modules": 0},
                       "workload": {**DECODE["workload"], "speculative_tokens": 1}})
    with pytest.raises(ScenarioError, match="workload.acceptance_rate"):
        _decode(make_scenario, 1, 1.5)
    # an acceptance rate without drafts is valid and named as unused
    s = make_scenario({**DECODE, "workload": {**DECODE["workload"], "acceptance_rate": 0.8}})
    assert any("acceptance_rate is unused" in w for w in scenario_warnings(s))


def test_serving_search_counts_the_accepted_tokens(make_scenario):
    # A 30 ms decode step yielding 1.5 tokens per sequence: TPOT 20 ms; 16 sequences on each
    # of 4 replicas over 8 GPUs -> 16 * 4 / 0.02 / 8 = 400 tokens/s per GPU.
    m = serving_metrics(0.030, 0.5, 16, 4, 8, tokens_per_step=1.5)
    assert m["tpot_s"] == pytest.approx(0.020)
    assert m["tokens_per_s_per_gpu"] == pytest.approx(400.0)
    s = _decode(make_scenario, 1, 0.5)
    assert decode_tokens_per_step(s) == pytest.approx(1.5)
    # the prefill half of a serving layout drafts nothing
    pre = prefill_scenario(s, RequestShape(64, 16))
    assert (pre.workload.speculative_tokens, decode_tokens_per_step(pre)) == (0, 1.0)


def test_the_screen_prices_the_drafts_as_the_simulator_does(make_scenario):
    # One stage (the screen's pipeline formula is exact there): the search's closed-form screen
    # adds the same draft blocks and heads as the simulator, with drafts as without.
    from moesim.pricing.context import scenario_topology
    from moesim.search.screen import screen_layout

    steps = []
    for k in (0, 1, 2):
        s = make_scenario({**DECODE, "parallelism": {"pp": 1, "dp": 4, "ep": 4},
                           "workload": {**DECODE["workload"], "global_batch": 8,
                                        "speculative_tokens": k,
                                        "acceptance_rate": 0.5 if k else 0.0}})
        sim = simulate(s).result.step_time
        assert screen_layout(s, scenario_topology(s)).step_time == pytest.approx(sim, rel=1e-9)
        steps.append(sim)
    assert steps[0] < steps[1] < steps[2]
