"""Plain data (YAML, dotted overrides) to the typed settings dataclasses and back, checking every field."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from config.checks import SettingsError


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError("config", f"file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SettingsError("config", f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError("config", f"{path}: top level must be a mapping")
    return loaded


def deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SettingsError(".".join(keys), "cannot override inside a non-mapping value")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """A ``--set dotted.key=value`` argument -> (key, value), the value read as YAML (``[a, b]`` is a list)."""
    if "=" not in text:
        raise ValueError(f"--set expects dotted.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw else ""


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every field; errors name the dotted key."""
    if not isinstance(data, Mapping):
        raise SettingsError(path or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(_join(path, unknown[0]), f"unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], data[name], _join(path, name)) for name in names if name in data}
    try:
        return cls(**kwargs)
    except SettingsError as exc:
        if path and not exc.key.startswith(path):
            raise SettingsError(_join(path, exc.key.split(".", 1)[-1]), str(exc).split(": ", 2)[-1]) from None
        raise


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise SettingsError(key, f"{value!r} is not allowed (allowed: {allowed})")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise SettingsError(key, f"{value!r}: expected a list")
        item_t = args[0]
        return tuple(_coerce(item_t, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SettingsError(key, f"{value!r}: expected a mapping")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(key, f"{value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SettingsError(key, f"{value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise SettingsError(key, f"{value!r}: expected a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise SettingsError(key, f"{value!r}: expected a string")
    if tp is Any:
        return value
    raise SettingsError(key, f"unsupported settings type {tp!r}")
