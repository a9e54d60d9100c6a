"""``moesim calibrate``: measure this machine with the PyTorch suite in ``calibrate/``, write a profile.

The suite (``calibrate/run_calibration.py``, torch only, no moesim import) runs in a subprocess of
the current Python; its progress lines pass straight through. It lives in the source checkout next
to the ``moesim`` package, not in the wheel: ``--suite DIR`` points at a copy elsewhere.

With ``--emulated-nodes K`` a second run measures the inter-node link class on K network
namespaces joined by a ``tc``-shaped bridge (``calibrate/emulated_cluster.py``, needs root), one
rank per namespace, so the fitted bandwidth is one emulated node's egress rate. Its
``scale_out`` link and ``inter_node`` tables are merged into the profile of the first run (kernels
and intra-node collectives); ``calibration.metadata.emulated`` records the nodes and the tc rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from moesim.errors import CalibrationError, MoESimError
from moesim.results import output_arg

__all__ = ["register", "find_suite", "calibrate", "merge_emulated", "import_aiconfigurator"]

_INSTALL = "pip install 'moesim[calibrate]' (torch==2.13.0)"
# Flags forwarded to run_calibration.py as they are (model sizes of the kernel tables).
_FORWARD = ("hidden", "ffn", "experts", "top_k", "max_tokens", "repeats")


def register(sub, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``calibrate`` subcommand to the ``moesim`` parser."""
    p = sub.add_parser("calibrate", help="measure this machine and write a hardware profile",
                       description="Run the PyTorch calibration suite (calibrate/) and write a "
                       "measured hardware profile that `moesim run` uses.")
    p.add_argument("-o", "--output", type=output_arg, help="profile YAML to write (default "
                   "measured-<host>.yaml in the current folder)")
    p.add_argument("--nprocs", type=int, default=2, help="local ranks for the collectives "
                   "(default 2; 1 = kernels only)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds, for CI")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the kernels "
                   "(default 1: one core per emulated device, steady on a shared machine)")
    p.add_argument("--emulated-nodes", type=int, default=0, metavar="K",
                   help="also measure inter-node links on K emulated nodes (needs root)")
    p.add_argument("--rate", default="400mbit", help="tc egress rate of each emulated node "
                   "(default 400mbit)")
    p.add_argument("--suite", help="the calibrate/ folder (default: next to the moesim package)")
    for name in _FORWARD:
        p.add_argument(f"--{name.replace('_', '-')}", type=int,
                       help="forwarded to run_calibration.py")
    imp = p.add_argument_group("import measured tables instead of measuring "
                               "(docs/calibration_import.md)")
    imp.add_argument("--import", dest="import_from", choices=("aiconfigurator",),
                     help="read NVIDIA aiconfigurator's measured kernel tables (pip install "
                     "'moesim[aic]') instead of running the suite")
    imp.add_argument("--system", help="aiconfigurator system, e.g. h100_sxm")
    imp.add_argument("--backend", help="trtllm, sglang or vllm")
    imp.add_argument("--version", help="backend version (default: the newest present)")
    imp.add_argument("--base-profile", help="moesim datasheet profile giving device and links "
                     "(default: the one matching --system, e.g. h100-sxm)")
    imp.add_argument("--aic-data", metavar="DIR", help="read this copy of aiconfigurator's "
                     "systems/data folder instead of the installed package")
    commands["calibrate"] = _cmd_calibrate


def find_suite(suite: str | os.PathLike[str] | None = None) -> Path:
    """The ``calibrate/`` folder holding ``run_calibration.py``.

    Raises
    ------
    CalibrationError
        It is not there (a wheel install ships no ``calibrate/``).
    """
    folder = Path(suite) if suite else Path(__file__).resolve().parent.parent / "calibrate"
    if not (folder / "run_calibration.py").is_file():
        raise CalibrationError(
            f"calibration suite not found: no run_calibration.py in {folder}. It ships with the "
            "moesim source checkout (calibrate/), not with the wheel: clone the repository or "
            "copy calibrate/ and pass --suite DIR")
    return folder


def _require_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise MoESimError(f"moesim calibrate needs PyTorch in this Python ({sys.executable}): "
                          f"{_INSTALL}")


