"""A real expert-parallel MoE layer, timed phase by phase: the ground truth for moesim.

Each of N ranks holds ``tokens_per_rank`` tokens and the experts its ``placement`` entry names
(an expert on several ranks is replicated; its tokens are split round-robin over the replicas).
One forward pass is what Megatron/DeepSpeed-style expert parallelism does:

1. route    -- router logits (linear hidden -> E), softmax gates over the top-k experts
               (the given expert ids when the config fixes the routing), permute the
               (token, k) rows by destination (rank, local slot);
2. dispatch -- exchange per-(rank, slot) row counts with ``all_to_all_single``, then the token
               rows with an uneven ``all_to_all_single``;
3. expert   -- group the received rows by local slot and run each expert's SwiGLU FFN;
4. combine  -- the uneven all-to-all back, un-permute, weight by the gates and sum over top-k.

Times come from ``time.perf_counter`` (CUDA: events, then one synchronize per iteration) with
barriers around the whole layer only, so each phase includes the waiting a real step sees.
The report (JSON) gives per-rank median/p10/p90 of each phase and the per-iteration maximum
over ranks of the total: what a synchronous training step waits for.

Only torch is imported (no moesim) so this folder can be copied to a GPU cluster. Launch with
``python moe_layer.py CONFIG.json --nprocs N`` (local spawn), under ``torchrun``, or any launcher
that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (e.g. ``emulated_cluster.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["LayerConfigError", "LayerConfig", "load_config", "reference_moe", "run_rank",
           "launch_local", "main"]

PHASES = ("route", "dispatch", "expert", "combine", "total")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEYS = ("hidden", "ffn", "num_experts", "top_k", "tokens_per_rank", "dtype", "placement",
         "routing", "warmup", "iters", "seed", "threads_per_rank")


class LayerConfigError(ValueError):
    """The layer configuration is invalid; the message names the field and what is allowed."""


@dataclass(frozen=True)
class LayerConfig:
    """One MoE layer and how it is spread over ranks (see the module docstring)."""

    hidden: int
    ffn: int  # intermediate size of each expert's SwiGLU FFN
    num_experts: int
    top_k: int
    tokens_per_rank: int
    placement: tuple[tuple[int, ...], ...]  # [ranks][slots] expert ids; len = world size
    dtype: str = "float32"
    routing: dict[str, Any] | None = None  # None: the router's own top-k
    warmup: int = 2
    iters: int = 10
    seed: int = 0
    threads_per_rank: int = 1

    @property
    def world_size(self) -> int:
        return len(self.placement)

    @property
    def slots(self) -> int:
        """Slots per rank in the count exchange (the largest rank's expert count)."""
        return max(1, max(len(p) for p in self.placement))


def load_config(source: str | os.PathLike[str] | dict[str, Any]) -> LayerConfig:
    """Read and validate a layer config from a JSON file path or an already-parsed dict."""
    raw = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise LayerConfigError(f"unknown keys {unknown}; allowed: {list(_KEYS)}")
    missing = [k for k in ("hidden", "ffn", "num_experts", "top_k", "tokens_per_rank", "placement")
               if k not in raw]
    if missing:
        raise LayerConfigError(f"missing required keys {missing}")
    fields = dict(raw)
    fields["placement"] = tuple(tuple(int(e) for e in slots) for slots in raw["placement"])
    cfg = LayerConfig(**fields)
    _validate(cfg)
    return cfg


def _validate(cfg: LayerConfig) -> None:
    for name in ("hidden", "ffn", "num_experts", "top_k", "tokens_per_rank", "iters",
                 "threads_per_rank"):
        if int(getattr(cfg, name)) < 1:
            raise LayerConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.warmup < 0:
        raise LayerConfigError(f"warmup={cfg.warmup} must be >= 0")
    if cfg.top_k > cfg.num_experts:
        raise LayerConfigError(f"top_k={cfg.top_k} must be <= num_experts={cfg.num_experts}")
    if cfg.dtype not in _DTYPES:
        raise LayerConfigError(f"dtype={cfg.dtype!r}; allowed: {list(_DTYPES)}")
    held = set()
    for rank, slots in enumerate(cfg.placement):
        if len(set(slots)) != len(slots):
            raise LayerConfigError(f"placement[{rank}]={list(slots)} holds an expert twice")
        bad = [e for e in slots if not 0 <= e < cfg.num_experts]
        if bad:
            raise LayerConfigError(f"placement[{rank}] has expert ids {bad} outside "
                                   f"[0, {cfg.num_experts})")
        held.update(slots)
    if len(held) != cfg.num_experts:
        raise LayerConfigError(f"experts {sorted(set(range(cfg.num_experts)) - held)} are on "
                               "no rank; every expert needs at least one slot")
    _validate_routing(cfg)


def _validate_routing(cfg: LayerConfig) -> None:
    r = cfg.routing
    if r is None:
        return
    kind = r.get("kind")
    if kind == "expert_ids":
        ids = torch.as_tensor(r["expert_ids"])
        want = (cfg.world_size, cfg.tokens_per_rank, cfg.top_k)
        if tuple(ids.shape) != want:
            raise LayerConfigError(f"routing.expert_ids has shape {tuple(ids.shape)}; "
                                   f"expected [ranks, tokens_per_rank, top_k] = {list(want)}")
        if ids.min() < 0 or ids.max() >= cfg.num_experts:
            raise LayerConfigError(f"routing.expert_ids must lie in [0, {cfg.num_experts})")
        if (ids.sort(-1).values.diff(dim=-1) == 0).any():
            raise LayerConfigError("routing.expert_ids repeats an expert within a token's top-k")
    elif kind == "sampled":
        p = torch.as_tensor(r["popularity"], dtype=torch.float64)
        if p.shape != (cfg.num_experts,) or (p < 0).any() or (p > 0).sum() < cfg.top_k:
            raise LayerConfigError(f"routing.popularity needs {cfg.num_experts} values >= 0 "
                                   f"with at least top_k={cfg.top_k} of them > 0")
    else:
        raise LayerConfigError(f"routing.kind={kind!r}; allowed: 'expert_ids', 'sampled'")


# ---- deterministic weights, tokens and routing (identical in every process) ----

def _seed(*keys: object) -> int:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _randn(shape: tuple[int, ...], scale: float, *keys: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(*keys))
    return torch.randn(shape, generator=g, dtype=torch.float32) * scale


def _tokens(cfg: LayerConfig, rank: int) -> torch.Tensor:
    """Activations of one rank: [tokens_per_rank, hidden] fp32 (cast by the caller)."""
    return _randn((cfg.tokens_per_rank, cfg.hidden), 1.0, cfg.seed, "tokens", rank)


def _router_weight(cfg: LayerConfig) -> torch.Tensor:
    return _randn((cfg.num_experts, cfg.hidden), cfg.hidden**-0.5, cfg.seed, "router")


def _expert_weights(cfg: LayerConfig, expert: int) -> tuple[torch.Tensor, ...]:
    """SwiGLU weights (gate [F, H], up [F, H], down [H, F]) of one expert."""
    h, f = cfg.hidden, cfg.ffn
    return (_randn((f, h), h**-0.5, cfg.seed, "gate", expert),
            _randn((f, h), h**-0.5, cfg.seed, "up", expert),
            _randn((h, f), f**-0.5, cfg.seed, "down", expert))


def _fixed_ids(cfg: LayerConfig, rank: int) -> torch.Tensor | None:
    """Top-k expert ids [tokens, top_k] the config imposes on this rank, or None."""
    r = cfg.routing
    if r is None:
        return None
    if r["kind"] == "expert_ids":
        return torch.as_tensor(r["expert_ids"][rank], dtype=torch.long)
    p = torch.as_tensor(r["popularity"], dtype=torch.float64)
    g = torch.Generator().manual_seed(_seed(r.get("seed", 0), "routing", rank))
    return torch.multinomial(p.expand(cfg.tokens_per_rank, -1), cfg.top_k, generator=g)


def _route(x: torch.Tensor, w_router: torch.Tensor, fixed: torch.Tensor | None,
           top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] and normalised gate weights [T, k] (fp32) for tokens x [T, H]."""
    probs = F.softmax((x @ w_router.t()).float(), dim=-1)  # [T, E]
    ids = probs.topk(top_k, dim=-1).indices if fixed is None else fixed
    gates = probs.gather(1, ids)
    return ids, gates / gates.sum(dim=-1, keepdim=True)


def _swiglu(x: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    gate, up, down = w
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def reference_moe(cfg: LayerConfig, ranks: list[int] | None = None,
                  device: str = "cpu") -> list[torch.Tensor]:
    """The same layer in one process, all experts local, no communication.

    Returns each requested rank's output [tokens_per_rank, hidden] (config dtype): the numbers
    the distributed layer must reproduce.
    """
    dt = _DTYPES[cfg.dtype]
    w_router = _router_weight(cfg).to(device, dt)
    experts = [tuple(t.to(device, dt) for t in _expert_weights(cfg, e))
               for e in range(cfg.num_experts)]
    outs = []
    for rank in range(cfg.world_size) if ranks is None else ranks:
        x = _tokens(cfg, rank).to(device, dt)
        fixed = _fixed_ids(cfg, rank)
        ids, gates = _route(x, w_router, None if fixed is None else fixed.to(device), cfg.top_k)
        y = torch.empty(*ids.shape, cfg.hidden, device=device, dtype=dt)  # [T, k, H]
        for e in range(cfg.num_experts):
            tok, k = (ids == e).nonzero(as_tuple=True)
            y[tok, k] = _swiglu(x[tok], experts[e])
        outs.append((y * gates.unsqueeze(-1).to(dt)).sum(dim=1))
    return outs


# ---- the distributed layer ----

class _Layer:
    """State of one rank: its tokens, router, local experts and the replica tables."""

    def __init__(self, cfg: LayerConfig, rank: int, device: torch.device):
        dt = _DTYPES[cfg.dtype]
        self.cfg, self.rank, self.device = cfg, rank, device
        self.x = _tokens(cfg, rank).to(device, dt)
        self.w_router = _router_weight(cfg).to(device, dt)
        self.local = [tuple(t.to(device, dt) for t in _expert_weights(cfg, e))
                      for e in cfg.placement[rank]]
        fixed = _fixed_ids(cfg, rank)
        self.fixed = None if fixed is None else fixed.to(device)
        # replica tables [E, max replicas]: (rank, slot) of each copy of each expert
        replicas: list[list[tuple[int, int]]] = [[] for _ in range(cfg.num_experts)]
        for r, slots in enumerate(cfg.placement):
            for s, e in enumerate(slots):
                replicas[e].append((r, s))
        width = max(len(c) for c in replicas)
        pad = [c + [c[0]] * (width - len(c)) for c in replicas]
        self.rep_rank = torch.tensor([[r for r, _ in c] for c in pad], device=device)
        self.rep_slot = torch.tensor([[s for _, s in c] for c in pad], device=device)
        self.n_rep = torch.tensor([len(c) for c in replicas], device=device)

    def destinations(self, ids: torch.Tensor) -> torch.Tensor:
        """Destination key rank * slots + slot of each (token, k) row, ids flattened [T*k].

        The j-th row (in token order) for expert e goes to replica (j + rank) mod replicas(e),
        so each replica gets an even share and different senders start on different replicas.
        """
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        sorted_e = flat[order]
        starts = torch.bincount(flat, minlength=self.cfg.num_experts).cumsum(0)
        starts = starts - torch.bincount(flat, minlength=self.cfg.num_experts)
        j = torch.arange(flat.numel(), device=flat.device) - starts[sorted_e]
        rep = (j + self.rank) % self.n_rep[sorted_e]
        key = torch.empty_like(flat)
        key[order] = self.rep_rank[sorted_e, rep] * self.cfg.slots + self.rep_slot[sorted_e, rep]
        return key

    def forward(self, mark: Any) -> tuple[torch.Tensor, dict[str, list[int]]]:
        """One layer pass; ``mark(i)`` is called at the end of phase i. Returns output [T, H]."""
        cfg, n, s = self.cfg, self.cfg.world_size, self.cfg.slots
        # 1. route: gates, destinations, permuted send buffer [T*k, H]
        ids, gates = _route(self.x, self.w_router, self.fixed, cfg.top_k)
        key = self.destinations(ids)
        perm = key.argsort(stable=True)
        send_counts = torch.bincount(key, minlength=n * s)  # [ranks * slots]
        x_send = self.x[perm // cfg.top_k]
        mark(0)
        # 2. dispatch: counts first (the receiver needs them to size its buffer), then rows
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send_split = send_counts.view(n, s).sum(1).tolist()
        recv_split = recv_counts.view(n, s).sum(1).tolist()
        x_recv = x_send.new_empty(sum(recv_split), cfg.hidden)
        dist.all_to_all_single(x_recv, x_send, recv_split, send_split)
        mark(1)
        # 3. expert: rows arrive [source][slot]; regroup by slot, run, restore arrival order
        slot_of_row = torch.arange(s, device=self.device).repeat(n).repeat_interleave(recv_counts)
        by_slot = slot_of_row.argsort(stable=True)
        per_slot = recv_counts.view(n, s).sum(0).tolist()
        chunks = x_recv[by_slot].split(per_slot)
        y = torch.cat([_swiglu(c, self.local[i]) if i < len(self.local) else c
                       for i, c in enumerate(chunks)])
        y_recv = torch.empty_like(y)
        y_recv[by_slot] = y
        mark(2)
        # 4. combine: rows go back to their senders, then un-permute and gate-weighted sum
        y_send = y_recv.new_empty(x_send.shape)
        dist.all_to_all_single(y_send, y_recv, send_split, recv_split)
        rows = torch.empty_like(y_send)
        rows[perm] = y_send
        out = (rows.view(cfg.tokens_per_rank, cfg.top_k, -1)
               * gates.unsqueeze(-1).to(rows.dtype)).sum(dim=1)
        mark(3)
        counts = {"send_rows": send_split, "recv_rows": recv_split, "returned_rows": y_send.shape[0],
                  "expert_rows": per_slot[: len(self.local)]}
        return out, counts


def _timed_pass(layer: _Layer) -> tuple[list[float], torch.Tensor, dict[str, list[int]]]:
    """One barrier-bracketed pass; returns phase seconds [route, dispatch, expert, combine, total]."""
    cuda = layer.device.type == "cuda"
    barrier_args = {"device_ids": [layer.device.index]} if cuda else {}
    dist.barrier(**barrier_args)
    if cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        events[0].record()
        out, counts = layer.forward(lambda i: events[i + 1].record())
        torch.cuda.synchronize(layer.device)
        stamps = [0.0] + [events[0].elapsed_time(e) / 1e3 for e in events[1:]]
    else:
        stamps = [time.perf_counter()]
        out, counts = layer.forward(lambda i: stamps.append(time.perf_counter()))
        stamps = [t - stamps[0] for t in stamps]
    dist.barrier(**barrier_args)
    phases = [b - a for a, b in zip(stamps, stamps[1:])]
    return phases + [stamps[-1]], out, counts


def _quantiles(xs: list[float]) -> dict[str, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    q = t.quantile(torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return {"median": q[0], "p10": q[1], "p90": q[2]}


def run_rank(cfg: LayerConfig, rank: int, device: torch.device
             ) -> tuple[dict[str, Any] | None, torch.Tensor]:
    """Run warmup + iters passes on this rank (process group already initialised).

    Returns (report on rank 0 / None elsewhere, this rank's layer output [T, H]).
    """
    if dist.get_world_size() != cfg.world_size:
        raise LayerConfigError(f"placement lists {cfg.world_size} ranks but the world size is "
                               f"{dist.get_world_size()}")
    torch.set_num_threads(cfg.threads_per_rank)
    layer = _Layer(cfg, rank, device)
    times: list[list[float]] = []
    for i in range(cfg.warmup + cfg.iters):
        phases, out, counts = _timed_pass(layer)
        if i >= cfg.warmup:
            times.append(phases)
    record = {"rank": rank, "node": os.environ.get("MOESIM_NODE_ID"),
              "host": socket.gethostname(), "counts": counts, "totals_s": [t[4] for t in times],
              "phases_s": {p: _quantiles([t[i] for t in times]) for i, p in enumerate(PHASES)}}
    records: list[Any] = [None] * cfg.world_size
    dist.all_gather_object(records, record)
    if rank != 0:
        return None, out
    step = [max(r["totals_s"][i] for r in records) for i in range(cfg.iters)]
    report = {"config": asdict(cfg) | {"routing": _routing_summary(cfg)},
              "world_size": cfg.world_size, "backend": dist.get_backend(),
              "device": device.type, "units": "seconds", "ranks": records,
              "step_max_total_s": _quantiles(step), "step_max_total_per_iter_s": step}
    return report, out


def _routing_summary(cfg: LayerConfig) -> dict[str, Any] | None:
    """The routing without the (possibly huge) per-token id list."""
    if cfg.routing is None or cfg.routing["kind"] != "expert_ids":
        return cfg.routing
    return {"kind": "expert_ids"}


# ---- launching ----

def _device_for(local_rank: int, backend: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def _run_in_group(cfg: LayerConfig, backend: str, out_dir: str | None
                  ) -> dict[str, Any] | None:
    """Body of every rank once RANK/WORLD_SIZE/MASTER_* are in the environment."""
    rank = int(os.environ["RANK"])
    device = _device_for(int(os.environ.get("LOCAL_RANK", rank)), backend)
    dist.init_process_group(backend, rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        report, out = run_rank(cfg, rank, device)
    finally:
        dist.destroy_process_group()
    if out_dir is not None:
        torch.save({"output": out.cpu(), "report": report}, Path(out_dir) / f"rank{rank}.pt")
    return report


def _spawned(rank: int, cfg: LayerConfig, nprocs: int, port: int, backend: str,
             out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(cfg.threads_per_rank))
    _run_in_group(cfg, backend, out_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(cfg: LayerConfig, nprocs: int | None = None, backend: str = "auto"
                 ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Spawn the ranks on this machine; returns (rank 0's report, every rank's output)."""
    import torch.multiprocessing as mp

    nprocs = cfg.world_size if nprocs is None else nprocs
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads_per_rank)  # inherited by the children
    with tempfile.TemporaryDirectory(prefix="moe_layer_") as tmp:
        mp.spawn(_spawned, args=(cfg, nprocs, _free_port(), _pick_backend(backend), tmp),
                 nprocs=nprocs, join=True)
        saved = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(nprocs)]
    return saved[0]["report"], [s["output"] for s in saved]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="layer config JSON")
    ap.add_argument("--nprocs", type=int, help="spawn this many local ranks")
    ap.add_argument("--rank-env", action="store_true",
                    help="take RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the environment "
                         "(the default when RANK is set)")
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    ap.add_argument("--out", help="write the JSON report here instead of stdout")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.nprocs is not None:
        report: dict[str, Any] | None = launch_local(cfg, args.nprocs, args.backend)[0]
    elif args.rank_env or "RANK" in os.environ:
        torch.set_num_threads(cfg.threads_per_rank)
        report = _run_in_group(cfg, _pick_backend(args.backend), None)
    else:
        ap.error("give --nprocs N, or run under a launcher that sets RANK (torchrun)")
    if report is not None:
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
