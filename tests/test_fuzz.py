"""Fuzzing: mutated scenarios give a valid result or a MoESimError with a message, nothing else.

Mutations of a valid scenario: drop a field, retype a value, negate or enlarge a number, misspell
a key, truncate the YAML text, or replace it with random bytes; and hostile text: YAML alias bombs
in typed fields, deep nesting, integers of hundreds or thousands of digits, names that are paths or
hold NUL / surrogates, and file fields pointing at devices, folders, /proc, missing or absurdly long
paths. `benchmarks/fuzz.py` runs the same strategy for many more examples, with a time limit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.assembly import simulate
from moesim.errors import MoESimError
from moesim.spec.scenario import load_scenario

BASE = {
    "name": "fuzz",
    "seed": 0,
    "model": {"base": "tiny-cpu", "num_layers": 2},
    "cluster": {"hardware": "cpu-local", "topology": "fat_tree", "nodes": 2,
                "devices_per_node": 2},
    "parallelism": {"tp": 1, "pp": 2, "dp": 2, "ep": 2},
    "workload": {"mode": "training", "global_batch": 4, "seq_len": 64, "micro_batch": 1},
    "routing": {"distribution": "zipf", "zipf_s": 0.8, "max_tokens_per_source": 64},
    "placement": {"policy": "contiguous"},
    "communication": {"alltoall": "direct", "overlap": "none"},
    "simulation": {"max_seconds": 5},
}

ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                       st.lists(st.integers(0, 9), max_size=3), st.just({"x": 1}),
                       st.sampled_from(["1 GB/s", "-3 us", "9 parsecs", "fp8", "1e400"]))


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


def _mutate(data: dict, draw) -> dict:
    data = copy.deepcopy(data)
    paths = list(_paths(data))
    path = draw(st.sampled_from(paths))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    kind = draw(st.sampled_from(["drop", "retype", "negate", "enlarge", "misspell", "small"]))
    value = parent[key]
    if kind == "drop":
        del parent[key]
    elif kind == "retype":
        parent[key] = draw(ODD_VALUES)
    elif kind == "negate" and isinstance(value, int | float) and not isinstance(value, bool):
        parent[key] = -value
    elif kind == "enlarge" and isinstance(value, int | float) and not isinstance(value, bool):
        parent[key] = value * draw(st.sampled_from([3, 1000, 10**6, 10**12]))
    elif kind == "small" and isinstance(value, int | float) and not isinstance(value, bool):
        parent[key] = draw(st.sampled_from([0, 1, 0.5, 1e-9]))
    elif kind == "misspell":
        parent[key + draw(st.sampled_from(["s", "_", "X"]))] = parent.pop(key)
    return data


HOSTILE = ("alias_bomb", "deep", "huge_int", "bad_name", "bad_path")
# Typed fields a hostile value goes into (a repeated top-level key replaces the first).
_TYPED = ("name", "seed", "description", "model", "cluster", "workload", "parallelism",
          "routing", "simulation")
BAD_NAMES = ("../../x", "a/b", "/abs", "..", ".", "", "a b", "x" * 300, "\\0", "a\\0b",
             "\\ud800", "a\\udfffb", "\\x07bell", "naïve", "con:", "~", "-", "a\\\\b")
BAD_PATHS = ("/dev/zero", "/dev/null", "/", "/proc/self/status", "/proc", "/etc/shadow",
             "../../../../etc/passwd", "/nonexistent/x.yaml", "x" * 5000, "a\\0b.yaml",
             "/dev/zero.yaml", "/tmp", "scenario.yaml", "~/.ssh/id_rsa", "\\ud800.csv")


def _bomb(levels: int, width: int) -> str:
    parts = ['l0: &l0 ["lol"]']
    parts += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "{" + ", ".join(parts) + "}"


def hostile_line(kind: str, draw) -> str:
    """One YAML line of hostile input (appended to a valid scenario)."""
    key = draw(st.sampled_from(_TYPED))
    if kind == "alias_bomb":
        return f"{key}: {_bomb(draw(st.integers(3, 12)), draw(st.integers(2, 12)))}"
    if kind == "deep":
        depth = draw(st.sampled_from([10, 63, 64, 65, 100, 1000, 20000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return f"{key}: " + opener * depth + "1" + closer * depth
    if kind == "huge_int":
        digits = draw(st.sampled_from([19, 20, 40, 41, 400, 4300, 4301, 20000]))
        number = draw(st.sampled_from(["9", "1"])) * digits
        where = draw(st.sampled_from(["seed", "workload", "cluster", "parallelism"]))
        if where == "seed":
            return f"seed: {number}"
        field = {"workload": "global_batch", "cluster": "nodes", "parallelism": "dp"}[where]
        inner = {**BASE[where], field: "NUMBER"}
        return f"{where}: " + yaml.safe_dump(inner, default_flow_style=True).strip().replace(
            "NUMBER", number)
    if kind == "bad_name":
        return f'name: "{draw(st.sampled_from(BAD_NAMES))}"'
    path = draw(st.sampled_from(BAD_PATHS))
    where = draw(st.sampled_from(["hardware", "trace", "plan", "model"]))
    if where == "hardware":
        return "cluster: " + yaml.safe_dump({**BASE["cluster"], "hardware": "PATH"},
                                            default_flow_style=True).strip().replace(
            "PATH", f'"{path}"')
    if where == "trace":
        return f'routing: {{distribution: trace, trace: "{path}"}}'
    if where == "plan":
        return f'placement: {{policy: file, file: "{path}"}}'
    return f'model: "{path}"'


@st.composite
def scenario_texts(draw) -> str:
    data = BASE
    for _ in range(draw(st.integers(1, 3))):
        data = _mutate(data, draw)
    text = yaml.safe_dump(data)
    how = draw(st.sampled_from(["whole", "whole", "whole", "truncate", "bytes", "hostile"]))
    if how == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if how == "bytes":
        return draw(st.binary(max_size=200)).decode("latin-1")
    if how == "hostile":
        return yaml.safe_dump(BASE) + hostile_line(draw(st.sampled_from(HOSTILE)), draw) + "\n"
    return text


def _run(text: str, path: Path) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        sim = simulate(load_scenario(path))
    except MoESimError as exc:
        assert str(exc).strip(), "a MoESimError must carry a message"
        return
    assert sim.result.step_time > 0


# derandomize: CI runs the same 300 examples every time; benchmarks/fuzz.py explores at random.
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(text=scenario_texts())
def test_mutated_scenarios_never_crash(text, tmp_path_factory):
    _run(text, tmp_path_factory.mktemp("fuzz") / "scenario.yaml")


def test_base_scenario_is_valid(tmp_path):
    sim = simulate(load_scenario(_write(tmp_path, BASE)))
    assert sim.result.step_time > 0


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
