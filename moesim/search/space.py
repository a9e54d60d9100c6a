"""The layout space of a search: which knobs vary, over which values, and which layouts are valid.

A scenario may carry a ``search:`` section. Keys with a dot name a knob and list its allowed
values (``parallelism.pp: [8, 16]``); keys without one are options::

    search:
      parallelism.tp: [1, 2]          # restrict a knob (one value pins it)
      communication.overlap: [two_batch]
      top: 8                          # layouts simulated fully
      max_layouts: 20000              # enumeration cap (deterministic order; the cap is reported)
      input_len: 2048                 # serving request shape (default: the workload's own)
      output_len: 256
      prefill_batch: 1                # prompts per DP replica in the prefill giving the TTFT

Knobs left open get default ranges: TP powers of two up to a node, PP the divisors of the device
count up to the layers (training; serving 1/2/4/8), VP 1/2/4/8, EP the divisors of the expert
slots that divide the devices, pipeline schedule 1F1B/DualPipe, micro-batch 1/2 (decode: the
batch per replica, powers of two up to 4096), ZeRO 1/2/3, recompute none/selective/full,
overlap none/two_batch; the all-to-all algorithm, placement policy and redundant experts stay
the scenario's unless the section lists values. Every knob's range includes the scenario's own
value, so its layout can be ranked. Training layouts run 1F1B (interleaved with VP > 1) or
DualPipe (even PP, VP 1, ZeRO <= 2).
"""

from __future__ import annotations

import copy
import itertools
import typing
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moesim.errors import ScenarioError
from moesim.spec.fields import build, read_yaml
from moesim.spec.scenario import (
    Scenario,
    apply_overrides,
    context_parallel_problem,
    dualpipe_problem,
    expert_tensor_parallel_problem,
    interleaving_problem,
    replicated_dispatch_problem,
    scenario_from_mapping,
)

__all__ = ["KNOBS", "OPTIONS", "SearchSpec", "Candidate", "load_search", "enumerate_layouts",
           "candidate_scenario"]

# Knobs in enumeration order (the last varies fastest). dp is derived: devices / (tp cp pp).
KNOBS = ("parallelism.tp", "parallelism.cp", "parallelism.pp", "parallelism.ep", "parallelism.vp",
         "parallelism.schedule", "workload.micro_batch", "parallelism.zero_stage",
         "memory.recompute", "communication.overlap", "communication.alltoall",
         "placement.policy", "placement.redundant_experts")
OPTIONS = {"top": 8, "max_layouts": 20000, "input_len": 0, "output_len": 256,
           "prefill_batch": 1}
_TRAIN_ONLY = ("parallelism.vp", "parallelism.schedule", "parallelism.zero_stage",
               "memory.recompute", "parallelism.cp")


@dataclass(frozen=True)
class SearchSpec:
    """A parsed search: the base scenario mapping, its ``search:`` section and the device count."""

    source: str
    base: dict[str, Any]              # scenario mapping without ``search`` (overrides applied)
    base_dir: str
    scenario: Scenario                # the scenario as written (its own layout)
    devices: int
    ranges: dict[str, tuple[Any, ...]] = field(default_factory=dict)   # user restrictions
    options: dict[str, int] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return self.scenario.workload.mode != "training"


@dataclass(frozen=True)
class Candidate:
    """One layout: the knob values (dp included) as scenario overrides."""

    values: tuple[tuple[str, Any], ...]

    def get(self, knob: str) -> Any:
        return dict(self.values)[knob]

    def label(self) -> str:
        v = dict(self.values)
        cp = v.get("parallelism.cp", 1)
        text = (f"TP{v['parallelism.tp']}{f' CP{cp}' if cp > 1 else ''} PP{v['parallelism.pp']} "
                f"EP{v['parallelism.ep']} DP{v['parallelism.dp']}")
        if v.get("parallelism.vp", 1) > 1:
            text += f" VP{v['parallelism.vp']}"
        if v.get("parallelism.schedule", "1f1b") == "dualpipe":
            text += " DualPipe"
        return text


