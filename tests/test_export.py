"""Plan files (moesim, SGLang, TensorRT-LLM), engine load dumps, and the ``moesim plan`` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.errors import InfeasiblePlacement, MoESimError, TraceError
from moesim.placement import export
from moesim.placement.placement import Placement
from moesim.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "scenarios" / "tiny-cpu.yaml"


def _placement(layers: int = 4, ep: int = 2, slots: int = 5, experts: int = 8) -> Placement:
    """A valid placement with replicas: every expert once, then spares cycling."""
    rng = np.random.default_rng(0)
    rows = [rng.permutation(np.arange(ep * slots) % experts) for _ in range(layers)]
    return Placement.from_physical(np.array(rows), ep, experts, name="test")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt, name", [("moesim", "plan.json"), ("moesim", "plan.yaml"),
                                       ("sglang", "expert_location.json"),
                                       ("trtllm", "moe_load_balancer.yaml")])
def test_round_trip(tmp_path, fmt, name):
    placement = _placement()
    path = tmp_path / name
    export.write_plan(path, placement, fmt=fmt, moe_layer_ids=[3, 4, 5, 6])
    back = export.read_plan(path, ep=2, moe_layer_ids=[3, 4, 5, 6])
    np.testing.assert_array_equal(back.slot_expert, placement.slot_expert)
    assert back.num_experts == 8


def test_sglang_document_holds_only_the_map(tmp_path):
    placement = _placement()
    export.write_plan(tmp_path / "p.json", placement, fmt="sglang")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert list(doc) == ["physical_to_logical_map"]          # SGLang passes keys as kwargs
    assert doc["physical_to_logical_map"][1] == placement.physical_to_logical[1].tolist()


def test_trtllm_document_keys_are_model_layers(tmp_path):
    placement = _placement()
    export.write_plan(tmp_path / "lb.yaml", placement, fmt="trtllm", moe_layer_ids=[3, 4, 5, 6])
    doc = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    assert doc["num_slots"] == 10 and doc["layer_updates_per_iter"] == 0
    assert sorted(doc["initial_global_assignments"]) == [3, 4, 5, 6]
    assert doc["initial_global_assignments"][5] == placement.physical_to_logical[2].tolist()


def test_trtllm_layers_may_also_be_numbered_from_zero(tmp_path):
    placement = _placement()
    export.write_plan(tmp_path / "lb.yaml", placement, fmt="trtllm")
    back = export.read_plan(tmp_path / "lb.yaml", ep=2, moe_layer_ids=[3, 4, 5, 6])
    np.testing.assert_array_equal(back.slot_expert, placement.slot_expert)


# ----------------------------------------------------------------------------- against a scenario


def _tiny(tmp_path: Path, **changes) -> tuple[Path, object]:
    """tiny-cpu (4 MoE layers, 8 experts, ep=2) with 2 redundant slots, and a valid plan."""
    s = load_scenario(TINY, ["placement.redundant_experts=2"])
    placement = _placement(layers=4, ep=2, slots=5)
    doc = export.to_moesim(placement)
    doc.update(changes)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    return path, s


def test_load_plan_accepts_a_matching_plan(tmp_path):
    path, s = _tiny(tmp_path)
    placement = export.load_plan(path, s)
    assert placement.num_layers == 4 and placement.ep == 2 and placement.slots_per_device == 5


@pytest.mark.parametrize("change, match", [
    ({"slot_expert": _placement(layers=3, slots=5).slot_expert.tolist()},
     r"plan.json: layers: the plan has 3 MoE layers; the model tiny-cpu has 4"),
    ({"slot_expert": _placement(layers=4, ep=4, slots=5, experts=8).slot_expert.tolist(),
      "ep": 4}, r"plan.json: ep: the plan is for ep=4 devices; expected ep=2"),
    ({"slot_expert": _placement(layers=4, slots=4).slot_expert.tolist(), "slots_per_device": 4},
     r"plan.json: slots: the plan has 8 slots .* set placement.redundant_experts=0"),
    ({"num_experts": 9}, r"plan.json: num_experts: the plan is for 9 experts; the model has 8"),
    ({"slot_expert": [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 0]]] * 4},
     r"plan.json: slot_expert\[0\]: expert id 8 out of range; allowed 0..7"),
    ({"slot_expert": [[[0, 1, 2, 3, 4], [5, 6, 0, 1, 2]]] * 4},
     r"plan.json: slot_expert: layer 0: experts \[7\] have no slot"),
    ({"slot_expert": [[[0, 1, 2], [3, 4]]]}, r"plan.json: slot_expert: must be a non-empty "
                                             r"rectangular"),
    ({"slot_expert": [[["a", "b"]]]}, r"plan.json: slot_expert: must be .* integer"),
    ({"format": "other"}, r"plan.json: format: 'other'; expected 'moesim-placement'"),
    ({"ep": 3}, r"plan.json: ep: 3 but slot_expert has 2"),
])
def test_bad_plan_names_file_and_field(tmp_path, change, match):
    path, s = _tiny(tmp_path, **change)
    with pytest.raises(InfeasiblePlacement, match=match):
        export.load_plan(path, s)


@pytest.mark.parametrize("text, suffix, match", [
    ("{not json", ".json", r"bad.json: not valid JSON"),
    ("[1, 2]", ".json", r"bad.json: a plan file must be a mapping"),
    ('{"experts": []}', ".json", r"bad.json: unknown plan format: keys \['experts'\]"),
    ('{"physical_to_logical_map": [[0]], "extra": 1}', ".json",
     r"bad.json: extra: unknown key; an SGLang plan holds only physical_to_logical_map"),
    ("initial_global_assignments: {0: [0, 1], 1: [1, 0]}\nnum_slots: 3\n", ".yaml",
     r"bad.yaml: num_slots: 3 but each layer lists 2 slots"),
    ("initial_global_assignments: {7: [0, 1], 9: [1, 0]}\n", ".yaml",
     r"bad.yaml: initial_global_assignments: 2 layers \[7, 9\]... match neither"),
    ("initial_global_assignments: [1, 2]\n", ".yaml",
     r"bad.yaml: initial_global_assignments: must be a non-empty mapping"),
])
def test_malformed_files_name_file_and_field(tmp_path, text, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(MoESimError, match=match):       # a one-line error naming the file
        export.read_plan(path, ep=2, moe_layer_ids=[0, 1])


def test_missing_file_and_missing_ep(tmp_path):
    with pytest.raises(InfeasiblePlacement, match="nope.json: no such plan file"):
        export.read_plan(tmp_path / "nope.json")
    export.write_plan(tmp_path / "s.json", _placement(), fmt="sglang")
    with pytest.raises(InfeasiblePlacement, match="s.json: ep: a sglang plan does not record"):
        export.read_plan(tmp_path / "s.json")


# ----------------------------------------------------------------------------- engine loads


def test_sglang_logical_count_is_summed_over_steps(tmp_path):
    count = np.arange(2 * 3 * 4).reshape(2, 3, 4)           # [steps, layers, experts]
    (tmp_path / "dump.json").write_text(json.dumps({"logical_count": count.tolist()}))
    trace = export.import_load(tmp_path / "dump.json", num_experts=4, num_layers=3)
    np.testing.assert_array_equal(trace.counts, count.sum(axis=0))
    assert not trace.per_token


def test_vllm_load_history_and_npz(tmp_path):
    rows = [np.full((2, 3), i + 1.0) for i in range(3)]
    doc = {"load_history": [{"logical_expert_load": r.tolist()} for r in rows]}
    (tmp_path / "vllm.json").write_text(json.dumps(doc))
    np.testing.assert_array_equal(export.import_load(tmp_path / "vllm.json").counts,
                                  np.full((2, 3), 6.0))
    np.savez(tmp_path / "load.npz", logical_expert_load=np.ones((5, 2, 3)))
    np.testing.assert_array_equal(export.import_load(tmp_path / "load.npz").counts,
                                  np.full((2, 3), 5.0))


@pytest.mark.parametrize("doc, match", [
    ({"counts": [[1]]}, r"no expert load found; expected one of logical_count"),
    ({"logical_count": [1, 2]}, r"logical_count: shape \(2,\); expected \[..., layers, experts\]"),
    ({"logical_count": [[1, -1]]}, r"logical_count: counts must be finite and >= 0"),
    ({"logical_count": [[0, 0], [1, 1]]}, r"logical_count: layer 0 has no tokens"),
    ({"logical_count": [[1, 1, 1]]}, r"logical_count: 3 experts; the model has 2"),
    ({"load_history": [{"other": 1}]}, r"load_history: every entry needs logical_expert_load"),
])
def test_bad_load_dumps(tmp_path, doc, match):
    (tmp_path / "d.json").write_text(json.dumps(doc))
    with pytest.raises(TraceError, match=match):
        export.import_load(tmp_path / "d.json", num_experts=2)


# ----------------------------------------------------------------------------- CLI


def test_cli_plan_is_accepted_by_run(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", str(TINY), "-o", str(plan), "--replicas", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("moesim", "eplb", "contiguous", "round_robin"):
        assert f"\n{name} " in out
    assert "cross-node MB" in out and "max/mean" in out and "layer us" in out
    doc = json.loads(plan.read_text())
    assert doc["format"] == "moesim-placement" and doc["metadata"]["planner"] == "moesim"
    assert main(["run", str(TINY), "--set", "placement.policy=file", "--set",
                 f"placement.file={plan}", "--set", "placement.redundant_experts=2",
                 "-o", str(tmp_path / "run"), "--no-trace"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["step_time"] > 0


def test_cli_plan_from_a_trace_in_sglang_format(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(400)] for _ in range(4)])
    np.savez(tmp_path / "trace.npz", expert_ids=ids)
    out_path = tmp_path / "loc.json"
    assert main(["plan", str(TINY), "--trace", str(tmp_path / "trace.npz"), "--planner", "eplb",
                 "--planner", "moesim", "--format", "sglang", "-o", str(out_path)]) == 0
    assert "plan on tokens [0, 0.5), price on [0.5, 1)" in capsys.readouterr().out
    back = export.read_plan(out_path, ep=2, num_experts=8)
    assert back.num_layers == 4 and back.slots_per_device == 4


def test_cli_plan_rejects_an_unknown_planner_and_bad_trace(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", str(TINY), "--planner", "magic", "-o", str(tmp_path / "p.json")])
    (tmp_path / "t.npz").write_bytes(b"not a zip")
    assert main(["plan", str(TINY), "--trace", str(tmp_path / "t.npz"),
                 "-o", str(tmp_path / "p.json")]) == 2
    assert "t.npz: not a readable .npz archive" in capsys.readouterr().err


def test_moesim_plan_file_keeps_the_replica_rule(tmp_path):
    from moesim.placement.export import read_plan, write_plan
    from moesim.placement.placement import Placement
    table = np.arange(8).reshape(1, 4, 2)
    for rule in ("even", "least_loaded"):
        write_plan(tmp_path / "p.json", Placement(table, 8, replica_rule=rule))
        assert read_plan(tmp_path / "p.json").replica_rule == rule
    (tmp_path / "bad.json").write_text('{"slot_expert": [[[0, 1]]], "replica_rule": "random"}')
    with pytest.raises(InfeasiblePlacement, match="bad.json: replica_rule: 'random'"):
        read_plan(tmp_path / "bad.json")
