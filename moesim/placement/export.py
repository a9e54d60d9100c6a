"""Plan files: moesim's own, SGLang's and TensorRT-LLM's placements, and engines' load dumps.

A placement leaves moesim in one of three forms (docs/placement.md has examples):

- **moesim** (``.json`` or ``.yaml``): ``{"format": "moesim-placement", "version": 1,
  "num_experts", "ep", "slots_per_device", "slot_expert": [layers][devices][slots]}`` plus
  optional ``name``, ``moe_layer_ids`` and ``metadata``; ``moesim run`` reads it with
  ``placement: {policy: file, file: plan.json}``.
- **SGLang** ``--init-expert-location`` JSON: ``{"physical_to_logical_map": [layers][slots]}``,
  slot ``s`` on rank ``s // slots_per_rank`` (SGLang passes the keys to its constructor, so no
  other key may appear).
- **TensorRT-LLM** ``moe_load_balancer.yaml``: ``num_slots``, ``layer_updates_per_iter: 0`` and
  ``initial_global_assignments: {layer: [expert per slot]}``, keyed by the model's block index
  of each MoE layer (3..60 for DeepSeek-V3).

:func:`load_plan` reads any of the three back against a scenario. :func:`import_load` turns an
engine's recorded expert load (SGLang ``logical_count``, vLLM ``logical_expert_load``, both
``[..., layers, experts]``) into a counts-only :class:`moesim.routing_trace.RoutingTrace`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moesim.errors import InfeasiblePlacement, TraceError
from moesim.placement.placement import REPLICA_RULES, Placement
from moesim.results import write_text_atomic
from moesim.routing_trace import RoutingTrace
from moesim.spec.limits import load_json_text, load_yaml_text, read_text_bounded

__all__ = ["FORMATS", "to_moesim", "to_sglang", "to_trtllm", "write_plan", "read_plan",
           "load_plan", "import_load"]

FORMATS = ("moesim", "sglang", "trtllm")
MOESIM_FORMAT = "moesim-placement"


def to_moesim(placement: Placement, *, moe_layer_ids: list[int] | None = None,
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """moesim's plan document (plain lists and numbers)."""
    doc: dict[str, Any] = {"format": MOESIM_FORMAT, "version": 1, "name": placement.name,
                           "num_experts": placement.num_experts, "ep": placement.ep,
                           "slots_per_device": placement.slots_per_device}
    if moe_layer_ids is not None:
        doc["moe_layer_ids"] = [int(i) for i in moe_layer_ids]
    doc["replica_rule"] = placement.replica_rule
    doc["slot_expert"] = placement.slot_expert.tolist()
    if metadata:
        doc["metadata"] = metadata
    return doc


def to_sglang(placement: Placement) -> dict[str, Any]:
    """SGLang ``--init-expert-location`` document: ``physical_to_logical_map [layers][slots]``."""
    return {"physical_to_logical_map": placement.physical_to_logical.tolist()}


def to_trtllm(placement: Placement, moe_layer_ids: list[int] | None = None) -> dict[str, Any]:
    """TensorRT-LLM ``moe_load_balancer.yaml`` document, keyed by ``moe_layer_ids`` (default
    0..layers-1)."""
    ids = list(range(placement.num_layers)) if moe_layer_ids is None else list(moe_layer_ids)
    if len(ids) != placement.num_layers:
        raise InfeasiblePlacement(f"moe_layer_ids has {len(ids)} entries for "
                                  f"{placement.num_layers} layers")
    rows = placement.physical_to_logical.tolist()
    return {"num_slots": placement.ep * placement.slots_per_device, "layer_updates_per_iter": 0,
            "initial_global_assignments": {int(i): row for i, row in zip(ids, rows, strict=True)}}