def _suite_args(args: argparse.Namespace) -> list[str]:
    out = ["--threads", str(args.threads)]
    if args.tiny:
        out.append("--tiny")
    for name in _FORWARD:
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def _run(cmd: list[str], what: str) -> None:
    """Run ``cmd`` with stdout/stderr passed through; CalibrationError on a non-zero exit."""
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        reason = "bad arguments" if done.returncode == 2 else "see the messages above"
        raise CalibrationError(f"{what} failed (exit {done.returncode}: {reason}): "
                               f"{' '.join(cmd)}")


def calibrate(output: Path, args: argparse.Namespace) -> Path:
    """Run the suite (and the emulated inter-node run) and write the profile to ``output``."""
    _require_torch()
    suite = find_suite(args.suite)
    if args.nprocs < 1 or args.threads < 1:
        raise CalibrationError(f"--nprocs (={args.nprocs}) and --threads (={args.threads}) "
                               "must be >= 1")
    if args.emulated_nodes == 1 or args.emulated_nodes < 0:
        raise CalibrationError(f"--emulated-nodes (={args.emulated_nodes}) must be 0 (off) "
                               "or >= 2")
    for name in _FORWARD:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CalibrationError(f"--{name.replace('_', '-')} (={value}) must be >= 1")
    if not re.fullmatch(r"\d+(\.\d+)?([kmgt]?(bit|bps))", args.rate.strip().lower()):
        raise CalibrationError(f"--rate {args.rate!r}: a tc rate such as 400mbit, 10gbit or "
                               "50mbps")
    cmd = [sys.executable, str(suite / "run_calibration.py"), "-o", str(output),
           "--nprocs", str(args.nprocs), *_suite_args(args)]
    if args.nprocs == 1:
        cmd.append("--no-collectives")
    print(f"moesim calibrate: kernels{' and collectives' if args.nprocs > 1 else ''} "
          f"({args.nprocs} rank{'s' * (args.nprocs > 1)}, {args.threads} thread"
          f"{'s' * (args.threads > 1)})", file=sys.stderr, flush=True)
    _run(cmd, "calibration")
    if args.emulated_nodes:
        with tempfile.TemporaryDirectory(prefix="moesim-emulated-") as tmp:
            remote = _run_emulated(suite, Path(tmp) / "emulated.yaml", args)
            merge_emulated(output, remote, suite, nodes=args.emulated_nodes, rate=args.rate)
    return output


