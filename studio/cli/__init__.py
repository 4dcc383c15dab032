"""The `studio` command. Bad input ends with a one-line message on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
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


def _add_membrane_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--membrane", action="append", help="FILE[:WEIGHT] a concept-erasing membrane (repeatable); "
                                                       "its strength is set per prompt")
    p.add_argument("--no-transport", action="store_true",
                   help="membranes at their weight on every prompt (no per-prompt strength)")


def _load(args):
    from studio.loading import load_pipeline

    return load_pipeline(args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
                         config=args.config, offline=args.offline or None, progress=sys.stderr.isatty(),
                         adapters=parse_adapter_args(getattr(args, "adapter", None)),
                         membranes=parse_adapter_args(getattr(args, "membrane", None)),
                         transport=None if getattr(args, "no_transport", False) else "tokenuni",
                         one_step=getattr(args, "one_step", None), control=control_args(args))


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


def _steps_and_guidance(args) -> tuple[int, float]:
    """25 steps at guidance 5 by default; with a one-step adaptor, 1 step without guidance."""
    one_step = getattr(args, "one_step", None)
    steps = args.steps if args.steps is not None else (1 if one_step else 25)
    guidance = args.guidance if args.guidance is not None else (0.0 if one_step else 5.0)
    return steps, guidance


def cmd_generate(args) -> None:
    from studio.generate import GenerationSettings, generate, output_paths, save_images

    steps, guidance = _steps_and_guidance(args)
    settings = GenerationSettings(args.prompt, args.negative_prompt, steps, guidance, args.seed,
                                  args.batch, args.height, args.width)
    settings.validate()
    paths = output_paths(args.out, args.batch)  # refuse an unwritable path before the model loads
    pipe = _load(args)
    images = generate(pipe, settings)
    extra = {kind: {Path(f).name: w for f, w in parse_adapter_args(getattr(args, kind)).items()}
             for kind in ("adapter", "membrane")}
    extra = {f"{kind}s": files for kind, files in extra.items() if files}
    if getattr(args, "control", None):
        extra["control"] = [{"adapter": Path(c["adapter"]).name, "image": Path(c["image"]).name, "scale": c["scale"],
                             "start": c["start"], "end": c["end"]} for c in control_args(args)]
    if args.one_step:
        extra["one_step"] = Path(args.one_step).name
    if getattr(pipe, "studio_last_permeability", None):
        extra["permeability"] = pipe.studio_last_permeability
    save_images(images, paths, settings, str(args.model), extra or None)
    for p in paths:
        print(p)


def cmd_eval(args) -> None:
    from studio.bench.recorder import record
    from studio.bench.evaluate import run_b1
    from studio.shapes.judge import load_judge

    steps, guidance = _steps_and_guidance(args)
    if args.n <= 0 or steps <= 0:
        raise StudioError("--n and --steps must be at least 1")
    pipe = _load(args)
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
        def most_frequent(head: str) -> str:
            pairs = r.misreadings[head].most_common(args.errors)
            return ", ".join(f"{want} → {got} ×{count}" for (want, got), count in pairs) or "none"

        rows = [[h, f"{100 * (1 - r.accuracy[h]):.1f}%", most_frequent(h)] for h in heads]
        print(record(f"B1 misreadings ({model}, {r.n} prompts of {args.combos} combinations, {r.steps} steps, "
                     f"guidance {r.guidance:g})",
                     ["attribute", "wrong", f"most frequent (prompted → read by the judge), up to {args.errors}"],
                     rows, write=not args.no_write))


def cmd_pretrain(args) -> None:
    import json

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


def cmd_info(args) -> None:
    import platform

    import diffusers
    import torch
    import transformers

    from studio import __version__
    from studio.shapes import embedded

    print(f"studio {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} CPU threads)")
    from studio.kernels.attention import attention_backend, xformers_available
    from studio.kernels.paths import describe

    device = "cuda" if cuda else "cpu"
    print(f"attention backend: {attention_backend(device)} (xformers {'installed' if xformers_available() else 'absent'})")
    print(f"adapter kernel path: {describe()}")
    print(f"embedded model: {embedded.SHAPES_DIR} ({'present' if embedded.is_shipped() else 'MISSING'})")


def cmd_bench(args) -> None:
    from studio.bench.concept import bench_generation

    print(bench_generation(model=args.model, batch=args.batch, steps=args.steps, guidance=args.guidance,
                           repeats=args.repeats, write=not args.no_write))


def cmd_bench_judge(args) -> None:
    from studio.bench.concept import bench_judge

    print(bench_judge(n=args.n, write=not args.no_write))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, so the YAML config and the command line hold the same settings."""
    import typing

    from studio.training.engine import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if f.name == "adapter":
            p.add_argument(flag, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                           help="a setting of the method, e.g. rank=8 (repeatable)")
        elif hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, action="append", default=argparse.SUPPRESS, help="repeatable")
        else:
            base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            p.add_argument(flag, type=base[0], default=argparse.SUPPRESS)
    p.add_argument("--config", dest="config_file", default=None, help="YAML file with any of these settings")
    p.add_argument("--preset", default=None, help="quick or standard: defaults tuned for a first result")
    p.add_argument("--rank", type=int, default=argparse.SUPPRESS, help="shortcut for --adapter rank=N")


