"""Collective microbenchmarks: what the expert-parallel exchanges cost on this cluster's links.

MoE expert parallelism moves tokens with ``all_to_all_single`` (evenly split when routing is
balanced, unevenly when some experts are hot), and data/tensor parallelism uses ``all_reduce``
and ``all_gather``. Each is timed over a log grid of per-rank buffer sizes and summarised by an
alpha-beta fit (see ``fit.py``).

Measurement: before every timed call the group meets at a small all-reduce (a barrier that also
works on NCCL), each rank times the call with ``time.perf_counter`` (after a device synchronize
on CUDA), and the per-iteration *maximum over ranks* is kept: a synchronous step waits for the
slowest rank. ``seconds`` is the median of those maxima.

Link classes: ranks report a node id (``MOESIM_NODE_ID`` if set, for emulated nodes in network
namespaces, else the hostname). Ranks of one node form an ``intra_node`` group; if there are
several nodes, the whole world is also measured as ``inter_node`` (its traffic crosses nodes).

Launch: under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from the environment,
multi-node capable) via :func:`run_collectives`, or locally with :func:`launch_local`, which
spawns ``nprocs`` workers on 127.0.0.1. Rank 0 returns the tables. Only torch is imported.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .bench_kernels import Progress, percentile
from .fit import FitError, all_to_all_bytes_moved, bytes_moved_per_rank, fit_alpha_beta

__all__ = ["CollectiveConfig", "OPS", "node_id", "pick_backend", "zipf_splits",
           "run_collectives", "launch_local"]

# (table name, uneven?) in the order they run; one progress stage each.
OPS = (("all_to_all", False), ("all_to_all", True), ("all_reduce", False), ("all_gather", False))
_ELEMENT_BYTES = 4  # float32 buffers: every backend reduces them


@dataclass(frozen=True)
class CollectiveConfig:
    """What to measure; picklable so spawned workers get it."""

    bytes_per_rank: tuple[int, ...]  # per-rank buffer sizes (all-gather: the input shard)
    backend: str = "gloo"
    warmup: int = 3
    repeats: int = 10
    threads: int = 1  # torch threads per rank (gloo reductions use them)


def node_id() -> str:
    """This rank's node: ``MOESIM_NODE_ID`` (emulated nodes) or the hostname."""
    return os.environ.get("MOESIM_NODE_ID") or socket.gethostname()


def pick_backend(requested: str, nprocs: int) -> str:
    """``nccl`` when asked for, or on ``auto`` when each rank can have its own GPU; else gloo."""
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend {requested!r} is not one of 'auto', 'gloo', 'nccl'")
    if requested != "auto":
        return requested
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if dist.is_nccl_available() and gpus >= max(nprocs, 1) else "gloo"


