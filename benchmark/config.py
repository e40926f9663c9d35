"""Typed configuration: dataclass sections, ``--set section.key=value`` overrides, validation.

Every section is a frozen dataclass owned by the part of the code that uses it (schedules, model
presets, data augmentation, synthetic dataset, trainer, method hyper-parameters). ``--set`` values are
parsed with the type of the field they override; an unknown section or key is a ConfigError that
lists what exists. The resolved configuration is written into ``run.json``, and a run folder whose
recorded configuration differs from the command is refused (runner).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping

from benchmark.errors import ConfigError


def parse_set_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["step0.iterations=10", "method.kd_weight=5"]`` -> ``{"step0": {"iterations": "10"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {item!r} is not of the form section.key=value",
                              hint="e.g. --set increment.iterations=50 --set method.kd_weight=10")
        out.setdefault(section, {})[name] = value.strip()
    return out


def _convert(raw: str, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        kind = args[0]
        origin = typing.get_origin(kind)
    try:
        if kind is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            # "2e4" and "20_000" are natural ways to write iteration counts.
            value = float(raw) if any(c in raw.lower() for c in ".e") else int(raw)
            if value != int(value):
                raise ValueError(raw)
            return int(value)
        if kind is float:
            return float(raw)
        if origin in (tuple, list):
            (inner, *_) = typing.get_args(kind) or (str,)
            parts = [p for p in raw.strip("()[]").split(",") if p.strip()]
            return tuple(_convert(p.strip(), inner, where) for p in parts)
        if kind is str or kind is Any:
            return raw
    except ValueError:
        raise ConfigError(f"{where}: cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"{where}: values of type {kind} cannot be set from the command line")


def apply_overrides(obj: Any, overrides: Mapping[str, str], section: str) -> Any:
    """A copy of dataclass ``obj`` with ``overrides`` (raw strings) converted to the fields' types."""
    if not overrides:
        return obj
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, raw in overrides.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else \
                f"keys of {section!r}: {', '.join(names)}"
            raise ConfigError(f"unknown --set key {section}.{key}", hint=hint)
        changes[key] = _convert(raw, hints[key], f"--set {section}.{key}")
    return dataclasses.replace(obj, **changes)


def check_sections(overrides: Mapping[str, Any], known: list[str]) -> None:
    for section in overrides:
        if section not in known:
            close = difflib.get_close_matches(section, known, n=2, cutoff=0.5)
            hint = f"did you mean {close[0]}.<key>?" if close else f"sections: {', '.join(known)}"
            raise ConfigError(f"unknown --set section {section!r}", hint=hint)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and paths as plain JSON values (for run.json and config comparison)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
