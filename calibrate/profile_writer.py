"""The measured hardware profile: assembling it from the tables and writing it atomically.

moesim reads hardware profiles (YAML) that normally hold datasheet peaks. A measured profile has
the same top-level shape (``name``, ``description``, ``device``, ``links``, ``node``) filled with
measured figures, plus a ``calibration`` section with the raw tables (plain SI numbers) that
moesim's calibrated cost models interpolate. See ``README.md`` for the schema.

The file is written to a temporary file in the target directory and moved into place with
``os.replace``, so a crash or a serialisation error never leaves a half-written profile where an
old good one was. PyYAML is used when installed; otherwise a small emitter writes the same YAML
(block style, floats always with a ``.`` or exponent so YAML 1.1 readers parse them as floats).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["build_profile", "write_profile", "to_yaml"]

_PLAIN_STR_FIRST = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_/")
_DIGITS = 6
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def build_profile(*, name: str, host: str, date: str, device: Mapping[str, Any],
                  kernels: Mapping[str, Any], collectives: Mapping[str, Any] | None,
                  layout: Mapping[str, Any] | None, metadata: Mapping[str, Any],
                  scale_out_kind: str | None = None) -> dict[str, Any]:
    """The profile dict: summary sections from the tables, then the tables themselves.

    Parameters
    ----------
    device : {name, kind ("cpu" | "gpu"), memory (bytes)} of the benchmarked device
    kernels : the ``calibration.kernels`` tables (``gemm`` and ``memcpy`` give the peaks)
    collectives : the ``calibration.collectives`` tables, or None if none were measured
    layout : {ranks_per_node, ...} from the collective run, or None
    metadata : host, date, torch_version, ... (stored as ``calibration.metadata``)
    scale_out_kind : label for inter-node links; default "emulated" on CPU, "infiniband" on GPU
    """
    gpu = device["kind"] == "gpu"
    flops_key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    dtype = str(metadata.get("dtype", "float32"))
    profile: dict[str, Any] = {
        "name": name,
        "description": f"Measured by calibrate/ on {host} {date}",
        "device": {
            "name": device["name"],
            "kind": device["kind"],
            "peak_flops": {flops_key.get(dtype, dtype): max(kernels["gemm"]["flops_per_s"])},
            "memory": int(device["memory"]),
            "memory_bandwidth": max(kernels["memcpy"]["bytes_per_s"]),
        },
    }
    links = _links(collectives or {}, gpu, scale_out_kind)
    if links:
        profile["links"] = links
    ranks_per_node = int(layout["ranks_per_node"]) if layout else 1
    profile["node"] = {"devices_per_node": ranks_per_node}
    calibration: dict[str, Any] = {"metadata": dict(metadata), "kernels": dict(kernels)}
    if collectives:
        calibration["collectives"] = dict(collectives)
    profile["calibration"] = calibration
    return profile


def _links(collectives: Mapping[str, Any], gpu: bool,
           scale_out_kind: str | None) -> dict[str, Any]:
    """scale_up / scale_out from the evenly split all-to-all fits of each link class."""
    kinds = {"intra_node": ("scale_up", "nvlink" if gpu else "loopback"),
             "inter_node": ("scale_out", scale_out_kind or ("infiniband" if gpu else "emulated"))}
    links: dict[str, Any] = {}
    for entry in collectives.get("all_to_all", []):
        if entry.get("uneven") or entry.get("beta") is None:
            continue
        key, kind = kinds[entry["link"]]
        links[key] = {"kind": kind, "bandwidth": entry["beta"], "latency": entry["alpha"]}
    return links


def write_profile(path: str | os.PathLike[str], profile: Mapping[str, Any],
                  header: str = "") -> Path:
    """Write ``profile`` as YAML to ``path`` atomically; ``header`` lines become ``#`` comments.

    The old file (if any) stays untouched unless the new one was written completely.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            for line in header.splitlines():
                stream.write(f"# {line}".rstrip() + "\n")
            _serialize(profile, stream)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)      # mkstemp makes the file private; a profile is an ordinary file
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _serialize(data: Mapping[str, Any], stream: IO[str]) -> None:
    """Dump ``data`` as block YAML; PyYAML if available, else :func:`to_yaml`."""
    try:
        import yaml
    except ImportError:
        stream.write(to_yaml(data))
        return

    class _Dumper(yaml.SafeDumper):
        """Mappings in block style, lists of scalars in flow style (one table row a line)."""

    def _list(dumper: yaml.SafeDumper, items: list[Any]) -> yaml.Node:
        flow = not any(isinstance(v, dict | list) for v in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)

    _Dumper.add_representer(list, _list)
    yaml.dump(_plain(data), stream, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
              width=100)


def _plain(obj: Any) -> Any:
    """Tuples to lists and numbers to Python scalars, so safe_dump accepts everything."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # str subclasses (torch.__version__) are not safe_dump-able
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    return float(f"{float(obj):.{_DIGITS}g}")  # timings carry no more significant digits


def to_yaml(data: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars (the fallback when PyYAML is missing).

    Lists of scalars are written in flow style (``[1, 2.5]``) to keep tables readable.
    """
    pad = " " * indent
    if isinstance(data, Mapping):
        if not data:
            return pad + "{}\n"
        lines = []
        for key, value in data.items():
            head = f"{pad}{_scalar(str(key))}:"
            if _is_block(value):
                lines.append(head + "\n" + to_yaml(value, indent + 2))
            else:
                lines.append(f"{head} {_inline(value)}\n")
        return "".join(lines)
    if isinstance(data, list | tuple) and _is_block(data):
        lines = []
        for item in data:
            body = to_yaml(item, indent + 2) if _is_block(item) else f"{pad}  {_inline(item)}\n"
            lines.append(f"{pad}- {body[indent + 2:]}")
        return "".join(lines)
    return f"{pad}{_inline(data)}\n"


def _is_block(value: Any) -> bool:
    if isinstance(value, Mapping):
        return bool(value)
    if isinstance(value, list | tuple):
        return any(isinstance(v, Mapping | list | tuple) for v in value)
    return False


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return _scalar(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(float(f"{value:.{_DIGITS}g}"))
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"  # 1e-05 -> 1.0e-05: YAML 1.1 needs the dot
        return text
    text = str(value)
    plain = (text and text[0] in _PLAIN_STR_FIRST and text.lower() not in _RESERVED
             and all(c.isalnum() or c in "_-./ ()" for c in text) and text == text.strip())
    if plain:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
