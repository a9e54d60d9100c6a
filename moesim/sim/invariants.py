"""Invariants every simulation must satisfy; a broken one is a bug in moesim (InternalError).

Cheap and always on, each derived independently of the code that produced the numbers:

- tokens: routed copies = kept + dropped; every kept copy is sent and computed by some slot;
- bytes per source and per destination: what each device sends over the dispatch equals its
  routed token copies x bytes per token, and what it receives equals the copies its slots compute
  from other devices x bytes (hierarchical all-to-all: the NVLink part exactly, per device,
  and each network copy between one and top-k token copies; all-gather: every live device sends
  and receives exactly (live - 1) x its real tokens x bytes per token, whatever the routing, and
  a failed one nothing);
- links: no link of the simulated group carries more than its capacity allows in the time it
  was busy; the run also records how loaded every link is when *all* EP groups of the step move
  the same traffic at once (:func:`all_groups_link_load`), which the simulation prices one group
  at a time;
- time: no stage runs two chunks at once, no stream two ops at once, spans end after they start;
- memory is never negative.
"""

from __future__ import annotations

import numpy as np

from moesim.errors import InternalError
from moesim.pricing.alltoall import Collective
from moesim.sim.simulation import Simulation
from moesim.traffic import LayerTraffic

__all__ = ["check_invariants", "check_traffic", "check_collective", "all_groups_link_load"]


def _close(a: float | np.ndarray, b: float | np.ndarray, what: str) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
    if not np.allclose(a, b, rtol=1e-7, atol=1e-9 * scale):
        worst = int(np.argmax(np.abs(a - b))) if a.ndim else 0
        raise InternalError(f"invariant broken: {what}: {a.ravel()[worst]!r} != "
                            f"{b.ravel()[worst]!r}" + (f" (device {worst})" if a.ndim else ""))


def check_invariants(sim: Simulation) -> None:
    s, costs = sim.scenario, sim.costs
    ctx = costs.ctx
    token_bytes = ctx.hidden * ctx.dispatch_bytes_per_elem
    for layer in s.model.moe_layer_ids:
        block = costs.block(layer)
        assert block.traffic is not None
        check_traffic(block.traffic, ctx.tokens_per_source, ctx.top_k,
                      block.traffic.dispatch_copy_bytes or token_bytes, ctx.device_node,
                      block.traffic.algorithm, f"layer {layer}")
        for coll in (block.dispatch, block.combine):
            check_collective(coll, sim.topology.capacity, f"layer {layer}")
    _check_timeline(sim)
    for row in sim.result.memory:
        if min(v for key, v in row.items() if key != "stage") < 0:
            raise InternalError(f"invariant broken: negative memory in stage {row['stage']}")


def check_traffic(tr: LayerTraffic, tokens_per_source: float, top_k: int, token_bytes: float,
                  device_node: np.ndarray, algorithm: str, where: str) -> None:
    """Token and byte conservation of one layer's dispatch (see the module docstring)."""
    ep = tr.tokens.shape[0]
    # Every source's copies are kept or dropped (a failed source's are all dropped).
    _close(tr.counts.sum() + tr.dropped, tokens_per_source * ep * top_k,
           f"{where} token copies routed")
    _close(tr.tokens.sum(), tr.counts.sum(), f"{where} token copies sent")
    _close(tr.tokens.sum(axis=0), tr.slot_tokens.sum(axis=1),
           f"{where} token copies each device receives vs its slots compute")
    own = np.diag(tr.tokens)
    src, dst = tr.pairs[:, 0], tr.pairs[:, 1]
    if algorithm == "replicated":    # every rank holds the tokens: no byte moves
        _close(tr.dispatch_bytes.sum() + tr.combine_bytes.sum(), 0.0,
               f"{where} replicated dispatch bytes")
        return
    if algorithm == "allgather":     # every live device's tokens once to every other live one
        live = np.ones(ep, dtype=bool) if tr.failed is None else ~tr.failed
        expect = np.where(live, (live.sum() - 1) * tokens_per_source * token_bytes, 0.0)
        _close(np.bincount(src, tr.dispatch_bytes, minlength=ep), expect,
               f"{where} all-gather dispatch bytes each device sends")
        _close(np.bincount(dst, tr.dispatch_bytes, minlength=ep), expect,
               f"{where} all-gather dispatch bytes each device receives")
        matrix = np.zeros((ep, ep))
        np.add.at(matrix, (src, dst), tr.dispatch_bytes)
        pair = live[:, None] & live[None, :] & ~np.eye(ep, dtype=bool)
        _close(matrix, np.where(pair, tokens_per_source * token_bytes, 0.0),
               f"{where} all-gather dispatch bytes of each (source, destination) pair")
        return
    if algorithm in ("direct", "deepep_ll"):     # one copy per token-expert pair, direct
        sent = np.bincount(src, tr.dispatch_bytes, minlength=ep)
        received = np.bincount(dst, tr.dispatch_bytes, minlength=ep)
        _close(sent, (tr.tokens.sum(axis=1) - own) * token_bytes,
               f"{where} dispatch bytes each device sends vs its routed copies")
        _close(received, (tr.slot_tokens.sum(axis=1) - own) * token_bytes,
               f"{where} dispatch bytes each device receives vs its slots' copies")
        return
    # Hierarchical: a source on node n reaches node b != n through its relay on b (the device of
    # b with the source's rank in its node, modulo b's size), which forwards over NVLink.
    relay = _relays(device_node)                                    # [src, devices]: relay used
    same = device_node[:, None] == device_node[None, :]             # [src, dst]
    via = ~same & (relay == np.arange(ep)[None, :])                 # dst is its own relay
    local = same[src, dst]
    # Step 1: NVLink bytes into each device: its slots' copies from every source except itself
    # and those it relays to itself (those arrive over the network).
    nvlink_in = np.bincount(dst[local], tr.dispatch_bytes[local], minlength=ep)
    expect = (tr.slot_tokens.sum(axis=1) - own - (tr.tokens * via).sum(axis=0)) * token_bytes
    if algorithm == "deepep_normal":
        # One copy per destination rank, not per token-expert pair: between pairs / top-k and
        # pairs arrive over NVLink (bounds), and the network part is bounded below.
        _within(nvlink_in, expect / top_k, expect, f"{where} NVLink dispatch bytes each "
                "device receives")
    else:
        _close(nvlink_in, expect, f"{where} NVLink dispatch bytes each device receives")
    # Step 2: NVLink bytes out of each device: its own node's copies plus what it relays.
    forwarded = ~same & (relay != np.arange(ep)[None, :])
    relayed = np.bincount(relay[forwarded], tr.tokens[forwarded], minlength=ep)
    nvlink_out = np.bincount(src[local], tr.dispatch_bytes[local], minlength=ep)
    expect_out = ((tr.tokens * same).sum(axis=1) - own + relayed) * token_bytes
    if algorithm == "deepep_normal":
        _within(nvlink_out, expect_out / top_k, expect_out, f"{where} NVLink dispatch bytes "
                "each device sends")
    else:
        _close(nvlink_out, expect_out, f"{where} NVLink dispatch bytes each device sends")
    # Step 3: one network copy per (token, other node) it has experts on: at least its
    # token-expert pairs bound there / top-k, at most all of them (exact counts when nothing was
    # dropped: capacity drops thin the copies by the source's average kept share).
    if tr.dropped > 0:
        return
    net = np.bincount(src[~local], tr.dispatch_bytes[~local], minlength=ep) / token_bytes
    pairs_off = (tr.tokens * ~same).sum(axis=1)
    if np.any(net < pairs_off / top_k * (1 - 1e-7) - 1e-9) or np.any(
            net > pairs_off * (1 + 1e-7) + 1e-9):
        raise InternalError(f"invariant broken: {where} network copies per source outside "
                            "[token-expert pairs off-node / top-k, token-expert pairs off-node]")


