"""Hostile input to run, plan, collective, calibrate and the loaders: one line, exit 2, no output.

Each case is one a prober found passing silently, hanging or leaving folders behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.spec.limits import load_yaml_text

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "scenarios" / "tiny-cpu.yaml"     # 8 experts, top-2, ep 2, 4 MoE layers


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 and one line on stderr; return that line."""
    try:
        code = main(argv)
    except SystemExit as exc:      # argparse refuses bad flags by exiting
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error: "), lines
    return lines[0]


def test_replicas_beyond_one_per_device_are_refused_fast(tmp_path, capsys):
    # 8 experts on ep = 2 devices: at most 8 x (2 - 1) = 8 replicas put every expert everywhere.
    out = tmp_path / "run"
    err = refused(["run", str(TINY), "-o", str(out), "--set",
                   "placement.redundant_experts=1000000"], capsys)
    assert "placement.redundant_experts" in err and "<= num_experts x (ep - 1) = 8" in err
    assert not out.exists()
    assert "= 8" in refused(["plan", str(TINY), "-o", str(tmp_path / "p.json"),
                             "--replicas", "10"], capsys)


def test_empty_output_paths_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "-o/--output" in refused(["run", str(TINY), "-o", ""], capsys)
    assert "-o/--output" in refused(["plan", str(TINY), "-o", ""], capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_plan_leaves_no_folder(tmp_path, capsys):
    ids = np.zeros((4, 64, 2), dtype=np.int16)
    ids[..., 1] = 1
    ids[2, 5, 0] = -1                                   # one id out of range
    np.savez(tmp_path / "neg.npz", expert_ids=ids)
    for target in ("plans/", "made/sub/plan.json"):
        err = refused(["plan", str(TINY), "--trace", str(tmp_path / "neg.npz"),
                       "-o", str(tmp_path / target)], capsys)
        assert "neg.npz: expert_ids" in err
    assert not (tmp_path / "plans").exists() and not (tmp_path / "made").exists()
    assert "--split" in refused(["plan", str(TINY), "--split", "0.3", "-o",
                                 str(tmp_path / "p.json")], capsys)


def test_trace_layout_is_honoured_by_run_as_by_plan(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(4 * 64)]).reshape(4, 64, 2)
    np.savez(tmp_path / "lf.npz", expert_ids=ids.astype(np.int16))
    np.savez(tmp_path / "tf.npz", expert_ids=ids.transpose(1, 0, 2).astype(np.int16),
             layout=np.array("tokens,layers,k"))
    np.savez(tmp_path / "bad.npz", expert_ids=ids.astype(np.int16), layout=np.array("zzz"))
    steps = []
    for name in ("lf", "tf"):
        out = tmp_path / f"run-{name}"
        assert main(["run", str(TINY), "--no-trace", "-o", str(out), "--set",
                     "routing.distribution=trace", "--set",
                     f"routing.trace={tmp_path / name}.npz"]) == 0
        steps.append(json.loads((out / "results.json").read_text())["step_time"])
    capsys.readouterr()
    assert steps[0] == steps[1]   # the same routing, read from either layout
    err = refused(["run", str(TINY), "--no-trace", "-o", str(tmp_path / "r"), "--set",
                   "routing.distribution=trace", "--set",
                   f"routing.trace={tmp_path / 'bad.npz'}"], capsys)
    assert "layout array says 'zzz'" in err


def test_model_and_routing_checks_name_the_file(tmp_path, capsys):
    err = refused(["validate", str(TINY), "--set", "routing.distribution=hot"], capsys)
    assert "tiny-cpu.yaml: routing.hot_experts: 0 must be in 1..7" in err
    err = refused(["validate", str(TINY), "--set", "model={base: tiny-cpu, attention: "
                   "{kind: gqa, num_heads: 4, num_kv_heads: 3, head_dim: 64}}"], capsys)
    assert "num_kv_heads=3 must divide num_heads=4" in err


def test_a_key_given_twice_is_refused(tmp_path, capsys):
    text = TINY.read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(text + "seed: 5\n")
    first = 1 + text.splitlines().index(next(line for line in text.splitlines()
                                              if line.startswith("seed:")))
    err = refused(["validate", str(path)], capsys)
    assert f"key 'seed' given twice (first on line {first})" in err
    # A merge key may be overridden, as YAML allows; a key repeated in another mapping is fine.
    doc = load_yaml_text("a: &x {k: 1, j: 2}\nb: {<<: *x, k: 3}\nc: {k: 4}\n", source="m.yaml")
    assert doc == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}, "c": {"k": 4}}


