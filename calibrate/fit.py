"""Alpha-beta fits of collective timings: ``seconds = alpha + bytes_moved / beta``.

``alpha`` (s) is the fixed cost of one call (launch, handshakes, synchronisation) and ``beta``
(bytes/s) the bandwidth a rank sees on its link. The fit minimises the squared *relative* error

    sum_i ((alpha + x_i / beta - t_i) / t_i) ** 2,

so a 4 KB point (microseconds) counts as much as a 16 MB point (milliseconds); an unweighted
fit would let the large messages decide alpha too. The problem is linear in ``(alpha, 1/beta)``
and is solved in closed form (2x2 normal equations on column-scaled data). A negative alpha
(noise on a latency-free link) is clamped to 0 and ``1/beta`` refitted alone.

``x_i`` is the number of bytes each rank moves over its link, from the buffer size ``b`` per rank
on ``n`` ranks (the nccl-tests "bus bandwidth" conventions):

- all-to-all: ``b (n - 1) / n`` (the share of its buffer a rank sends to the others);
- all-reduce: ``2 b (n - 1) / n`` (ring reduce-scatter + all-gather);
- all-gather: ``b (n - 1)`` (``b`` = the per-rank input shard; a rank receives the others').

Pure Python (no numpy) so the calibration folder depends on torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FitError", "AlphaBeta", "fit_alpha_beta", "bytes_moved_per_rank",
           "all_to_all_bytes_moved"]

COLLECTIVES = ("all_to_all", "all_reduce", "all_gather")


class FitError(ValueError):
    """The points cannot give an alpha-beta model (too few, non-positive, or flat in bytes)."""


@dataclass(frozen=True)
class AlphaBeta:
    """A fitted link model; ``max_rel_error`` is the worst ``|model - t| / t`` over the points."""

    alpha: float  # seconds per call
    beta: float  # bytes per second
    max_rel_error: float

    def seconds(self, nbytes: float) -> float:
        """Predicted seconds to move ``nbytes``."""
        return self.alpha + nbytes / self.beta


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> AlphaBeta:
    """Least-squares fit, weighted to relative error, of ``seconds = alpha + nbytes / beta``.

    Parameters
    ----------
    nbytes : [points] bytes moved per rank (see the module docstring), > 0
    seconds : [points] measured seconds per call, > 0

    Raises
    ------
    FitError
        Fewer than two points, lengths differ, a value is not positive and finite, fewer than
        two distinct sizes, or the times do not grow with the bytes.
    """
    x, t = _checked(nbytes, seconds)
    # Rows of the weighted system: alpha * (1/t) + g * (x/t) = 1, with g = 1/beta.
    # Step 1: scale both columns to unit RMS so the 2x2 normal equations are well conditioned.
    u = [1.0 / ti for ti in t]
    v = [xi / ti for xi, ti in zip(x, t)]
    su = math.sqrt(sum(ui * ui for ui in u) / len(u))
    sv = math.sqrt(sum(vi * vi for vi in v) / len(v))
    us = [ui / su for ui in u]
    vs = [vi / sv for vi in v]
    # Step 2: solve [[uu, uv], [uv, vv]] [a, g] = [u1, v1].
    uu = sum(a * a for a in us)
    vv = sum(b * b for b in vs)
    uv = sum(a * b for a, b in zip(us, vs))
    det = uu * vv - uv * uv
    if det <= 1e-12 * uu * vv:
        raise FitError(f"bytes {list(nbytes)} need at least two distinct sizes to fit alpha-beta")
    alpha = (vv * sum(us) - uv * sum(vs)) / det / su
    g = (uu * sum(vs) - uv * sum(us)) / det / sv
    # Step 3: a negative alpha is noise around a zero fixed cost; refit the slope alone.
    if alpha < 0.0:
        alpha = 0.0
        g = sum(v) / sum(vi * vi for vi in v)
    if g <= 0.0:
        raise FitError(f"seconds {list(seconds)} do not grow with bytes {list(nbytes)}; "
                       "no bandwidth can be fitted")
    worst = max(abs(alpha + xi * g - ti) / ti for xi, ti in zip(x, t))
    return AlphaBeta(alpha=alpha, beta=1.0 / g, max_rel_error=worst)


def _checked(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(nbytes) != len(seconds):
        raise FitError(f"{len(nbytes)} byte sizes but {len(seconds)} timings; they must pair up")
    if len(nbytes) < 2:
        raise FitError(f"alpha-beta needs at least 2 points, got {len(nbytes)}")
    x = [float(b) for b in nbytes]
    t = [float(s) for s in seconds]
    for name, values in (("bytes", x), ("seconds", t)):
        bad = [val for val in values if not (math.isfinite(val) and val > 0.0)]
        if bad:
            raise FitError(f"{name} must be positive and finite, got {bad[0]!r}")
    return x, t


def bytes_moved_per_rank(collective: str, buffer_bytes: float, ranks: int) -> float:
    """Bytes one rank moves over its link for an evenly split collective.

    ``buffer_bytes`` is the per-rank buffer ``b`` (all-gather: the input shard).

    Examples
    --------
    >>> bytes_moved_per_rank("all_to_all", 1024, 4)
    768.0
    """
    if ranks < 2:
        raise FitError(f"ranks (={ranks}) must be >= 2 for a collective to move bytes")
    n = float(ranks)
    if collective == "all_to_all":
        return buffer_bytes * (n - 1) / n
    if collective == "all_reduce":
        return 2.0 * buffer_bytes * (n - 1) / n
    if collective == "all_gather":
        return buffer_bytes * (n - 1)
    raise FitError(f"unknown collective {collective!r}; expected one of {COLLECTIVES}")


def all_to_all_bytes_moved(splits: Sequence[Sequence[int]], element_bytes: int) -> float:
    """Bytes the busiest rank moves off-rank in an all-to-all with split matrix ``splits``.

    ``splits: [ranks, ranks]``, ``splits[src][dst]`` = elements ``src`` sends to ``dst``. A rank
    is as busy as the larger of what it sends to and receives from other ranks; the collective
    finishes when the busiest rank does. For equal splits this is ``b (n - 1) / n``.
    """
    n = len(splits)
    worst = 0
    for r in range(n):
        sent = sum(splits[r][d] for d in range(n) if d != r)
        received = sum(splits[s][r] for s in range(n) if s != r)
        worst = max(worst, sent, received)
    return float(worst * element_bytes)
