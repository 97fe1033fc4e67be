"""How fedgov's config is checked key by key: each dataclass field carries its rule (type,
choices, range, meaning), and a nested table of raw TOML values is built into the dataclasses
with one-line errors that name the key; plus the flat dotted form Flower's ``run_config`` uses.

The sections themselves are in ``fedgov.config``; the rules between keys in
``fedgov.config_checks``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any

__all__ = ["ConfigError", "build_dataclass", "flatten", "spec", "unflatten"]


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key (and file)."""


def spec(default: Any, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, doc: str = "") -> Any:
    """A dataclass field carrying its validation rule."""
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open, "doc": doc}
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    # bool is an int subclass in Python; keep them apart so `rounds = true` is an error.
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        op = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"{where}: {key}: {value!r} is out of range (must be {op} {low})")
    if high is not None and value > high:
        raise ConfigError(f"{where}: {key}: {value!r} is out of range (must be <= {high})")


def build_dataclass(cls: type, raw: typing.Mapping[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{where}: {prefix}{key}: unknown key")
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub = raw.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{where}: {key}: expected a table, got {type(sub).__name__}")
            kwargs[name] = build_dataclass(tp, sub, f"{key}.", where)
        elif name in raw:
            value = _coerce(key, raw[name], tp, where)
            _check_range(key, value, f.metadata, where)
            kwargs[name] = value
    return cls(**kwargs)


def flatten(d: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is a value, not a table")
        node[leaf] = value
    return out
