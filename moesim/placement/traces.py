"""Synthetic per-token routing traces with skew, co-activation and drift, for planning studies.

A real router's choices have three properties a placement planner must face: a few experts are
far more popular than others (skew), some experts tend to be chosen by the same tokens
(co-activation), and the popular experts change over time (drift: a new domain of requests).
:func:`synthetic_trace` draws a per-token trace with all three. Each layer has a fixed partition
of its experts into ``coactivation_groups`` groups (the model's structure, stable over time);
each token picks one group and adds ``coactivation_strength`` to its members' logits, as
:func:`moesim.routing.sample_layer` does. Time is split into ``windows`` equal windows; window
``w`` uses the popularity ``(1 - drift) * base + drift * fresh_w``, where ``fresh_w`` is the base
Zipf popularity under a new random permutation. Planning on window 0 and evaluating on a later
one is then a held-out test under drift.
"""

from __future__ import annotations

import numpy as np

from moesim.errors import ScenarioError
from moesim.routing import coactivation_partition
from moesim.routing_trace import RoutingTrace

__all__ = ["synthetic_trace", "synthetic_groups"]


def synthetic_trace(num_experts: int, num_layers: int, num_tokens: int, top_k: int, *,
                    zipf_s: float = 0.8, coactivation_groups: int = 8,
                    coactivation_strength: float = 2.0, drift: float = 0.3, windows: int = 2,
                    seed: int = 0) -> RoutingTrace:
    """Draw a per-token trace ``expert_ids: int16[layers, num_tokens, top_k]``.

    Parameters
    ----------
    num_experts, num_layers, num_tokens, top_k : int
        Sizes; ``1 <= top_k <= num_experts``; ``num_tokens`` a multiple of ``windows``.
    zipf_s : float
        Skew of the base popularity (``p_i ∝ 1 / rank_i^s``, ranks randomly permuted per layer).
    coactivation_groups, coactivation_strength : int, float
        Group structure (0 groups or strength 0: none) and the logit boost of a token's group.
    drift : float
        In [0, 1]: weight of the window's fresh popularity against the base one.
    windows : int
        Equal time windows, each with its own popularity.
    seed : int
        Layer ``l`` draws from ``np.random.default_rng([seed, l])``.

    Raises
    ------
    ScenarioError
        A size or parameter out of range.
    """
    _check(num_experts, num_layers, num_tokens, top_k, zipf_s, drift, windows,
           coactivation_groups, coactivation_strength)
    ids = np.empty((num_layers, num_tokens, top_k), dtype=np.int16 if num_experts < 2**15
                   else np.int32)
    per_window = num_tokens // windows
    for layer in range(num_layers):
        rng = np.random.default_rng([seed, layer])
        base, group_of = _structure(num_experts, zipf_s, coactivation_groups,
                                    coactivation_strength, rng)
        for w in range(windows):
            popularity = (1.0 - drift) * base + drift * _zipf(num_experts, zipf_s, rng)
            rows = slice(w * per_window, (w + 1) * per_window)
            ids[layer, rows] = _draw(popularity, group_of, coactivation_strength, per_window,
                                     top_k, rng)
    name = (f"synthetic(E={num_experts}, k={top_k}, s={zipf_s}, groups={coactivation_groups}, "
            f"strength={coactivation_strength}, drift={drift}, seed={seed})")
    return RoutingTrace(name, num_experts, expert_ids=ids)


def synthetic_groups(num_experts: int, num_layers: int, *, zipf_s: float = 0.8,
                     coactivation_groups: int = 8, coactivation_strength: float = 2.0,
                     seed: int = 0) -> np.ndarray | None:
    """The co-activation group ``int[layers, E]`` of each expert in :func:`synthetic_trace`'s
    trace with the same arguments (None without co-activation): the structure a planner should
    find, for reference rows in studies."""
    if not (coactivation_groups and coactivation_strength):
        return None
    out = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        group_of = _structure(num_experts, zipf_s, coactivation_groups, coactivation_strength,
                              np.random.default_rng([seed, layer]))[1]
        assert group_of is not None   # groups and strength are set
        out[layer] = group_of
    return out


def _structure(num_experts: int, zipf_s: float, groups: int, strength: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """A layer's base popularity and co-activation groups (None: none), drawn first from its
    ``rng`` in this order."""
    base = _zipf(num_experts, zipf_s, rng)
    group_of = coactivation_partition(num_experts, groups, rng) if groups and strength else None
    return base, group_of


def _zipf(num_experts: int, s: float, rng: np.random.Generator) -> np.ndarray:
    weights = (rng.permutation(num_experts) + 1.0) ** -s
    return weights / weights.sum()


def _draw(popularity: np.ndarray, group_of: np.ndarray | None, strength: float, tokens: int,
          top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Gumbel-top-k choices ``[tokens, top_k]`` of one window (chunked to bound memory)."""
    logits = np.log(popularity)
    token_group = None
    if group_of is not None:
        groups = int(group_of.max()) + 1
        mass = np.bincount(group_of, weights=popularity, minlength=groups)
        token_group = rng.choice(groups, size=tokens, p=mass / mass.sum())
    out = np.empty((tokens, top_k), dtype=np.int64)
    chunk = 2048
    for lo in range(0, tokens, chunk):
        hi = min(tokens, lo + chunk)
        keys = logits + rng.gumbel(size=(hi - lo, popularity.size))
        if token_group is not None and group_of is not None:
            keys += strength * (group_of[None, :] == token_group[lo:hi, None])
        out[lo:hi] = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    return out


def _check(num_experts: int, num_layers: int, num_tokens: int, top_k: int, zipf_s: float,
           drift: float, windows: int, groups: int, strength: float) -> None:
    for name, value in (("num_experts", num_experts), ("num_layers", num_layers),
                        ("num_tokens", num_tokens), ("windows", windows)):
        if value < 1:
            raise ScenarioError(f"{name}={value} must be >= 1")
    if not 1 <= top_k <= num_experts:
        raise ScenarioError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    if num_tokens % windows:
        raise ScenarioError(f"num_tokens={num_tokens} must be a multiple of windows={windows}")
    if not zipf_s >= 0 or not 0.0 <= drift <= 1.0:
        raise ScenarioError(f"zipf_s={zipf_s} must be >= 0 and drift={drift} in [0, 1]")
    if strength and not 1 <= groups <= num_experts:
        raise ScenarioError(f"coactivation_groups={groups} must be in 1..{num_experts}")
    if not strength >= 0:
        raise ScenarioError(f"coactivation_strength={strength} must be >= 0")
