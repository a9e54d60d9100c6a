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
table is unchanged.

Every answer is counted by kernel and source (``table``, ``extrapolated`` beyond the grid,
``roofline`` when no table matched), so results can say what served the compute model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import CalibrationError

__all__ = ["Curve", "MeasuredTables", "KERNELS", "SOURCES"]

KERNELS = ("expert_ffn", "gate", "attention")
SOURCES = ("table", "extrapolated", "roofline")


@dataclass(frozen=True, eq=False)
class Curve:
    """One measured table: ``tokens: float[n]`` strictly increasing, ``seconds: float[n]`` > 0.

    ``seconds`` is made non-decreasing on construction (running minimum from the right).
    """

    tokens: np.ndarray
    seconds: np.ndarray

    def __post_init__(self) -> None:
        t = np.asarray(self.tokens, dtype=float)
        s = np.minimum.accumulate(np.asarray(self.seconds, dtype=float)[::-1])[::-1]
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


class MeasuredTables:
    """The kernel tables of one measured profile, with counters of what served each call.

    Tables are keyed by shape: expert FFN by (hidden, ffn) and group size, gate by
    (hidden, experts), attention by hidden. ``source`` names the profile file in errors.
    """

    def __init__(self, expert_ffn: Mapping[tuple[int, int, int], Curve],
                 gate: Mapping[tuple[int, int], Curve], attention: Mapping[int, Curve],
                 source: str = "") -> None:
        self.expert_ffn_tables = dict(expert_ffn)   # (hidden, ffn, experts in group) -> Curve
        self.gate_tables = dict(gate)               # (hidden, experts) -> Curve
        self.attention_tables = dict(attention)     # hidden -> Curve
        self.source = source
        self.served: Counter[tuple[str, str]] = Counter()  # (kernel, source) -> calls

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
            key = (_int(entry, "hidden", source, where), _int(entry, "ffn", source, where))
            experts = _int(entry, "experts", source, where) if "experts" in entry else 1
            ffn[(*key, experts)] = _curve(entry, source, where)
        for i, entry in enumerate(_entries(kernels, "gate", source)):
            where = f"calibration.kernels.gate[{i}]"
            gate[(_int(entry, "hidden", source, where),
                  _int(entry, "experts", source, where))] = _curve(entry, source, where)
        for i, entry in enumerate(_entries(kernels, "attention", source)):
            where = f"calibration.kernels.attention[{i}]"
            attention[_int(entry, "hidden", source, where)] = _curve(entry, source, where)
        return cls(ffn, gate, attention, source)

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
        beyond it; the part beyond is named). Kernels without tables (LM head, embedding, glue)
        always take the roofline.
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


def _int(entry: Mapping[str, Any], key: str, source: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{source}: {where}.{key}: {value!r} must be an integer >= 1")
    return value


def _curve(entry: Mapping[str, Any], source: str, where: str) -> Curve:
    """Validate ``tokens`` / ``seconds`` (/ ``p10``) of one table; its Curve reads p10 if given."""
    arrays = {}
    for key in ("tokens", "seconds", *(("p10",) if "p10" in entry else ())):
        raw = entry.get(key)
        try:
            values = np.asarray(raw, dtype=float)
        except (TypeError, ValueError):
            values = np.zeros(0)
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
    return Curve(arrays["tokens"], low)
