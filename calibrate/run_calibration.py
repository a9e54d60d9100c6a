"""Measure this machine and write a moesim hardware profile (the calibration entry point).

Runs the kernel microbenchmarks (``bench_kernels``) and the collective microbenchmarks
(``bench_collectives``), fits alpha-beta link models (``fit``) and writes the profile YAML
(``profile_writer``). Three ways to launch::

    python calibrate/run_calibration.py --tiny -o tiny.yaml            # CI smoke test, seconds
    python calibrate/run_calibration.py --nprocs 2 -o my_host.yaml      # local ranks, spawned
    torchrun --nnodes 2 --nproc-per-node 8 ... calibrate/run_calibration.py -o cluster.yaml

Locally the kernels run first in this process, then ``nprocs`` ranks are spawned for the
collectives. Under torchrun (RANK and WORLD_SIZE set) every rank runs the collectives first, then
rank 0 alone runs the kernels (the others exit, so they do not compete for the device) and writes
the profile. :func:`run` is the in-process API: ``run(argv) -> exit code``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):  # run as a script: make the `calibrate` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibrate import bench_kernels as bk  # noqa: E402
from calibrate.bench_collectives import (  # noqa: E402
    OPS,
    CollectiveConfig,
    launch_local,
    pick_backend,
    run_collectives,
)
from calibrate.profile_writer import build_profile, write_profile  # noqa: E402

__all__ = ["Plan", "make_plan", "describe_device", "run", "main"]

KERNEL_STAGES = ("expert_ffn", "expert_ffn (grouped)", "gate", "attention", "gemm", "memcpy")
MB = 1 << 20


@dataclass(frozen=True)
class Plan:
    """Every size the calibration measures; built from a preset and the command line."""

    hidden: int
    ffn: int
    experts: int
    top_k: int
    group_experts: int  # experts in the grouped (bmm) FFN benchmark
    heads: int
    head_dim: int
    ffn_tokens: tuple[int, ...]  # tokens per expert, single-expert FFN
    group_tokens: tuple[int, ...]  # tokens per expert, grouped FFN (group total <= max tokens)
    attention_tokens: tuple[int, ...]
    gemm_sizes: tuple[int, ...]
    memcpy_bytes: tuple[int, ...]
    collective_bytes: tuple[int, ...]
    policy: bk.TimingPolicy
    collective_warmup: int
    collective_repeats: int


# Preset: (hidden, head_dim, max_tokens, attention tokens, gemm sizes, memcpy bytes,
#          collective bytes per rank). CPU sizes keep the default run at a few minutes on 2 cores.
_PRESETS: dict[str, tuple[int, int, int, tuple[int, int], tuple[int, int], tuple[int, int],
                          tuple[int, int]]] = {
    "tiny": (64, 16, 256, (16, 256), (64, 256), (MB, 4 * MB), (4 << 10, 4 * MB)),
    "cpu": (1024, 64, 4096, (16, 4096), (128, 4096), (MB, 256 * MB), (4 << 10, 16 * MB)),
    "gpu": (4096, 128, 16384, (128, 16384), (256, 8192), (MB, 1024 * MB), (4 << 10, 256 * MB)),
}


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    """Sizes from the preset (``tiny``, else by device) overridden by explicit arguments."""
    preset = "tiny" if args.tiny else ("gpu" if device.type == "cuda" else "cpu")
    hidden0, head_dim0, max_tokens0, att, gemm, mem, coll = _PRESETS[preset]
    hidden = args.hidden or hidden0
    head_dim = args.head_dim or min(head_dim0, hidden)
    max_tokens = args.max_tokens or max_tokens0
    group = args.group_experts or min(args.experts, 8)
    policy = (bk.TimingPolicy(warmup=1, repeats=5, min_repeats=3, budget_s=0.1, min_sample_s=1e-4)
              if args.tiny else bk.TimingPolicy(repeats=25, budget_s=2.0))
    if args.repeats:
        policy = bk.TimingPolicy(policy.warmup, args.repeats, min(policy.min_repeats,
                                                                  args.repeats),
                                 policy.budget_s, policy.min_sample_s)
    return Plan(
        hidden=hidden, ffn=args.ffn or -(-int(2.75 * hidden) // 64) * 64,
        experts=args.experts, top_k=args.top_k, group_experts=group,
        heads=args.heads or max(1, hidden // head_dim), head_dim=head_dim,
        ffn_tokens=tuple(bk.log2_grid(1, max_tokens)),
        group_tokens=tuple(bk.log2_grid(1, max(1, max_tokens // group))),
        attention_tokens=tuple(bk.log2_grid(min(att[0], max_tokens), max_tokens)),
        gemm_sizes=tuple(bk.log2_grid(*gemm)), memcpy_bytes=tuple(bk.log2_grid(*mem)),
        collective_bytes=tuple(bk.log2_grid(args.min_bytes or coll[0], args.max_bytes or coll[1],
                                            step=2 if args.tiny else 1)),
        policy=policy, collective_warmup=2 if args.tiny else 5,
        collective_repeats=args.repeats or (9 if args.tiny else 20))


def describe_device(device: torch.device) -> dict[str, Any]:
    """``{name, kind, memory}``: the CPU model and usable RAM, or the GPU name and memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "kind": "gpu", "memory": int(props.total_memory)}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's cgroup limit is what this process can actually use
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    return {"name": name, "kind": "cpu", "memory": int(memory)}


