"""DualPipe (DeepSeek-V3's bidirectional pipeline): its order on every device, its bubble against
the schedule's published formula, a two-stage timeline by hand, two stages' parameters per device,
and what a scenario may not ask of it."""

from __future__ import annotations

from collections import Counter

import pytest

from moesim import cli
from moesim.assembly import simulate
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import stage_params
from moesim.sim.pipeline import run_pipeline
from moesim.sim.schedule import dualpipe, dualpipe_plan, one_f_one_b

SIZES = [(2, 4), (4, 8), (4, 12), (6, 14), (8, 20), (16, 40)]


def _run(pp: int, m: int, seconds: dict[str, float]) -> list:
    plans = [dualpipe_plan(stage, pp, m) for stage in range(pp)]
    spans, _ = run_pipeline([p.order for p in plans], 1, lambda st, k, c, now: seconds[k], 0.0,
                            plans=plans)
    return spans


@pytest.mark.parametrize(("pp", "m"), SIZES)
def test_every_device_runs_each_micro_batch_of_each_direction_once(pp, m):
    """Direction 0 (chunk 0) carries micro-batches 0..m/2-1, direction 1 (chunk 1) the rest; each
    passes every device once forward and once backward (whole, or split into an input-gradient
    pass and a later weight-gradient pass), its forward first."""
    half = m // 2
    for stage in range(pp):
        order = dualpipe(stage, pp, m)
        kinds = Counter(kind for kind, _, _ in order)
        assert kinds["F"] + kinds["f"] == m and kinds["B"] + kinds["b"] + kinds["x"] == m
        assert kinds["W"] == kinds["b"] and kinds["f"] == kinds["x"]
        expected = {(mb, int(mb >= half)) for mb in range(m)}
        assert {(mb, c) for kind, mb, c in order if kind in "Ff"} == expected
        assert {(mb, c) for kind, mb, c in order if kind in "Bbx"} == expected
        at = {(kind, mb, c): i for i, (kind, mb, c) in enumerate(order)}
        for mb, c in expected:
            back = next(at[(k, mb, c)] for k in "Bbx" if (k, mb, c) in at)
            fwd = next(at[(k, mb, c)] for k in "Ff" if (k, mb, c) in at)
            assert fwd < back
            if ("b", mb, c) in at:
                assert at[("b", mb, c)] < at[("W", mb, c)]


@pytest.mark.parametrize(("pp", "m"), SIZES)
def test_bubble_is_the_published_formula(pp, m):
    """deepseek-ai/DualPipe's table: bubble (PP/2 - 1)(F&B + B - 3W) per device, here with a
    forward-backward pair taking F&B = F + B (no overlap gained), B = 2F and W = F (the weight
    half of a backward); against 1F1B's (PP - 1)(F + B). Work per device: m (F + B) under both."""
    f, b, w = 1.0, 2.0, 1.0
    spans = _run(pp, m, {"F": f, "B": b, "b": b - w, "W": w, "f": f + b, "x": 0.0})
    step = max(sp.end for sp in spans)
    assert step == pytest.approx(m * (f + b) + (pp / 2 - 1) * (f + b + b - 3 * w))
    orders = [one_f_one_b(stage, pp, 1, m) for stage in range(pp)]
    spans_1f1b, _ = run_pipeline(orders, 1, lambda st, k, c, now: {"F": f, "B": b}[k], 0.0)
    assert max(sp.end for sp in spans_1f1b) == pytest.approx(m * (f + b) + (pp - 1) * (f + b))


def test_two_stages_by_hand():
    """pp = 2, 4 micro-batches, F = 1, B = 2 (b = W = 1), an overlapped forward-backward pair
    2.5 (not 3), no transfer time. Both devices are middle ones, whose first main-step pair the
    reference leaves unoverlapped. Device 0 runs F0 F2 F1 B2 (f3 x0) B3 b1 W1 (micro-batches 2,
    3 enter at device 1, which runs F2 F0 F3 B0 (f1 x2) B1 b3 W3 the same way): F0 [0,1]; F2
    needs device 1's F2 [0,1]: [1,2]; F1 [2,3]; B2 (its direction's last stage) [3,5]; the pair
    f3 + x0 needs device 1's F3, sent with its B0 at 5: [5,7.5]; B3 [7.5,9.5]; b1 needs device
    1's B1 [7.5,9.5]: [9.5,10.5]; W1 [10.5,11.5]. 11.5 = 3 F + 2 B + the pair + b + W."""
    spans = _run(2, 4, {"F": 1.0, "B": 2.0, "b": 1.0, "W": 1.0, "f": 2.5, "x": 0.0})
    zero = [(sp.kind, sp.micro_batch, sp.start, sp.end) for sp in spans if sp.stage == 0]
    assert zero == [("F", 0, 0, 1), ("F", 2, 1, 2), ("F", 1, 2, 3), ("B", 2, 3, 5),
                    ("f", 3, 5, 7.5), ("x", 0, 7.5, 7.5), ("B", 3, 7.5, 9.5),
                    ("b", 1, 9.5, 10.5), ("W", 1, 10.5, 11.5)]
    assert max(sp.end for sp in spans) == 11.5


