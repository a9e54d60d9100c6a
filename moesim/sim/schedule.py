"""Pipeline schedules: the order in which each stage runs its forward and backward chunks.

``one_f_one_b`` is Megatron-LM's schedule: with ``vp == 1`` the classic 1F1B (PipeDream-Flush),
with ``vp > 1`` the interleaved 1F1B of Narayanan et al. 2021, where each stage holds ``vp`` model
chunks and the bubble shrinks by ``vp``. Inference runs forward chunks only.
An entry is ``(kind, micro_batch, chunk)`` with kind "F" or "B".
"""

from __future__ import annotations

__all__ = ["one_f_one_b", "forward_only"]

Entry = tuple[str, int, int]


def _virtual(k: int, pp: int, vp: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward or backward virtual micro-batch of a stage."""
    group = k // (pp * vp)
    chunk = (k // pp) % vp
    if not forward:
        chunk = vp - 1 - chunk
    return group * pp + k % pp, chunk


def one_f_one_b(stage: int, pp: int, vp: int, micro_batches: int) -> list[Entry]:
    """The ordered list of chunks stage ``stage`` runs in one training step."""
    total = micro_batches * vp
    if vp == 1:
        warmup = min(pp - stage - 1, micro_batches)
    else:
        warmup = min((pp - stage - 1) * 2 + (vp - 1) * pp, total)
    order: list[Entry] = []
    f = b = 0
    for _ in range(warmup):
        order.append(("F", *_virtual(f, pp, vp, True)))
        f += 1
    while f < total:
        order.append(("F", *_virtual(f, pp, vp, True)))
        f += 1
        order.append(("B", *_virtual(b, pp, vp, False)))
        b += 1
    while b < total:
        order.append(("B", *_virtual(b, pp, vp, False)))
        b += 1
    return order


def forward_only(stage: int, pp: int, vp: int, micro_batches: int) -> list[Entry]:
    return [("F", *_virtual(k, pp, vp, True)) for k in range(micro_batches * vp)]