def parse_settings(items: list[str] | None) -> dict:
    """--adapter KEY=VALUE items → {key: YAML-parsed value}."""
    import yaml

    from studio.training.engine import TrainingError

    settings = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainingError(f"--adapter takes KEY=VALUE, got {item!r}")
        settings[key.replace("-", "_")] = yaml.safe_load(value)
    return settings


def train_config_from_args(args, defaults: dict | None = None):
    """The config of `studio train`-style flags: `defaults` (a command's own), then the YAML file, the preset and
    the explicit flags over them."""
    from studio.training.engine import TrainConfig, config_with_preset

    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    adapter = parse_settings(explicit.pop("adapter", []))
    if hasattr(args, "rank"):
        adapter["rank"] = args.rank
    values = dict(defaults or {})
    values.update(TrainConfig.read_yaml(args.config_file) if args.config_file else {})
    values.update(explicit)
    values["adapter"] = {**values.get("adapter", {}), **adapter}
    return config_with_preset(args.preset, **values)


def cmd_train(args) -> None:
    from studio.training.engine import Trainer

    config = train_config_from_args(args)

    def on_event(event: dict) -> None:
        if event["kind"] in ("log",):
            print(event["message"], file=sys.stderr)
        elif event["kind"] == "preview":
            tqdm_write(f"step {event['step']}: preview {', '.join(event['paths'])}")

    result = Trainer(config, on_event).run()
    print(result.adapter_path)
    print(f"{result.steps} steps, final loss {result.final_loss:.4f}, {result.seconds:.0f} s, "
          f"{result.trainable_parameters:,} trainable parameters", file=sys.stderr)


def check_control_method(method: str, command: str) -> str:
    from studio.pipelines.control import CONTROL_METHODS

    if method not in CONTROL_METHODS:
        raise StudioError(f"{command} takes {', '.join(CONTROL_METHODS)}, got {method!r}")
    return method


def control_train_config(args, render: bool = True):
    """The TrainConfig of `studio control-train` (rendering its shapes-world data when no --data is given).
    With render=False the data is not rendered yet, only its folders named: a check of the settings before a
    queued job renders it (the web UI's Control tab calls this twice, on the page and in the job)."""
    if not hasattr(args, "method"):
        args.method = "controlnext"
    check_control_method(args.method, "control-train --method")
    name = getattr(args, "name", None) or f"{args.method}_{args.condition.replace(',', '_')}"
    args.name = name
    if not hasattr(args, "output_dir"):
        args.output_dir = f"runs/control/{name}"
    if not hasattr(args, "data"):
        from studio.shapes.conditions import condition_kinds, write_control_set

        condition_kinds(args.condition)
        if getattr(args, "model", "shapes") != "shapes":
            raise StudioError("without --data, control-train renders the shapes world: give --data and "
                              "--control-data for another model")
        if args.examples < 1:
            raise StudioError(f"--examples must be at least 1 (got {args.examples})")
        if not 0.0 <= getattr(args, "two_shapes", 0.0) <= 1.0:
            raise StudioError(f"--two-shapes is a fraction between 0 and 1 (got {args.two_shapes})")
        folder = Path(args.output_dir) / "data"
        if render:  # two-shape scenes: their two conditions are two inputs, summed as at generation
            images, conditions = write_control_set(folder, args.condition, args.examples,
                                                   two_shapes=getattr(args, "two_shapes", 0.0),
                                                   separate=not getattr(args, "overlay_scenes", False))
        else:
            images, conditions = folder / "images", folder / "conditions"
        args.data, args.control_data = str(images), str(conditions)
    from studio.adapters.control.method import LAYOUT_TIMESTEPS

    config = train_config_from_args(args, defaults=LAYOUT_TIMESTEPS)
    config.adapter.setdefault("condition", args.condition)
    return config