PIPE = {"parallelism": {"tp": 1, "pp": 2, "dp": 2, "ep": 2},
        "workload": {"global_batch": 8, "micro_batch": 1}}


def test_each_device_holds_one_stage_of_each_direction(make_scenario):
    one = make_scenario(PIPE)
    dual = make_scenario({**PIPE, "parallelism": {**PIPE["parallelism"],
                                                   "schedule": "dualpipe"}})
    plain, both = Layout.for_scenario(one), Layout.for_scenario(dual)
    stages = plain.chunk_layers()
    assert both.chunk_layers() == [[stages[0][0], stages[1][0]], [stages[1][0], stages[0][0]]]
    # Two stages' blocks, and the embedding and LM head on both end devices.
    for stage in range(2):
        dense = sum(stage_params(one, plain, st)[0] for st in range(2))
        experts = sum(stage_params(one, plain, st)[1] for st in range(2))
        assert stage_params(dual, both, stage) == pytest.approx((dense, experts))


def test_a_simulated_step_runs_both_directions(make_scenario):
    """The same 2-stage training step under 1F1B and DualPipe: every device runs 4 forward and 4
    backward chunks, and DualPipe's chunks end sooner (no bubble at two stages, where 1F1B waits
    (pp - 1)(F + B)); its devices then reduce and update two stages' gradients."""
    one = simulate(make_scenario(PIPE))
    dual = simulate(make_scenario({**PIPE, "parallelism": {**PIPE["parallelism"],
                                                           "schedule": "dualpipe"}}))
    assert max(sp.end for sp in dual.spans) < max(sp.end for sp in one.spans)
    for stage in range(2):
        kinds = Counter(sp.kind for sp in dual.spans if sp.stage == stage)
        assert kinds["F"] + kinds["f"] == 4 and kinds["B"] + kinds["b"] + kinds["x"] == 4
        runs = dual.runs
        for c in range(2):   # a zero-bubble input pass is shorter than the whole backward; an
            # overlapped pair no longer than its two chunks back to back, no shorter than either
            assert runs[(stage, "b", c)].makespan <= runs[(stage, "B", c)].makespan
            pair = runs[(stage, "f", c)].makespan
            alone = runs[(stage, "F", c)].makespan, runs[(stage, "B", 1 - c)].makespan
            assert max(alone) <= pair <= sum(alone) * (1 + 1e-12)
            assert runs[(stage, "x", 1 - c)].makespan == 0.0


@pytest.mark.parametrize(("change", "words"), [
    ({"workload": {"mode": "prefill"}}, "training schedule"),
    ({"parallelism": {"pp": 1, "dp": 4, "ep": 4}}, "even pp"),
    ({"parallelism": {"vp": 2}}, "vp must be 1"),
    ({"workload": {"global_batch": 6}}, "at least 2 * pp"),
    ({"parallelism": {"zero_stage": 3}}, "not modelled"),
])
def test_what_dualpipe_cannot_run_is_one_clear_error(make_scenario, change, words):
    base = {**PIPE, "parallelism": {**PIPE["parallelism"], "schedule": "dualpipe"}}
    merged = {**base, **{k: {**base.get(k, {}), **v} for k, v in change.items()}}
    with pytest.raises(ScenarioError) as err:
        make_scenario(merged)
    assert "parallelism.schedule" in str(err.value) and words in str(err.value)


def test_the_cli_refuses_dualpipe_for_serving_with_exit_2(capsys):
    rc = cli.main(["run", "scenarios/tiny-cpu.yaml", "--set", "parallelism.schedule=dualpipe",
                   "--set", "workload.mode=prefill"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "parallelism.schedule" in err and "Traceback" not in err
