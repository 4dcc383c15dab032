"""`studio distill`: train a one-step adaptor against the multi-step teacher. Its flags are the distill task's
settings (studio.tasks.distill.SETTINGS), also given as --setting KEY=VALUE."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.common import add_model_args, check_safetensors_out, load_options, log_events, parse_settings, summary
from studio.cli.flags import add_engine_settings, add_settings, engine_values, values_from


def register(sub) -> None:
    from studio.tasks.distill import SETTINGS

    d = sub.add_parser("distill", help="train a one-step adaptor against the multi-step teacher")
    d.add_argument("--out", default="one_step.safetensors", help="the adaptor .safetensors")
    d.add_argument("--prompts", default=None, help="a UTF-8 file, one prompt per line (default on the embedded "
                                                   "model: captions of its world)")
    d.add_argument("--cache", default=None, help="teacher pairs file (default: <out>.teacher.safetensors; reused "
                                                 "when it fits)")
    add_settings(d, SETTINGS)
    add_engine_settings(d)
    d.add_argument("--rank", type=int, default=4, help="adaptor rank (default 4)")
    d.add_argument("--no-high-frequency", action="store_true", help="spatial loss only (the ablation)")
    d.add_argument("--setting", action="append", metavar="KEY=VALUE", help="any of the settings above by its "
                                                                           "field name, e.g. radius=0.2 (repeatable)")
    d.add_argument("--resume", default=None, help="'latest' or a checkpoint folder: continue a stopped run")
    add_model_args(d)
    d.set_defaults(func=run)


def run(args) -> None:
    from studio.tasks.distill import SETTINGS, distill

    settings = {**values_from(args, SETTINGS), **engine_values(args), **parse_settings(args.setting, "--setting")}
    if args.no_high_frequency:
        settings.update(fourier_weight=0.0, edge_weight=0.0)
    out = check_safetensors_out(args.out, "a one-step adaptor")
    result = distill(out, model=args.model, settings=settings, rank=args.rank, prompts_file=args.prompts,
                     cache=args.cache, resume=args.resume, on_event=log_events, progress_bar=sys.stderr.isatty(),
                     load=load_options(args))
    print(result.adapter_path)
    print(summary(result, f", {Path(out).stat().st_size / 1024:.0f} KB; generate with "
                          f"`studio generate --one-step {out} PROMPT`"), file=sys.stderr)