def test_plan_files_of_another_version_or_model_are_refused(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", str(TINY), "--planner", "contiguous", "-o", str(plan)]) == 0
    capsys.readouterr()
    doc = json.loads(plan.read_text())
    for field, value, said in (("version", 99, "this moesim reads version 1"),
                               ("moe_layer_ids", [0, 1, 2, 99], "the model's MoE layers are")):
        bad = tmp_path / f"{field}.json"
        bad.write_text(json.dumps({**doc, field: value}))
        err = refused(["run", str(TINY), "--no-trace", "-o", str(tmp_path / "r"), "--set",
                       "placement.policy=file", "--set", f"placement.file={bad}"], capsys)
        assert f"{field}: " in err and said in err
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, said", [
    (["--nodes", "600", "--size", "1 MiB"], "4800 ranks: an all-to-all is priced flow by flow"),
    (["--size", "1000"], "has no unit"),
    (["--size", "2 PiB"], "at most 1 PiB"),
    (["--ll-nvlink", "--ll-nic", "--size", "1 MiB"], "not allowed with argument --ll-nvlink"),
])
def test_collective_flags(argv, said, capsys):
    assert said in refused(["collective", "h100-sxm", *argv], capsys)


@pytest.mark.parametrize("argv, said", [
    (["--hidden", "-5"], "--hidden (=-5) must be >= 1"),
    (["--rate", "fast"], "--rate 'fast': a tc rate"),
])
def test_calibrate_flags_are_checked_before_measuring(argv, said, tmp_path, capsys):
    out = tmp_path / "m.yaml"
    assert said in refused(["calibrate", "--tiny", *argv, "-o", str(out)], capsys)
    assert not out.exists()


def test_fault_checks_name_the_list_item(capsys):
    err = refused(["validate", str(TINY), "--set",
                   "faults=[{kind: device, device: 1}, {kind: device, device: 2, slowdown: 0.5}]"],
                  capsys)
    assert "faults[1].slowdown: slowdown=0.5 must be 0 (failed) or >= 1" in err


