"""Command-line flags generated from settings dataclasses, bound back by name.

    add_settings(parser, EraseSettings)            # --steps, --lr, --denoise-steps, ... with each field's help
    EraseSettings(**values_from(args, EraseSettings))  # only the flags the user gave

A flag that is not given leaves no attribute on the namespace, so a preset or a YAML file under the flags
keeps its values. Float flags take finite numbers only: `nan` and `inf` are refused when the line is read."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Iterable

from studio.utils.settings import SettingSpec, describe


def finite_float(text: str) -> float:
    """argparse type of a float flag: a number, not nan or ±inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_TYPES = {"int": int, "float": finite_float, "str": str}


def _element_type(cls: type, spec: SettingSpec):
    """The type of one item of a list setting (list[int] -> int); str unless the annotation says otherwise."""
    hint = next(f.type for f in dataclasses.fields(cls) if f.name == spec.name)
    inner = (hint if isinstance(hint, str) else str(hint)).partition("[")[2]
    return next((t for name, t in _TYPES.items() if inner.startswith(name)), str)


def flag_name(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def _help(spec: SettingSpec) -> str | None:
    if not spec.help:
        return None
    shown = spec.default not in (None, "", [], ()) and spec.kind != "bool"
    return f"{spec.help} (default: {spec.default})" if shown else spec.help


def add_settings(parser: argparse.ArgumentParser, cls: type, *, only: Iterable[str] | None = None,
                 exclude: Iterable[str] = (), prefix: str = "", defaults: dict | None = None) -> list[str]:
    """One flag per field of the settings dataclass `cls` (those in `only`, none in `exclude`):
    `--<prefix><field-name>` with the field's help, type and choices (`defaults`: what the help says a field's
    default is where the command's differs from the dataclass's). bool fields get --x/--no-x, list fields
    a repeatable flag; dict fields none. Returns the field names given flags."""
    only = set(only) if only is not None else None
    names = []
    for spec in describe(cls):
        if defaults and spec.name in defaults:
            spec = dataclasses.replace(spec, default=defaults[spec.name])
        if (only is not None and spec.name not in only) or spec.name in set(exclude):
            continue
        if spec.type.startswith(("dict", "Dict", "typing.Dict")):  # no flag form: KEY=VALUE flags carry these
            continue
        kwargs = {"dest": prefix + spec.name, "default": argparse.SUPPRESS, "help": _help(spec)}
        if spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "list":
            kwargs.update(action="append", type=_element_type(cls, spec))
            kwargs["help"] = f"{kwargs['help']} (repeatable)" if kwargs["help"] else "repeatable"
        else:
            kwargs["type"] = _TYPES[spec.kind]
        if spec.choices and spec.kind != "bool":
            kwargs["choices"] = spec.choices
        parser.add_argument(flag_name(spec.name, prefix), **kwargs)
        names.append(spec.name)
    return names


def values_from(args: argparse.Namespace, cls: type, prefix: str = "") -> dict:
    """{field: value} of the `cls` flags (added by add_settings) that were given on the command line."""
    return {spec.name: getattr(args, prefix + spec.name) for spec in describe(cls) if hasattr(args, prefix + spec.name)}


def add_engine_settings(parser: argparse.ArgumentParser) -> None:
    """The training engine's settings a task command offers (checkpoints, precision, clipping, ...)."""
    from studio.tasks.runs import MACHINERY_FLAGS, TASK_DEFAULTS
    from studio.training import LoopSettings

    add_settings(parser, LoopSettings, only=MACHINERY_FLAGS, defaults=TASK_DEFAULTS)


def engine_values(args: argparse.Namespace) -> dict:
    """The engine settings given on the command line (see add_engine_settings)."""
    from studio.tasks.runs import MACHINERY_FLAGS
    from studio.training import LoopSettings

    return {k: v for k, v in values_from(args, LoopSettings).items() if k in MACHINERY_FLAGS}