def zipf_splits(numel: int, ranks: int) -> list[list[int]]:
    """Uneven all-to-all split matrix ``[src, dst]``: every rank sends ``numel`` elements,
    a share ``~ 1 / (dst + 1)`` to each destination, so rank 0 plays the hot expert.
    """
    weights = [1.0 / (d + 1) for d in range(ranks)]
    total = sum(weights)
    row = [int(numel * w / total) for w in weights]
    row[0] += numel - sum(row)  # rounding remainder to the hot rank keeps each row at numel
    return [list(row) for _ in range(ranks)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(group: Any, device: torch.device) -> None:
    flag = torch.zeros(1, device=device)
    dist.all_reduce(flag, group=group)
    _sync(device)


def _timed(op: Callable[[], Any], group: Any, device: torch.device,
           cfg: CollectiveConfig) -> float:
    """Median over iterations of the slowest rank's seconds for one call of ``op``."""
    for _ in range(cfg.warmup):
        op()
    _sync(device)
    times = []
    for _ in range(cfg.repeats):
        _barrier(group, device)
        t0 = time.perf_counter()
        op()
        _sync(device)
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return percentile(slowest.cpu().tolist(), 50)


def _make_op(name: str, uneven: bool, numel: int, group: Any,
             device: torch.device) -> tuple[Callable[[], Any], float]:
    """The call to time and the bytes it moves per rank (the fit's x)."""
    n, me = dist.get_world_size(group), dist.get_rank(group)
    src = torch.ones(numel, device=device)
    if name == "all_to_all" and uneven:
        splits = zipf_splits(numel, n)
        recv = [splits[s][me] for s in range(n)]
        dst = torch.empty(sum(recv), device=device)
        moved = all_to_all_bytes_moved(splits, _ELEMENT_BYTES)
        return (lambda: dist.all_to_all_single(dst, src, recv, splits[me], group=group)), moved
    moved = bytes_moved_per_rank(name, numel * _ELEMENT_BYTES, n)
    if name == "all_to_all":
        dst = torch.empty(numel, device=device)
        return (lambda: dist.all_to_all_single(dst, src, group=group)), moved
    if name == "all_reduce":
        return (lambda: dist.all_reduce(src, group=group)), moved
    dst = torch.empty(numel * n, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return (lambda: gather(dst, src, group=group)), moved


def _sweep(name: str, uneven: bool, link: str, group: Any, device: torch.device,
           cfg: CollectiveConfig, progress: Progress) -> tuple[dict[str, Any], list[float]]:
    """Time one op over the buffer sizes; the table entry and the bytes moved per point."""
    n = dist.get_world_size(group)
    sizes, seconds, moved = [], [], []
    for b in cfg.bytes_per_rank:
        numel = max(n, b // _ELEMENT_BYTES // n * n)  # equal splits need a multiple of n
        op, x = _make_op(name, uneven, numel, group, device)
        sizes.append(numel * _ELEMENT_BYTES)
        seconds.append(_timed(op, group, device, cfg))
        moved.append(x)
        progress.detail(f"{name}{' uneven' if uneven else ''} {link} x{n} {sizes[-1]} B: "
                        f"{seconds[-1] * 1e6:.1f} us")
    entry: dict[str, Any] = {"link": link, "ranks": n}
    if name == "all_to_all":
        entry["uneven"] = uneven
    entry.update(bytes=sizes, seconds=seconds, alpha=None, beta=None)
    return entry, moved


def _fitted(entry: dict[str, Any], moved: list[float], name: str) -> dict[str, Any]:
    """``entry`` with alpha and beta filled in (left None, with a warning, if no fit exists)."""
    try:
        fit = fit_alpha_beta(moved, entry["seconds"])
        entry.update(alpha=fit.alpha, beta=fit.beta)
    except FitError as err:
        print(f"[calibrate] warning: no alpha-beta for {name} {entry['link']}: {err}",
              file=sys.stderr)
    return entry


def _link_plans(world: int, rank: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """The (link, group) pairs this rank takes part in, and the node layout seen from rank 0."""
    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, node_id())
    nodes = list(dict.fromkeys(ids))
    members = {node: [r for r in range(world) if ids[r] == node] for node in nodes}
    layout = {"nodes": len(nodes), "world_size": world, "ranks_per_node": len(members[ids[0]]),
              "node_id_source": "MOESIM_NODE_ID" if os.environ.get("MOESIM_NODE_ID")
              else "hostname"}
    if len(nodes) == 1:
        return [("intra_node", dist.group.WORLD)], layout
    # Every rank must create every subgroup, in the same order.
    groups = {node: dist.new_group(members[node]) for node in nodes}
    plans: list[tuple[str, Any]] = []
    if len(members[ids[rank]]) >= 2:
        plans.append(("intra_node", groups[ids[rank]]))
    plans.append(("inter_node", dist.group.WORLD))
    return plans, layout


def run_collectives(cfg: CollectiveConfig, device: torch.device, progress: Progress,
                    first_stage: int) -> dict[str, Any] | None:
    """Measure every op on every link class in an initialised process group.

    Returns ``{"collectives": {op: [entry, ...]}, "layout": {...}}`` on rank 0, None elsewhere.
    Progress stages ``first_stage .. first_stage + len(OPS) - 1`` are announced by rank 0.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    plans, layout = _link_plans(world, rank)
    tables: dict[str, list[dict[str, Any]]] = {"all_to_all": [], "all_reduce": [],
                                               "all_gather": []}
    for i, (name, uneven) in enumerate(OPS):
        if rank == 0:
            progress.stage(first_stage + i, f"{name}{' (uneven)' if uneven else ''}")
        for link, group in plans:
            _barrier(dist.group.WORLD, device)  # link classes never overlap in time
            quiet = Progress(progress.total, progress.start_time, verbose=False)
            entry, moved = _sweep(name, uneven, link, group, device, cfg,
                                  progress if rank == 0 else quiet)
            if rank == 0:
                tables[name].append(_fitted(entry, moved, name))
    _barrier(dist.group.WORLD, device)
    return {"collectives": tables, "layout": layout} if rank == 0 else None


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name.startswith("lo")), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(local_rank: int, nprocs: int, port: int, cfg: CollectiveConfig,
             progress: Progress, first_stage: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(nprocs), LOCAL_RANK=str(local_rank))
    lo = _loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = lo  # all ranks are on 127.0.0.1
    torch.set_num_threads(cfg.threads)
    device = torch.device("cpu")
    if cfg.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(cfg.backend, rank=local_rank, world_size=nprocs)
    try:
        result = run_collectives(cfg, device, progress, first_stage)
        if result is not None:
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def launch_local(cfg: CollectiveConfig, nprocs: int, progress: Progress,
                 first_stage: int) -> dict[str, Any]:
    """Spawn ``nprocs`` ranks on this host, run :func:`run_collectives`, return rank 0's result."""
    if nprocs < 2:
        raise ValueError(f"nprocs (={nprocs}) must be >= 2 to measure collectives")
    with tempfile.TemporaryDirectory(prefix="moesim-calibrate-") as tmp:
        result_path = os.path.join(tmp, "collectives.json")
        mp.spawn(_spawned, args=(nprocs, _free_port(), cfg, progress, first_stage, result_path),
                 nprocs=nprocs, join=True)
        return json.loads(Path(result_path).read_text())