def test_a_relative_trace_path_is_read_from_the_scenario_folder_then_here(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "scen"
    (folder / "traces").mkdir(parents=True)
    ids = np.stack([np.random.default_rng(1).permutation(8)[:2] for _ in range(256)])
    np.savez(folder / "traces" / "t.npz", expert_ids=ids.reshape(4, 64, 2).astype(np.int16))
    text = TINY.read_text().replace("routing: {distribution: zipf, zipf_s: 0.8}",
                                    "routing: {distribution: trace, trace: traces/t.npz}")
    (folder / "s.yaml").write_text(text)
    (folder / "missing.yaml").write_text(text.replace("traces/t.npz", "traces/none.npz"))
    monkeypatch.chdir(tmp_path)                       # not the scenario's folder
    assert main(["validate", str(folder / "s.yaml")]) == 0
    capsys.readouterr()
    # Not beside the scenario but in the working directory: found there, as a model would be.
    (tmp_path / "here.npz").write_bytes((folder / "traces" / "t.npz").read_bytes())
    assert main(["validate", str(folder / "s.yaml"), "--set", "routing.trace=here.npz"]) == 0
    capsys.readouterr()
    err = refused(["validate", str(folder / "missing.yaml")], capsys)
    assert "missing.yaml: routing.trace:" in err and "none.npz: no such trace file" in err


@pytest.mark.parametrize("value, said", [
    ("2:1", "'2:1' reads as the base-60 number 121 in YAML 1.1"),
    ("010", "'010' has a leading zero, which YAML 1.1 reads as octal"),
])
def test_yaml_11_number_traps_are_refused(value, said, capsys):
    assert said in refused(["validate", str(TINY), "--set", f"workload.global_batch={value}"],
                           capsys)


def test_a_yaml_12_exponent_is_a_number():
    # YAML 1.1 needs a dot and a signed exponent (1.0e+3); 1e-6 and 2.5e3 were read as text.
    assert load_yaml_text("a: 1e-6\nb: 2.5e3\nc: 1.0e+3\nd: '1e3'\n", source="x") == {
        "a": 1e-6, "b": 2500.0, "c": 1000.0, "d": "1e3"}


@pytest.mark.parametrize("model, said", [
    ("{base: tiny-cpu, attention: {kind: mla, num_heads: 4}}", "MLA attention needs kv_lora_rank"),
    ("{base: tiny-cpu, hidden_size: 250, attention: {head_dim: 0}}",
     "hidden_size=250 must be a multiple of num_heads=4"),
    ("{base: tiny-cpu, cross_attention_layers: 5}", "cross_attention_layers=5 must be <= "),
])
def test_model_shapes_that_cannot_be_built_are_refused(model, said, capsys):
    assert said in refused(["validate", str(TINY), "--set", f"model={model}"], capsys)


def test_cluster_routing_and_plan_flag_checks(tmp_path, capsys):
    err = refused(["validate", str(REPO / "scenarios" / "switch-base-128-tpu.yaml"), "--set",
                   "cluster.devices_per_node=7"], capsys)
    assert "7 chips per host must divide the torus's 32 chips" in err
    err = refused(["validate", str(TINY), "--set", "routing.coactivation_groups=100", "--set",
                   "routing.coactivation_strength=5"], capsys)
    assert "tiny-cpu.yaml: routing.coactivation_groups: 100 must be in 1..num_experts=8" in err
    out = str(tmp_path / "p.json")
    assert "--stall" in refused(["plan", str(TINY), "-o", out, "--stall", "blocking"], capsys)
    assert "--eval-sample" in refused(["plan", str(TINY), "-o", out, "--eval-sample", "5"], capsys)
    assert "listed twice" in refused(["plan", str(TINY), "-o", out, "--failed-devices", "1,1"],
                                     capsys)
    assert "control character" in refused(["run", str(TINY), "-o", str(tmp_path / "a\nb")],
                                          capsys)
    assert not (tmp_path / "a\nb").exists()


def test_a_plan_holding_true_is_refused(tmp_path, capsys):
    plan = tmp_path / "sg.json"
    plan.write_text(json.dumps({"physical_to_logical_map": [[2, 3, 5, 7, 0, True, 4, 6]] * 4}))
    err = refused(["plan", str(TINY), "-o", str(tmp_path / "o.json"), "--current", str(plan),
                   "--planner", "eplb"], capsys)
    assert "physical_to_logical_map: holds true/false" in err


def test_a_scenario_may_carry_its_search_section(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(TINY.read_text() + "search: {parallelism.tp: [1], top: 2}\n")
    assert main(["validate", str(path)]) == 0


def test_import_only_flags_need_import(tmp_path, capsys):
    err = refused(["calibrate", "--system", "h100_sxm", "-o", str(tmp_path / "m.yaml")], capsys)
    assert "--system: only read with --import aiconfigurator" in err


def test_interleaving_needs_a_pipeline(capsys):
    err = refused(["validate", str(TINY), "--set", "parallelism.pp=1", "--set",
                   "parallelism.dp=4", "--set", "parallelism.vp=2"], capsys)
    assert "parallelism.vp: vp=2 interleaves pipeline stages; with pp=1 there are none" in err


def test_fields_another_field_makes_unused_are_warned_about(tmp_path, capsys):
    args = ["--set", "workload.context_len=5", "--set", "cluster.torus_dims=[2, 2]", "--set",
            "placement.file=plan.json", "--set", "memory={recompute: full, recompute_modules: "
            "[moe]}"]
    assert main(["validate", str(TINY), *args]) == 0
    out = capsys.readouterr().out
    for said in ("cluster.torus_dims is unused: the topology is 'fat_tree'",
                 "workload.context_len is unused in training",
                 "placement.file is unused: placement.policy is",
                 "memory.recompute_modules is unused: memory.recompute is 'full'"):
        assert f"warning: {said}" in out
    assert main(["run", str(TINY), "--no-trace", "-o", str(tmp_path / "r"),
                 "--set", "workload.context_len=5"]) == 0
    assert "moesim: warning: workload.context_len is unused" in capsys.readouterr().err
    assert main(["validate", str(TINY)]) == 0 and "warning" not in capsys.readouterr().out
    assert main(["validate", str(TINY), "--set", "communication.alltoall=deepep_normal"]) == 0
    assert "prices NVIDIA GPU kernels (SMs, NVLink, RDMA) on a cpu" in capsys.readouterr().out
    # cpu-local (tiny-cpu's profile) gives bf16 and fp32 peaks only.
    assert main(["validate", str(TINY), "--set", "precision.compute=fp8"]) == 0
    assert ("warning: cpu-local gives no peak_flops.fp8: fp8 GEMMs are priced at bf16's peak"
            in capsys.readouterr().out)


def test_experts_left_whole_on_every_tp_rank_are_warned_about(capsys):
    # tiny-cpu on its 4 devices as TP2 x DP2: with ep=1 and etp=1 each TP rank would hold and
    # run every expert whole; with ep=2 the experts spread over the pair, with etp=2 each TP
    # rank holds half of every expert (expert tensor parallelism).
    tp2 = ["--set", "parallelism.tp=2", "--set", "parallelism.pp=1"]
    assert main(["validate", str(TINY), *tp2, "--set", "parallelism.ep=1"]) == 0
    assert "warning: parallelism.ep=1 < tp=2 with etp=1" in capsys.readouterr().out
    for fix in (["parallelism.ep=2"], ["parallelism.ep=1", "parallelism.etp=2"]):
        assert main(["validate", str(TINY), *tp2, *(x for f in fix for x in ("--set", f))]) == 0
        assert "< tp=2" not in capsys.readouterr().out


def test_a_relative_plan_file_is_found_in_the_working_directory_too(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(TINY), "--planner", "contiguous", "-o", "plan.json"]) == 0
    assert not (TINY.parent / "plan.json").exists()    # not beside the scenario: only here
    assert main(["run", str(TINY), "--no-trace", "-o", "r", "--set", "placement.policy=file",
                 "--set", "placement.file=plan.json"]) == 0
    capsys.readouterr()
