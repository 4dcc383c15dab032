"""What several command families share: the parser that reports on one line, the model flags and their
loading, FILE[:WEIGHT] and KEY=VALUE lists, and the checks of output paths."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from studio.cli.flags import finite_float
from studio.loading import SCHEDULERS, StudioError


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, `studio: error: ...`, and exit code 2 (the usage is a
    `--help` away)."""

    def error(self, message: str):
        sys.stderr.write(f"studio: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes",
                   help="'shapes' (embedded), a diffusers folder, a hub id, or a .safetensors checkpoint")
    p.add_argument("--config", default=None, help="for a single-file checkpoint: a diffusers folder or hub id "
                                                  "whose configs describe it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS))
    p.add_argument("--offline", action="store_true", help="never reach the network")


def load_options(args) -> dict:
    """The load_pipeline options of the model flags (besides the model itself)."""
    return {"device": args.device, "dtype": args.dtype, "scheduler": args.scheduler, "config": args.config,
            "offline": args.offline or None, "progress": sys.stderr.isatty()}


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    """Trained files that steer generation: adapters, membranes (per-prompt strength), a one-step adaptor."""
    p.add_argument("--adapter", action="append", help="FILE[:WEIGHT] a trained adapter (repeatable)")
    p.add_argument("--membrane", action="append", help="FILE[:WEIGHT] a concept-erasing membrane (repeatable); "
                                                       "its strength is set per prompt")
    p.add_argument("--no-transport", action="store_true",
                   help="membranes at their weight on every prompt (no per-prompt strength)")
    p.add_argument("--one-step", default=None, metavar="FILE", help="a one-step adaptor (studio distill)")
    p.add_argument("--fast-decoder", default=None, metavar="SOURCE",
                   help="decode with an AutoencoderTiny instead of the VAE: a folder or hub id (TAESD's for SD), or "
                        "'shapes' for the embedded model's")


def add_steps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="default: the family's (25; SD3 and Flux-dev 28, Flux-schnell 4; 1 with --one-step)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="default: the family's (5; SD3 7, Flux-dev 3.5, Flux-schnell 0; 0 with --one-step)")


def load_model(args):
    """The pipeline of the model flags, with the adapter flags' files attached."""
    from studio.loading import load_pipeline

    return load_pipeline(args.model, **load_options(args),
                         adapters=parse_adapter_args(getattr(args, "adapter", None)),
                         membranes=parse_adapter_args(getattr(args, "membrane", None)),
                         transport=None if getattr(args, "no_transport", False) else "tokensim",
                         one_step=getattr(args, "one_step", None), control=control_args(args),
                         fast_decoder=getattr(args, "fast_decoder", None))


def control_args(args) -> list[dict] | None:
    """--control FILE[:SCALE] (repeatable; the same file twice: one adapter, two inputs) paired in order with
    --control-image IMG; --control-start/-end."""
    controls = parse_adapter_list(getattr(args, "control", None))
    images = getattr(args, "control_image", None) or []
    if not controls:
        if images:
            raise StudioError("--control-image needs a control adapter (--control FILE)")
        return None
    if len(images) != len(controls):
        raise StudioError(f"{len(controls)} --control adapter(s) but {len(images)} --control-image(s): give one "
                          "control image per adapter, in the same order")
    return [{"adapter": path, "image": image, "scale": scale, "start": args.control_start, "end": args.control_end}
            for (path, scale), image in zip(controls, images)]


def steps_and_guidance(args) -> tuple[int, float]:
    """25 steps at guidance 5 by default; with a one-step adaptor, 1 step without guidance."""
    one_step = getattr(args, "one_step", None)
    steps = args.steps if args.steps is not None else (1 if one_step else 25)
    guidance = args.guidance if args.guidance is not None else (0.0 if one_step else 5.0)
    return steps, guidance


def parse_adapter_list(items: list[str] | None) -> list[tuple[str, float]]:
    """`file.safetensors` or `file.safetensors:0.8` -> [(file, weight)], in order, repeats kept."""
    out = []
    for item in items or []:
        path, sep, weight = item.rpartition(":")
        if sep and path and re.fullmatch(r"-?\d+(\.\d*)?|-?\.\d+", weight):
            out.append((path, float(weight)))
        else:  # no weight, or a ':' that belongs to the path
            out.append((item, 1.0))
    return out


def parse_adapter_args(items: list[str] | None) -> dict[str, float]:
    """`file.safetensors` or `file.safetensors:0.8` -> {file: weight}."""
    return dict(parse_adapter_list(items))


def parse_settings(items: list[str] | None, flag: str = "--adapter") -> dict:
    """KEY=VALUE items (of `flag`) → {key: YAML-parsed value}."""
    import yaml

    settings = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudioError(f"{flag} takes KEY=VALUE, got {item!r}")
        settings[key.replace("-", "_")] = yaml.safe_load(value)
    return settings


def check_output_folder(folder: str | Path, flag: str) -> None:
    """Refuse a folder path that is (or lies under) an existing file, before anything is computed."""
    path = Path(folder)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            where = "is a file" if part == path else f"lies under {part}, a file"
            raise StudioError(f"{flag} {folder} {where}, not a folder; choose another {flag}")
        if part.exists():
            return


def check_safetensors_out(out: str | Path, what: str) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: {what} is written as a .safetensors file")
    check_output_folder(out.parent if str(out.parent) else ".", "--out's folder")
    return out


def tqdm_write(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def log_events(event: dict) -> None:
    """The engine's events as a command shows them: log lines and previews on stderr (past the bar)."""
    if event["kind"] == "log":
        tqdm_write(event["message"])
    elif event["kind"] == "preview":
        tqdm_write(f"step {event['step']}: preview {', '.join(event['paths'])}")


def summary(result, extra: str = "") -> str:
    """The line after training: steps, final loss, time, parameters (and what the command adds)."""
    return (f"{result.steps} steps, final loss {result.final_loss:.4f}, {result.seconds:.0f} s, "
            f"{result.trainable_parameters:,} trainable parameters{extra}")
