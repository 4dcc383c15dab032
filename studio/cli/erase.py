"""`studio erase`: train a membrane that erases concepts, data-free. Its flags are the erase task's settings
(studio.tasks.erase.SETTINGS); the membrane's own settings go through --setting KEY=VALUE."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.common import add_model_args, check_safetensors_out, load_options, log_events, parse_settings, summary
from studio.cli.flags import add_engine_settings, add_settings, engine_values, values_from


def _membrane_settings() -> str:
    """The settings --setting takes: the fields of the erase-kind methods' configs."""
    from studio.adapters import get_method, method_names
    from studio.utils.settings import describe

    names = {spec.name for name in method_names("erase") for spec in describe(get_method(name).config_class)}
    return ", ".join(sorted(names - {"prompts", "concepts"}))  # those two: the command's own arguments


def register(sub) -> None:
    from studio.tasks.erase import SETTINGS

    er = sub.add_parser("erase", help="train a membrane that erases concepts, data-free")
    er.add_argument("concepts", nargs="+", help="what to erase, e.g. circle (they also set per-prompt strength)")
    er.add_argument("--out", default=None, help="the membrane .safetensors (default: <concepts>.safetensors)")
    er.add_argument("--prompt", action="append", help="a prompt to erase from (repeatable; default: on the "
                                                      "embedded model, captions naming the concept; else the concepts)")
    er.add_argument("--preset", default="shapes", help="shapes (embedded model) or sd15 (the paper's SD 1.x settings)")
    add_settings(er, SETTINGS)
    add_engine_settings(er)
    er.add_argument("--setting", action="append", metavar="KEY=VALUE",
                    help=f"membrane setting: {_membrane_settings()} (repeatable)")
    er.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: continue a stopped run")
    add_model_args(er)
    er.set_defaults(func=run)


def run(args) -> None:
    from studio.tasks.erase import SETTINGS, erase

    adapter = parse_settings(args.setting, "--setting")
    if args.prompt:
        adapter["prompts"] = list(args.prompt)
    out = check_safetensors_out(args.out or f"{'_'.join(args.concepts)}.safetensors".replace(" ", "-"),
                                "a membrane")
    settings = {**values_from(args, SETTINGS), **engine_values(args)}
    result = erase(args.concepts, out, model=args.model, preset=args.preset, settings=settings,
                   adapter=adapter, resume=args.resume, on_event=log_events, progress_bar=sys.stderr.isatty(),
                   load=load_options(args))
    print(result.adapter_path)
    print(summary(result, f", {Path(out).stat().st_size / 1024:.0f} KB"), file=sys.stderr)

