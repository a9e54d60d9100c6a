"""Pipeline schedules: the order in which each stage runs its forward and backward chunks.

``one_f_one_b`` is Megatron-LM's schedule: with ``vp == 1`` the classic 1F1B (PipeDream-Flush),
with ``vp > 1`` the interleaved 1F1B of Narayanan et al. 2021, where each stage holds ``vp`` model
chunks and the bubble shrinks by ``vp``. Inference runs forward chunks only. :func:`dualpipe` is
DeepSeek-V3's bidirectional schedule (deepseek-ai/DualPipe): half the micro-batches enter at the
first stage, half at the last, and each device holds one stage of each direction.

An entry is ``(kind, micro_batch, chunk)``: "F" a forward chunk, "B" a whole backward chunk; under
zero-bubble splitting "b" a backward for the inputs only (its output gradient goes on at once) and
"W" the weight gradients of the oldest "b" still waiting for them; in DualPipe's overlapped pairs
"f" a forward run together with the next entry's backward, "x" that backward (no time of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["one_f_one_b", "forward_only", "dualpipe", "dualpipe_plan", "StagePlan"]

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


@dataclass(frozen=True)
class StagePlan:
    """A stage's order with DualPipe's communication points: entry ``i`` starts once its own
    input and the inputs of the entries in ``waits[i]`` have arrived (receives posted earlier
    and waited together), and its output is sent when entry ``release[i]`` ends (a pair of
    chunks sends both outputs at the pair's end)."""

    order: list[Entry]
    release: list[int]
    waits: list[list[int]]


def dualpipe(stage: int, pp: int, micro_batches: int) -> list[Entry]:
    """DualPipe's order on device ``stage`` (:func:`dualpipe_plan` without its communication
    points).

    >>> [e[0] for e in dualpipe(0, 2, 4)]
    ['F', 'F', 'F', 'B', 'f', 'x', 'B', 'b', 'W']
    """
    return dualpipe_plan(stage, pp, micro_batches).order


def dualpipe_plan(stage: int, pp: int, micro_batches: int) -> StagePlan:
    """DualPipe on device ``stage`` (DeepSeek-V3 report sec. 3.2.1; the eight steps of
    deepseek-ai/DualPipe's ``DualPipe.step``) for an even ``pp`` and an even number of
    ``micro_batches`` >= 2 pp.

    Chunk ``d`` is direction ``d``: direction 0 runs stages 0..pp-1 on devices 0..pp-1 with
    micro-batches ``0..m/2-1``, direction 1 the same stages on devices pp-1..0 with micro-batches
    ``m/2..m-1``; a device in the first half calls direction 0 its phase 0, one in the second half
    direction 1. As in the reference a forward-backward pair runs overlapped (one "f" entry, the
    backward an "x" entry after it), waits for both inputs and sends both outputs at its end.
    """
    half_ranks, half = pp // 2, micro_batches // 2
    rank = min(stage, pp - 1 - stage)
    flip = int(stage >= half_ranks)
    middle = rank == half_ranks - 1
    f, b = [0, 0], [0, 0]
    pending: list[tuple[int, int]] = []
    plan = StagePlan([], [], [])
    posted: dict[int, list[int]] = {0: [], 1: []}   # entries waiting on the input of the next
                                                    # forward of a phase (received ahead)

    def add(kind: str, mb: int, d: int) -> int:
        plan.order.append((kind, mb, d))
        plan.release.append(len(plan.order) - 1)
        plan.waits.append([])
        return len(plan.order) - 1

    def forward(phase: int) -> int:
        d = phase ^ flip
        f[d] += 1
        i = add("F", d * half + f[d] - 1, d)
        for waiting in posted[phase]:   # a receive posted ahead for this forward's input
            plan.waits[waiting].append(i)
        posted[phase].clear()
        return i

    def backward(phase: int, zero_bubble: bool = False) -> int:
        d = phase ^ flip
        b[d] += 1
        mb = d * half + b[d] - 1
        if zero_bubble:
            pending.append((mb, d))
        return add("b" if zero_bubble else "B", mb, d)

    def weights() -> int:
        return add("W", *pending.pop(0))

    def pair(phase0: int, phase1: int) -> None:
        """A forward of ``phase0`` overlapped with a backward of ``phase1``: one "f" entry runs
        both (the pair's time), then a zero-length "x" entry stands for the backward; both
        inputs first, both sends at the end."""
        i = forward(phase0)
        j = backward(phase1)
        plan.order[i] = ("f", *plan.order[i][1:])
        plan.order[j] = ("x", *plan.order[j][1:])
        plan.waits[i].append(j)
        plan.release[i] = j

    for _ in range((half_ranks - rank - 1) * 2):          # 1: nF0
        forward(0)
    deferred = -1
    for k in range(rank + 1):                             # 2: nF0F1
        i = forward(0)
        j = forward(1)
        posted[0].append(j)       # the next forward-0 input is received with this one's
        if not middle:
            plan.release[i] = j
        elif k == rank:
            deferred = j          # the middle device sends this forward-1 after the next F0
    for _ in range(half_ranks - rank - 1):                # 3: nB1W1F1 (zero bubble)
        backward(1, zero_bubble=True)
        posted[1].append(weights())   # the forward-1 input is received before the W
        forward(1)
    for k in range(half - pp + rank + 1):                 # 4: nF0B1F1B0 (the main step)
        if k == 0 and middle:     # not overlapped, to shorten the bubble (reference's note)
            i = forward(0)
            plan.release[deferred] = i
            j = backward(1)
            plan.release[i] = j
        else:
            pair(0, 1)
        pair(1, 0)
    for _ in range(half_ranks - rank - 1):                # 5: nB1F1B0
        backward(1)
        pair(1, 0)
    zero_bubble = False                                   # 6: nB1B0, the later half split
    for k in range(rank + 1):
        if k == (rank + 1) // 2 and rank % 2 == 1:
            zero_bubble = True
        backward(1, zero_bubble)
        if k == (rank + 1) // 2 and rank % 2 == 0:
            zero_bubble = True
        backward(0, zero_bubble)
    for _ in range(half_ranks - rank - 1):                # 7: nWB0 (zero bubble)
        weights()
        backward(0, zero_bubble=True)
    for _ in range(rank + 1):                             # 8: nW
        weights()
    return plan
