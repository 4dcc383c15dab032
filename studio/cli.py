"""The `studio` command. Bad input ends with a one-line message on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from studio.loading import SCHEDULERS, StudioError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes",
                   help="'shapes' (embedded), a diffusers folder, a hub id, or a .safetensors checkpoint")
    p.add_argument("--config", default=None, help="for a single-file checkpoint: a diffusers folder or hub id "
                                                  "whose configs describe it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS))
    p.add_argument("--offline", action="store_true", help="never reach the network")


def _load(args):
    from studio.loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
                         config=args.config, offline=args.offline or None, progress=sys.stderr.isatty())


def cmd_generate(args) -> None:
    from studio.generate import GenerationSettings, generate, output_paths, save_images

    settings = GenerationSettings(args.prompt, args.negative_prompt, args.steps, args.guidance, args.seed,
                                  args.batch, args.height, args.width)
    settings.validate()
    paths = output_paths(args.out, args.batch)  # refuse an unwritable path before the model loads
    pipe = _load(args)
    images = generate(pipe, settings)
    save_images(images, paths, settings, str(args.model))
    for p in paths:
        print(p)


def cmd_eval(args) -> None:
    from studio.benchmarks import record
    from studio.evaluate import run_b1
    from studio.judge import load_judge

    if args.n <= 0 or args.steps <= 0:
        raise StudioError("--n and --steps must be at least 1")
    pipe = _load(args)
    judge = load_judge(args.judge)
    r = run_b1(pipe, judge, n=args.n, steps=args.steps, guidance=args.guidance, batch=args.batch)
    heads = list(r.accuracy)
    header = ["model", "prompts", "steps", "guidance", *heads, "all", "FD", "FD floor", "img/s"]
    row = [str(args.model), str(r.n), str(r.steps), f"{r.guidance:g}", *(f"{100 * r.accuracy[h]:.1f}%" for h in heads),
           f"{100 * r.all_correct:.1f}%", f"{r.fd:.2f}", f"{r.fd_floor:.2f}", f"{r.images_per_second:.2f}"]
    print(record("B1 base quality", header, [row], write=not args.no_write))


def cmd_pretrain(args) -> None:
    import json

    from studio.pretrain import PretrainConfig, pretrain

    try:
        overrides = json.loads(args.overrides)
        cfg = PretrainConfig(**{**overrides, "device": args.device, "seed": args.seed})
    except json.JSONDecodeError as e:
        raise StudioError(f"--overrides is not valid JSON ({e})") from None
    except TypeError as e:
        raise StudioError(f"--overrides: {e}") from None
    report = pretrain(cfg, Path(args.out), tuple(args.stages.split(",")))
    print(json.dumps(report, indent=2))


def cmd_info(args) -> None:
    import platform

    import diffusers
    import torch
    import transformers

    from studio import __version__, embedded

    print(f"studio {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} CPU threads)")
    print("attention backend: " + ("xformers" if _has_xformers() and cuda else "torch SDPA"))
    print(f"embedded model: {embedded.SHAPES_DIR} ({'present' if embedded.is_shipped() else 'MISSING'})")


def _has_xformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


def cmd_bench(args) -> None:
    from studio.bench import bench_generation

    print(bench_generation(model=args.model, batch=args.batch, steps=args.steps, guidance=args.guidance,
                           repeats=args.repeats, write=not args.no_write))


def cmd_bench_judge(args) -> None:
    from studio.bench import bench_judge

    print(bench_judge(n=args.n, write=not args.no_write))


def cmd_ui(args) -> None:
    from studio.ui.app import launch  # lazily: the UI sits above the core

    launch(host=args.host, port=args.port, auth=args.auth, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="studio", description="Diffusion-model customization studio")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    g.add_argument("--out", default="image.png", help="output .png (several images: name-0.png, name-1.png, ...)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="B1: prompt accuracy and FD of a model, judged on the shapes world")
    _add_model_args(e)
    e.add_argument("--n", type=int, default=256)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    e.add_argument("--no-write", action="store_true", help="print only; do not add a row to BENCHMARKS.md")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("pretrain", help="train the embedded shapes model and its judge from scratch")
    p.add_argument("--out", default="runs/pretrain")
    p.add_argument("--stages", default="vae,judge,unet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", default="{}", help='JSON of PretrainConfig fields, e.g. \'{"unet_steps": 500}\'')
    p.set_defaults(func=cmd_pretrain)

    b = sub.add_parser("bench", help="speed benchmarks (written to BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bg = bsub.add_parser("generate", help="pipeline load time and images per second")
    bg.add_argument("--model", default="shapes")
    bg.add_argument("--batch", type=int, default=8)
    bg.add_argument("--steps", type=int, default=25)
    bg.add_argument("--guidance", type=float, default=5.0)
    bg.add_argument("--repeats", type=int, default=3)
    bg.add_argument("--no-write", action="store_true")
    bg.set_defaults(func=cmd_bench)

    bj = bsub.add_parser("judge", help="judge accuracy on fresh renders and after the VAE")
    bj.add_argument("--n", type=int, default=1000)
    bj.add_argument("--no-write", action="store_true")
    bj.set_defaults(func=cmd_bench_judge)

    i = sub.add_parser("info", help="versions, device, attention backend")
    i.set_defaults(func=cmd_info)

    u = sub.add_parser("ui", help="the web UI")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--auth", default=None, help="user:pass")
    u.add_argument("--model", default="shapes")
    u.set_defaults(func=cmd_ui)
    return ap


def _quiet_libraries() -> None:
    """Library warnings and loading bars would bury the one line a user needs to read."""
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except StudioError as e:
        print(f"studio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
