"""What a simulation reports: step time, throughput, MFU, breakdown, per-device, per-link, per-expert.

``Result`` is a plain dataclass of numbers and lists so that it serialises to ``results.json``
byte-for-byte the same for the same scenario; :func:`summary` renders it for humans (the only place
besides the YAML edge where ms, GB/s and TFLOPS appear).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moesim.errors import MoESimError
from moesim.units import format_quantity

__all__ = ["Result", "summary", "write_json_atomic", "write_text_atomic", "write_bytes_atomic",
           "json_text", "output_arg",
           "check_output_dir", "discard_output_dir", "write_files_together", "provenance",
           "run_label", "default_run_dir"]

_NAME_MAX, _PATH_MAX = 255, 4096   # bytes (Linux NAME_MAX and PATH_MAX)


@dataclass
class Result:
    scenario: str
    mode: str                       # training / prefill / decode
    engine: str                     # aggregated / full
    devices: int
    step_time: float                # seconds
    tokens_per_step: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    model_flops_per_token: float    # convention in moesim.sim.simulate.model_flops_per_token
    mfu: float
    tflops_per_device: float
    breakdown: dict[str, float]     # seconds, of the critical stage's busiest device; sums to step_time
    stages: list[dict[str, Any]]
    memory: list[dict[str, float]]
    links: dict[str, Any]
    experts: dict[str, Any]
    alltoall: dict[str, float]
    dropped_tokens: float
    compute_source: str
    events: int
    notes: list[str] = field(default_factory=list)
    faults: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _round(asdict(self))


def provenance(scenario: Any, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What makes a results.json self-describing: the resolved scenario as a plain dict, the
    ``--set`` overrides, the seed, the moesim version and the hardware profile's source.

    ``scenario`` is a :class:`moesim.spec.scenario.Scenario` (already with the overrides).
    """
    from moesim.spec.fields import to_plain
    from moesim.version import __version__

    resolved = to_plain(scenario)
    hw = scenario.hardware
    profile = {"name": hw.name, "path": hw.path, "measured": hw.calibration is not None}
    resolved["hardware"] = profile                  # the profile's own figures live in its file
    return {"moesim_version": __version__, "scenario_file": scenario.source,
            "overrides": list(overrides), "seed": scenario.seed, "hardware_profile": profile,
            "resolved_scenario": _round(resolved)}


