"""The shapes world's commands: `studio eval` (B1: prompt accuracy and FD, judged) and `studio pretrain` (the
embedded model and its judge from scratch)."""

from __future__ import annotations

import json
from pathlib import Path

from studio.cli.common import add_adapter_args, add_model_args, add_steps_args, load_model, steps_and_guidance
from studio.loading import StudioError


def register(sub) -> None:
    e = sub.add_parser("eval", help="B1: prompt accuracy and FD of a model, judged on the shapes world")
    add_model_args(e)
    e.add_argument("--n", type=int, default=256)
    add_steps_args(e)
    e.add_argument("--batch", type=int, default=16)
    add_adapter_args(e)
    e.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    e.add_argument("--combos", choices=("heldout", "seen"), default="heldout",
                   help="prompts of attribute combinations held out of pretraining (B1) or seen in it (a diagnostic)")
    e.add_argument("--errors", type=int, default=0, metavar="K",
                   help="also list each attribute's K most frequent misreadings (prompted → read)")
    e.add_argument("--no-write", action="store_true", help="print only; do not add a row to BENCHMARKS.md")
    e.set_defaults(func=run_eval)

    p = sub.add_parser("pretrain", help="train the embedded shapes model and its judge from scratch")
    p.add_argument("--out", default="runs/pretrain")
    p.add_argument("--stages", default="vae,judge,unet",
                   help="comma-separated: vae, judge, unet, fast_decoder (one-step generation's AutoencoderTiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", default="{}", help='JSON of PretrainConfig fields, e.g. \'{"unet_steps": 500}\'')
    p.set_defaults(func=run_pretrain)


def run_eval(args) -> None:
    from studio.bench.evaluate import run_b1
    from studio.bench.recorder import record
    from studio.shapes.judge import load_judge

    steps, guidance = steps_and_guidance(args)
    if args.n <= 0 or steps <= 0:
        raise StudioError("--n and --steps must be at least 1")
    pipe = load_model(args)
    judge = load_judge(args.judge)
    r = run_b1(pipe, judge, n=args.n, steps=steps, guidance=guidance, batch=args.batch, combos=args.combos)
    heads = list(r.accuracy)
    header = ["model", "prompts", "steps", "guidance", *heads, "all", "FD", "FD floor", "img/s"]
    model = str(args.model) + (f" + one-step {Path(args.one_step).name}" if args.one_step else "")
    row = [model, str(r.n), str(r.steps), f"{r.guidance:g}", *(f"{100 * r.accuracy[h]:.1f}%" for h in heads),
           f"{100 * r.all_correct:.1f}%", f"{r.fd:.2f}", f"{r.fd_floor:.2f}", f"{r.images_per_second:.2f}"]
    title = "B1 base quality" if args.combos == "heldout" else "B1 on pretraining combinations (a diagnostic)"
    print(record(title, header, [row], write=not args.no_write))
    if args.errors:
        print(_misreadings(args, r, heads, model))


def _misreadings(args, r, heads: list[str], model: str) -> str:
    from studio.bench.recorder import record

    def most_frequent(head: str) -> str:
        pairs = r.misreadings[head].most_common(args.errors)
        return ", ".join(f"{want} → {got} ×{count}" for (want, got), count in pairs) or "none"

    rows = [[h, f"{100 * (1 - r.accuracy[h]):.1f}%", most_frequent(h)] for h in heads]
    return record(f"B1 misreadings ({model}, {r.n} prompts of {args.combos} combinations, {r.steps} steps, "
                  f"guidance {r.guidance:g})",
                  ["attribute", "wrong", f"most frequent (prompted → read by the judge), up to {args.errors}"],
                  rows, write=not args.no_write)


def run_pretrain(args) -> None:
    from studio.shapes.pretrain import PretrainConfig, pretrain

    try:
        overrides = json.loads(args.overrides)
        cfg = PretrainConfig(**{**overrides, "device": args.device, "seed": args.seed})
    except json.JSONDecodeError as e:
        raise StudioError(f"--overrides is not valid JSON ({e})") from None
    except TypeError as e:
        raise StudioError(f"--overrides: {e}") from None
    report = pretrain(cfg, Path(args.out), tuple(args.stages.split(",")))
    print(json.dumps(report, indent=2))
