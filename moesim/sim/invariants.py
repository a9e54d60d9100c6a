"""Invariants every simulation must satisfy; a broken one is a bug in moesim (InternalError).

Cheap and always on: tokens conserved through routing, capacity dropping and replica splitting;
bytes conserved per layer (what devices send is what devices receive, and the flow bytes equal the
routed token copies); no link carries more than its capacity allows in the time it was busy; no
stage runs two chunks at once; every span has end >= start; memory is never negative.
"""

from __future__ import annotations

import numpy as np

from moesim.errors import InternalError
from moesim.spec.hardware import dtype_bytes

__all__ = ["check_invariants"]

RTOL = 1e-9


def _close(a: float, b: float, what: str) -> None:
    if not np.isclose(a, b, rtol=1e-7, atol=1e-6):
        raise InternalError(f"invariant broken: {what}: {a!r} != {b!r}")


def check_invariants(sim) -> None:
    s, costs = sim.scenario, sim.costs
    ep = s.parallelism.ep
    k = s.model.effective_top_k
    tokens = costs.tokens
    for layer in s.model.moe_layer_ids:
        block = costs.block(layer)
        tr = block.traffic
        # Tokens: routed copies = kept + dropped; kept copies all reach some slot.
        sources = ep if tr.live_sources < 0 else tr.live_sources
        routed = tokens * sources * k
        _close(tr.counts.sum() + tr.dropped, routed, f"layer {layer} token copies routed")
        _close(tr.tokens.sum(), tr.counts.sum(), f"layer {layer} token copies sent")
        _close(tr.slot_tokens.sum(), tr.counts.sum(), f"layer {layer} token copies computed")
        # Bytes: sent per source = received per destination, summed over flows.
        sent = np.bincount(tr.pairs[:, 0], tr.dispatch_bytes, minlength=ep).sum()
        received = np.bincount(tr.pairs[:, 1], tr.dispatch_bytes, minlength=ep).sum()
        _close(sent, received, f"layer {layer} dispatch bytes sent vs received")
        if s.communication.alltoall == "direct":
            off_device = tr.tokens.sum() - np.trace(tr.tokens)
            bytes_per = s.model.hidden_size * dtype_bytes(s.precision.dispatch)
            _close(tr.dispatch_bytes.sum(), off_device * bytes_per,
                   f"layer {layer} dispatch bytes vs token copies")
        for coll in (block.dispatch, block.combine):
            if len(coll.link_index) and coll.duration > 0:
                cap = sim.topology.capacity[coll.link_index]
                if np.any(coll.link_bytes > cap * coll.duration * (1 + 1e-6)):
                    raise InternalError(f"invariant broken: layer {layer}: a link carried more "
                                        "bytes than capacity x all-to-all duration")
                if np.any(coll.link_busy > coll.duration * (1 + 1e-9)):
                    raise InternalError(f"invariant broken: layer {layer}: link busy longer "
                                        "than the all-to-all")
    _check_timeline(sim)
    for row in sim.result.memory:
        if min(v for key, v in row.items() if key != "stage") < 0:
            raise InternalError(f"invariant broken: negative memory in stage {row['stage']}")


def _check_timeline(sim) -> None:
    by_stage: dict[int, list] = {}
    for span in sim.spans:
        if span.end < span.start:
            raise InternalError(f"invariant broken: span ends before it starts: {span}")
        by_stage.setdefault(span.stage, []).append(span)
    for stage, spans in by_stage.items():
        spans.sort(key=lambda sp: sp.start)
        for a, b in zip(spans, spans[1:], strict=False):
            if b.start < a.end - 1e-12 * max(1.0, a.end):
                raise InternalError(f"invariant broken: stage {stage} runs two chunks at once")
    for run in sim.runs.values():
        if len(run.ops) and np.any(run.end < run.start):
            raise InternalError("invariant broken: an op ends before it starts")
        for stream in ("compute", "comm"):
            idx = [i for i, op in enumerate(run.ops) if op.stream == stream]
            if len(idx) > 1 and np.any(run.start[idx[1:]] < run.end[idx[:-1]] - 1e-12):
                raise InternalError(f"invariant broken: a device's {stream} stream runs two ops "
                                    "at once")
