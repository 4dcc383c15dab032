"""`studio train` (a concept adapter on a folder of images) and `studio control-train` (a control adapter on
condition/image pairs): one flag per TrainConfig field, so the YAML config and the command line hold the same
settings."""

from __future__ import annotations

import argparse
import sys

from studio.cli.common import check_output_folder, log_events, parse_settings, summary
from studio.cli.flags import add_settings, finite_float, values_from
from studio.loading import StudioError


def register(sub) -> None:
    t = sub.add_parser("train", help="teach a concept: train an adapter on a folder of images")
    add_train_args(t)
    t.set_defaults(func=run)
    _register_control(sub)


def _register_control(sub) -> None:
    from studio.adapters import method_names

    from studio.tasks.control import DEFAULT_METHOD, DEFAULT_RECIPE

    ct = sub.add_parser("control-train", help=f"train a control adapter ({', '.join(method_names('control'))}) on "
                                              "rendered condition/image pairs, or on --data with --control-data")
    add_train_args(ct, defaults={"method": DEFAULT_METHOD, **DEFAULT_RECIPE})
    ct.add_argument("--condition", default="mask", help="mask, edges, box (exact, from the shapes world), canny, "
                    "lineart; several comma-separated: the training pairs alternate between them")
    ct.add_argument("--examples", type=int, default=512, help="rendered training pairs (without --data)")
    ct.add_argument("--two-shapes", type=finite_float, default=0.0,
                    help="the fraction of rendered pairs that are two-shape scenes, their shapes' conditions two "
                         "inputs summed (multi-condition control; best started from a trained adapter)")
    ct.add_argument("--overlay-scenes", action="store_true",
                    help="a scene's two conditions overlaid in one image instead (a first training stage)")
    ct.set_defaults(func=run_control)


def add_train_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per TrainConfig field (--adapter: the method's settings as KEY=VALUE), a YAML file and a preset;
    `defaults`: what the help names as a default where the command's differs from TrainConfig's."""
    from studio.training import TrainConfig

    add_settings(p, TrainConfig, exclude=("adapter",), defaults=defaults)
    p.add_argument("--adapter", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="a setting of the method, e.g. rank=8 (repeatable)")
    p.add_argument("--config", dest="config_file", default=None, help="YAML file with any of these settings")
    p.add_argument("--preset", default=None, help="quick or standard: defaults tuned for a first result")
    p.add_argument("--rank", type=int, default=argparse.SUPPRESS, help="shortcut for --adapter rank=N")


def _explicit(args) -> dict:
    """The TrainConfig values given as flags, the method's settings (--adapter, --rank) as a dict."""
    from studio.training import TrainConfig

    explicit = values_from(args, TrainConfig)
    adapter = parse_settings(explicit.pop("adapter", []))
    if hasattr(args, "rank"):
        adapter["rank"] = args.rank
    explicit["adapter"] = adapter
    return explicit


def _yaml(args) -> dict:
    from studio.training import TrainConfig

    path = getattr(args, "config_file", None)
    return TrainConfig.read_yaml(path) if path else {}


def train_config_from_args(args, defaults: dict | None = None):
    """The config of `studio train`-style flags: `defaults` (a command's own), then the YAML file, the preset and
    the explicit flags over them."""
    from studio.training import config_with_preset

    explicit = _explicit(args)
    values = {**(defaults or {}), **_yaml(args)}
    adapter = {**values.get("adapter", {}), **explicit.pop("adapter")}
    return config_with_preset(args.preset, **{**values, **explicit, "adapter": adapter})


def control_train_config(args, render: bool = True):
    """The TrainConfig of `studio control-train` (rendering its shapes-world data when no --data is given).
    With render=False the data is not rendered yet, only its folders named: a check of the settings before a
    queued job renders it."""
    from studio.tasks.control import control_config

    two_shapes, examples = getattr(args, "two_shapes", 0.0), getattr(args, "examples", 512)
    if not 0.0 <= two_shapes <= 1.0:
        raise StudioError(f"--two-shapes is a fraction between 0 and 1 (got {two_shapes})")
    if examples < 1:
        raise StudioError(f"--examples must be at least 1 (got {examples})")
    defaults, explicit = _yaml(args), _explicit(args)
    for key in ("method", "data", "control_data", "name", "output_dir"):
        if key not in explicit and key in defaults:
            explicit[key] = defaults[key]
    picked = {key: explicit.pop(key, None) for key in ("method", "data", "control_data")}
    return control_config(condition=getattr(args, "condition", "mask"), examples=examples, two_shapes=two_shapes,
                          overlay_scenes=getattr(args, "overlay_scenes", False), preset=getattr(args, "preset", None),
                          render=render, defaults=defaults, **picked, **explicit)


def _train_and_report(config, hint=lambda result: "") -> None:
    from studio.adapters import get_method
    from studio.training import Trainer

    check_output_folder(config.output_dir, "--output-dir")
    result = Trainer(config, log_events).run()
    print(result.adapter_path)
    for path in get_method(config.method).export_extra(result.adapter_path):
        print(path)
    print(summary(result, hint(result)), file=sys.stderr)


def run(args) -> None:
    _train_and_report(train_config_from_args(args))


def run_control(args) -> None:
    if hasattr(args, "output_dir"):  # before the data is rendered into it
        check_output_folder(args.output_dir, "--output-dir")
    config = control_train_config(args)
    _train_and_report(config, lambda result: f"; generate with `studio generate --control {result.adapter_path} "
                                             "--control-image CONDITION.png PROMPT`")
