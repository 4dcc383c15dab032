"""Dataclass settings built from YAML or `KEY=VALUE` values.

PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float: the form every diffusion
trainer's docs use for learning rates. Numbers written that way are converted here by the field's type,
and a value of the wrong type is named in a one-line error instead of failing deep inside training."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")

_NUMBER_TYPES = {"float": float, "int": int, "float | None": float, "int | None": int,
                 "Optional[float]": float, "Optional[int]": int}


def from_values(cls: type[T], values: dict[str, Any], error: type[Exception], what: str | None = None) -> T:
    """`cls(**values)` for a dataclass, with unknown names refused and numbers given as text converted."""
    what = what or cls.__name__
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        listed = f"; known: {', '.join(sorted(known))}" if len(known) <= 24 else ""
        raise error(f"unknown {what} setting(s): {', '.join(unknown)}{listed}")
    converted = dict(values)
    for name, value in values.items():
        annotation = known[name].type  # text under `from __future__ import annotations`, else the class
        kind = _NUMBER_TYPES.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
        if kind is None or value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise error(f"{what} setting {name} takes a number, got {value!r}") from None
            value = number
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise error(f"{what} setting {name} takes a whole number, got {value!r}")
            value = int(value)
        converted[name] = kind(value) if isinstance(value, (int, float)) else value
    try:
        return cls(**converted)
    except TypeError as exc:
        raise error(f"{what} settings: {exc}") from None
