"""Dataclass settings built from YAML or `KEY=VALUE` values.

PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float: the form every diffusion
trainer's docs use for learning rates. Numbers written that way are converted here by the field's type,
and a value of the wrong type is named in a one-line error instead of failing deep inside training."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
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


# ---- settings described for generated front ends (CLI flags, UI forms) ----

def setting(default: Any = MISSING, *, help: str, choices: tuple | None = None, default_factory: Any = MISSING,
            advanced: bool = False) -> Any:
    """A dataclass field with what a front end shows: `help` (one line), `choices` (the values allowed) and
    `advanced` (kept out of a form's first view). Use as `lr: float = setting(1e-3, help="learning rate")`."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "advanced": advanced}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SettingSpec:
    """One setting as a front end needs it: its name, its type as written, its default, help and choices."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple | None = None
    advanced: bool = False

    @property
    def kind(self) -> str:
        """bool | int | float | str | list (of str) -- what widget or flag the setting takes."""
        text = self.type.replace("Optional[", "").replace(" | None", "").rstrip("]")
        if text.startswith(("list", "List", "tuple")):
            return "list"
        return text if text in ("bool", "int", "float") else "str"

    @property
    def optional(self) -> bool:
        return "None" in self.type or "Optional" in self.type


def describe(cls: type) -> list[SettingSpec]:
    """Every field of the settings dataclass `cls`, in order, with its help (empty where none was written)."""
    out = []
    for f in fields(cls):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(SettingSpec(f.name, annotation, default, f.metadata.get("help", ""),
                               f.metadata.get("choices"), f.metadata.get("advanced", False)))
    return out