def write_plan(path: str | Path, placement: Placement, *, fmt: str = "moesim",
               moe_layer_ids: list[int] | None = None,
               metadata: dict[str, Any] | None = None) -> None:
    """Write ``placement`` atomically in format ``fmt`` (one of :data:`FORMATS`); YAML when the
    file ends in ``.yaml``/``.yml``, else JSON."""
    if fmt == "moesim":
        doc = to_moesim(placement, moe_layer_ids=moe_layer_ids, metadata=metadata)
    elif fmt == "sglang":
        doc = to_sglang(placement)
    elif fmt == "trtllm":
        doc = to_trtllm(placement, moe_layer_ids)
    else:
        raise InfeasiblePlacement(f"unknown plan format {fmt!r}; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
    else:
        text = json.dumps(doc, separators=(",", ":")) + "\n"
    write_text_atomic(path, text)


def read_plan(path: str | Path, *, ep: int | None = None, num_experts: int | None = None,
              moe_layer_ids: list[int] | None = None) -> Placement:
    """Read a plan file of any format (recognised by its keys).

    SGLang and TensorRT-LLM files do not record the EP size: pass ``ep``. ``num_experts``
    defaults to the file's value (moesim) or the highest id + 1. ``moe_layer_ids`` orders a
    TensorRT-LLM file's layers (default: its keys in ascending order).

    Raises
    ------
    InfeasiblePlacement
        Unreadable file, unknown format, a malformed field, or an invalid placement; the message
        names the file and the field.
    """
    path = Path(path)
    doc = _read_document(path)
    fmt, table, file_ep, file_experts = _parse(path, doc, moe_layer_ids)
    if ep is not None and file_ep is not None and ep != file_ep:
        raise _error(path, "ep", f"the plan is for ep={file_ep} devices; expected ep={ep}")
    ep = file_ep if file_ep is not None else ep
    if ep is None:
        raise _error(path, "ep", f"a {fmt} plan does not record the EP size; pass ep")
    experts = num_experts if num_experts is not None else file_experts
    if experts is None:
        experts = int(table.max()) + 1
    if file_experts is not None and experts != file_experts:
        raise _error(path, "num_experts", f"the plan is for {file_experts} experts; the model "
                                          f"has {experts}")
    if table.shape[1] % ep:
        raise _error(path, _table_field(fmt), f"{table.shape[1]} slots per layer do not split "
                                              f"evenly over ep={ep} devices")
    if table.min() < 0 or table.max() >= experts:
        bad = int(table.min()) if table.min() < 0 else int(table.max())
        layer = int(np.argwhere((table < 0) | (table >= experts))[0][0])
        raise _error(path, f"{_table_field(fmt)}[{layer}]",
                     f"expert id {bad} out of range; allowed 0..{experts - 1}")
    rule = doc.get("replica_rule", "least_loaded") if fmt == "moesim" else "least_loaded"
    if rule not in REPLICA_RULES:
        raise _error(path, "replica_rule", f"{rule!r}; allowed: {', '.join(REPLICA_RULES)}")
    try:
        placement = Placement.from_physical(table, ep, experts, name=doc.get("name") or path.stem)
    except InfeasiblePlacement as exc:
        raise _error(path, _table_field(fmt), str(exc)) from None
    return replace(placement, replica_rule=rule)


def load_plan(path: str | Path, scenario) -> Placement:
    """The placement in ``path``, checked against ``scenario`` (policy "file").

    Checks: MoE layer count, EP size, experts per layer, and slots per layer equal to
    ``num_experts + placement.redundant_experts`` (memory is sized from the latter).
    """
    path = Path(path)
    m, par = scenario.model, scenario.parallelism
    placement = read_plan(path, ep=par.ep, num_experts=m.num_experts,
                          moe_layer_ids=list(m.moe_layer_ids))
    if placement.num_layers != m.num_moe_layers:
        raise _error(path, "layers", f"the plan has {placement.num_layers} MoE layers; the model "
                                     f"{m.name} has {m.num_moe_layers}")
    slots = m.num_experts + scenario.placement.redundant_experts
    if placement.ep * placement.slots_per_device != slots:
        raise _error(path, "slots", f"the plan has {placement.ep * placement.slots_per_device} "
                                    f"slots per layer; the scenario has {slots} (num_experts + "
                                    "placement.redundant_experts): set "
                                    f"placement.redundant_experts="
                                    f"{placement.ep * placement.slots_per_device - m.num_experts}")
    return placement


def _error(path: Path, field: str, message: str) -> InfeasiblePlacement:
    return InfeasiblePlacement(f"{path}: {field}: {message}")


def _table_field(fmt: str) -> str:
    return {"moesim": "slot_expert", "sglang": "physical_to_logical_map",
            "trtllm": "initial_global_assignments"}[fmt]


def _read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InfeasiblePlacement(f"{path}: no such plan file")
    text = read_text_bounded(path)          # size cap, regular files only (moesim.spec.limits)
    doc = (load_yaml_text(text, source=str(path)) if path.suffix.lower() in (".yaml", ".yml")
           else load_json_text(text, source=str(path)))   # depth and alias limits
    if not isinstance(doc, dict):
        raise InfeasiblePlacement(f"{path}: a plan file must be a mapping with slot_expert, "
                                  "physical_to_logical_map or initial_global_assignments")
    return doc


def _parse(path: Path, doc: dict[str, Any], moe_layer_ids: list[int] | None
           ) -> tuple[str, np.ndarray, int | None, int | None]:
    """(format, physical_to_logical [layers, slots], ep or None, num_experts or None)."""
    if "slot_expert" in doc:
        if doc.get("format", MOESIM_FORMAT) != MOESIM_FORMAT:
            raise _error(path, "format", f"{doc['format']!r}; expected {MOESIM_FORMAT!r}")
        table = _int_array(path, "slot_expert", doc["slot_expert"], 3)
        for name, axis in (("ep", 1), ("slots_per_device", 2)):
            if name in doc and doc[name] != table.shape[axis]:
                raise _error(path, name, f"{doc[name]} but slot_expert has {table.shape[axis]}")
        experts = doc.get("num_experts")
        if experts is not None and (not isinstance(experts, int) or experts < 1):
            raise _error(path, "num_experts", f"{experts!r} must be an integer >= 1")
        if doc.get("version", 1) != 1:
            raise _error(path, "version", f"{doc['version']!r}; this moesim reads version 1")
        if moe_layer_ids is not None and "moe_layer_ids" in doc \
                and doc["moe_layer_ids"] != list(moe_layer_ids):
            raise _error(path, "moe_layer_ids", f"{doc['moe_layer_ids']!r:.80} but the model's "
                                                f"MoE layers are {list(moe_layer_ids)!r:.80}")
        return "moesim", table.reshape(table.shape[0], -1), table.shape[1], experts
    if "physical_to_logical_map" in doc:
        extra = sorted(set(doc) - {"physical_to_logical_map"})
        if extra:
            raise _error(path, extra[0], "unknown key; an SGLang plan holds only "
                                         "physical_to_logical_map")
        return "sglang", _int_array(path, "physical_to_logical_map",
                                    doc["physical_to_logical_map"], 2), None, None
    if "initial_global_assignments" in doc:
        return "trtllm", _trtllm_table(path, doc, moe_layer_ids), None, None
    raise InfeasiblePlacement(f"{path}: unknown plan format: keys {sorted(doc)[:6]}; expected "
                              "slot_expert (moesim), physical_to_logical_map (SGLang) or "
                              "initial_global_assignments (TensorRT-LLM)")


def _trtllm_table(path: Path, doc: dict[str, Any], moe_layer_ids: list[int] | None
                  ) -> np.ndarray:
    field = "initial_global_assignments"
    assignments = doc[field]
    if not isinstance(assignments, dict) or not assignments:
        raise _error(path, field, "must be a non-empty mapping {layer: [expert per slot]}")
    try:
        rows = {int(key): value for key, value in assignments.items()}
    except (TypeError, ValueError):
        raise _error(path, field, f"layer keys must be integers, got {list(assignments)[:4]}"
                     ) from None
    keys = sorted(rows)
    if moe_layer_ids is not None:
        if set(keys) == set(moe_layer_ids):
            keys = list(moe_layer_ids)
        elif set(keys) != set(range(len(moe_layer_ids))):
            ids = list(moe_layer_ids)
            raise _error(path, field, f"{len(keys)} layers {keys[:3]}... match neither the "
                                      f"model's {len(ids)} MoE layers {ids[:3]}... nor "
                                      f"0..{len(ids) - 1}")
    table = _int_array(path, field, [rows[k] for k in keys], 2)
    if "num_slots" in doc and doc["num_slots"] != table.shape[1]:
        raise _error(path, "num_slots", f"{doc['num_slots']} but each layer lists "
                                        f"{table.shape[1]} slots")
    return table


def _int_array(path: Path, field: str, value: Any, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        array = np.asarray([], dtype=object)
    if _holds_bool(value):   # numpy would read true/false among integers as 1/0
        raise _error(path, field, "holds true/false; expert ids are integers")
    if array.ndim != ndim or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        shape = "[layers][devices][slots]" if ndim == 3 else "[layers][slots]"
        raise _error(path, field, f"must be a non-empty rectangular {shape} array of integer "
                                  f"expert ids (got shape {array.shape}, dtype {array.dtype})")
    return array.astype(np.int64)


def _holds_bool(value: Any) -> bool:
    """Whether nested lists ``value`` hold a boolean anywhere."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list | tuple):
            stack.extend(item)
    return False


# ----------------------------------------------------------------------------- engine loads

_LOAD_KEYS = ("logical_count", "logical_expert_load")


def import_load(path: str | Path, *, num_experts: int | None = None,
                num_layers: int | None = None) -> RoutingTrace:
    """An engine's recorded expert load as a counts-only trace ``counts: [layers, experts]``.

    Reads SGLang's expert-distribution dump (``logical_count``) or vLLM's EPLB load
    (``logical_expert_load``, or a ``load_history`` list of ``{"logical_expert_load": ...}``)
    from ``.json``, ``.npz`` or ``.pt``; leading axes (steps, ranks, windows) are summed.

    Raises
    ------
    TraceError
        Unreadable file, no known key, bad shape or values, or a mismatch with ``num_experts``
        / ``num_layers``; the message names the file and the field.
    """
    path = Path(path)
    field, raw = _load_field(path)
    try:
        array = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise TraceError(f"{path}: {field}: not a numeric array") from None
    if array.ndim < 2 or 0 in array.shape:
        raise TraceError(f"{path}: {field}: shape {array.shape}; expected [..., layers, experts]")
    counts = array.reshape(-1, *array.shape[-2:]).sum(axis=0)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise TraceError(f"{path}: {field}: counts must be finite and >= 0")
    for name, want, got in (("experts", num_experts, counts.shape[1]),
                            ("layers", num_layers, counts.shape[0])):
        if want is not None and want != got:
            raise TraceError(f"{path}: {field}: {got} {name}; the model has {want}")
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    if empty.size:
        raise TraceError(f"{path}: {field}: layer {empty[0]} has no tokens")
    return RoutingTrace(str(path), counts.shape[1], counts=counts)


def _load_field(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        raise TraceError(f"{path}: no such load file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            doc = load_json_text(read_text_bounded(path), source=str(path))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                doc = {name: archive[name] for name in archive.files}
        elif suffix == ".pt":
            import torch
            doc = torch.load(path, map_location="cpu", weights_only=True)
            doc = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in doc.items()}
        else:
            raise TraceError(f"{path}: unknown load format {suffix!r}; valid: .json, .npz, .pt")
    except TraceError:
        raise
    except Exception as exc:  # json, zip, pickle and torch each raise their own errors
        raise TraceError(f"{path}: not a readable load file ({' '.join(str(exc).split())})"
                         ) from None
    if not isinstance(doc, dict):
        raise TraceError(f"{path}: expected a mapping with one of {', '.join(_LOAD_KEYS)}")
    if isinstance(doc.get("load_history"), list):
        rows = [entry.get("logical_expert_load") if isinstance(entry, dict) else None
                for entry in doc["load_history"]]
        if not rows or any(row is None for row in rows):
            raise TraceError(f"{path}: load_history: every entry needs logical_expert_load")
        return "load_history", rows
    for key in _LOAD_KEYS:
        if key in doc:
            return key, doc[key]
    raise TraceError(f"{path}: no expert load found; expected one of "
                     f"{', '.join(_LOAD_KEYS)} or load_history (keys: {sorted(doc)[:6]})")