def load_search(path: str | Path, overrides: list[str] | None = None, *,
                gpus: int | None = None) -> SearchSpec:
    """Read a scenario with an optional ``search:`` section; ``gpus`` resizes the cluster.

    Raises
    ------
    ScenarioError
        Unknown search keys or knobs, empty or non-list ranges, a knob value its scenario field
        would refuse, a GPU count that is not whole nodes, or anything
        :func:`moesim.spec.scenario.load_scenario` rejects.
    """
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ScenarioError("a scenario must be a YAML mapping", source=str(path))
    data = copy.deepcopy(data)
    section = data.pop("search", None) or {}
    if not isinstance(section, dict):
        raise ScenarioError("search must be a mapping of knob: [values] and options",
                            source=str(path), field="search")
    data = apply_overrides(data, overrides or [], source=str(path))
    ranges, options = _parse_section(section, str(path))
    if gpus is not None:
        data = _resize(data, gpus, str(path), path.parent)
    scenario = scenario_from_mapping(data, source=str(path), base_dir=path.parent)
    ranges = _check_values(data, ranges, str(path))
    cps = {scenario.parallelism.cp, *ranges.get("parallelism.cp", ())}
    if scenario.workload.mode != "training" and max(cps) > 1:
        raise ScenarioError(f"cp={max(cps)}: the serving search prices decode steps, which "
                            "context parallelism does not split (use cp: 1)", source=str(path),
                            field="parallelism.cp" if scenario.parallelism.cp > 1 else
                            "search.parallelism.cp")
    return SearchSpec(str(path), data, str(path.parent), scenario, scenario.num_devices,
                      ranges, options)


def _parse_section(section: dict, source: str) -> tuple[dict[str, tuple], dict[str, int]]:
    ranges: dict[str, tuple] = {}
    options = dict(OPTIONS)
    for key, value in section.items():
        key = str(key)
        if "." in key:
            if key not in KNOBS:
                raise ScenarioError(f"unknown knob (allowed: {', '.join(KNOBS)})",
                                    source=source, field=f"search.{key}")
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ScenarioError("needs at least one value", source=source,
                                    field=f"search.{key}")
            ranges[key] = tuple(values)
        elif key in OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScenarioError("must be a whole number >= 0", source=source,
                                    field=f"search.{key}")
            options[key] = value
        else:
            raise ScenarioError(f"unknown option (allowed: {', '.join(OPTIONS)} or a knob: "
                                f"{', '.join(KNOBS)})", source=source, field=f"search.{key}")
    if options["top"] < 1 or options["max_layouts"] < 1:
        raise ScenarioError("top and max_layouts must be >= 1", source=source, field="search")
    return ranges, options


def _check_values(data: dict, ranges: dict[str, tuple], source: str) -> dict[str, tuple]:
    """Every listed value checked alone as the scenario loader checks its field (type, allowed
    values, bounds) and normalised (``2.0`` -> ``2``): only combinations of values are left to
    :func:`divisibility_reason` and the screen."""
    hints = typing.get_type_hints(Scenario)
    checked: dict[str, tuple] = {}
    for knob, values in ranges.items():
        section, leaf = knob.split(".")
        base = data.get(section) or {}
        out = []
        for value in values:
            try:
                built = build(hints[section], {**base, leaf: value}, source=source, path=section)
                if knob == "placement.policy" and value == "file" and not built.file:
                    raise ScenarioError("policy 'file' needs placement.file in the scenario")
            except ScenarioError as exc:
                reason = str(exc).removeprefix(f"{source}: ").removeprefix(f"{knob}: ")
                if repr(value) not in reason:
                    reason = f"value {value!r}: {reason}"
                raise ScenarioError(reason, source=source, field=f"search.{knob}") from None
            out.append(getattr(built, leaf))
        checked[knob] = tuple(out)
    return checked


def _resize(data: dict, gpus: int, source: str, base_dir: Path) -> dict:
    """The mapping on ``gpus`` devices: whole nodes, the scenario's tp, cp, pp and ep kept and
    dp scaled to fill them (the search varies them all); the global batch kept."""
    probe = scenario_from_mapping(data, source=source, base_dir=base_dir)
    per_node = probe.devices_per_node
    if gpus < 1 or gpus % per_node:
        raise ScenarioError(f"--gpus {gpus} must be a whole number of {per_node}-device nodes",
                            source=source, field="cluster.nodes")
    data = copy.deepcopy(data)
    data["cluster"]["nodes"] = gpus // per_node
    par = dict(data.get("parallelism") or {})
    tp, pp, cp = int(par.get("tp", 1)), int(par.get("pp", 1)), int(par.get("cp", 1))
    if gpus % (tp * pp * cp):
        what = "tp * pp * cp" if cp > 1 else "tp * pp"
        raise ScenarioError(f"--gpus {gpus} is not a multiple of the scenario's {what} = "
                            f"{tp * pp * cp}", source=source, field="parallelism")
    par["dp"] = gpus // (tp * pp * cp)
    data["parallelism"] = par
    return data


