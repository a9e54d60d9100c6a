"""Shipped and user-written model descriptions: finding one by name, path or inline mapping.

A model is given in one of three ways, wherever a scenario says ``model:``:

- a shipped name, ``mixtral-8x7b``: a YAML file in ``scenarios/models/`` (inside the wheel:
  ``moesim/_data/scenarios/models/``) whose sizes are the model's public configuration;
- a path to a ``.yaml`` file, absolute or relative to the scenario that names it;
- an inline mapping of :class:`~moesim.spec.model.ModelSpec` fields.

A mapping (inline or in a file) may start from another model with ``base: <name or path>`` and
override some of its fields, e.g. ``{base: mixtral-8x7b, num_layers: 4}`` for a small variant of a
real model. Nested mappings merge key by key, so ``{base: m, attention: {num_kv_heads: 1}}`` keeps
the base's other attention fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moesim.errors import ScenarioError
from moesim.spec.fields import build, read_yaml
from moesim.spec.limits import check_path_text
from moesim.spec.model import ModelSpec

__all__ = ["model_dirs", "list_models", "find_model", "load_model", "merge_mappings"]

# How deep ``base:`` chains may go before we call it a cycle.
_MAX_BASE_DEPTH = 8


def model_dirs() -> list[Path]:
    """Where shipped models live: inside the wheel, or under ``scenarios/`` in a source checkout."""
    here = Path(__file__).resolve().parent.parent
    return [here / "_data" / "scenarios" / "models", here.parent / "scenarios" / "models"]


def list_models() -> list[str]:
    """Names of the shipped models, sorted."""
    return sorted({p.stem for d in model_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_model(name_or_path: str, relative_to: Path | None = None) -> Path:
    """Resolve a shipped model name ("mixtral-8x7b") or a path to a ``.yaml`` file.

    A relative path is looked up next to ``relative_to`` (the scenario's folder) first, then in
    the current directory.

    Raises
    ------
    ScenarioError
        The file does not exist, or the name is not a shipped model (the message lists them).
    """
    as_file = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{name_or_path}.yaml"
    check_path_text(as_file, source=None, field=None)   # NUL, surrogates, OS length limits
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        bases = ([relative_to] if relative_to is not None else []) + [Path.cwd()]
        for base in bases:
            path = candidate if candidate.is_absolute() else base / candidate
            if path.is_file():
                return path
        raise ScenarioError(f"model file {name_or_path!r} not found")
    for directory in model_dirs():
        path = directory / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    raise ScenarioError(f"unknown model {name_or_path!r} (shipped: {', '.join(list_models())}; "
                        "or give a path to a .yaml file, or the model's fields as a mapping)")


def load_model(model: str | Mapping[str, Any] | ModelSpec, *, source: str | None = None,
               relative_to: Path | None = None, field_path: str = "model") -> ModelSpec:
    """Load and validate a model given by shipped name, by ``.yaml`` path or as a mapping.

    Parameters
    ----------
    model
        A shipped name, a path, a mapping of ModelSpec fields (optionally with ``base:``), or an
        already built ModelSpec (returned as is).
    source
        The file the mapping came from, for error messages.
    relative_to
        Folder that relative paths (the model's, or a ``base:``) are resolved against.
    field_path
        Where the model sits in ``source`` (``model``), prefixed to field names in errors.

    Raises
    ------
    ScenarioError
        Unknown name, missing file, unknown or badly typed field, or inconsistent sizes.
    """
    return _load(model, source=source, relative_to=relative_to, field_path=field_path, seen=())


def _load(model: Any, *, source: str | None, relative_to: Path | None, field_path: str,
          seen: tuple[Path, ...]) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        try:
            path = find_model(model, relative_to)
        except ScenarioError as exc:
            raise ScenarioError(str(exc), source=source, field=field_path) from None
        return _load_file(path, field_path=field_path, seen=seen)
    if not isinstance(model, Mapping):
        raise ScenarioError(f"expected a model name, a .yaml path or a mapping of model fields, "
                            f"got {type(model).__name__} {model!r:.60}", source=source,
                            field=field_path)
    data = _resolve_base(dict(model), source=source, relative_to=relative_to,
                         field_path=field_path, seen=seen)
    return build(ModelSpec, data, source=source, path=field_path)


def _load_file(path: Path, *, field_path: str, seen: tuple[Path, ...]) -> ModelSpec:
    resolved = path.resolve()
    if resolved in seen or len(seen) >= _MAX_BASE_DEPTH:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ScenarioError(f"'base:' chain loops or is deeper than {_MAX_BASE_DEPTH}: {chain}",
                            source=str(path), field="base")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ScenarioError("a model file must be a YAML mapping of model fields",
                            source=str(path))
    data = {"name": path.stem, **data}  # the file name stands in for a missing name
    return _load(data, source=str(path), relative_to=path.parent, field_path=field_path,
                 seen=(*seen, resolved))


def _resolve_base(data: dict[str, Any], *, source: str | None, relative_to: Path | None,
                  field_path: str, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Replace ``base:`` by the base model's fields, overridden (deeply) by ``data``'s."""
    if "base" not in data:
        return data
    base_ref = data.pop("base")
    if not isinstance(base_ref, str):
        raise ScenarioError(f"expected a model name or .yaml path, got "
                            f"{type(base_ref).__name__} {base_ref!r:.60}", source=source,
                            field=f"{field_path}.base")
    try:
        path = find_model(base_ref, relative_to)
    except ScenarioError as exc:
        raise ScenarioError(str(exc), source=source, field=f"{field_path}.base") from None
    # The base is validated on its own first, so an error in it names the base's file.
    base = _load_file(path, field_path=field_path, seen=seen)
    base_data = _spec_mapping(base)
    if "name" not in data:
        data["name"] = f"{base.name}-variant" if data else base.name
    return merge_mappings(base_data, data)


def _spec_mapping(spec: Any) -> dict[str, Any]:
    """A built spec as the mapping that would build it again (nested dataclasses as mappings)."""
    return {f.name: (_spec_mapping(v) if dataclasses.is_dataclass(v := getattr(spec, f.name))
                     else v)
            for f in dataclasses.fields(spec) if f.init}


def merge_mappings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` applied; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged
