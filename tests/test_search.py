"""moesim search: enumeration, validity, the closed-form screen against full simulations, serving
metrics, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from moesim.assembly import simulate
from moesim.cli import main
from moesim.errors import ScenarioError
from moesim.layout import Layout
from moesim.memory import stage_memory
from moesim.pricing.context import PricingContext
from moesim.search.runner import run_search
from moesim.search.serving import (
    RequestShape,
    decode_scenario,
    kv_max_batch,
    pareto_front,
    serving_metrics,
)
from moesim.search.space import load_search
from moesim.spec.scenario import load_scenario

from .conftest import REPO

TINY = REPO / "scenarios" / "tiny-cpu.yaml"
# Pin every knob but the parallel degrees: the brute force below then walks the same space.
PINNED = {"workload.micro_batch": [1], "parallelism.zero_stage": [1],
          "memory.recompute": ["none"], "communication.overlap": ["none"],
          "communication.alltoall": ["direct"], "parallelism.schedule": ["1f1b"]}


def _scenario_file(tmp_path: Path, src: Path, search: dict, **changes) -> Path:
    data = yaml.safe_load(src.read_text())
    data.update(changes)
    data["search"] = search
    path = tmp_path / src.name
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(folder: Path) -> list[dict]:
    with open(folder / "search.csv") as f:
        return list(csv.DictReader(f))


def _brute_force(devices: int) -> dict[tuple, float]:
    """Step time of every valid (tp, pp, ep, vp) of tiny-cpu on ``devices``, simulated fully."""
    times = {}
    for tp in (1, 2):
        for pp in (1, 2, 4):
            if devices % (tp * pp):
                continue
            dp = devices // (tp * pp)
            for ep in (1, 2, 4, 8):
                for vp in (1, 2, 4):
                    if (dp * tp) % ep or 8 % ep or pp * vp > 4 or (pp == 1 and vp > 1):
                        continue
                    if (8 // dp) % pp and vp > 1:
                        continue
                    s = load_scenario(TINY, [f"parallelism.tp={tp}", f"parallelism.pp={pp}",
                                             f"parallelism.dp={dp}", f"parallelism.ep={ep}",
                                             f"parallelism.vp={vp}"])
                    times[(tp, pp, ep, vp)] = simulate(s).result.step_time
    return times


def test_search_finds_the_brute_force_best_and_the_screen_keeps_it(tmp_path):
    path = _scenario_file(tmp_path, TINY, {**PINNED, "top": 3})
    out = run_search(load_search(path), tmp_path / "out")
    times = _brute_force(4)
    best = min(times, key=lambda k: times[k])
    # every valid layout of the pinned space is in the table, none twice
    assert len(out.rows) == len(times)
    first = out.rows[0]
    assert first["simulated"]
    got = (first["parallelism.tp"], first["parallelism.pp"], first["parallelism.ep"],
           first["parallelism.vp"])
    assert times[got] == pytest.approx(times[best], rel=1e-9)
    assert first["step_time_s"] == pytest.approx(times[best], rel=1e-9)
    # the screen put the layout the full simulation ranks first among its top 3
    screened = sorted(out.rows, key=lambda r: r["screened_step_time_s"])[:3]
    assert any((r["parallelism.tp"], r["parallelism.pp"], r["parallelism.ep"],
                r["parallelism.vp"]) == best for r in screened)
    # the scenario's own layout (tp1 pp2 ep2) is ranked, and its rank matches its time
    assert out.own_rank is not None
    own = out.rows[out.own_rank - 1]
    assert (own["parallelism.pp"], own["parallelism.ep"]) == (2, 2)
    assert own["simulated"] and own["step_time_s"] == pytest.approx(times[(1, 2, 2, 1)])


def test_memory_infeasible_layouts_never_reach_the_table(tmp_path):
    src = REPO / "scenarios" / "mixtral-8x7b-train-4node.yaml"
    path = _scenario_file(tmp_path, src, {**PINNED, "memory.recompute": ["selective"],
                                          "parallelism.tp": [1], "parallelism.vp": [1],
                                          "top": 1})
    spec = load_search(path)
    out = run_search(spec, tmp_path / "out")
    assert out.dropped["out of memory"] > 0
    rows = _rows(tmp_path / "out")
    assert len(rows) == len(out.rows) > 0
    for r in rows:   # an independent memory check of every listed layout
        s = load_scenario(src, [
            f"parallelism.pp={r['parallelism.pp']}", f"parallelism.dp={r['parallelism.dp']}",
            f"parallelism.ep={r['parallelism.ep']}", "parallelism.tp=1", "parallelism.vp=1"])
        layout = Layout.for_scenario(s)
        assert all(stage_memory(s, layout, st).fits for st in range(s.parallelism.pp))
        assert float(r["memory_bytes"]) <= float(r["memory_capacity_bytes"])
    # pp=1 with ep=1 holds all 47B parameters and their Adam state on one GPU
    assert not any(r["parallelism.pp"] == "1" and r["parallelism.ep"] == "1" for r in rows)


def test_enumeration_counts_and_cap(tmp_path):
    # tiny-cpu on 4 devices, pinned: tp in {1,2}, pp in {1,2,4} (divisors of 4, <= 4 layers),
    # ep in {1,2,4} (divide both the 8 experts and the 4 devices), vp in {1,2,4,8}
    path = _scenario_file(tmp_path, TINY, {**PINNED, "max_layouts": 3})
    spec = load_search(path)
    from moesim.search.space import enumerate_layouts
    cands, dropped, capped = enumerate_layouts(spec)
    assert capped and len(cands) == 3
    assert cands[0].label() == "TP1 PP2 EP2 DP2"          # the scenario's own layout first
    spec = load_search(_scenario_file(tmp_path, TINY, PINNED))
    cands, dropped, capped = enumerate_layouts(spec)
    assert not capped
    # 2 x 3 x 3 x 4 = 72 combinations
    assert len(cands) + sum(dropped.values()) == 72
    assert len(cands) == len(_brute_force_count())


def _brute_force_count() -> list[tuple]:
    out = []
    for tp in (1, 2):
        for pp in (1, 2, 4):
            if 4 % (tp * pp):
                continue
            dp = 4 // (tp * pp)
            for ep in (1, 2, 4):
                for vp in (1, 2, 4, 8):
                    if (dp * tp) % ep or pp * vp > 4 or (pp == 1 and vp > 1):
                        continue
                    if vp > 1 and (8 // dp) % pp:
                        continue
                    out.append((tp, pp, ep, vp))
    return out


def test_bad_search_sections_are_one_line_errors(tmp_path):
    with pytest.raises(ScenarioError, match="search.parallelism.foo"):
        load_search(_scenario_file(tmp_path, TINY, {"parallelism.foo": [1]}))
    with pytest.raises(ScenarioError, match="search.speed"):
        load_search(_scenario_file(tmp_path, TINY, {"speed": 3}))
    with pytest.raises(ScenarioError, match="whole number of 2-device nodes"):
        load_search(TINY, gpus=3)


def test_serving_metrics_by_hand():
    # TPOT 20 ms at 16 sequences per replica, 4 replicas on 8 GPUs:
    # 16 * 4 / 0.02 / 8 = 400 tokens/s per GPU, 1 / 0.02 = 50 tokens/s per user
    m = serving_metrics(0.020, 0.5, 16, 4, 8)
    assert m["tokens_per_s_per_gpu"] == pytest.approx(400.0)
    assert m["tokens_per_s_per_user"] == pytest.approx(50.0)
    assert m["ttft_s"] == 0.5 and m["tpot_s"] == 0.020
    # (3,1) and (1,3) are incomparable, (2,2) too; (1,1) and (2,0.5) are beaten
    assert pareto_front([(3, 1), (1, 3), (2, 2), (1, 1), (2, 0.5), (3, 1)]) == [
        True, True, True, False, False, True]


def test_one_layer_ttft_tpot_agree_with_direct_simulation(tmp_path):
    """A one-layer model served on 2 devices: the search's TPOT is the decode step of B
    sequences at the average context, its TTFT the prefill of one prompt, both simulated."""
    data = yaml.safe_load(TINY.read_text())
    data.update(model={"base": "tiny-cpu", "num_layers": 1},
                cluster={"hardware": "cpu-local", "topology": "fat_tree", "nodes": 1,
                         "devices_per_node": 2},
                parallelism={"tp": 1, "pp": 1, "dp": 2, "ep": 2},
                workload={"mode": "decode", "global_batch": 8, "seq_len": 1, "micro_batch": 4,
                          "context_len": 128},
                search={**{k: v for k, v in PINNED.items() if k != "workload.micro_batch"},
                        "workload.micro_batch": [4], "parallelism.tp": [1],
                        "parallelism.ep": [2], "output_len": 64, "top": 1})
    path = tmp_path / "one-layer.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_search(path)
    out = run_search(spec, tmp_path / "out")
    row = next(r for r in out.rows if r["simulated"])
    assert (row["parallelism.pp"], row["parallelism.dp"]) == (1, 2)
    base = ["parallelism.tp=1", "parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2"]
    plain = dict(data)
    plain.pop("search")
    plain_path = tmp_path / "plain.yaml"
    plain_path.write_text(yaml.safe_dump(plain))
    # decode: 4 sequences per replica, context 128 + 64 / 2 = 160 tokens
    dec = load_scenario(plain_path, base + ["workload.micro_batch=4", "workload.global_batch=8",
                                            "workload.context_len=160"])
    pre = load_scenario(plain_path, base + ["workload.mode=prefill", "workload.seq_len=128",
                                            "workload.micro_batch=1", "workload.global_batch=2",
                                            "workload.context_len=0"])
    tpot, ttft = simulate(dec).result.step_time, simulate(pre).result.step_time
    assert row["tpot_s"] == pytest.approx(tpot, rel=1e-9)
    assert row["ttft_s"] == pytest.approx(ttft, rel=1e-9)
    assert row["tokens_per_s_per_user"] == pytest.approx(1 / tpot)
    assert row["tokens_per_s_per_gpu"] == pytest.approx(2 * 4 / tpot / 2)
    # the screen's TPOT is a fair estimate of the simulated one
    assert row["screened_tpot_s"] == pytest.approx(tpot, rel=0.5)


def test_kv_bound_batch_is_the_largest_that_fits():
    s = load_scenario(REPO / "scenarios" / "mixtral-8x7b-infer-1node.yaml")
    shape = RequestShape(2048, 256)
    b = kv_max_batch(s, shape)
    layout = Layout.for_scenario(s)

    def fits(n: int) -> bool:
        d = decode_scenario(s, shape, n, longest=True)
        return stage_memory(d, layout, 0).fits

    assert b > 0 and fits(b) and not fits(b + 1)
    # by hand: each extra sequence adds its KV cache at the longest context, 2048 + 256 tokens
    # plus the one being decoded, x 32 layers x (K and V: 2 x 8 KV heads x 128 x 2 bytes)
    d1, d2 = (stage_memory(decode_scenario(s, shape, n, longest=True), layout, 0)
              for n in (1, 2))
    assert d2.kv_cache - d1.kv_cache == pytest.approx(2305 * 32 * 2 * 8 * 128 * 2)


def test_cli_writes_outputs_and_runnable_top_scenarios(tmp_path, capsys):
    path = _scenario_file(tmp_path, TINY, {**PINNED, "top": 2})
    out = tmp_path / "out"
    assert main(["search", str(path), "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "the scenario's own layout (TP1 PP2 EP2 DP2) ranks" in text
    manifest = json.loads((out / "search.json").read_text())
    assert manifest["valid"] == len(_rows(out))
    tops = sorted((out / "top").glob("*.yaml"))
    assert len(tops) == 2
    assert main(["run", str(tops[0]), "-o", str(tmp_path / "run"), "--no-trace"]) == 0
    # a second search into the same folder needs --resume, which reuses every simulation
    assert main(["search", str(path), "-o", str(out), "-q"]) == 2
    assert main(["search", str(path), "-o", str(out), "-q", "--resume"]) == 0
    assert json.loads((out / "search.json").read_text())["simulated"] == 0
    assert main(["search", str(TINY), "-o", str(tmp_path / "x"), "--max-tpot", "50ms"]) == 2


def test_plot_of_a_search_folder(tmp_path):
    from moesim.report.cli import plot_results

    path = _scenario_file(tmp_path, TINY, {**PINNED, "top": 1})
    run_search(load_search(path), tmp_path / "out")
    written = plot_results(tmp_path / "out", tmp_path / "plots")
    assert {p.name for p in written} == {"step-time-vs-memory.png", "step-time-vs-memory.svg"}
    serving = REPO / "scenarios" / "mixtral-8x7b-infer-1node.yaml"
    spath = _scenario_file(tmp_path, serving, {"parallelism.tp": [1], "parallelism.pp": [1],
                                               "parallelism.ep": [8], "top": 1,
                                               "workload.micro_batch": [16, 64]})
    run_search(load_search(spath), tmp_path / "sout", max_tpot=0.05)
    written = plot_results(tmp_path / "sout", tmp_path / "splots")
    assert {p.name for p in written} == {"pareto.png", "pareto.svg"}
    rows = _rows(tmp_path / "sout")
    assert any(r["pareto"] == "True" for r in rows)


def test_dualpipe_layouts_follow_its_rules_and_the_screen_follows_the_simulator(tmp_path):
    """With both schedules open, a DualPipe layout is valid exactly where DualPipe runs (even pp,
    vp 1, an even number of micro-batches at least 2 pp); its screen (half of a device's two
    stages per micro-batch plus the bubble (pp/2 - 1)(F + B/2)) stays near the simulation."""
    from moesim.search.screen import screen_layout
    from moesim.search.space import candidate_scenario, enumerate_layouts
    search = {**PINNED, "parallelism.schedule": ["1f1b", "dualpipe"]}
    spec = load_search(_scenario_file(tmp_path, TINY, search))
    cands, dropped, _ = enumerate_layouts(spec)
    dual = [c for c in cands if c.get("parallelism.schedule") == "dualpipe"]
    assert dual and len(cands) - len(dual) == len(_brute_force_count())
    for c in dual:
        pp, vp = c.get("parallelism.pp"), c.get("parallelism.vp")
        mbs = spec.scenario.workload.global_batch // c.get("parallelism.dp")
        assert pp % 2 == 0 and vp == 1 and mbs % 2 == 0 and mbs >= 2 * pp
        s = candidate_scenario(spec, c, validate=True)
        ctx = PricingContext.from_scenario(s)
        assert screen_layout(s, ctx.topology).step_time == pytest.approx(
            simulate(s).result.step_time, rel=0.1)


def test_replicated_dispatch_layouts_keep_the_loaders_rule(tmp_path):
    """A serving search of Mixtral on one DGX H100 with the ``replicated`` dispatch (EP inside
    each TP group): every layout it keeps loads as a scenario (ep divides tp), and those with
    ep larger than tp, whose TP ranks hold different tokens, are dropped for that reason (they
    were priced as if nothing moved)."""
    from moesim.search.space import candidate_scenario, enumerate_layouts
    from moesim.spec.scenario import replicated_dispatch_problem

    data = yaml.safe_load((REPO / "scenarios" / "mixtral-8x7b-infer-1node.yaml").read_text())
    data["parallelism"] = {"tp": 8, "pp": 1, "dp": 1, "ep": 8}
    data["communication"] = {"alltoall": "replicated"}
    data["search"] = {"parallelism.pp": [1], "workload.micro_batch": [64],
                      "communication.overlap": ["none"]}
    path = tmp_path / "replicated.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_search(path)
    cands, dropped, _ = enumerate_layouts(spec)
    layouts = {(dict(c.values)["parallelism.tp"], dict(c.values)["parallelism.ep"])
               for c in cands}
    assert layouts and all(tp % ep == 0 for tp, ep in layouts)
    assert (8, 8) in layouts and (4, 8) not in layouts
    assert any(reason.startswith("replicated") for reason in dropped)
    for cand in cands:
        par = candidate_scenario(spec, cand).parallelism
        assert replicated_dispatch_problem(par.tp, par.ep, par.sequence_parallel, par.etp) is None
