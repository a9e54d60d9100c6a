"""Routing traces: recorded expert choices (or per-layer loads) read from files.

Formats (NPZ per-token ``expert_ids`` or per-layer ``counts``; CSV long format) are documented in
``docs/trace_format.md``. :func:`load_trace` validates a file against the model and raises
``TraceError`` naming the file, the field and what is allowed; :func:`choices_from_trace` turns a
trace layer into the :class:`~moesim.routing.LayerChoices` the simulator samples otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moesim.errors import ScenarioError, TraceError
from moesim.routing import LayerChoices, sample_layer, sampled_per_source

__all__ = ["RoutingTrace", "LAYOUTS", "load_trace", "validated_trace", "choices_from_trace"]

# Axis orders of a per-token ``expert_ids`` array: "auto" reads an archive's ``layout`` array,
# else takes the axis that matches the model's MoE layers (layers first when both or neither do).
LAYOUTS = ("auto", "layers,tokens,k", "tokens,layers,k")

_NPZ_KEYS = ("expert_ids", "counts", "coactivation", "num_experts")
_CSV_HEADERS = ("layer,token,expert", "layer,expert,count")
# Largest id a CSV column may hold (the model limits: 10,000 layers, 65,536 experts); token ids
# must be below the number of rows (every token 0..T-1 has rows). Larger ids would size arrays.
_CSV_MAX_ID = {"layer": 10_000, "expert": 1 << 16}
_CSV_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class RoutingTrace:
    """Recorded routing of a model: per-token choices, or per-layer expert loads only."""

    path: str                              # where it came from (for messages)
    num_experts: int
    expert_ids: np.ndarray | None = None   # int32[layers, tokens, k], tokens in time order
    counts: np.ndarray | None = None       # float[layers, E] (counts-only traces)
    coactivation: np.ndarray | None = None  # float[layers, E, E] symmetric pair counts, optional

    @property
    def per_token(self) -> bool:
        return self.expert_ids is not None

    @property
    def num_layers(self) -> int:
        data = self.expert_ids if self.expert_ids is not None else self.counts
        assert data is not None
        return int(data.shape[0])

    def layer_counts(self) -> np.ndarray:
        """Token-expert assignments per layer and expert: ``[layers, E]``."""
        if self.expert_ids is None:
            assert self.counts is not None
            return self.counts.astype(np.float64)
        layers = self.expert_ids.shape[0]
        flat = np.arange(layers).repeat(self.expert_ids[0].size) * self.num_experts
        flat = flat + self.expert_ids.reshape(-1)
        return np.bincount(flat, minlength=layers * self.num_experts).reshape(
            layers, self.num_experts).astype(np.float64)

    def window(self, start_frac: float, end_frac: float) -> RoutingTrace:
        """The tokens in ``[start_frac, end_frac)`` of the trace (e.g. plan on early tokens and
        evaluate on later ones). Only per-token traces have a token order."""
        if self.expert_ids is None:
            raise TraceError(f"{self.path}: a counts-only trace has no token order to window; "
                             "window() needs expert_ids")
        if not 0.0 <= start_frac < end_frac <= 1.0:
            raise ScenarioError(f"window [{start_frac}, {end_frac}) must satisfy "
                                "0 <= start < end <= 1", field="window")
        tokens = self.expert_ids.shape[1]
        lo, hi = int(start_frac * tokens), int(end_frac * tokens)
        if hi <= lo:
            raise TraceError(f"{self.path}: window [{start_frac}, {end_frac}) of {tokens} "
                             "tokens is empty")
        return replace(self, path=f"{self.path}[tokens {lo}:{hi}]",
                       expert_ids=self.expert_ids[:, lo:hi], coactivation=None)


def load_trace(path: str | Path, num_experts: int | None = None, num_layers: int | None = None,
               top_k: int | None = None, layout: str = "auto") -> RoutingTrace:
    """Read and validate a routing trace (``.npz`` or ``.csv``, see docs/trace_format.md).

    ``num_experts`` / ``num_layers`` / ``top_k``, when given, must match the trace. ``layout``:
    the axis order of an archive's per-token ``expert_ids`` (one of :data:`LAYOUTS`; an archive's
    own ``layout`` array must agree with it); the trace is always returned layers first.

    Raises
    ------
    TraceError
        The file is missing, malformed, or does not match the model; the message names the file,
        the field and what is allowed.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise TraceError(f"{path}: layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        fields = _layers_first(path, _read_npz(path), layout, num_layers)
    elif suffix == ".csv":
        fields = _read_csv(path, num_experts)
    else:
        raise TraceError(f"{path}: unknown trace format {suffix!r}; valid: .npz, .csv")
    return validated_trace(str(path), fields, num_experts, num_layers, top_k)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            fields = {name: archive[name] for name in archive.files}
    except Exception as exc:   # numpy raises ValueError, OSError or zipfile errors here
        raise TraceError(f"{path}: not a readable .npz archive ({exc})") from None
    # Extra arrays are metadata (a recorder's model dims, losses, domains) when the archive holds
    # routing data; with no routing array at all they are most likely misspellings.
    unknown = sorted(set(fields) - set(_NPZ_KEYS) - {"layout"})
    if unknown and not ({"expert_ids", "counts"} & set(fields)):
        raise TraceError(f"{path}: unknown array(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join((*_NPZ_KEYS, 'layout'))}")
    return {name: value for name, value in fields.items() if name in (*_NPZ_KEYS, "layout")}


def _layers_first(path: Path, fields: dict[str, np.ndarray], layout: str,
                  num_layers: int | None) -> dict[str, np.ndarray]:
    """``fields`` with a per-token ``expert_ids`` put layers first (see :func:`load_trace`)."""
    declared = fields.pop("layout", None)
    ids = fields.get("expert_ids")
    if declared is not None:
        said = str(declared.reshape(-1)[0]).replace(" ", "") if declared.size else ""
        if said not in LAYOUTS[1:]:
            raise TraceError(f"{path}: layout array says {said!r}; allowed: "
                             f"{', '.join(LAYOUTS[1:])}")
        if layout != "auto" and layout != said:
            raise TraceError(f"{path}: the file says layout {said!r} but {layout!r} was asked")
        layout = said
    if ids is None or ids.ndim != 3:
        return fields   # validated_trace names what is wrong
    if layout == "auto" and num_layers is not None and ids.shape[0] != num_layers:
        if ids.shape[1] != num_layers:
            raise TraceError(f"{path}: expert_ids has shape {ids.shape}; neither axis 0 "
                             f"([layers, tokens, k]) nor axis 1 ([tokens, layers, k]) is the "
                             f"model's {num_layers} MoE layers")
        layout = LAYOUTS[2]
    if layout == LAYOUTS[2]:
        fields["expert_ids"] = np.ascontiguousarray(ids.transpose(1, 0, 2))
    return fields


def _read_csv(path: Path, num_experts: int | None) -> dict[str, np.ndarray]:
    if path.stat().st_size > _CSV_MAX_BYTES:
        raise TraceError(f"{path}: {path.stat().st_size:,} bytes is more than the "
                         f"{_CSV_MAX_BYTES:,} allowed for a CSV trace")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from None
    header = lines[0].strip().replace(" ", "").lower() if lines else ""
    if header not in _CSV_HEADERS:
        raise TraceError(f"{path}: header {header!r}; expected one of: {' | '.join(_CSV_HEADERS)}")
    body = [line for line in lines[1:] if line.strip() and not line.lstrip().startswith("#")]
    if not body:
        raise TraceError(f"{path}: no data rows after the header")
    try:
        rows = np.loadtxt(body, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise TraceError(f"{path}: cannot parse rows ({exc})") from None
    if rows.shape[1] != 3:
        raise TraceError(f"{path}: rows have {rows.shape[1]} columns; expected 3 ({header})")
    columns = header.split(",")
    for col, name in enumerate(columns):
        values = rows[:, col]
        if name != "count" and not (np.all(values >= 0) and np.all(values == np.round(values))):
            bad = values[(values < 0) | (values != np.round(values))][0]
            raise TraceError(f"{path}: column {name}: {bad} is not an integer >= 0")
        limit = len(rows) - 1 if name == "token" else _CSV_MAX_ID.get(name)
        if limit is not None and values.max() > limit:
            raise TraceError(f"{path}: column {name}: id {values.max():.0f} is larger than the "
                             f"{limit:,} allowed" + (" (token ids count up from 0, one or more "
                                                     "rows each)" if name == "token" else ""))
    layer = rows[:, 0].astype(np.int64)
    layers = int(layer.max()) + 1          # a layer count mismatch is reported by the caller
    if columns[1] == "token":
        return {"expert_ids": _tokens_from_rows(path, layer, rows[:, 1].astype(np.int64),
                                                rows[:, 2].astype(np.int64), layers)}
    expert = rows[:, 1].astype(np.int64)
    experts = int(expert.max()) + 1 if num_experts is None else max(num_experts,
                                                                    int(expert.max()) + 1)
    flat = layer * experts + expert
    if np.unique(flat).size != flat.size:
        raise TraceError(f"{path}: a (layer, expert) pair appears twice; each pair at most once")
    counts = np.zeros(layers * experts)
    counts[flat] = rows[:, 2]
    return {"counts": counts.reshape(layers, experts)}


def _tokens_from_rows(path: Path, layer: np.ndarray, token: np.ndarray, expert: np.ndarray,
                      layers: int) -> np.ndarray:
    """Long rows (layer, token, expert) → ``expert_ids[layers, tokens, k]``; every layer must have
    tokens 0..T-1 and every token the same number k of rows."""
    tokens = int(token.max()) + 1
    per_token = np.bincount(layer * tokens + token, minlength=layers * tokens)
    k = int(per_token.max())
    if np.any(per_token != k):
        bad = int(np.flatnonzero(per_token != k)[0])
        raise TraceError(f"{path}: layer {bad // tokens} token {bad % tokens} has "
                         f"{per_token[bad]} expert rows; every layer needs tokens 0..{tokens - 1}"
                         f" with the same number of experts (k={k})")
    order = np.lexsort((token, layer))     # stable: a token's experts keep their file order
    return expert[order].reshape(layers, tokens, k)


def validated_trace(path: str, fields: dict[str, np.ndarray], num_experts: int | None,
                     num_layers: int | None, top_k: int | None) -> RoutingTrace:
    has_ids, has_counts = "expert_ids" in fields, "counts" in fields
    if has_ids == has_counts:
        raise TraceError(f"{path}: needs exactly one of expert_ids [layers, tokens, k] or "
                         f"counts [layers, experts]; found {sorted(fields) or 'neither'}")
    declared = fields.get("num_experts")
    if declared is not None:
        if declared.shape != () or not np.issubdtype(declared.dtype, np.integer) or declared < 1:
            raise TraceError(f"{path}: num_experts must be an integer scalar >= 1; "
                             f"got {declared!r}")
        if num_experts is not None and int(declared) != num_experts:
            raise TraceError(f"{path}: num_experts={int(declared)} but the model has "
                             f"{num_experts} experts")
        num_experts = int(declared)
    if has_ids:
        ids, e = _checked_ids(path, fields["expert_ids"], num_experts, top_k)
        trace = RoutingTrace(path, e, expert_ids=ids)
    else:
        counts = _checked_counts(path, fields["counts"], num_experts)
        trace = RoutingTrace(path, counts.shape[1], counts=counts)
    if num_layers is not None and trace.num_layers != num_layers:
        raise TraceError(f"{path}: trace has {trace.num_layers} layers; the model has "
                         f"{num_layers} MoE layers")
    if "coactivation" in fields:
        trace = replace(trace, coactivation=_checked_coactivation(
            path, fields["coactivation"], trace.num_layers, trace.num_experts))
    return trace


def _checked_ids(path: str, ids: np.ndarray, num_experts: int | None,
                 top_k: int | None) -> tuple[np.ndarray, int]:
    if ids.ndim != 3 or 0 in ids.shape:
        raise TraceError(f"{path}: expert_ids has shape {ids.shape}; expected non-empty "
                         "[layers, tokens, k]")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{path}: expert_ids has dtype {ids.dtype}; expected integers")
    e = int(ids.max()) + 1 if num_experts is None else num_experts
    if ids.min() < 0 or ids.max() >= e:
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise TraceError(f"{path}: expert_ids: expert id {bad} out of range; allowed 0..{e - 1}")
    if top_k is not None and ids.shape[2] != top_k:
        raise TraceError(f"{path}: expert_ids has k={ids.shape[2]} experts per token; the model "
                         f"routes each token to top_k={top_k}")
    repeated = np.any(np.diff(np.sort(ids, axis=2), axis=2) == 0, axis=2)
    if np.any(repeated):
        layer, token = np.argwhere(repeated)[0]
        raise TraceError(f"{path}: expert_ids: layer {layer} token {token} lists an expert twice; "
                         "a token's k experts must be distinct")
    return ids.astype(np.int32), e


def _checked_counts(path: str, counts: np.ndarray, num_experts: int | None) -> np.ndarray:
    if counts.ndim != 2 or 0 in counts.shape:
        raise TraceError(f"{path}: counts has shape {counts.shape}; expected non-empty "
                         "[layers, experts]")
    if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
        raise TraceError(f"{path}: counts has dtype {counts.dtype}; expected numbers")
    counts = counts.astype(np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise TraceError(f"{path}: counts: every count must be finite and >= 0 "
                         f"(found {counts[~(np.isfinite(counts) & (counts >= 0))][0]})")
    if num_experts is not None and counts.shape[1] != num_experts:
        raise TraceError(f"{path}: counts has {counts.shape[1]} experts per layer; the model "
                         f"has {num_experts}")
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    if empty.size:
        raise TraceError(f"{path}: counts: layer {empty[0]} has no tokens; every layer needs a "
                         "positive total")
    return counts


def _checked_coactivation(path: str, co: np.ndarray, layers: int, e: int) -> np.ndarray:
    if co.shape != (layers, e, e):
        raise TraceError(f"{path}: coactivation has shape {co.shape}; expected "
                         f"[layers, experts, experts] = ({layers}, {e}, {e})")
    co = co.astype(np.float64)
    if not np.all(np.isfinite(co)) or np.any(co < 0):
        raise TraceError(f"{path}: coactivation: every entry must be finite and >= 0")
    if not np.allclose(co, co.transpose(0, 2, 1)):
        raise TraceError(f"{path}: coactivation must be symmetric in its two expert axes")
    return co


def choices_from_trace(trace: RoutingTrace, layer: int, *, num_sources: int,
                       tokens_per_source: int, rng: np.random.Generator,
                       max_tokens_per_source: int = 256, top_k: int | None = None,
                       expert_node: np.ndarray | None = None,
                       max_nodes: int | None = None) -> LayerChoices:
    """The choices of one layer, taken from a trace.

    Per-token traces: sampled token i is trace token ``i % tokens`` (in order, cycling) and comes
    from source ``i % num_sources``. Counts-only traces: popularity = counts / total, then
    :func:`sample_layer` (which needs ``top_k``; ``expert_node`` / ``max_nodes`` apply here only,
    since a per-token trace already holds its router's decisions).
    """
    if not 0 <= layer < trace.num_layers:
        raise TraceError(f"{trace.path}: layer {layer} out of range; the trace has layers "
                         f"0..{trace.num_layers - 1}")
    n = sampled_per_source(tokens_per_source, max_tokens_per_source, num_sources)
    if trace.expert_ids is None:
        if top_k is None:
            raise TraceError(f"{trace.path}: a counts-only trace needs top_k to sample tokens")
        assert trace.counts is not None
        return sample_layer(trace.counts[layer], num_sources=num_sources,
                            tokens_per_source=tokens_per_source, top_k=top_k, rng=rng,
                            max_tokens_per_source=max_tokens_per_source,
                            expert_node=expert_node, max_nodes=max_nodes)
    ids = trace.expert_ids[layer]                                          # [tokens, k]
    if top_k is not None and ids.shape[1] != top_k:
        raise TraceError(f"{trace.path}: trace has k={ids.shape[1]} experts per token; the model "
                         f"routes to top_k={top_k}")
    index = np.arange(num_sources * n)
    return LayerChoices(ids[index % ids.shape[0]].astype(np.int32),
                        (index % num_sources).astype(np.int32), tokens_per_source / n)