def cmd_control_train(args) -> None:
    from studio.training.engine import Trainer

    config = control_train_config(args)
    result = Trainer(config, lambda e: print(e["message"], file=sys.stderr) if e["kind"] == "log" else None).run()
    print(result.adapter_path)
    if args.method == "controlnet":
        from studio.adapters.control import export_controlnet

        print(export_controlnet(result.adapter_path, result.adapter_path.with_suffix("")))
    print(f"{result.steps} steps, final loss {result.final_loss:.4f}, {result.seconds:.0f} s, "
          f"{result.trainable_parameters:,} trainable parameters; generate with `studio generate --control "
          f"{result.adapter_path} --control-image CONDITION.png PROMPT`", file=sys.stderr)


def tqdm_write(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def cmd_erase(args) -> None:
    from studio.tasks.erase import default_prompts
    from studio.adapters.spm.erase import erase_config, train_membrane

    settings = {k: getattr(args, k) for k in ("steps", "lr", "batch", "denoise_steps", "seed")
                if getattr(args, k) is not None}
    adapter = parse_settings(args.setting)
    if args.prompt:
        adapter["prompts"] = list(args.prompt)
    config, run = erase_config(args.concepts, args.preset, settings=settings, adapter=adapter)
    out = Path(args.out or f"{'_'.join(args.concepts)}.safetensors".replace(" ", "-"))
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: a membrane is written as a .safetensors file")
    pipe = _load(args)
    if not config.prompts:
        config.prompts = default_prompts(pipe, config.concepts, seed=run.seed)
    result = train_membrane(pipe, config, run, out, progress=sys.stderr.isatty())
    print(result.path)
    print(f"{result.steps} steps, final loss {result.last_loss:.4f}, {result.seconds:.0f} s, "
          f"{result.trainable_parameters:,} trainable parameters, {out.stat().st_size / 1024:.0f} KB", file=sys.stderr)


def cmd_distill(args) -> None:
    from studio.adapters.hipa.config import DistillSettings
    from studio.tasks.distill import run_distill

    fields = {k: getattr(args, k) for k in ("pairs", "steps", "lr", "batch", "teacher_steps", "teacher_guidance",
                                            "seed") if getattr(args, k) is not None}
    fields.update(parse_settings(args.setting))
    if args.no_high_frequency:
        fields.update(fourier_weight=0.0, edge_weight=0.0)
    try:
        settings = DistillSettings(**fields)
    except TypeError as e:
        raise StudioError(f"distill settings: {e}") from None
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: a one-step adaptor is written as a .safetensors file")
    cache = Path(args.cache) if args.cache else out.with_name(f"{out.stem}.teacher.safetensors")
    pipe = _load(args)
    result = run_distill(pipe, settings, out, rank=args.rank, prompts_file=args.prompts, cache=cache,
                         progress=sys.stderr.isatty(), log=tqdm_write)
    print(result.path)
    print(f"{result.steps} steps, final loss {result.last_loss:.4f}, {result.seconds:.0f} s, "
          f"{result.trainable_parameters:,} trainable parameters, {out.stat().st_size / 1024:.0f} KB; generate with "
          f"`studio generate --one-step {out} PROMPT`", file=sys.stderr)


def cmd_bench_onestep(args) -> None:
    from studio.bench.onestep import bench_onestep

    print(bench_onestep(n=args.n, out=args.out, settings=parse_settings(args.setting), write=not args.no_write,
                        concept=not args.no_concept, reuse=args.reuse, adversarial=args.adversarial))


def cmd_bench_erase(args) -> None:
    from studio.bench.erase import bench_erase, bench_permeability

    parts = set(args.parts.split(","))
    if not parts <= {"permeability", "erase"}:
        raise StudioError(f"bench erase: --parts takes permeability, erase (got {args.parts!r})")
    if "permeability" in parts:
        print(bench_permeability(n=args.n, write=not args.no_write))
    if "erase" in parts:
        print(bench_erase(n=args.n, out=args.out, settings=parse_settings(args.setting), write=not args.no_write))


def cmd_export(args) -> None:
    from studio.adapters.io import export_adapter

    out, *embedding = export_adapter(args.adapter, args.format, args.out)
    print(out)
    for path in embedding:
        print(f"{path} (the trigger token '{path.stem}' as a textual-inversion embedding: load it beside the LoRA)")


def cmd_bake(args) -> None:
    from studio.adapters import read_adapter

    file = read_adapter(args.adapter)
    if file.method == "soda":  # SODA's update is a function of the base weights: it needs the model
        from studio.adapters.soda.bake import bake_to_lora as bake_soda
        from studio.loading import load_pipeline

        model = args.model or file.metadata.get("base_model_name")
        if not model:
            raise StudioError(f"{args.adapter} does not name its base model; give --model")
        out, error = bake_soda(args.adapter, args.rank, load_pipeline(model, device="cpu", dtype="fp32"), args.out)
    else:
        from studio.adapters.sara.bake import bake_to_lora

        out, error = bake_to_lora(args.adapter, args.rank, args.out)
    print(f"{out} (rank {args.rank}: relative error {error:.2%}; `studio export` writes it for ComfyUI/A1111)")


def cmd_merge(args) -> None:
    from studio.adapters import merge_adapters

    pipe = _load(args)
    merge_adapters(pipe)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from studio.single_file import save_single_file

        print(save_single_file(pipe, out))
    else:
        from studio.utils.files import atomic_dir

        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp)
        print(out)


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