def run_label(name: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """A scenario's name with its overrides, for summaries and plot titles."""
    return f"{name} [{', '.join(overrides)}]" if overrides else name


def default_run_dir(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """``results/<name>``, or ``results/<name>-<8 hex digits>`` with overrides, so that a
    ``--set`` run never overwrites the baseline (the digits hash the overrides, in order)."""
    if not overrides:
        return Path("results") / name
    digest = hashlib.sha256("\n".join(overrides).encode("utf-8", "surrogatepass")).hexdigest()
    return Path("results") / f"{name}-{digest[:8]}"


def _round(obj: Any) -> Any:
    """Round floats to 12 significant digits so JSON output is stable and readable."""
    if isinstance(obj, float):
        return float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temp file + rename: readers see the old or the
    new file (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename: readers see the old or the new file.
    The file gets the permissions of any new file (``mkstemp`` makes its temporary private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _as_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _as_new_file(path: str) -> None:
    """Give ``path`` the permissions of a file created under the current umask (``mkstemp``
    makes its temporaries private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def json_text(data: Any, *, compact: bool = False) -> str:
    """JSON with sorted keys (stable bytes) and a final newline; ``compact`` drops indentation."""
    if compact:
        return json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n"
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | Path, data: Any, *, compact: bool = False) -> None:
    """JSON with sorted keys (stable bytes); ``compact`` drops indentation (large traces)."""
    write_text_atomic(path, json_text(data, compact=compact))


def output_arg(text: str) -> str:
    """The argparse ``type`` of every command's ``-o``: a path, never empty (an empty one would
    write into the current folder, or silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave -o out for the default, "
                                         "where the command has one)")
    return text


def check_output_dir(path: str | Path, *, what: str = "output folder"
                     ) -> tuple[Path, Path | None]:
    """Make sure ``path`` can be the folder outputs are written to, before any work starts.

    The folder is created if missing and a probe file is written and removed, so a read-only
    mount, ``/proc`` or a missing permission fail here, not after the simulation.

    Returns
    -------
    (path, created)
        ``created`` is the topmost folder this call made, or None (:func:`discard_output_dir`
        removes what it made again if nothing is written).

    Raises
    ------
    MoESimError
        One line naming the path: a name too long, an existing non-folder on the way, a folder
        that cannot be created or written.
    """
    path = Path(path)
    bad = next((c for c in str(path) if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise MoESimError(f"{what} {str(path)[:60]!r}: contains the control character {bad!r}; "
                          "choose a name without one")
    text = os.fsencode(str(path))
    if len(text) >= _PATH_MAX:
        raise MoESimError(f"{what} {str(path)[:60]}...: the path is {len(text)} bytes, more "
                          f"than the {_PATH_MAX - 1} allowed")
    for part in path.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise MoESimError(f"{what} {_short(path)}: the name {part[:40]!r}... is "
                              f"{len(os.fsencode(part))} bytes, more than the {_NAME_MAX} "
                              "allowed")
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():   # a dangling link on the way
            raise MoESimError(f"{what} {_short(path)}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise MoESimError(f"{what} {_short(path)}: {existing} exists and is not a folder")
    created = None if path.exists() else _topmost_missing(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".moesim-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.errno == errno.EROFS:
            reason = "read-only file system"
        raise MoESimError(f"{what} {_short(path)} cannot be written ({reason}); choose "
                          "another with -o") from None
    return path, created


def _topmost_missing(path: Path) -> Path:
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def discard_output_dir(path: Path, created: Path | None) -> None:
    """Remove the folders :func:`check_output_dir` created, as far as they are still empty."""
    if created is None:
        return
    folder = path
    while True:
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder == created or folder == folder.parent:
            return
        folder = folder.parent


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 100 else text[:97] + "..."


def write_files_together(folder: str | Path, files: dict[str, str],
                         remove: tuple[str, ...] = ()) -> list[Path]:
    """Write several files into ``folder`` all-or-nothing: every one, or none of them.

    Each text goes to a temp file in ``folder`` (fsynced); only when all are written are they
    renamed into place, then the stale outputs named in ``remove`` are deleted. If writing any
    fails, every temp file is removed and the folder is as it was; if a rename fails midway, the
    files already replaced get their earlier versions back (kept as hard links until the end).

    Returns the paths written, in the order of ``files``.

    Raises
    ------
    MoESimError
        An OSError while writing or renaming (a full disk); nothing is left behind.
    """
    folder = Path(folder)
    temps: dict[str, str] = {}
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            temps[name] = tmp
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            _as_new_file(tmp)
        _replace_all(folder, temps)
    except BaseException as exc:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        if isinstance(exc, OSError):   # a full disk, a folder removed underneath: not a bug
            raise MoESimError(f"cannot write the outputs to {_short(folder)} "
                              f"({exc.strerror or exc}); nothing was written") from None
        raise
    for name in remove:
        if name not in files:
            (folder / name).unlink(missing_ok=True)
    return [folder / name for name in files]


def _replace_all(folder: Path, temps: dict[str, str]) -> None:
    """Rename every temp file onto its name; on failure put the earlier files back."""
    backups: dict[str, str | None] = {}
    try:
        for name, tmp in temps.items():
            target = folder / name
            backups[name] = None
            if target.exists():
                saved = f"{tmp}.old"
                os.link(target, saved)
                backups[name] = saved
            os.replace(tmp, target)
    except BaseException:
        for name, backup in backups.items():
            replaced = not os.path.exists(temps[name])
            if backup is not None:
                if replaced:
                    os.replace(backup, folder / name)
                else:   # still the earlier file (a link to the backup): drop the backup
                    os.unlink(backup)
            elif replaced:
                (folder / name).unlink(missing_ok=True)   # new, and already renamed in
        raise
    for backup in backups.values():
        if backup is not None:
            os.unlink(backup)


def summary(r: Result, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """A human-readable table of a result (``overrides``: the ``--set`` values it ran with)."""
    ms = lambda s: format_quantity(s, "time")  # noqa: E731
    lines = [
        f"scenario        {r.scenario}  ({r.mode}, {r.devices} devices, {r.engine} engine)",
        *([f"overrides       {', '.join(overrides)}"] if overrides else []),
        f"step time       {ms(r.step_time)}",
        f"throughput      {r.tokens_per_s:,.0f} tokens/s  ({r.tokens_per_s_per_device:,.1f} per "
        "device)",
        f"model FLOPs     {r.tflops_per_device:.1f} TFLOPS per device, MFU {100 * r.mfu:.1f}%",
        "breakdown       " + ", ".join(f"{k} {ms(v)} ({100 * v / r.step_time:.0f}%)"
                                       for k, v in r.breakdown.items() if r.step_time > 0),
        f"all-to-all      {format_quantity(r.alltoall['bytes_per_step'], 'bytes')} per step per "
        f"EP group, {100 * r.alltoall['cross_node_fraction']:.0f}% cross-node",
        f"expert load     max/mean {r.experts['max_over_mean']:.2f} (worst layer "
        f"{r.experts['worst_layer_max_over_mean']:.2f}); device max/mean "
        f"{r.experts['device_max_over_mean']:.2f}; dropped tokens {r.dropped_tokens:,.0f}",
        "memory (GiB)    " + ", ".join(f"stage {m['stage']}: {m['total'] / 2**30:.1f}/"
                                       f"{m['capacity'] / 2**30:.0f}" for m in r.memory[:4])
        + (" ..." if len(r.memory) > 4 else ""),
    ]
    busiest = r.links.get("busiest", [])[:3]
    if busiest:
        lines.append("busiest links   " + "; ".join(
            f"{b['link']} {100 * b['utilisation']:.0f}%" for b in busiest))
    if r.faults:
        f = r.faults
        lines.append(f"faults          step {ms(f['healthy_step_time'])} healthy -> "
                     f"{ms(f['step_time'])} ({f['step_time_change_pct']:+.1f}%); "
                     f"{f['dropped_tokens_due_to_faults']:,.0f} tokens dropped by faults")
    lines.append(f"compute model   {r.compute_source}")
    lines += [f"note            {n}" for n in r.notes]
    return "\n".join(lines)