def _run_emulated(suite: Path, path: Path, args: argparse.Namespace) -> Path:
    """Collectives across ``args.emulated_nodes`` namespaces, one rank each; returns the profile."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        raise CalibrationError("--emulated-nodes needs root and iproute2 (`ip`, `tc`) to build "
                               "network namespaces; run as root or drop --emulated-nodes")
    # Kernel sizes are minimal: only the links of this run are kept. Buffers span MoE dispatch
    # sizes (16 KiB .. 2 MiB per rank): larger all-to-alls over the tbf-shaped veths are bimodal
    # here (a 4 MiB one took 41 ms or 80 ms, run to run), which no alpha-beta line describes.
    inner = [sys.executable, str(suite / "run_calibration.py"), "-o", str(path), "--threads", "1",
             "--hidden", "64", "--ffn", "128", "--max-tokens", "16",
             "--min-bytes", str(16 << 10), "--max-bytes", str(2 << 20),
             *(["--tiny"] if args.tiny else [])]
    cmd = [sys.executable, str(suite / "emulated_cluster.py"), "--nodes", str(args.emulated_nodes),
           "--ranks-per-node", "1", "--rate", args.rate, "--", *inner]
    print(f"moesim calibrate: inter-node links on {args.emulated_nodes} emulated nodes at "
          f"{args.rate} (output appears when it finishes)", file=sys.stderr, flush=True)
    _run(cmd, "emulated inter-node calibration")
    return path


def _load_module(suite: Path, name: str) -> ModuleType:
    """A stdlib-only module of the suite, loaded by path (the suite is not a moesim package)."""
    spec = importlib.util.spec_from_file_location(f"_moesim_suite_{name}", suite / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def merge_emulated(local: Path, remote: Path, suite: Path, *, nodes: int, rate: str) -> None:
    """Put ``remote``'s scale_out link and inter_node tables into the profile at ``local``.

    Raises
    ------
    CalibrationError
        The emulated run measured no usable inter-node all-to-all.
    """
    import yaml

    base, other = (yaml.safe_load(p.read_text()) for p in (local, remote))
    link = (other.get("links") or {}).get("scale_out")
    if link is None:
        raise CalibrationError(f"the emulated run measured no inter-node link ({remote}: "
                               "links.scale_out missing; the all-to-all fit failed)")
    base.setdefault("links", {})["scale_out"] = link
    tables = base["calibration"].setdefault("collectives", {})
    for op, entries in (other["calibration"].get("collectives") or {}).items():
        tables.setdefault(op, []).extend(e for e in entries if e.get("link") == "inter_node")
    cluster = _load_module(suite, "emulated_cluster")
    base["calibration"]["metadata"]["emulated"] = {
        "nodes": nodes, "ranks_per_node": 1, "rate": rate,
        "rate_bytes_per_s": cluster.rate_bytes_per_s(rate),
        "command": other["calibration"]["metadata"].get("command", "")}
    header = [ln[2:] for ln in local.read_text().splitlines() if ln.startswith("# ")]
    header.append(f"links.scale_out and inter_node tables: {nodes} emulated nodes, tc rate {rate}, "
                  "one rank per node (moesim calibrate --emulated-nodes)")
    writer = _load_module(suite, "profile_writer")
    writer.write_profile(local, base, header="\n".join(header))


def describe(path: Path) -> list[str]:
    """Lines saying what the profile at ``path`` holds (loaded with moesim's own loader)."""
    from moesim.calibration import MeasuredTables
    from moesim.spec.hardware import load_hardware

    profile = load_hardware(str(path))
    tables = MeasuredTables.from_profile(profile)
    d = profile.device
    lines = [f"device          {d.name} ({d.kind}): peak {max(d.peak_flops.values()) / 1e9:.1f} "
             f"GFLOP/s ({', '.join(d.peak_flops)}), memory bandwidth "
             f"{d.memory_bandwidth / 1e9:.1f} GB/s"]
    for name, link in profile.links.items():
        lines.append(f"link {name:<10} {link.kind}: {link.bandwidth / 1e6:.1f} MB/s, latency "
                     f"{link.latency * 1e6:.0f} us")
    for (h, f, g), curve in sorted(tables.expert_ffn_tables.items()):
        lines.append(f"expert_ffn      hidden {h}, ffn {f}, {g} expert(s): "
                     f"{_span(curve.tokens)} tokens")
    for (h, e), curve in sorted(tables.gate_tables.items()):
        lines.append(f"gate            hidden {h}, {e} experts: {_span(curve.tokens)} tokens")
    for h, curve in sorted(tables.attention_tables.items()):
        lines.append(f"attention       hidden {h}: {_span(curve.tokens)} tokens")
    meta: dict[str, Any] = (profile.calibration or {}).get("metadata", {})
    if meta:
        lines.append(f"measured        {meta.get('date')} on {meta.get('host')}, torch "
                     f"{meta.get('torch_version')}, {meta.get('duration_s')} s")
    return lines


def _span(tokens: Any) -> str:
    return f"{int(tokens[0])}..{int(tokens[-1])}"


def import_aiconfigurator(args: argparse.Namespace) -> Path:
    """``moesim calibrate --import aiconfigurator``: its measured tables on a datasheet profile.

    Raises
    ------
    CalibrationError
        aiconfigurator (or pyarrow) missing, unknown system/backend/version, no usable table.
    ScenarioError
        The base profile is unknown or already calibrated.
    """
    from moesim import aic_import as aic
    from moesim.errors import ScenarioError
    from moesim.spec.fields import read_yaml
    from moesim.spec.hardware import find_profile

    if not args.system or not args.backend:
        raise CalibrationError("--import aiconfigurator needs --system (e.g. h100_sxm) and "
                               f"--backend ({', '.join(aic.BACKENDS)})")
    root, label = aic.data_root(args.aic_data)
    aic.check_request(root, args.system, args.backend, args.version)
    base = args.base_profile or aic.DEFAULT_BASE.get(args.system)
    if base is None:
        raise CalibrationError(f"--base-profile: no shipped moesim profile matches system "
                               f"{args.system!r} (known: {', '.join(sorted(aic.DEFAULT_BASE))}); "
                               "give --base-profile NAME_OR_PATH")
    base_path = find_profile(base)
    base_data = read_yaml(base_path)
    if not isinstance(base_data, dict) or "calibration" in base_data:
        raise ScenarioError("--base-profile must be a datasheet profile (a mapping without a "
                            "`calibration` section)", source=str(base_path))
    output, created = writable_output(Path(args.output or
                                           f"{base_data.get('name', base_path.stem)}-aic-"
                                           f"{args.backend}.yaml"))
    existed = output.exists()
    try:
        _import_to(output, args, aic, root, label, base, base_path, base_data)
        from moesim.calibration import MeasuredTables
        from moesim.spec.hardware import load_hardware

        MeasuredTables.from_profile(load_hardware(str(output)))  # it loads as moesim reads it
    except BaseException:
        _discard(output, existed, created)
        raise
    return output


def _import_to(output: Path, args: argparse.Namespace, aic: Any, root: Path, label: str,
               base: str, base_path: Path, base_data: dict) -> None:
    """Write the imported profile to ``output`` (see :func:`import_aiconfigurator`)."""
    from moesim.results import write_text_atomic

    per_node = (base_data.get("node") or {}).get("devices_per_node", 8)
    kernels, collectives, summary, version = aic.import_tables(
        root, args.system, args.backend, args.version, devices_per_node=int(per_node))
    source = f"{label} {args.system}/{args.backend}/{version}"
    name = f"{base_data.get('name', base_path.stem)}-aic-{args.backend}"
    command = ("moesim calibrate --import aiconfigurator --system " + args.system + " --backend "
               + args.backend + (f" --version {args.version}" if args.version else "")
               + (f" --base-profile {args.base_profile}" if args.base_profile else ""))
    calibration = {
        "source": source,
        "metadata": {"tool": "aiconfigurator", "data": str(root), "system": args.system,
                     "backend": args.backend, "version": version,
                     "requested_version": args.version or "newest", "base_profile": base,
                     "command": command,
                     "license": "aiconfigurator is Apache-2.0 (NVIDIA); kernel timings "
                                "measured by NVIDIA on real GPUs",
                     "units": "seconds; tokens as each table's token axis (see "
                              "docs/calibration_import.md)",
                     "tables": summary},
        "kernels": kernels,
        "collectives": collectives,
    }
    memory_op = aic.memory_op_model(root, args.system)
    if memory_op is not None:
        calibration["memory_op"] = memory_op
    wide_mla = aic.wide_ep_mla(args.backend)
    if wide_mla is not None:
        calibration["wide_ep_mla"] = wide_mla
    header = [f"Measured kernel tables from NVIDIA aiconfigurator (Apache-2.0): {source}.",
              f"Device, links and their sources: moesim's datasheet profile {base} "
              f"({base_path.name}), unchanged.",
              f"Written by: {command}"]
    text = aic.build_profile_text(base_path.read_text(encoding="utf-8"), base, name,
                                  calibration, header)
    write_text_atomic(output, text)
    for line in summary:
        print(line)


def writable_output(path: Path) -> tuple[Path, Path | None]:
    """``path`` resolved, once its folder is known to take a new file (made if missing), so a
    calibration or an import never runs only to fail writing its profile; and the topmost
    folder this made (None if none; :func:`_discard` removes it again on failure).

    Raises
    ------
    MoESimError
        ``path`` is a folder, or its folder cannot be made or written.
    """
    from moesim.results import check_output_dir

    path = path.resolve()
    if path.is_dir():
        raise MoESimError(f"-o {path}: is a folder; give the profile's file name, e.g. "
                          f"{path / 'profile.yaml'}")
    _, created = check_output_dir(path.parent, what="-o folder")
    return path, created


def _discard(output: Path, existed: bool, created: Path | None) -> None:
    """Remove a profile a failed calibration or import wrote (never one that was there
    before it started), and the folders it made."""
    from moesim.results import discard_output_dir

    if not existed:
        output.unlink(missing_ok=True)
    discard_output_dir(output.parent, created)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    given = [f"--{n.replace('_', '-')}" for n in ("system", "backend", "version", "base_profile",
                                                  "aic_data") if getattr(args, n, None)]
    if given and not args.import_from:
        raise CalibrationError(f"{', '.join(given)}: only read with --import aiconfigurator "
                               "(without it, moesim calibrate measures this machine)")
    if args.import_from:
        output = import_aiconfigurator(args)
        print(f"wrote           {output}")
        print(f"use it with     --set cluster.hardware={output}   (or cluster: {{hardware: ...}})")
        return 0
    output, created = writable_output(Path(args.output or
                                           f"measured-{socket.gethostname()}.yaml"))
    existed = output.exists()
    try:
        calibrate(output, args)
    except BaseException:
        _discard(output, existed, created)
        raise
    for line in describe(output):
        print(line)
    print(f"wrote           {output}")
    print(f"use it with     cluster: {{hardware: {output}}}   (in a scenario file)")
    return 0
