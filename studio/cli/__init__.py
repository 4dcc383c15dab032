"""The `studio` command, one module a command family (each with its `register(subparsers)` beside its
handlers). Bad input ends with a one-line message on stderr, `studio: error: ...`, and exit code 2."""

from __future__ import annotations

import sys

from studio.cli import bench, distill, erase, export, generate, info, shapes, train, ui
from studio.cli.common import Parser, control_args, parse_adapter_args, parse_adapter_list, parse_settings
from studio.cli.train import control_train_config, train_config_from_args
from studio.loading import StudioError

__all__ = ["main", "build_parser", "control_args", "control_train_config", "parse_adapter_args",
           "parse_adapter_list", "parse_settings", "train_config_from_args"]

FAMILIES = (generate, shapes, bench, train, erase, distill, export, info, ui)


def build_parser() -> Parser:
    ap = Parser(prog="studio", description="Diffusion-model customization studio")
    sub = ap.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    return ap


def _quiet_libraries() -> None:
    """Library warnings and loading bars would bury the one line a user needs to read."""
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):  # already imported (building a parser can): the variable came late
        if name in sys.modules and os.environ[name.upper() + "_VERBOSITY"] == "error":
            sys.modules[name].utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag refused (2), its message already printed
        return e.code if isinstance(e.code, int) else 2
    _quiet_libraries()
    from studio.adapters import AdapterError

    try:
        args.func(args)
    except (StudioError, AdapterError) as e:
        print(f"studio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    return 0
