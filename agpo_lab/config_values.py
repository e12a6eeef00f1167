"""Turning YAML values into typed config sections: the checks behind `agpo_lab.config`'s one-line
errors (unknown keys, wrong types, values outside a Literal's choices)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin


def build_section(cls: type, name: str, values: dict[str, Any]) -> Any:
    """Instantiate a section dataclass, checking key names and value types."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in section '{name}'; valid: {', '.join(valid)}")
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"section '{name}': {err}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise a one-line ValueError."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list like [a, b]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key}={value!r}: expected {len(args)} values")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        item_type = args[0] if args else Any
        return origin(_coerce(v, item_type, key) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected true or false")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r}: expected a number")
        if tp is int and float(value) != int(value):
            raise ValueError(f"{key}={value!r}: expected an integer")
        return tp(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{key}={value!r}: expected a string")
        return str(value)
    return value


def plain(value: Any) -> Any:
    """Tuples to lists, recursively (YAML-safe)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