def cmd_bench_concept(args) -> None:
    from studio.bench.concept import bench_concept

    print(bench_concept(method=args.method, preset=args.preset, n=args.n, out=args.out, steps=args.steps,
                        adapter=parse_settings(args.adapter), lr=args.lr, write=not args.no_write,
                        settings=parse_settings(args.set), prior_renders=args.prior_renders,
                        prior_paired=args.prior_paired))


def cmd_bench_fewshot(args) -> None:
    from studio.bench.control import bench_few_shot

    check_control_method(args.method, "bench fewshot --method")
    print(bench_few_shot(args.method, seen=args.seen, new=args.new, shots=args.shots, examples=args.examples,
                         source_steps=args.source_steps, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         bias_lr=args.bias_lr, n=args.n, eval_steps=args.eval_steps, out=args.out,
                         write=not args.no_write, reuse=args.reuse))


def cmd_bench_multicontrol(args) -> None:
    from studio.bench.control import bench_multi_condition
    from studio.shapes.conditions import check_kind

    check_kind(args.first_kind)
    check_kind(args.second_kind)
    check_control_method(args.method, "bench multicontrol --method")
    print(bench_multi_condition(args.adapter, args.also or [], first_kind=args.first_kind,
                                second_kind=args.second_kind, n=args.n, scale=args.scale, method=args.method,
                                examples=args.examples, two_shapes=args.two_shapes, separate=args.separate_inputs,
                                init_from=args.init_from, steps=args.steps, eval_steps=args.eval_steps,
                                out=args.out, reuse=args.reuse, write=not args.no_write))


def cmd_bench_control(args) -> None:
    from studio.bench.control import bench_control
    from studio.shapes.conditions import condition_kinds

    condition_kinds(args.condition)
    methods = args.methods.split(",")
    for method in methods:
        check_control_method(method, "bench control --methods")
    print(bench_control(methods, condition=args.condition, n=args.n, examples=args.examples, steps=args.steps,
                        batch_size=args.batch_size, out=args.out, eval_steps=args.eval_steps, write=not args.no_write,
                        reuse=args.reuse, lr={m: args.lr for m in methods} if args.lr else None,
                        settings=parse_settings(args.set), adapter=parse_settings(args.adapter)))


def cmd_bench_train(args) -> None:
    from studio.bench.train_cost import bench_train

    print(bench_train(models=args.models.split(","), methods=args.methods.split(","), steps=args.steps,
                      write=not args.no_write))


def cmd_bench_ui(args) -> None:
    from studio.bench.concept import bench_ui_first_image

    print(bench_ui_first_image(preset=args.preset, write=not args.no_write))