def _run_kernels(plan: Plan, device: torch.device, dtype: torch.dtype, progress: bk.Progress,
                 first_stage: int) -> dict[str, Any]:
    common = {"device": device, "policy": plan.policy, "progress": progress}
    steps = (
        lambda: bk.bench_expert_ffn(plan.hidden, plan.ffn, plan.ffn_tokens, dtype=dtype,
                                    **common),
        lambda: bk.bench_expert_ffn(plan.hidden, plan.ffn, plan.group_tokens, dtype=dtype,
                                    experts=plan.group_experts, **common),
        lambda: bk.bench_gate(plan.hidden, plan.experts, plan.top_k, plan.ffn_tokens,
                              dtype=dtype, **common),
        lambda: bk.bench_attention(plan.hidden, plan.heads, plan.head_dim, plan.attention_tokens,
                                   dtype=dtype, **common),
        lambda: bk.bench_gemm(plan.gemm_sizes, dtype=dtype, **common),
        lambda: bk.bench_memcpy(plan.memcpy_bytes, **common),
    )
    results = []
    for i, (name, step) in enumerate(zip(KERNEL_STAGES, steps)):
        progress.stage(first_stage + i, name)
        results.append(step())
    return {"expert_ffn": [results[0], results[1]], "gate": [results[2]],
            "attention": [results[3]], "gemm": results[4], "memcpy": results[5]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_calibration.py", description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", required=True, help="profile YAML to write")
    p.add_argument("--nprocs", type=int, default=None,
                   help="local ranks for collectives (default: GPUs, else 2; 1 = none)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: finishes in seconds (CI)")
    p.add_argument("--hidden", type=int, help="model hidden size")
    p.add_argument("--ffn", type=int, help="expert FFN size (default 2.75 x hidden)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (gate)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (gate)")
    p.add_argument("--group-experts", type=int, help="experts in the grouped FFN (default <= 8)")
    p.add_argument("--heads", type=int, help="attention heads (default hidden / head_dim)")
    p.add_argument("--head-dim", type=int, help="attention head size")
    p.add_argument("--max-tokens", type=int, help="largest token count in the kernel grids")
    p.add_argument("--min-bytes", type=int, help="smallest collective buffer per rank")
    p.add_argument("--max-bytes", type=int, help="largest collective buffer per rank")
    p.add_argument("--repeats", type=int, help="timed samples per point (max)")
    p.add_argument("--dtype", choices=sorted(bk.DTYPES), help="default bfloat16 GPU, float32 CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default: usable cores)")
    p.add_argument("--no-collectives", action="store_true", help="kernels only")
    p.add_argument("--name", help="profile name (default measured-<host>)")
    p.add_argument("--scale-out-kind", help="label of inter-node links (default by device)")
    p.add_argument("--progress", action="store_true", help="also print one line per point")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ("nprocs", "hidden", "ffn", "experts", "top_k", "group_experts", "heads",
                "head_dim", "max_tokens", "min_bytes", "max_bytes", "repeats", "threads")
    for key in positive:
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} (={value}) must be >= 1")
    if args.top_k > args.experts:
        p.error(f"--top-k (={args.top_k}) must be <= --experts (={args.experts})")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and not gpus:
        p.error("--device cuda: torch sees no CUDA device")
    if args.backend == "nccl" and not (gpus and dist.is_nccl_available()):
        p.error("--backend nccl needs CUDA devices and an NCCL build of torch; use gloo")
    if args.backend == "nccl" and (args.nprocs or 0) > gpus:
        p.error(f"--backend nccl needs one GPU per rank: --nprocs {args.nprocs} > {gpus} GPUs")