def _powers(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if (1 << i) <= limit]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_ranges(spec: SearchSpec) -> dict[str, tuple]:
    """Every knob's values: the user's restriction, else a default range with the scenario's own
    value included (in sorted order, own value placed in)."""
    s, n = spec.scenario, spec.devices
    par, wl, m = s.parallelism, s.workload, s.model
    own = _own_values(s)
    train = wl.mode == "training"
    slots = m.num_experts + s.placement.redundant_experts
    defaults: dict[str, list] = {
        "parallelism.tp": [t for t in _powers(s.devices_per_node) if n % t == 0],
        # context parallelism follows the sequence length: the scenario's unless listed
        "parallelism.cp": [par.cp],
        "parallelism.pp": [p for p in _divisors(n) if p <= min(m.num_layers, 64)] if train
        else [p for p in (1, 2, 4, 8) if n % p == 0 and p <= m.num_layers],
        "parallelism.ep": [e for e in _divisors(slots) if n % e == 0],
        "parallelism.vp": [1, 2, 4, 8] if train else [1],
        "parallelism.schedule": ["1f1b", "dualpipe"] if train else [par.schedule],
        "workload.micro_batch": [1, 2] if wl.mode != "decode" else
        [b for b in _powers(4096)],
        "parallelism.zero_stage": [1, 2, 3] if train else [par.zero_stage],
        "memory.recompute": ["none", "selective", "full"] if train else [s.memory.recompute],
        "communication.overlap": ["none", "two_batch"],
        "communication.alltoall": [],
        "placement.policy": [],
        "placement.redundant_experts": [],
    }
    ranges: dict[str, tuple] = {}
    for knob in KNOBS:
        if knob in spec.ranges:
            ranges[knob] = spec.ranges[knob]
            continue
        values = list(defaults[knob])
        if own[knob] not in values:
            values.append(own[knob])
        ranges[knob] = tuple(sorted(values, key=_order)) if knob not in _TRAIN_ONLY or train \
            else (own[knob],)
    return ranges


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def _own_values(s: Scenario) -> dict[str, Any]:
    par = s.parallelism
    return {"parallelism.tp": par.tp, "parallelism.cp": par.cp, "parallelism.pp": par.pp,
            "parallelism.ep": par.ep,
            "parallelism.vp": par.vp, "parallelism.schedule": par.schedule,
            "workload.micro_batch": s.workload.micro_batch,
            "parallelism.zero_stage": par.zero_stage, "memory.recompute": s.memory.recompute,
            "communication.overlap": s.communication.overlap,
            "communication.alltoall": s.communication.alltoall,
            "placement.policy": s.placement.policy,
            "placement.redundant_experts": s.placement.redundant_experts}


def own_candidate(spec: SearchSpec) -> Candidate:
    """The scenario's own layout as a candidate."""
    values = _own_values(spec.scenario)
    values["parallelism.dp"] = spec.scenario.parallelism.dp
    return Candidate(tuple(sorted(values.items())))


