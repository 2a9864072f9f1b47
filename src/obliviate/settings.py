"""Settings dataclasses built from plain values (YAML, CLI strings, ``--set`` pairs), with a
clear error naming the setting; used by the run configuration and by every method's and
attack's ``Config`` (so it sits below them all and imports nothing of the package but errors)."""
from __future__ import annotations

import types
import typing
from dataclasses import field, fields, is_dataclass
from typing import Any

from obliviate.errors import ObliviateError


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert YAML/CLI values to the field's declared type, with a clear error."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        if type(None) in args or annotation is Any:
            return None
        raise ObliviateError(f"{where} may not be empty.")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise ObliviateError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}.")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(coerce(v, args[0], where) for v in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ObliviateError(f"{where} must be true or false, got {value!r}.")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ObliviateError(f"{where} must be {annotation.__name__}, got {value!r}.") from err
    return value


def build_section(cls: type, values: dict, where: str):
    """Instantiate a config dataclass from a dict; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ObliviateError(f"{where} must be a mapping of settings, got {type(values).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ObliviateError(f"Unknown setting(s) {', '.join(sorted(unknown))} in {where}. Known: {', '.join(sorted(known))}.")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = value if is_dataclass(hints[name]) else coerce(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def setting(default: Any, help: str) -> Any:
    """A dataclass field with the one-line help `--help` shows (the code's comments say why)."""
    return field(default=default, metadata={"help": help})
