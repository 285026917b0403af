"""Recipes: YAML into the typed `config.RunConfig`, with ``--section.field value`` overrides, unknown keys and
wrong types refused with the fix named (`ConfigError`) before any process group starts."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from prelora_ds.config.sections import RunConfig, _require
from prelora_ds.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` as a string; here it is a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))
_SECTION_TYPES = typing.get_type_hints(RunConfig)


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else f" Known: {', '.join(sorted(choices))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}={value!r} has the wrong type; expected {tp}.")
    if origin is list:
        _require(isinstance(value, list), f"{where}={value!r} must be a list, e.g. [0.08, 1.0].")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), f"{where}={value!r} must be a mapping, e.g. {{depth: 6}}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool:
        _require(isinstance(value, bool), f"{where}={value!r} must be true or false.")
        return value
    if tp is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{where}={value!r} must be an integer (got {type(value).__name__}).",
        )
        return value
    _require(
        isinstance(value, tp),
        f"{where}={value!r} must be a {_type_name(tp)} (got {type(value).__name__}).",
    )
    return value


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    known = list(hints)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown recipe key {name}.{key}.{_closest(key, known)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Typed, validated RunConfig from a nested mapping (a loaded recipe with overrides applied)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}.")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown recipe section {section!r}.{_closest(section, list(SECTIONS))}")
    sections = {}
    for section in SECTIONS:
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"recipe section {section!r} must be a mapping of fields, got {values!r}.")
        sections[section] = _build_section(section, values)
    return RunConfig(**sections)


def parse_override_value(text: str) -> Any:
    """YAML scalar semantics: `true`, `12`, `1e-3`, `null`, `[0.5, 1.0]`, `{depth: 6}`."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides (`train.max_steps` -> value) to a nested recipe mapping (copied)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}.")
    for k, v in raw.items():
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"recipe section {k!r} must be a mapping of fields, got {v!r}.")
    merged = {k: dict(v or {}) for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override --{dotted} must name a field as --section.field (e.g. --train.max_steps 12).")
        if section not in SECTIONS:
            raise ConfigError(f"unknown override section --{dotted}.{_closest(section, list(SECTIONS))}")
        if "." in key:  # nested mapping field, e.g. model.kwargs.depth
            field_name, _, sub = key.partition(".")
            current = merged.setdefault(section, {}).get(field_name) or {}
            if not isinstance(current, dict):
                raise ConfigError(f"--{dotted}: {section}.{field_name}={current!r} is not a mapping; set it whole.")
            merged[section][field_name] = {**current, sub: value}
        else:
            merged.setdefault(section, {})[key] = value
    return merged


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"recipe {path} does not exist; pass --recipe with a YAML file such as recipes/demo.yaml."
            )
        try:
            raw = yaml_load(path.read_text())
            raw = {} if raw is None else raw
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    return build_config(apply_overrides(raw, overrides or {}))