def divisibility_reason(spec: SearchSpec, v: dict[str, Any]) -> str | None:
    """Why a layout breaks a divisibility rule (None if it keeps them all)."""
    s, n = spec.scenario, spec.devices
    m = s.model
    tp, pp, ep, vp, mb = (v["parallelism.tp"], v["parallelism.pp"], v["parallelism.ep"],
                          v["parallelism.vp"], v["workload.micro_batch"])
    cp = v.get("parallelism.cp", s.parallelism.cp)
    if n % (tp * pp * cp):
        return "tp*pp*cp does not divide the devices"
    dp = n // (tp * pp * cp)
    if tp > s.devices_per_node:
        return "tp larger than a node"
    if (dp * cp * tp) % ep:
        return "ep does not divide dp*cp*tp"
    # experts split over the TP group stay split at every tp (etp = tp)
    if s.parallelism.etp > 1 and expert_tensor_parallel_problem(
            tp, _etp(spec, tp), ep, m.expert_ffn_size, dp * cp * tp) is not None:
        return "experts split over TP (etp) need etp | tp, ep * etp | dp*cp*tp, an FFN that splits"
    if v.get("communication.alltoall") == "replicated" and replicated_dispatch_problem(
            tp, ep, s.parallelism.sequence_parallel, _etp(spec, tp)) is not None:
        return "replicated needs ep | tp, no sequence parallelism, no etp with ep"
    if cp > 1 and (split := context_parallel_problem(
            cp, tp, s.workload.seq_len, m.attention.num_heads,
            s.communication.cp_algorithm)) is not None:
        return split[1]
    if (m.num_experts + v["placement.redundant_experts"]) % ep:
        return "ep does not divide the expert slots"
    if pp * vp > m.num_layers:
        return "pp*vp exceeds the layers"
    if (problem := interleaving_problem(pp, vp)) is not None:
        return f"vp>1 {problem}"
    batch = _global_batch(spec, dp, mb)
    if batch % dp or (batch // dp) % mb:
        return "global batch does not split into dp x micro-batches"
    mbs = batch // dp // mb
    if vp > 1 and mbs % pp:
        return "interleaving needs micro-batches a multiple of pp"
    if v.get("parallelism.schedule") == "dualpipe":
        return dualpipe_problem(pp, vp, v["parallelism.zero_stage"], mbs)
    return None


def _etp(spec: SearchSpec, tp: int) -> int:
    """A layout's expert tensor parallelism: a scenario that splits its experts over the whole
    TP group keeps doing so at every tp; one that splits them over part of it keeps its etp
    (layouts whose tp it does not divide are dropped)."""
    par = spec.scenario.parallelism
    return tp if par.etp > 1 and par.etp == par.tp else par.etp


def _global_batch(spec: SearchSpec, dp: int, mb: int) -> int:
    """Training and prefill keep the scenario's global batch; decode runs ``mb`` sequences per
    DP replica in one micro-batch (the batch size is the knob)."""
    if spec.scenario.workload.mode == "decode":
        return dp * mb
    return spec.scenario.workload.global_batch


def candidate_overrides(spec: SearchSpec, cand: Candidate) -> tuple[str, ...]:
    """``field=value`` overrides that turn the base scenario into ``cand``'s scenario."""
    import json

    v = dict(cand.values)
    out = [f"{k}={json.dumps(val)}" for k, val in cand.values]
    if spec.scenario.parallelism.etp > 1:
        out.append(f"parallelism.etp={_etp(spec, v['parallelism.tp'])}")
    batch = _global_batch(spec, v["parallelism.dp"], v["workload.micro_batch"])
    out.append(f"workload.global_batch={batch}")
    return tuple(out)


def candidate_scenario(spec: SearchSpec, cand: Candidate, *, validate: bool = False
                       ) -> Scenario:
    """The scenario of one layout: the base scenario's dataclasses replaced (fast), or with
    ``validate`` rebuilt from the overridden mapping and checked as a file would be."""
    if validate:
        data = apply_overrides(spec.base, list(candidate_overrides(spec, cand)),
                               source=spec.source)
        return scenario_from_mapping(data, source=spec.source, base_dir=Path(spec.base_dir))
    s, v = spec.scenario, dict(cand.values)
    par = replace(s.parallelism, tp=v["parallelism.tp"], cp=v["parallelism.cp"],
                  etp=_etp(spec, v["parallelism.tp"]),
                  pp=v["parallelism.pp"],
                  dp=v["parallelism.dp"], ep=v["parallelism.ep"], vp=v["parallelism.vp"],
                  zero_stage=v["parallelism.zero_stage"],
                  schedule=v["parallelism.schedule"])
    wl = replace(s.workload, micro_batch=v["workload.micro_batch"],
                 global_batch=_global_batch(spec, v["parallelism.dp"],
                                            v["workload.micro_batch"]))
    return replace(s, parallelism=par, workload=wl,
                   memory=replace(s.memory, recompute=v["memory.recompute"]),
                   communication=replace(s.communication, overlap=v["communication.overlap"],
                                         alltoall=v["communication.alltoall"]),
                   placement=replace(s.placement, policy=v["placement.policy"],
                                     redundant_experts=v["placement.redundant_experts"]))


def enumerate_layouts(spec: SearchSpec) -> tuple[list[Candidate], Counter, bool]:
    """(valid-by-divisibility candidates, dropped count per reason, capped?) in deterministic
    knob order; the scenario's own layout is always kept first if valid."""
    ranges = default_ranges(spec)
    dropped: Counter = Counter()
    kept: list[Candidate] = []
    cap = spec.options.get("max_layouts", OPTIONS["max_layouts"])
    capped = False
    own = own_candidate(spec)
    seen = {own.values}
    own_reason = divisibility_reason(spec, dict(own.values))
    if own_reason is None:
        kept.append(own)
    for combo in itertools.product(*(ranges[k] for k in KNOBS)):
        v = dict(zip(KNOBS, combo, strict=True))
        reason = divisibility_reason(spec, v)
        if reason is not None:
            dropped[reason] += 1
            continue
        v["parallelism.dp"] = spec.devices // (v["parallelism.tp"] * v["parallelism.pp"]
                                               * v["parallelism.cp"])
        cand = Candidate(tuple(sorted(v.items())))
        if cand.values in seen:
            continue
        if len(kept) >= cap:
            capped = True
            break
        seen.add(cand.values)
        kept.append(cand)
    return kept, dropped, capped
