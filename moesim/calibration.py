"""Measured kernel tables: kernel times that ``moesim calibrate`` measured on the target machine.

A measured hardware profile (written by ``calibrate/run_calibration.py``) carries, under
``calibration.kernels``, tables of median seconds per forward call against token count for the
expert SwiGLU FFN (per expert, and grouped over G experts), the router gate and the attention
block. :class:`MeasuredTables` reads them once and answers the questions
:class:`moesim.compute.KernelTimer` asks; ``None`` means "no table for this shape", and the
timer then takes the roofline.

Interpolation is linear in log(tokens)-log(seconds) between grid points, so it is exact on grid
points and a power law between them (a kernel going from weight-bound to compute-bound bends
smoothly). Outside the grid the table is extended the way the roofline behaves there, anchored
at the table's edge: below the smallest token count a kernel is bound by reading its weights, a
cost that does not shrink with fewer tokens, so the edge value is kept; above the largest it is
compute-bound, so time grows in proportion to tokens from the edge value.

Timing noise only ever adds time (a descheduled thread, a neighbour's job), so a table is read
at its ``p10`` where it records one (the expert FFN does), else at its median ``seconds``: on an
idle device the two agree within a few percent, on a shared one p10 is the kernel's own time.
A kernel never gets cheaper with more tokens, so each table is then replaced by its running
minimum from the right (``seconds[i] = min(seconds[i:])``): upward spikes are cut, a monotone
table is unchanged. Imported (shaped) tables are not: they are a framework's own kernels as
measured, and a row slower than its neighbour at more tokens (vLLM's GEMMs at m = 64 against
m = 65) is the kernel that framework runs at that shape.

Every answer is counted by kernel and source (``table``, ``extrapolated`` beyond the grid,
``roofline`` when no table matched), so results can say what served the compute model.

Shaped tables (``moesim calibrate --import aiconfigurator``, see ``docs/calibration_import.md``)
add kinds keyed by the full kernel shape, each a curve over one token axis:

- ``gemm``: one GEMM ``[m, k] x [k, n]`` keyed by (n, k, dtype), axis m (tokens);
- ``moe``: one device's fused MoE layer (grouped GEMMs, activation, routing glue) keyed by
  (hidden, ffn, experts on the device, top-k, dtype, total experts), axis the routed token copies
  the device computes (see :meth:`MeasuredTables.moe`); ``moe_deepep_decode`` /
  ``moe_deepep_prefill`` the same keys for the expert GEMMs wide-EP deployments run between
  DeepEP's low-latency (decode) or normal (prefill) dispatch and combine;
- ``attention_context`` / ``attention_generation``: the attention core (no projections) keyed by
  (heads, kv heads, head dim, KV dtype, batch), axis the sequence length / the KV length;
- ``mla_context`` / ``mla_generation``: the same for DeepSeek-style MLA, keyed by (heads, KV
  dtype, batch); ``mla_module_context`` / ``mla_module_generation``: the whole MLA sub-layer
  (projections, latent norms, rotary, core, output projection), keyed also by the projections'
  dtype; ``mla_wideep_context`` / ``mla_wideep_generation``: SGLang's wide-EP MLA module, the
  same keys, without the fused q_a + kv_a down-projection (it runs outside the module);
- ``mla_bmm``: absorbed MLA decode's per-head BMMs keyed by (heads, op ``pre``/``post``, dtype),
  axis tokens.

A shaped lookup takes the exact key or answers None; the token axis is interpolated (and a GEMM's
width between two measured widths, see :meth:`MeasuredTables.gemm`). It is
counted only where the profile has tables of that kind, so a profile without them reports as
before. ``calibration.kernels.gemm`` of a ``moesim calibrate`` profile is the suite's peak sweep (a
mapping, not a list of shaped tables) and is not a lookup table. A curve's ``tokens`` and
``seconds`` may be lists or strings of space-separated numbers (the compact form the import
writes: pure-Python YAML reads one long string several times faster than a list).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import CalibrationError

__all__ = ["Curve", "MeasuredTables", "gemm_sites", "KERNELS", "SHAPED", "SOURCES",
           "DTYPE_TABLES", "MOE_KINDS", "GEMM_NEIGHBOURS", "GEMM_REACH_OCTAVES"]

KERNELS = ("expert_ffn", "gate", "attention", "gemm", "moe", "attention_context",
           "attention_generation", "mla_context", "mla_generation", "moe_deepep_decode",
           "moe_deepep_prefill", "mla_module_context", "mla_module_generation",
           "mla_wideep_context", "mla_wideep_generation", "mla_bmm")
# Fused-MoE table kinds: the frameworks' standard fused MoE, and the grouped GEMMs that run
# between DeepEP's low-latency (decode: masked layout) or normal (prefill: contiguous layout)
# dispatch and combine.
MOE_KINDS = ("moe", "moe_deepep_decode", "moe_deepep_prefill")
# Kinds keyed by the full shape (aiconfigurator import): counted only where the profile has them.
SHAPED = KERNELS[3:]
# A compute dtype and the table dtypes that serve it, in order of preference: moesim's "fp8" GEMM
# is served by per-tensor FP8 tables, else by block-scaled FP8 (DeepSeek-V3 style) ones; a
# block-scaled recipe ("fp8_block", precision.fp8_scaling: block) the other way round.
DTYPE_TABLES = {"fp8": ("fp8", "fp8_block"), "fp8_block": ("fp8_block", "fp8")}
SOURCES = ("table", "extrapolated", "roofline")


@dataclass(frozen=True, eq=False)
class Curve:
    """One measured table: ``tokens: float[n]`` strictly increasing, ``seconds: float[n]`` > 0.

    ``seconds`` is made non-decreasing on construction (running minimum from the right) unless
    ``monotone`` is False: imported tables are read as measured (see the module doc).
    """

    tokens: np.ndarray
    seconds: np.ndarray
    monotone: bool = True

    def __post_init__(self) -> None:
        t = np.asarray(self.tokens, dtype=float)
        s = np.asarray(self.seconds, dtype=float)
        if self.monotone:
            s = np.minimum.accumulate(s[::-1])[::-1]
        object.__setattr__(self, "tokens", t)
        object.__setattr__(self, "seconds", s)
        self._log_t: np.ndarray
        self._log_s: np.ndarray
        object.__setattr__(self, "_log_t", np.log(t))
        object.__setattr__(self, "_log_s", np.log(s))

    def __call__(self, tokens: np.ndarray | float) -> np.ndarray:
        """Seconds at ``tokens`` (any shape); log-log inside the grid, roofline-shaped outside.

        >>> c = Curve(np.array([1.0, 4.0]), np.array([1.0, 2.0]))
        >>> c(np.array([0.5, 1.0, 2.0, 4.0, 8.0])).round(6).tolist()
        [1.0, 1.0, 1.414214, 2.0, 4.0]
        """
        t = np.asarray(tokens, dtype=float)
        inside = np.exp(np.interp(np.log(np.clip(t, self.tokens[0], self.tokens[-1])),
                                  self._log_t, self._log_s))
        above = self.seconds[-1] * t / self.tokens[-1]
        return np.where(t > self.tokens[-1], above, inside)

    def outside(self, tokens: np.ndarray | float) -> np.ndarray:
        """bool mask: ``tokens`` lie off the measured grid (strictly below or above)."""
        t = np.asarray(tokens, dtype=float)
        return (t < self.tokens[0] * (1 - 1e-9)) | (t > self.tokens[-1] * (1 + 1e-9))


# Reach of a GEMM shape's efficiency transfer (MeasuredTables.gemm): the nearest measured shapes,
# at most this many, within this many octaves of (n, k).
GEMM_NEIGHBOURS = 4
GEMM_REACH_OCTAVES = 2.0


def gemm_sites(sites: Mapping[tuple[int, int], Curve], m: float, n: float, k: float
               ) -> tuple[list[tuple[tuple[int, int], float]], bool]:
    """The measured GEMM shapes ``(n_i, k_i)`` that price an unmeasured ``(n, k)`` at ``m``, with
    their weights, and whether the query lies beyond them (outside their range of n or of k).

    Candidates are the shapes whose m-curve covers ``m`` (all shapes if none does); distance is
    Euclidean in (log2 n, log2 k). The :data:`GEMM_NEIGHBOURS` nearest within
    :data:`GEMM_REACH_OCTAVES` are taken, weighted ``1 / distance**2``. A query narrower or
    shorter than every candidate gets no sites: below the measured shapes a GEMM nears its launch
    floor, which the kernel model prices and a measured efficiency does not carry to (a
    router's 8 columns from a 32-wide row). A query beyond every candidate along exactly one axis
    (a vocabulary wider than any measured width) is priced from the candidates within reach
    along the other axis: efficiency held at the frontier, as a single curve does beyond its
    last point. Anything else out of reach: no sites.

    >>> c = Curve(np.array([1.0, 64.0]), np.array([1e-5, 2e-5]))
    >>> [(s, round(w, 3)) for s, w in gemm_sites({(1024, 1024): c, (4096, 1024): c}, 8, 2048,
    ...                                           1024)[0]]
    [((1024, 1024), 1.0), ((4096, 1024), 1.0)]
    >>> sites, beyond = gemm_sites({(1024, 1024): c}, 8, 65536, 1024)
    >>> [(s, round(w, 4)) for s, w in sites], beyond
    ([((1024, 1024), 0.0278)], True)
    >>> gemm_sites({(512, 256): c, (7168, 16384): c}, 8, 65536, 1536)   # k far from both rows
    ([], False)
    """
    keys = list(sites)
    covering = [s for s in keys if sites[s].tokens[0] <= m <= sites[s].tokens[-1]]
    candidates = covering or keys
    query = np.log2([float(n), float(k)])
    logs = np.log2(np.array(candidates, dtype=float))
    distance = np.sqrt(((logs - query) ** 2).sum(axis=1))
    if (query < logs.min(axis=0)).any():
        return [], False
    reach = distance <= GEMM_REACH_OCTAVES
    if not reach.any():
        above = query > logs.max(axis=0)
        if above.sum() != 1:
            return [], False
        other = 1 - int(np.flatnonzero(above)[0])
        reach = np.abs(logs[:, other] - query[other]) <= GEMM_REACH_OCTAVES
        if not reach.any():
            return [], False
    order = sorted(np.flatnonzero(reach), key=lambda i: (distance[i], candidates[i]))
    chosen = order[:GEMM_NEIGHBOURS]
    used = logs[chosen]
    beyond = bool((query > used.max(axis=0)).any() or (query < used.min(axis=0)).any())
    return [(candidates[i], 1.0 / max(float(distance[i]), 1e-9) ** 2) for i in chosen], beyond


class MeasuredTables:
    """The kernel tables of one measured profile, with counters of what served each call.

    Tables are keyed by shape: expert FFN by (hidden, ffn) and group size, gate by
    (hidden, experts), attention by hidden. ``source`` names the profile file in errors.
    """

    def __init__(self, expert_ffn: Mapping[tuple[int, int, int], Curve],
                 gate: Mapping[tuple[int, int], Curve], attention: Mapping[int, Curve],
                 source: str = "", *,
                 shaped: Mapping[str, Mapping[tuple[Any, ...], Curve]] | None = None,
                 memory_op: tuple[float, float] | None = None,
                 wide_ep_mla: str = "module") -> None:
        self.expert_ffn_tables = dict(expert_ffn)   # (hidden, ffn, experts in group) -> Curve
        self.gate_tables = dict(gate)               # (hidden, experts) -> Curve
        self.attention_tables = dict(attention)     # hidden -> Curve
        # kind -> {key -> Curve}, keys in the order of SHAPE_FIELDS[kind] (ints, then strings)
        self.shaped_tables: dict[str, dict[tuple[Any, ...], Curve]] = {
            kind: dict((shaped or {}).get(kind, {})) for kind in SHAPED}
        self.source = source
        # (bytes/s, seconds per kernel) of the source's own formula for memory-bound glue
        # (norms, element-wise, embedding) it has no table for; None: moesim's device model.
        self.memory_op = memory_op
        # How a wide-EP (DeepEP) deployment runs MLA attention where the profile has no wide-EP
        # module table: "module" (the MLA module table) or "kernels" (core and projections).
        self.wide_ep_mla = wide_ep_mla
        self.served: Counter[tuple[str, str]] = Counter()  # (kernel, source) -> calls
        # (kind, key with batch -1) -> the batches measured for the other keys (sorted)
        self._batches: dict[tuple[str, tuple[Any, ...]], list[int]] = {}
        self._gemm_sites: dict[str, dict[tuple[int, int], Curve]] = {}   # dtype -> {(n, k)}

    @classmethod
    def from_profile(cls, profile: Any) -> MeasuredTables:
        """Read ``profile.calibration["kernels"]`` of a :class:`HardwareProfile`.

        Raises
        ------
        CalibrationError
            The section is missing or a table is malformed; the message names the profile file
            and the field (``calibration.kernels.expert_ffn[0].seconds``).
        """
        source = getattr(profile, "path", "") or getattr(profile, "name", "")
        calibration = getattr(profile, "calibration", None)
        if not isinstance(calibration, Mapping):
            raise CalibrationError(f"{source}: calibration: expected a mapping with a `kernels` "
                                   f"section, got {type(calibration).__name__}")
        kernels = calibration.get("kernels")
        if not isinstance(kernels, Mapping):
            raise CalibrationError(f"{source}: calibration.kernels: missing or not a mapping "
                                   "(re-run `moesim calibrate`)")
        ffn, gate, attention = {}, {}, {}
        for i, entry in enumerate(_entries(kernels, "expert_ffn", source)):
            where = f"calibration.kernels.expert_ffn[{i}]"
            experts = _int(entry, "experts", source, where) if "experts" in entry else 1
            ffn[(_int(entry, "hidden", source, where), _int(entry, "ffn", source, where),
                 experts)] = _curve(entry, source, where)
        for i, entry in enumerate(_entries(kernels, "gate", source)):
            where = f"calibration.kernels.gate[{i}]"
            gate[(_int(entry, "hidden", source, where),
                  _int(entry, "experts", source, where))] = _curve(entry, source, where)
        for i, entry in enumerate(_entries(kernels, "attention", source)):
            where = f"calibration.kernels.attention[{i}]"
            attention[_int(entry, "hidden", source, where)] = _curve(entry, source, where)
        shaped: dict[str, dict[tuple[Any, ...], Curve]] = {}
        for kind in SHAPED:
            raw = kernels.get(kind)
            if kind == "gemm" and isinstance(raw, Mapping):
                continue  # the calibration suite's peak sweep, not shaped tables
            tables = shaped.setdefault(kind, {})
            ints, strs = SHAPE_FIELDS[kind]
            for i, entry in enumerate(_entries(kernels, kind, source)):
                where = f"calibration.kernels.{kind}[{i}]"
                key = (*(_int(entry, k, source, where) for k in ints),
                       *(_str(entry, k, source, where) for k in strs))
                if key in tables:
                    raise CalibrationError(f"{source}: {where}: a second table for "
                                           f"{dict(zip(ints + strs, key))}; keys must be unique")
                tables[key] = _curve(entry, source, where, monotone=False)
        return cls(ffn, gate, attention, source, shaped=shaped,
                   memory_op=_memory_op(calibration.get("memory_op"), source),
                   wide_ep_mla=_wide_ep_mla(calibration.get("wide_ep_mla"), source))

    # ---- the questions KernelTimer asks ----

    def attention(self, hidden: int, tokens: float) -> float | None:
        """Seconds of the attention block for ``tokens`` tokens, or None (no table for hidden).

        The table times one causal sequence of ``tokens`` tokens: the simulator's tokens per
        micro-batch are read as one sequence.
        """
        return self._lookup("attention", self.attention_tables.get(int(hidden)), tokens)

    def gate(self, hidden: int, experts: int, tokens: float) -> float | None:
        """Seconds of the router (linear, softmax, top-k) for ``tokens`` tokens, or None."""
        return self._lookup("gate", self.gate_tables.get((int(hidden), int(experts))), tokens)

    def expert_ffn(self, hidden: int, ffn: int, tokens_per_slot: np.ndarray) -> float | None:
        """Seconds of a device's expert FFNs, ``tokens_per_slot: [slots]`` tokens each, or None.

        Sum over slots with tokens of the single-expert table (the experts run one after another,
        as the measured layer does); empty slots cost nothing. Without a single-expert table, a
        grouped table of G experts prices the active slots as ``active / G`` grouped calls at
        their mean tokens per expert.
        """
        tokens = np.asarray(tokens_per_slot, dtype=float).ravel()
        active = tokens[tokens > 0]
        single = self.expert_ffn_tables.get((int(hidden), int(ffn), 1))
        if single is not None:
            self._count("expert_ffn", single, active)
            return float(single(active).sum())
        grouped = [(g, c) for (h, f, g), c in sorted(self.expert_ffn_tables.items())
                   if (h, f) == (int(hidden), int(ffn))]
        if not grouped:
            self.served["expert_ffn", "roofline"] += 1
            return None
        if active.size == 0:
            self._count("expert_ffn", grouped[0][1], active)
            return 0.0
        size, curve = grouped[-1]
        mean = active.mean()
        self._count("expert_ffn", curve, np.array([mean]))
        return float(curve(mean)) * active.size / size

    # ---- shaped tables (aiconfigurator import) ----

    def gemm(self, m: float, n: int, k: int, dtype: str,
             model: Callable[[float, float, float], float] | None = None) -> float | None:
        """Seconds of one GEMM ``[m, k] x [k, n]`` in ``dtype``, or None (no table for it).

        A measured shape ``(n, k)`` answers from its own curve over m. Any other shape, with
        ``model`` (the kernel model's seconds at ``(m, n, k)``), takes the efficiency measured
        at the nearest measured shapes, :func:`gemm_sites`: each neighbour's time at ``m``
        against the model's time for the neighbour's shape gives its efficiency relative to the
        model; their inverse-square-distance mean (distance in octaves of n and k) scales the
        model's time for the query. A shape between the neighbours' n and k is counted
        ``table``, one outside them ``extrapolated``. Without ``model``, or with no
        neighbour within reach, None.
        """
        curve = self._shaped("gemm", lambda d: (int(n), int(k), d), dtype)
        if curve is not None or not self.has("gemm"):
            return self._shaped_lookup("gemm", curve, m)
        if model is not None:
            work = model(m, n, k)
            if work <= 0:
                return 0.0                  # no rows of work (m = 0): nothing to launch
            for d in DTYPE_TABLES.get(dtype, (dtype,)):
                sites = self._gemm_sites_of(d)
                if not sites:
                    continue
                anchors, beyond = gemm_sites(sites, m, n, k)
                if not anchors:
                    break
                weights = np.array([w for _, w in anchors])
                ratios = np.array([model(m, *site) / float(sites[site](float(m)))
                                   for site, _ in anchors])
                self.served["gemm", "extrapolated" if beyond else "table"] += 1
                return float(work * weights.sum() / (weights * ratios).sum())
        self.served["gemm", "roofline"] += 1
        return None

    def _gemm_sites_of(self, dtype: str) -> dict[tuple[int, int], Curve]:
        """The measured GEMM rows of ``dtype`` by shape ``(n, k)`` (indexed once)."""
        if dtype not in self._gemm_sites:
            self._gemm_sites[dtype] = {(key[0], key[1]): c for key, c
                                       in self.shaped_tables["gemm"].items() if key[2] == dtype}
        return self._gemm_sites[dtype]

    def moe(self, tokens_per_slot: np.ndarray, hidden: int, ffn: int, experts_per_device: int,
            top_k: int, dtype: str, *, experts: int | None = None,
            kind: str = "moe") -> float | None:
        """Seconds of one device's fused MoE layer, or None (no table for the shape).

        The measured table (aiconfigurator's ``moe_perf``) times rank 0 of an expert-parallel
        group of ``ep`` ranks: ``num_tokens`` tokens are routed evenly over all ``experts``
        experts with ``top_k`` each, and the rank runs its ``experts / ep`` local experts on the
        ``num_tokens * top_k / ep`` token copies they receive. The import stores that curve
        against those copies, so a device is priced at the total of ``tokens_per_slot: [slots]``
        (its slots are its ``experts_per_device``): how the copies spread over its experts is
        not modelled (the table is even routing). ``experts`` (the model's total) picks among
        tables that differ only in the group size; without it the smallest group is taken.
        ``kind``: which of :data:`MOE_KINDS` to read (the DeepEP kinds have the same keys).
        """
        tokens = np.asarray(tokens_per_slot, dtype=float).ravel()
        tables = self.shaped_tables[kind]
        curve = None
        for d in DTYPE_TABLES.get(dtype, (dtype,)):
            found = sorted((key[4], c) for key, c in tables.items()
                           if key[:4] == (int(hidden), int(ffn), int(experts_per_device),
                                          int(top_k)) and key[5] == d
                           and (experts is None or key[4] == int(experts)))
            if found:
                curve = found[0][1]
                break
        copies = float(tokens.sum())
        if curve is not None and copies <= 0:
            self._count(kind, curve, np.zeros(0))
            return 0.0
        return self._shaped_lookup(kind, curve, copies)

    def has_moe(self, hidden: int, ffn: int, top_k: int, experts: int, dtype: str,
                kinds: tuple[str, ...] = MOE_KINDS) -> bool:
        """Whether a fused-MoE table (of ``kinds``) of this expert shape exists, any group
        size."""
        dtypes = DTYPE_TABLES.get(dtype, (dtype,))
        return any(key[:2] == (int(hidden), int(ffn)) and key[3:5] == (int(top_k), int(experts))
                   and key[5] in dtypes for kind in kinds for key in self.shaped_tables[kind])

    def attention_context(self, batch: float, seq_len: float, heads: int, kv_heads: int,
                          head_dim: int, kv_dtype: str = "bf16") -> float | None:
        """Seconds of the prefill attention core (causal, ``batch`` sequences of ``seq_len``)."""
        return self._batch_lookup("attention_context", batch, seq_len,
                                  lambda b, d: (int(heads), int(kv_heads), int(head_dim), b, d),
                                  kv_dtype)

    def attention_generation(self, batch: float, kv_len: float, heads: int, kv_heads: int,
                             head_dim: int, kv_dtype: str = "bf16") -> float | None:
        """Seconds of the decode attention core: ``batch`` new tokens, ``kv_len`` cached each."""
        return self._batch_lookup("attention_generation", batch, kv_len,
                                  lambda b, d: (int(heads), int(kv_heads), int(head_dim), b, d),
                                  kv_dtype)

    def mla_context(self, batch: float, seq_len: float, heads: int,
                    kv_dtype: str = "bf16") -> float | None:
        """Seconds of the prefill MLA core (DeepSeek-V3 latent dims), ``heads`` per device."""
        return self._batch_lookup("mla_context", batch, seq_len,
                                  lambda b, d: (int(heads), b, d), kv_dtype)

    def mla_generation(self, batch: float, kv_len: float, heads: int,
                       kv_dtype: str = "bf16") -> float | None:
        """Seconds of the decode MLA core (DeepSeek-V3 latent dims), ``heads`` per device."""
        return self._batch_lookup("mla_generation", batch, kv_len,
                                  lambda b, d: (int(heads), b, d), kv_dtype)

    def mla_module(self, batch: float, length: float, heads: int, kv_dtype: str, dtype: str,
                   *, generation: bool, wide_ep: bool = False) -> float | None:
        """Seconds of the whole MLA sub-layer (projections in ``dtype``, latent norms, rotary,
        core, output projection): decode (``generation``) of ``batch`` sequences at KV length
        ``length``, or a prefill of ``batch`` sequences of ``length`` tokens; None without a
        table. ``wide_ep``: SGLang's wide-EP module instead, which leaves the fused q_a + kv_a
        down-projection out."""
        kind = ("mla_wideep" if wide_ep else "mla_module") + (
            "_generation" if generation else "_context")
        for d in DTYPE_TABLES.get(dtype, (dtype,)):
            def key(b: int, kv: str, gemm: str = d) -> tuple[Any, ...]:
                return (int(heads), b, kv, gemm)
            seconds = self._batch_lookup(kind, batch, length, key, kv_dtype, count_miss=False)
            if seconds is not None:
                return seconds
        return None

    def mla_bmm(self, tokens: float, heads: int, dtype: str, *, post: bool) -> float | None:
        """Seconds of absorbed MLA decode's ``pre`` (queries into the latent space) or ``post``
        (latent outputs back to heads) BMM over ``heads`` heads, or None (no table)."""
        op = "post" if post else "pre"
        curve = self._shaped("mla_bmm", lambda d: (int(heads), op, d), dtype)
        return self._shaped_lookup("mla_bmm", curve, tokens)

    def has(self, kind: str) -> bool:
        """Whether the profile holds any table of ``kind``."""
        return bool(self.shaped_tables.get(kind))

    def _shaped(self, kind: str, key: Callable[[str], tuple[Any, ...]],
                dtype: str) -> Curve | None:
        tables = self.shaped_tables[kind]
        for d in DTYPE_TABLES.get(dtype, (dtype,)):
            curve = tables.get(key(d))
            if curve is not None:
                return curve
        return None

    def _batch_lookup(self, kind: str, batch: float, length: float,
                      key: Callable[[int, str], tuple[Any, ...]], dtype: str,
                      *, count_miss: bool = True) -> float | None:
        """Seconds of ``batch`` sequences at ``length`` (sequence or KV length) from the tables
        of ``kind`` whose keys are ``key(batch, dtype)``.

        The table of that batch answers alone; a batch between two measured ones (tables are
        measured at powers of two) blends their times linearly in the batch: a batch's time is
        what all of them share (launch, tail, a module's weight reads) plus its sequences' work,
        linear in their number. None outside the measured batches (the kernel model answers: a
        module's weight reads do not grow with the batch, so no proportional extension holds)
        or with no table of the other keys (a miss is counted as ``roofline`` unless
        ``count_miss`` is False).
        """
        tables = self.shaped_tables[kind]
        at = SHAPE_FIELDS[kind][0].index("batch")
        for d in DTYPE_TABLES.get(dtype, (dtype,)):
            slot = (kind, key(-1, d))
            measured = self._batches.get(slot)
            if measured is None:
                measured = self._batches[slot] = sorted(
                    {k[at] for k in tables if key(k[at], d) == k})
            if not measured or batch < measured[0]:
                continue
            if batch == int(batch) and int(batch) in measured:
                return self._shaped_lookup(kind, tables[key(int(batch), d)], length)
            if batch > measured[-1]:
                continue
            hi = next(b for b in measured if b > batch)
            lo = max(b for b in measured if b < batch)
            low, high = tables[key(lo, d)], tables[key(hi, d)]
            self._count(kind, low, np.array([length]))
            f = (batch - lo) / (hi - lo)
            return float((1 - f) * low(float(length)) + f * high(float(length)))
        if count_miss and self.has(kind):
            self.served[kind, "roofline"] += 1
        return None

    def _shaped_lookup(self, kind: str, curve: Curve | None, tokens: float) -> float | None:
        if curve is None:
            if self.has(kind):
                self.served[kind, "roofline"] += 1
            return None
        self._count(kind, curve, np.array([tokens]))
        return float(curve(float(tokens)))

    # ---- bookkeeping ----

    def _lookup(self, kernel: str, curve: Curve | None, tokens: float) -> float | None:
        if curve is None:
            self.served[kernel, "roofline"] += 1
            return None
        self._count(kernel, curve, np.array([tokens]))
        return float(curve(float(tokens)))

    def _count(self, kernel: str, curve: Curve, tokens: np.ndarray) -> None:
        off = bool(curve.outside(tokens).any()) if tokens.size else False
        self.served[kernel, "extrapolated" if off else "table"] += 1

    def shares(self) -> dict[str, dict[str, float]]:
        """``{kernel: {source: fraction of calls}}`` for the kernels asked so far."""
        out: dict[str, dict[str, float]] = {}
        for kernel in KERNELS:
            total = sum(self.served[kernel, s] for s in SOURCES)
            if total:
                out[kernel] = {s: self.served[kernel, s] / total for s in SOURCES}
        return out

    def summary(self) -> str:
        """One line for results: ``calibrated tables (expert_ffn 100%, attention 0% → roofline)``.

        A percentage is the share of calls a measured table served (inside its grid or extended
        beyond it; the part beyond is named). Kernels without tables (embedding, glue) always
        take the roofline.
        """
        parts = []
        for kernel, share in self.shares().items():
            measured = share["table"] + share["extrapolated"]
            text = f"{kernel} {measured:.0%}"
            if share["extrapolated"]:
                text += f" ({share['extrapolated']:.0%} beyond grid)"
            if share["roofline"]:
                text += " → roofline" if not measured else f", {share['roofline']:.0%} roofline"
            parts.append(text)
        return f"calibrated tables ({', '.join(parts) or 'no kernel asked'})"


def _entries(kernels: Mapping[str, Any], name: str, source: str) -> Sequence[Mapping[str, Any]]:
    entries = kernels.get(name, [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise CalibrationError(f"{source}: calibration.kernels.{name}: expected a list of "
                               f"tables (mappings), got {entries!r:.80}")
    return entries


def _memory_op(raw: Any, source: str) -> tuple[float, float] | None:
    """``calibration.memory_op: {bandwidth: bytes/s, fixed: seconds}`` (written by the
    aiconfigurator import), or None when absent."""
    if raw is None:
        return None
    where = "calibration.memory_op"
    if not isinstance(raw, Mapping):
        raise CalibrationError(f"{source}: {where}: expected a mapping with bandwidth and fixed")
    values: list[float] = []
    for key, allowed in (("bandwidth", "> 0 (bytes/s)"), ("fixed", ">= 0 (seconds)")):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalibrationError(f"{source}: {where}.{key}: {value!r} must be a number "
                                   f"{allowed}")
        number = float(value)
        if not math.isfinite(number) or number < 0 or (key == "bandwidth" and number == 0):
            raise CalibrationError(f"{source}: {where}.{key}: {value!r} must be finite and "
                                   f"{allowed}")
        values.append(number)
    return values[0], values[1]


WIDE_EP_MLA_MODES = ("module", "kernels")


def _wide_ep_mla(raw: Any, source: str) -> str:
    """``calibration.wide_ep_mla: {mode: module|kernels}`` (written by the aiconfigurator import
    for backends whose wide-EP deployments run MLA as separate kernels); "module" when
    absent."""
    if raw is None:
        return "module"
    if not isinstance(raw, Mapping):
        raise CalibrationError(f"{source}: calibration.wide_ep_mla: expected a mapping "
                               f"{{mode: {' | '.join(WIDE_EP_MLA_MODES)}}}, got "
                               f"{type(raw).__name__}")
    mode = raw.get("mode")
    if mode not in WIDE_EP_MLA_MODES:
        raise CalibrationError(f"{source}: calibration.wide_ep_mla.mode: {mode!r} must be one of "
                               f"{', '.join(WIDE_EP_MLA_MODES)}")
    return str(mode)


def _int(entry: Mapping[str, Any], key: str, source: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{source}: {where}.{key}: {value!r} must be an integer >= 1")
    return value


def _str(entry: Mapping[str, Any], key: str, source: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise CalibrationError(f"{source}: {where}.{key}: {value!r} must be a non-empty string "
                               "(a dtype such as bf16, fp8)")
    return value


# Key fields of each shaped kind: integers, then strings (the order of the lookup keys).
SHAPE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gemm": (("n", "k"), ("dtype",)),
    "moe": (("hidden", "ffn", "experts_per_device", "top_k", "experts"), ("dtype",)),
    "moe_deepep_decode": (("hidden", "ffn", "experts_per_device", "top_k", "experts"),
                          ("dtype",)),
    "moe_deepep_prefill": (("hidden", "ffn", "experts_per_device", "top_k", "experts"),
                           ("dtype",)),
    "attention_context": (("heads", "kv_heads", "head_dim", "batch"), ("kv_dtype",)),
    "attention_generation": (("heads", "kv_heads", "head_dim", "batch"), ("kv_dtype",)),
    "mla_context": (("heads", "batch"), ("kv_dtype",)),
    "mla_generation": (("heads", "batch"), ("kv_dtype",)),
    "mla_module_context": (("heads", "batch"), ("kv_dtype", "dtype")),
    "mla_module_generation": (("heads", "batch"), ("kv_dtype", "dtype")),
    "mla_wideep_context": (("heads", "batch"), ("kv_dtype", "dtype")),
    "mla_wideep_generation": (("heads", "batch"), ("kv_dtype", "dtype")),
    "mla_bmm": (("heads",), ("op", "dtype")),
}


def _numbers(raw: Any) -> np.ndarray:
    """A list of numbers, or a string of space-separated numbers, as float[n] (empty if bad)."""
    if isinstance(raw, str):
        raw = raw.split()
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = [raw]      # a one-value curve written compactly reads back as a number
    try:
        return np.asarray(raw, dtype=float)
    except (TypeError, ValueError):
        return np.zeros(0)


def _curve(entry: Mapping[str, Any], source: str, where: str, *, monotone: bool = True
           ) -> Curve:
    """Validate ``tokens`` / ``seconds`` (/ ``p10``) of one table; its Curve reads p10 if given."""
    arrays = {}
    for key in ("tokens", "seconds", *(("p10",) if "p10" in entry else ())):
        raw = entry.get(key)
        values = _numbers(raw)
        if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) \
                or np.any(values <= 0):
            raise CalibrationError(f"{source}: {where}.{key}: {raw!r:.80} must be a non-empty "
                                   "list of finite numbers > 0")
        arrays[key] = values
    for key in ("seconds", "p10"):
        if key in arrays and arrays[key].size != arrays["tokens"].size:
            raise CalibrationError(f"{source}: {where}.{key}: {arrays[key].size} values for "
                                   f"{arrays['tokens'].size} token counts; they must match")
    if np.any(np.diff(arrays["tokens"]) <= 0):
        raise CalibrationError(f"{source}: {where}.tokens: {arrays['tokens'].tolist()} must be "
                               "strictly increasing")
    low = np.minimum(arrays["seconds"], arrays.get("p10", arrays["seconds"]))
    return Curve(arrays["tokens"], low, monotone)
