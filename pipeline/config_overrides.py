"""`--set section.field=value` overrides of a `RunConfig`, and the config as plain JSON and back.

Values are parsed by the field's declared type: int, float, bool (true/false/1/0/yes/no/on/off),
str, tuple[float, float] ("0.9,0.95"), list[str] (a JSON list, or items separated by "|"). Every
changed section is rebuilt with `dataclasses.replace`, so its `__post_init__` checks the new value;
errors name the override, the field and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from pipeline.config import ConfigError, RunConfig

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(text: str, kind: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("not a boolean")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if origin is tuple:
            items = json.loads(text) if text.startswith("[") else text.split(",")
            return tuple(_parse(str(item).strip(), args[0], where) for item in items)
        if origin is list:
            items = json.loads(text) if text.startswith("[") else [t for t in text.split("|") if t]
            return [_parse(str(item), args[0], where) for item in items]
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--set {where}: cannot read {text!r} as {getattr(kind, '__name__', kind)} ({err})") from None
    raise ConfigError(f"--set {where}: fields of type {kind} cannot be set from the command line")


def _set(obj: Any, path: list[str], text: str, full: str) -> Any:
    """A copy of dataclass `obj` with the field at `path` set from `text` (nested sections rebuilt)."""
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    name = path[0]
    if name not in names:
        raise ConfigError(
            f"--set {full}: {type(obj).__name__} has no field {name!r}; its fields are {', '.join(names)}"
        )
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {full}: {type(obj).__name__}.{name} is not a section with fields")
        value = _set(current, path[1:], text, full)
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {full}: {name} is a section; set one of its fields ({name}.FIELD=VALUE)")
        value = _parse(text, _field_types(type(obj))[name], full)
    try:
        return dataclasses.replace(obj, **{name: value})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--set {full}: {err}") from None


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """`config` with every "a.b.c=value" of `overrides` applied in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD.PATH=VALUE, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise ConfigError(f"--set {item!r}: the field path before '=' is empty")
        config = _set(config, path, text.strip(), item)
    return config


def config_to_dict(config: Any) -> dict:
    """A dataclass config as a JSON-compatible dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _build(cls, data: dict, where: str):
    hints = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        value = data[f.name]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            value = _build(kind, value, f"{where}.{f.name}")
        elif typing.get_origin(kind) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)} (written by another pomvid version?)")
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    """Inverse of `config_to_dict` (fields left out keep their defaults)."""
    return _build(RunConfig, data, "config")