def _within(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, what: str) -> None:
    tol = 1e-7 * max(float(np.abs(hi).max(initial=0.0)), 1.0)
    if np.any(values < lo * (1 - 1e-7) - tol) or np.any(values > hi * (1 + 1e-7) + tol):
        raise InternalError(f"invariant broken: {what}: outside [pairs / top-k, pairs]")


def _relays(device_node: np.ndarray) -> np.ndarray:
    """int[src, dst]: the device through which ``src`` reaches ``dst`` (``dst`` itself on its
    own node): on ``dst``'s node, the member with ``src``'s rank in its node modulo its size."""
    _, node = np.unique(device_node, return_inverse=True)
    node = node.ravel()
    sizes = np.bincount(node)
    order = np.argsort(node, kind="stable")
    rank = np.empty_like(node)
    rank[order] = np.arange(node.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    members = np.zeros((sizes.size, sizes.max()), dtype=np.int64)
    members[node[order], rank[order]] = order
    far = members[node[None, :], rank[:, None] % sizes[node][None, :]]      # [src, dst]
    return np.where(node[:, None] == node[None, :], np.arange(node.size)[None, :], far)


def check_collective(coll: Collective, capacity: np.ndarray, where: str) -> None:
    """No link carried more than capacity x duration, nor was busy longer than the collective."""
    if not len(coll.link_index) or coll.duration <= 0:
        return
    cap = capacity[coll.link_index]
    if np.any(coll.link_bytes > cap * coll.duration * (1 + 1e-6)):
        raise InternalError(f"invariant broken: {where}: a link carried more bytes than "
                            "capacity x all-to-all duration")
    if np.any(coll.link_busy > coll.duration * (1 + 1e-9)):
        raise InternalError(f"invariant broken: {where}: link busy longer than the all-to-all")


def all_groups_link_load(sim: Simulation) -> dict[str, float | int | str]:
    """Every EP group of every stage moving the busiest layer's dispatch at once: the largest
    (bytes on a link) / (capacity x the all-to-all's simulated duration) over all links.

    Above 1, groups that share links (oversubscribed uplinks) would slow each other down, which
    the simulation, pricing one group at a time, does not charge.
    """
    layout = sim.layout
    blocks = [sim.costs.block(layer) for layer in sim.scenario.model.moe_layer_ids]
    busiest = max(blocks, key=lambda b: b.dispatch.duration, default=None)
    groups = [layout.ep_group(st, g) for st in range(sim.scenario.parallelism.pp)
              for g in range(layout.ep_groups)]
    scope = {"groups_checked": len(groups), "groups": len(groups)}
    if busiest is None or busiest.traffic is None or busiest.dispatch.duration <= 0:
        return {**scope, "worst_link_load": 0.0, "link": ""}
    pairs, nbytes = busiest.traffic.pairs, busiest.traffic.dispatch_bytes
    topo = sim.topology
    load = np.zeros(topo.num_links)
    for group in groups:
        ptr, links = topo.paths_csr(group[pairs])
        load += np.bincount(links, weights=np.repeat(nbytes, np.diff(ptr)),
                            minlength=topo.num_links)
    ratio = load / (topo.capacity * busiest.dispatch.duration)
    worst = int(np.argmax(ratio))
    u, v = topo.link_ends[worst]
    return {**scope, "worst_link_load": float(ratio[worst]), "link": f"{u}->{v}"}


def _check_timeline(sim: Simulation) -> None:
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