def cmd_bench_kernels(args) -> None:
    import os

    # glibc returns big freed blocks to the OS and page-faults them back in later, more or less often from
    # one process to the next: pin its thresholds so every variant allocates alike (re-exec, they are read
    # at start-up)
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        pinned = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
        os.execve(sys.executable, [sys.executable, "-m", "studio.cli", *sys.argv[1:]], {**os.environ, **pinned})
    from studio.bench.kernels import (b7_tables, bench_linears, bench_sparse, bench_unmerged_generation,
                                      parse_shapes, sparse_table, summary)
    from studio.bench.recorder import record

    try:
        shapes, tokens, ranks = parse_shapes(args.shapes), _ints(args.tokens), _ints(args.ranks)
    except ValueError as e:
        raise StudioError(f"bench kernels: {e}") from None
    parts = set(args.parts.split(","))
    if not parts <= {"linears", "sparse", "unet"}:
        raise StudioError(f"bench kernels: --parts takes linears, sparse, unet (got {args.parts!r})")
    import torch

    from studio.kernels.check import DTYPES

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError("bench kernels: --device cuda but torch sees no CUDA device")
    on = dict(device=args.device, dtype=DTYPES[args.dtype])
    say = lambda line: print(line, flush=True)  # noqa: E731
    rows = bench_linears(shapes=shapes, tokens_list=tokens, ranks=ranks, repeats=args.repeats,
                         progress=say, **on) if "linears" in parts else []
    sparse = bench_sparse(densities=[float(d) for d in args.densities.split(",")], progress=say,
                          **on) if "sparse" in parts else []
    generation = [bench_unmerged_generation(model, adapters=args.adapters, rank=args.adapter_rank, **on)
                  for model in args.unet] if "unet" in parts else []
    header, table, gen_header, gen_table = b7_tables(rows, generation)
    if rows:
        print(record("B7 adapter linears: overhead over the bare linear (" + summary(rows) + ")", header, table,
                     write=not args.no_write))
    if sparse:
        print(record("B7 sparse-delta linear: training step over the frozen linear", *sparse_table(sparse),
                     write=not args.no_write))
    if gen_table:
        print(record("B7 UNet forward with unmerged adapters vs merged weights", gen_header, gen_table,
                     write=not args.no_write))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_ui(args) -> None:
    from studio.ui.app import launch  # lazily: the UI sits above the core

    launch(host=args.host, port=args.port, auth=args.auth, model=args.model, workspace=args.workspace)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="studio", description="Diffusion-model customization studio")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    g.add_argument("--out", default="image.png", help="output .png (several images: name-0.png, name-1.png, ...)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=None, help="default 25 (1 with --one-step)")
    g.add_argument("--guidance", type=float, default=None, help="default 5 (0 with --one-step)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--adapter", action="append", help="FILE[:WEIGHT] a trained adapter (repeatable)")
    _add_membrane_args(g)
    g.add_argument("--control", action="append", help="FILE[:SCALE] a control adapter (or a diffusers ControlNet "
                                                       "folder); repeatable, summed")
    g.add_argument("--control-image", action="append", help="the control image of each --control, in order")
    g.add_argument("--control-start", type=float, default=0.0, help="first fraction of the steps under control")
    g.add_argument("--control-end", type=float, default=1.0, help="last fraction of the steps under control")
    g.add_argument("--one-step", default=None, metavar="FILE", help="a HiPA one-step adaptor (studio distill)")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="B1: prompt accuracy and FD of a model, judged on the shapes world")
    _add_model_args(e)
    e.add_argument("--n", type=int, default=256)
    e.add_argument("--steps", type=int, default=None, help="default 25 (1 with --one-step)")
    e.add_argument("--guidance", type=float, default=None, help="default 5 (0 with --one-step)")
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--adapter", action="append", help="FILE[:WEIGHT] a trained adapter (repeatable)")
    _add_membrane_args(e)
    e.add_argument("--one-step", default=None, metavar="FILE", help="a HiPA one-step adaptor (studio distill)")
    e.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    e.add_argument("--combos", choices=("heldout", "seen"), default="heldout",
                   help="prompts of attribute combinations held out of pretraining (B1) or seen in it (a diagnostic)")
    e.add_argument("--errors", type=int, default=0, metavar="K",
                   help="also list each attribute's K most frequent misreadings (prompted → read)")
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

    t = sub.add_parser("train", help="teach a concept: train an adapter on a folder of images")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    ct = sub.add_parser("control-train", help="train a control adapter (T2I-Adapter, ControlNeXt-style or ControlNet) on rendered "
                                              "condition/image pairs, or on --data with --control-data")
    _add_train_args(ct)
    ct.add_argument("--condition", default="mask", help="mask, edges, box (exact, from the shapes world), canny, lineart; "
                    "several comma-separated: the training pairs alternate between them")
    ct.add_argument("--examples", type=int, default=256, help="rendered training pairs (without --data)")
    ct.add_argument("--two-shapes", type=float, default=0.0,
                    help="the fraction of rendered pairs that are two-shape scenes, their shapes' conditions two "
                         "inputs summed (multi-condition control; best started from a trained adapter)")
    ct.add_argument("--overlay-scenes", action="store_true",
                    help="a scene's two conditions overlaid in one image instead (a ControlNet's first stage)")
    ct.set_defaults(func=cmd_control_train)

    er = sub.add_parser("erase", help="train a membrane that erases concepts (SPM), data-free")
    er.add_argument("concepts", nargs="+", help="what to erase, e.g. circle (they also set per-prompt strength)")
    er.add_argument("--out", default=None, help="the membrane .safetensors (default: <concepts>.safetensors)")
    er.add_argument("--prompt", action="append", help="a prompt to erase from (repeatable; default: on the "
                                                      "embedded model, captions naming the concept; else the concepts)")
    er.add_argument("--preset", default="shapes", help="shapes (embedded model) or sd15 (the paper's SD 1.x settings)")
    er.add_argument("--steps", type=int, default=None)
    er.add_argument("--lr", type=float, default=None)
    er.add_argument("--batch", type=int, default=None)
    er.add_argument("--denoise-steps", type=int, default=None, help="DDIM steps the training latents come from")
    er.add_argument("--seed", type=int, default=None)
    er.add_argument("--setting", action="append", metavar="KEY=VALUE",
                    help="membrane setting: surrogate, eta, anchor_weight, anchors, rank (repeatable)")
    _add_model_args(er)
    er.set_defaults(func=cmd_erase)

    d = sub.add_parser("distill", help="train a one-step adaptor (HiPA) against the multi-step teacher")
    d.add_argument("--out", default="one_step.safetensors", help="the adaptor .safetensors")
    d.add_argument("--prompts", default=None, help="a UTF-8 file, one prompt per line (default on the embedded "
                                                   "model: captions of its world)")
    d.add_argument("--cache", default=None, help="teacher pairs file (default: <out>.teacher.safetensors; reused "
                                                 "when it fits)")
    d.add_argument("--pairs", type=int, default=None, help="teacher (noise, prompt, image) pairs (default 1024)")
    d.add_argument("--teacher-steps", type=int, default=None, help="default 25")
    d.add_argument("--teacher-guidance", type=float, default=None, help="default 5")
    d.add_argument("--steps", type=int, default=None, help="student training steps (default 800)")
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--batch", type=int, default=None)
    d.add_argument("--rank", type=int, default=4, help="adaptor rank (default 4)")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--no-high-frequency", action="store_true", help="spatial loss only (the ablation)")
    d.add_argument("--setting", action="append", metavar="KEY=VALUE",
                   help="pixel_weight, perceptual_weight, fourier_weight, edge_weight, radius, warmup, "
                        "adversarial_weight (not HiPA; 0 = off), discriminator_lr, ema_decay (0 = off) (repeatable)")
    _add_model_args(d)
    d.set_defaults(func=cmd_distill)

    x = sub.add_parser("export", help="write an adapter in kohya (ComfyUI/A1111) or diffusers/PEFT keys")
    x.add_argument("adapter")
    x.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    x.add_argument("--out", default=None, help="output .safetensors (default: next to the adapter)")
    x.set_defaults(func=cmd_export)

    bk_ = sub.add_parser("bake", help="approximate a SaRA or SODA adapter by a LoRA of a chosen rank (error reported)")
    bk_.add_argument("adapter")
    bk_.add_argument("--rank", type=int, default=16)
    bk_.add_argument("--model", default=None, help="SODA: the base model it was trained on (default: the one "
                                                   "its file names)")
    bk_.add_argument("--out", default=None, help="output .safetensors (default: <name>_lora<rank> beside it)")
    bk_.set_defaults(func=cmd_bake)

    m = sub.add_parser("merge", help="fold adapters into the base model and save it (folder or .safetensors)")
    _add_model_args(m)
    m.add_argument("--adapter", action="append", required=True, help="FILE[:WEIGHT] (repeatable)")
    m.add_argument("--out", required=True, help="a folder (diffusers) or a .safetensors single file")
    m.set_defaults(func=cmd_merge)

    bc = bsub.add_parser("concept", help="B2: teach the star as 'sks' and judge the result")
    bc.add_argument("--method", default="lora", help="a training method, or several separated by commas "
                                                     "(lora,sara,soda,oft,hra): one table, the same settings")
    bc.add_argument("--preset", default="quick")
    bc.add_argument("--steps", type=int, default=None)
    bc.add_argument("--adapter", action="append", metavar="KEY=VALUE", help="method setting (repeatable)")
    bc.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    bc.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training setting, e.g. "
                                                                       "timestep_bias=later (repeatable)")
    bc.add_argument("--prior-renders", type=int, default=0, metavar="N",
                    help="prior preservation on N renders of the base shapes with their captions")
    bc.add_argument("--prior-paired", action="store_true",
                    help="with --prior-renders: also the 8 training renders redrawn as each base shape")
    bc.add_argument("--n", type=int, default=64)
    bc.add_argument("--out", default="runs/bench_concept")
    bc.add_argument("--no-write", action="store_true")
    bc.set_defaults(func=cmd_bench_concept)

    be = bsub.add_parser("erase", help="B3: erase circle (and red), with and without Facilitated Transport, "
                                       "beside the ESD baseline; stacking and transfer")
    be.add_argument("--n", type=int, default=64)
    be.add_argument("--parts", default="permeability,erase")
    be.add_argument("--out", default="runs/bench_erase")
    be.add_argument("--setting", action="append", metavar="KEY=VALUE", help="erase setting override (repeatable)")
    be.add_argument("--no-write", action="store_true")
    be.set_defaults(func=cmd_bench_erase)

    bo = bsub.add_parser("onestep", help="B4: the one-step adaptor against the 25-step teacher and the base "
                                          "model at 1 and 4 steps, with the no-high-frequency ablation")
    bo.add_argument("--n", type=int, default=256)
    bo.add_argument("--out", default="runs/bench_onestep")
    bo.add_argument("--setting", action="append", metavar="KEY=VALUE", help="distill setting (repeatable)")
    bo.add_argument("--no-concept", action="store_true", help="skip the rows with a B2 concept adapter")
    bo.add_argument("--reuse", action="store_true", help="use the adaptors already in --out when they were trained "
                    "with the same settings (their training time as measured then)")
    bo.add_argument("--adversarial", type=float, default=0.0, metavar="WEIGHT",
                    help="also train HiPA plus the adversarial term (not HiPA) at this weight, one more row")
    bo.add_argument("--no-write", action="store_true")
    bo.set_defaults(func=cmd_bench_onestep)

    bcn = bsub.add_parser("control", help="B5: control adapters trained, then mask IoU and colour accuracy on "
                                          "held-out renders")
    bcn.add_argument("--methods", default="t2i_adapter,controlnext,controlnet")
    bcn.add_argument("--condition", default="mask")
    bcn.add_argument("--n", type=int, default=64, help="held-out renders judged")
    bcn.add_argument("--examples", type=int, default=512, help="rendered training pairs")
    bcn.add_argument("--steps", type=int, default=400, help="training steps per method")
    bcn.add_argument("--batch-size", type=int, default=8)
    bcn.add_argument("--eval-steps", type=int, default=25)
    bcn.add_argument("--lr", type=float, default=None, help="learning rate of every method (default: each its own)")
    bcn.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training setting for every method, e.g. "
                                                                        "timestep_bias=later (repeatable)")
    bcn.add_argument("--adapter", action="append", metavar="KEY=VALUE", help="method setting (repeatable)")
    bcn.add_argument("--out", default="runs/bench_control")
    bcn.add_argument("--reuse", action="store_true", help="evaluate adapters this benchmark already trained with the "
                                                          "same settings (their measured training time is kept)")
    bcn.add_argument("--no-write", action="store_true")
    bcn.set_defaults(func=cmd_bench_control)
    bfs = bsub.add_parser("fewshot", help="B5 few-shot: a control adapter trained on some condition kinds adapts to "
                                          "an unseen kind from a few pairs (biases only), against training from scratch")
    bfs.add_argument("--method", default="t2i_adapter")
    bfs.add_argument("--seen", default="mask,edges", help="the condition kinds the source adapter is trained on")
    bfs.add_argument("--new", default="box", help="the unseen condition kind")
    bfs.add_argument("--shots", type=int, default=30, help="pairs of the unseen kind")
    bfs.add_argument("--examples", type=int, default=512, help="rendered pairs of the seen kinds")
    bfs.add_argument("--source-steps", type=int, default=1200)
    bfs.add_argument("--steps", type=int, default=400, help="steps of each few-shot training")
    bfs.add_argument("--batch-size", type=int, default=8)
    bfs.add_argument("--lr", type=float, default=1e-3, help="lr of the source, the whole fine-tune and from scratch")
    bfs.add_argument("--bias-lr", type=float, default=1e-2, help="lr of the bias tuning")
    bfs.add_argument("--n", type=int, default=64, help="held-out renders judged")
    bfs.add_argument("--eval-steps", type=int, default=25)
    bfs.add_argument("--out", default="runs/bench_fewshot")
    bfs.add_argument("--reuse", action="store_true", help="reuse adapters already trained with the same settings")
    bfs.add_argument("--no-write", action="store_true")
    bfs.set_defaults(func=cmd_bench_fewshot)
    bmc = bsub.add_parser("multicontrol", help="B5 multi-condition: a mask of one shape and the edges of another as "
                                               "two control inputs, both obeyed?")
    bmc.add_argument("--adapter", default=None, help="a control adapter for both inputs (default: train one of "
                                                     "--method on one- and two-shape scenes of both kinds)")
    bmc.add_argument("--method", default="t2i_adapter", help="the method trained without --adapter")
    bmc.add_argument("--also", action="append", help="another adapter measured the same way (repeatable)")
    bmc.add_argument("--first-kind", default="mask")
    bmc.add_argument("--second-kind", default="edges")
    bmc.add_argument("--n", type=int, default=32, help="two-shape scenes judged")
    bmc.add_argument("--scale", type=float, default=1.0, help="conditioning scale of each input")
    bmc.add_argument("--examples", type=int, default=512, help="rendered training pairs (without --adapter)")
    bmc.add_argument("--two-shapes", type=float, default=0.5, help="the fraction of them that are two-shape scenes")
    bmc.add_argument("--separate-inputs", action="store_true",
                     help="train on a scene's two conditions as two summed inputs (as generation uses them), not "
                          "one overlaid image")
    bmc.add_argument("--init-from", default=None, help="train starting from this adapter of --method")
    bmc.add_argument("--steps", type=int, default=1200, help="training steps (without --adapter)")
    bmc.add_argument("--eval-steps", type=int, default=25)
    bmc.add_argument("--out", default="runs/bench_multicontrol")
    bmc.add_argument("--reuse", action="store_true", help="reuse an adapter already trained with the same settings")
    bmc.add_argument("--no-write", action="store_true")
    bmc.set_defaults(func=cmd_bench_multicontrol)
    bt = bsub.add_parser("train", help="B6: step time and peak memory per method, each in its own process")
    bt.add_argument("--models", default="shapes,sd15", help="shapes and/or sd15 (random SD 1.5 UNet)")
    bt.add_argument("--methods", default="full,lora-r4,lora-r16")
    bt.add_argument("--steps", type=int, default=5)
    bt.add_argument("--no-write", action="store_true")
    bt.set_defaults(func=cmd_bench_train)

    bu = bsub.add_parser("ui", help="web UI: time from the page to a trained concept's first image")
    bu.add_argument("--preset", default="quick")
    bu.add_argument("--no-write", action="store_true")
    bu.set_defaults(func=cmd_bench_ui)

    bk = bsub.add_parser("kernels", help="B7: fused adapter linears vs PEFT and the reference; unmerged vs merged")
    bk.add_argument("--shapes", default="320x320,640x640,1280x1280,768x320,320x2560,1280x320",
                    help="in x out of the linears (default: SD 1.5's)")
    bk.add_argument("--tokens", default="256,1024,4096")
    bk.add_argument("--ranks", default="4,16,64")
    bk.add_argument("--repeats", type=int, default=31)
    bk.add_argument("--parts", default="linears,sparse,unet",
                    help="which tables: linears (LoRA linears), sparse (sparse-delta linear), unet (unmerged vs merged)")
    bk.add_argument("--unet", nargs="+", default=["shapes", "sd15"], choices=["shapes", "sd15"],
                    help="UNets for the unmerged-vs-merged forward")
    bk.add_argument("--adapters", type=int, default=3)
    bk.add_argument("--adapter-rank", type=int, default=8)
    bk.add_argument("--densities", default="0.01,0.05,0.2", help="trained fractions for the sparse-delta table")
    bk.add_argument("--device", default="cpu", help="cpu, or cuda (adds the Triton kernel as a variant)")
    bk.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    bk.add_argument("--no-write", action="store_true")
    bk.set_defaults(func=cmd_bench_kernels)

    i = sub.add_parser("info", help="versions, device, attention backend, adapter kernel path")
    i.set_defaults(func=cmd_info)

    u = sub.add_parser("ui", help="the web UI")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--auth", default=None, help="user:pass")
    u.add_argument("--model", default="shapes")
    u.add_argument("--workspace", default=None, help="where uploads, runs and the adapter library live "
                                                     "(default: ./studio-workspace or $STUDIO_WORKSPACE)")
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
    except ValueError as e:
        from studio.adapters import AdapterError

        if not isinstance(e, AdapterError):
            raise
        print(f"studio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
