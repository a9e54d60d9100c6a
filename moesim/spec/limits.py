"""Bounds on everything a user hands moesim, checked before the input is used.

A scenario, sweep or plan file is small; a hostile or mistaken one must fail fast with one line
instead of hanging or ending in a traceback. This module holds the limits and the readers that
enforce them:

- files: regular files only (not ``/dev/zero``, a FIFO or a folder), at most
  :data:`MAX_FILE_BYTES`, checked with ``fstat`` before a byte is read;
- YAML: at most :data:`MAX_DEPTH` levels of nesting, at most :data:`MAX_NODES` nodes after alias
  expansion (an alias/anchor "billion laughs" bomb is refused while still a small graph, before
  anything walks it), no recursive anchors, integers of at most :data:`MAX_INT_DIGITS` digits;
- JSON: the same depth and node limits;
- strings: no NUL, control characters or lone surrogates; names that become file or folder names
  (a scenario's or a sweep's ``name``) only letters, digits and ``._-``; paths (profile, model,
  trace and plan references) no longer than the OS allows;
- sizes: at most :data:`MAX_DEVICES` devices in a cluster and :data:`MAX_SWEEP_POINTS` points in a
  sweep, checked from the sizes before anything is built or expanded.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from moesim.errors import ScenarioError

__all__ = ["MAX_FILE_BYTES", "MAX_DEPTH", "MAX_NODES", "MAX_INT_DIGITS", "MAX_DEVICES",
           "MAX_SWEEP_POINTS", "MAX_NAME_CHARS", "read_text_bounded", "load_yaml_text",
           "load_json_text", "check_text", "check_name", "check_path_text"]

MAX_FILE_BYTES = 16 * 2**20     # scenarios, profiles, sweeps and plans are kilobytes
MAX_DEPTH = 64                  # nesting levels of a YAML/JSON document
MAX_NODES = 1_000_000           # YAML/JSON nodes after alias expansion
MAX_INT_DIGITS = 40             # 2**63 has 19 digits; nothing moesim reads needs more than 40
MAX_DEVICES = 65_536            # devices in one cluster (DeepSeek-V3's training run used 2,048)
MAX_SWEEP_POINTS = 100_000      # points of one sweep
MAX_NAME_CHARS = 128
MAX_PATH_BYTES, MAX_PATH_PART_BYTES = 4095, 255   # Linux PATH_MAX - 1 and NAME_MAX

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def read_text_bounded(path: str | Path, *, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes.

    Raises
    ------
    ScenarioError
        Missing or unreadable file, not a regular file (a device such as ``/dev/zero``, a FIFO, a
        folder), larger than ``limit``, or not UTF-8. The message names the file.
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ScenarioError("file not found", source=source) from None
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot open file ({_os_reason(exc)})", source=source) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise ScenarioError(f"{kind}: give a regular file", source=source)
        if info.st_size > limit:
            raise ScenarioError(f"file is {info.st_size:,} bytes, more than the {limit:,} allowed",
                                source=source)
        data = os.read(fd, limit + 1) if info.st_size else b""
        chunks = [data]
        while data and sum(map(len, chunks)) <= limit:   # short reads: keep going, to the cap
            data = os.read(fd, limit + 1 - sum(map(len, chunks)))
            chunks.append(data)
        raw = b"".join(chunks)
    except OSError as exc:
        raise ScenarioError(f"cannot read file ({_os_reason(exc)})", source=source) from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise ScenarioError(f"file is more than the {limit:,} bytes allowed", source=source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"not UTF-8 text (byte {exc.start})", source=source) from None


def _os_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting while composing and huge integers while constructing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):  # noqa: ANN001, ANN201
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS} allowed)",
                node.start_mark)
        _refuse_base60(node, super().construct_yaml_int)
        text = str(node.value).replace("_", "").lstrip("+-")
        if len(text) > 1 and text[0] == "0" and text[1].isdigit():
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} has a leading zero, which YAML 1.1 reads as octal; "
                "write the number without it (or 0o... for octal)", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):  # noqa: ANN001, ANN201
        _refuse_base60(node, super().construct_yaml_float)
        return super().construct_yaml_float(node)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        # A key given twice: PyYAML keeps the last silently, so one of the two values the user
        # wrote would be ignored. Merge keys (<<) may be overridden, as YAML allows.
        if isinstance(node, yaml.MappingNode):
            first = {}   # (tag, text) of each key -> its line
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} given twice (first on line "
                        f"{first[key] + 1}); each key once", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _refuse_base60(node: yaml.ScalarNode, construct) -> None:  # noqa: ANN001
    """YAML 1.1 reads ``2:1`` as the base-60 number 121; nobody means that in a scenario."""
    if ":" in str(node.value):
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value!r} reads as the base-60 number {construct(node)} in YAML "
            "1.1; write a plain number, or quote it for text", node.start_mark)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)
# YAML 1.2 floats YAML 1.1 reads as text: an exponent without a dot or sign (1e-6, 2.5e3).
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _check_graph(root: yaml.Node) -> None:
    """Refuse a composed document whose alias expansion exceeds MAX_NODES nodes or MAX_DEPTH
    levels, or that refers to itself; linear in the number of distinct nodes."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[key], depth[key] = 1, 1
            continue
        children = ([c for pair in node.value for c in pair]
                    if isinstance(node, yaml.MappingNode) else list(node.value))
        if expanded:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_NODES:,} values once aliases are expanded "
                    "(an alias bomb?)", node.start_mark)
            if depth[key] > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels once aliases are "
                    "expanded", node.start_mark)
            continue
        if key in size:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(None, None, "an alias refers to itself",
                                              node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise yaml.composer.ComposerError(None, None, "an alias refers to itself",
                                                  child.start_mark)
            if id(child) not in size:
                stack.append((child, False))


def load_yaml_text(text: str, *, source: str | None, field: str | None = None) -> Any:
    """Parse YAML within the limits; every problem is a ScenarioError naming ``source``."""
    loader = None
    try:
        loader = _BoundedLoader(text)   # its reader already refuses unprintable characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"not valid YAML{where}: {problem}", source=source,
                            field=field) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # constructors of odd scalars
        raise ScenarioError(f"not valid YAML: {type(exc).__name__}: {exc}"[:200], source=source,
                            field=field) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_json_text(text: str, *, source: str | None) -> Any:
    """Parse JSON within the depth and size limits; problems are ScenarioErrors naming ``source``."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ScenarioError(f"JSON nested deeper than {MAX_DEPTH} levels", source=source) from None
    except ValueError as exc:   # JSONDecodeError, and int strings over Python's digit limit
        raise ScenarioError(f"not valid JSON: {' '.join(str(exc).split())}"[:200],
                            source=source) from None
    count, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        count += 1
        if level > MAX_DEPTH:
            raise ScenarioError(f"JSON nested deeper than {MAX_DEPTH} levels", source=source)
        if count > MAX_NODES:
            raise ScenarioError(f"JSON holds more than {MAX_NODES:,} values", source=source)
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and \
                value.bit_length() > MAX_INT_DIGITS * 3.33:
            raise ScenarioError(f"an integer of more than {MAX_INT_DIGITS} digits",
                                source=source)
    return data


def check_text(value: str, *, source: str | None, field: str | None) -> str:
    """``value`` unless it holds a NUL, a control character or a lone surrogate."""
    bad = _BAD_CHARS.search(value)
    if bad:
        raise ScenarioError(f"contains the character {bad.group()!r} at position {bad.start()} "
                            "(no NUL, control characters or lone surrogates)", source=source,
                            field=field)
    return value


def check_name(value: str, *, source: str | None, field: str | None) -> str:
    """``value`` if it is a safe file or folder name: letters, digits and ``._-`` only."""
    if not isinstance(value, str):
        raise ScenarioError(f"expected a name (letters, digits, ._-), got {type(value).__name__}",
                            source=source, field=field)
    if not _NAME.match(value) or value in (".", "..") or len(value) > MAX_NAME_CHARS:
        raise ScenarioError(f"{value[:60]!r} is not a valid name: use 1 to {MAX_NAME_CHARS} "
                            "letters, digits, '.', '_' or '-' (no path separators or spaces; "
                            "not '.' or '..'), e.g. my-scenario_2", source=source, field=field)
    return value


def check_path_text(value: str, *, source: str | None, field: str | None) -> str:
    """``value`` if it can be a file path: :func:`check_text`, and short enough for the OS."""
    check_text(value, source=source, field=field)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise ScenarioError(f"a path of {size:,} bytes is longer than the {MAX_PATH_BYTES:,} "
                            "allowed", source=source, field=field)
    for part in value.split("/"):
        part_size = len(part.encode("utf-8", "surrogatepass"))
        if part_size > MAX_PATH_PART_BYTES:
            raise ScenarioError(f"the path component {part[:30]!r}... is {part_size:,} bytes, "
                                f"longer than the {MAX_PATH_PART_BYTES} allowed", source=source,
                                field=field)
    return value
