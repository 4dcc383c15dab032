"""`studio generate`: text to image, with adapters, membranes, a one-step adaptor or control inputs."""

from __future__ import annotations

from pathlib import Path

from studio.cli.common import (add_adapter_args, add_model_args, add_steps_args, control_args, load_model,
                               parse_adapter_args, steps_and_guidance)
from studio.cli.flags import finite_float
from studio.loading import StudioError

# one pipeline call holds every image of the batch at once (latents, and activations several times their
# size at each step); past this, a mistyped number would exhaust the memory instead of drawing images
MAX_BATCH = 64


def register(sub) -> None:
    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    g.add_argument("--out", default="image.png", help="output .png (several images: name-0.png, name-1.png, ...)")
    g.add_argument("--negative-prompt", default="")
    add_steps_args(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=1, help=f"images drawn at once (at most {MAX_BATCH})")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    add_adapter_args(g)
    g.add_argument("--control", action="append", help="FILE[:SCALE] a control adapter (or a diffusers "
                                                       "ControlNetModel folder); repeatable, summed")
    g.add_argument("--control-image", action="append", help="the control image of each --control, in order")
    g.add_argument("--control-start", type=finite_float, default=0.0,
                   help="first fraction of the steps under control")
    g.add_argument("--control-end", type=finite_float, default=1.0, help="last fraction of the steps under control")
    add_model_args(g)
    g.set_defaults(func=run)


def check_batch(batch: int) -> None:
    if batch > MAX_BATCH:
        raise StudioError(f"--batch {batch}: at most {MAX_BATCH} images are drawn at once (a batch is held in "
                          f"memory whole); draw more in several runs with --seed 0, {MAX_BATCH}, {2 * MAX_BATCH}, ...")


def run(args) -> None:
    from studio.generate import GenerationSettings, family_steps_and_guidance, generate, output_paths, save_images

    steps, guidance = steps_and_guidance(args)
    settings = GenerationSettings(args.prompt, args.negative_prompt, steps, guidance, args.seed,
                                  args.batch, args.height, args.width)
    settings.validate()
    check_batch(args.batch)
    paths = output_paths(args.out, args.batch)  # refuse an unwritable path before the model loads
    pipe = load_model(args)
    if not getattr(args, "one_step", None):  # the family's own defaults for what was not given
        steps, guidance = family_steps_and_guidance(pipe)
        settings.steps = args.steps if args.steps is not None else steps
        settings.guidance = args.guidance if args.guidance is not None else guidance
    images = generate(pipe, settings)
    save_images(images, paths, settings, str(args.model), _provenance(args, pipe) or None)
    for p in paths:
        print(p)


def _provenance(args, pipe) -> dict:
    """What the image's metadata records besides its settings: the files that shaped it."""
    extra = {kind: {Path(f).name: w for f, w in parse_adapter_args(getattr(args, kind)).items()}
             for kind in ("adapter", "membrane")}
    extra = {f"{kind}s": files for kind, files in extra.items() if files}
    if getattr(args, "control", None):
        extra["control"] = [{"adapter": Path(c["adapter"]).name, "image": Path(c["image"]).name, "scale": c["scale"],
                             "start": c["start"], "end": c["end"]} for c in control_args(args)]
    if args.one_step:
        extra["one_step"] = Path(args.one_step).name
    if getattr(args, "fast_decoder", None):
        extra["fast_decoder"] = str(args.fast_decoder)
    if getattr(pipe, "studio_last_permeability", None):
        extra["permeability"] = pipe.studio_last_permeability
    return extra