def _header(metadata: dict[str, Any]) -> str:
    return "\n".join([
        "moesim hardware profile measured by calibrate/run_calibration.py",
        f"command: {metadata['command']}",
        f"host {metadata['host']}, {metadata['date']}, torch {metadata['torch_version']}, "
        f"{metadata['device_name']}, backend {metadata['backend']}",
        "Units are SI: seconds, bytes, bytes/s, FLOP/s. Kernel `seconds` = median seconds per",
        "forward call (expert_ffn also p10/p90); expert_ffn with experts > 1 times the whole group",
        "(bmm, each expert given `tokens`). memcpy bytes_per_s counts bytes read + written.",
        "Collective `bytes` = per-rank buffer (all_gather: input shard); alpha/beta fit",
        "seconds = alpha + moved / beta (least squares on relative error) with moved =",
        "b(n-1)/n all_to_all, 2b(n-1)/n all_reduce, b(n-1) all_gather, busiest rank's",
        "off-rank bytes for the uneven (Zipf) all_to_all.",
    ])


@dataclass(frozen=True)
class _Setup:
    """Where and how this process measures, decided once from the arguments and environment."""

    threads: int
    load: float  # 1-minute load average at the start
    launcher: bool  # under torchrun (or any launcher setting RANK / WORLD_SIZE)
    nprocs: int  # ranks for the collectives
    collectives: bool
    backend: str  # "gloo" | "nccl" | "none"
    device: torch.device  # kernel device (and NCCL collective device)
    dtype: torch.dtype


def _setup(args: argparse.Namespace) -> _Setup:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores or 1
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (cores or 1):  # other work shares the cores: every timing will come out slower
        print(f"[calibrate] warning: load average {load:.1f} exceeds the {cores} usable cores; "
              "timings will be inflated", file=sys.stderr)
    launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    nprocs = (int(os.environ["WORLD_SIZE"]) if launcher else None) or args.nprocs or \
        (torch.cuda.device_count() if cuda else 2)
    collectives = nprocs >= 2 and not args.no_collectives
    backend = pick_backend(args.backend, 1 if launcher else nprocs) if collectives else "none"
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if launcher else 0)
        torch.cuda.set_device(device)
    dtype = bk.DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    return _Setup(threads, load, launcher, nprocs, collectives, backend, device, dtype)


def _write(args: argparse.Namespace, argv: list[str], env: _Setup, kernels: dict[str, Any],
           coll: dict[str, Any] | None, started: float) -> Path:
    host = socket.gethostname()
    info = describe_device(env.device)
    metadata = {
        "host": host, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "device_name": info["name"], "backend": env.backend,
        "threads": env.threads, "nprocs": env.nprocs,
        "command": shlex.join(["calibrate/run_calibration.py", *argv]),
        "dtype": bk._dtype_name(env.dtype), "duration_s": round(time.time() - started, 1),
        "load_average": round(env.load, 2),  # 1-minute load when the run started
    }
    profile = build_profile(
        name=args.name or f"measured-{host}", host=host, date=metadata["date"], device=info,
        kernels=kernels, collectives=coll["collectives"] if coll else None,
        layout=coll["layout"] if coll else None, metadata=metadata,
        scale_out_kind=args.scale_out_kind)
    return write_profile(args.output, profile, header=_header(metadata))


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv``, calibrate, write the profile. Returns 0, 2 on bad arguments, 1 on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        _check(parser, args)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return _calibrate(args, argv)
    except (RuntimeError, OSError, ValueError, mp.ProcessRaisedException,
            mp.ProcessExitedException) as exc:
        print(f"[calibrate] failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _calibrate(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.time()
    env = _setup(args)
    plan = make_plan(args, env.device)
    stages = len(KERNEL_STAGES) + (len(OPS) if env.collectives else 0)
    progress = bk.Progress(stages, started, verbose=args.progress)
    cfg = CollectiveConfig(plan.collective_bytes, env.backend, plan.collective_warmup,
                           plan.collective_repeats, max(1, env.threads // env.nprocs))
    coll = None
    if env.launcher:
        # Launcher: collectives on every rank, then rank 0 alone runs the kernels.
        if env.collectives:
            dist.init_process_group(env.backend)
            coll_device = env.device if env.backend == "nccl" else torch.device("cpu")
            try:
                coll = run_collectives(cfg, coll_device, progress, 1)
            finally:
                dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
        kernels = _run_kernels(plan, env.device, env.dtype, progress, len(OPS) + 1)
    else:
        # Local: kernels here, then spawned ranks for the collectives.
        kernels = _run_kernels(plan, env.device, env.dtype, progress, 1)
        if env.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the GPU memory to the spawned rank on this device
        if env.collectives:
            coll = launch_local(cfg, env.nprocs, progress, len(KERNEL_STAGES) + 1)
    path = _write(args, argv, env, kernels, coll, started)
    print(f"[calibrate] wrote {path} ({time.time() - started:.1f} s)", file=sys.stderr)
    return 0


def main() -> None:
    """Console entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
