"""`studio bench control` (B5): control adapters trained on rendered (condition, image) pairs, then judged on
held-out renders (attribute combinations the base model never saw): *fidelity* = IoU of the condition's shape mask
with the generated shape's mask (the generated image segmented by its colour distance from its own background),
colour accuracy kept (the judge's colour read against the prompt, beside the uncontrolled model's), trainable
parameters and training time on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.shapes import world
from studio.bench.recorder import record
from studio.shapes.conditions import CONTROL_SEED, control_dataset

B5_SEED = CONTROL_SEED + 1
FEW_SHOT_SEED = CONTROL_SEED + 2
METHOD_LR = {"controlnext": 1e-3, "controlnet": 5e-4, "t2i_adapter": 1e-3, "ufc": 1e-4}  # UFC: the paper's


def generated_mask(image: torch.Tensor) -> np.ndarray:
    """The shape's mask in a generated image (3xHxW in [0, 1], as the pipeline returns it, read as 8-bit
    pixels): pixels far in colour from the background, whose colour is the median of the border pixels."""
    img = (image.permute(1, 2, 0).numpy() * 255).round()
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(img - background, axis=2)
    threshold = max(40.0, 0.5 * float(np.percentile(distance, 99)))
    return distance > threshold


def _score_cells(r: dict[str, float]) -> list[str]:
    """An evaluate_control result as table cells: mask IoU, images with IoU >= 0.8, colour accuracy."""
    return [f"{r['iou']:.3f}", f"{100 * r['iou_08']:.0f}%", f"{100 * r['colour']:.1f}%"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def evaluate_control(pipe, judge, examples, adapter: str | None, *, steps: int = 25, guidance: float = 5.0,
                     scale: float = 1.0, batch: int = 16) -> dict[str, float]:
    """Mean IoU and colour accuracy of `pipe` on `examples` (ControlExample), controlled by `adapter` (None: no
    control) with each example's condition image."""
    from studio.adapters.control import set_control
    from studio.bench.evaluate import generate_images
    from studio.shapes.judge import judge_images

    ious, colours = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        if adapter:
            cond = torch.from_numpy(np.stack([e.condition for e in chunk])).permute(0, 3, 1, 2).float() / 255
            set_control(pipe, [{"adapter": adapter, "image": cond, "scale": scale}])
        images = generate_images(pipe, [e.caption for e in chunk], [e.seed for e in chunk], steps, guidance,
                                 batch=batch)
        preds = judge_images(judge, images)[1]
        for j, e in enumerate(chunk):
            ious.append(iou(generated_mask(images[j]), world.render_mask(e.spec, e.seed)))
            colours.append(preds["colour"][j] == e.spec.colour)
    return {"iou": float(np.mean(ious)), "iou_08": float(np.mean(np.array(ious) >= 0.8)),
            "colour": float(np.mean(colours))}


def _reusable(path: Path, method: str, steps: int, batch_size: int, lr: float, images: Path,
              settings: dict[str, Any], adapter: dict[str, Any]):
    """(trainable parameters, training seconds, note) of an adapter this benchmark already trained with these
    settings (`--reuse`), or None. The time is the one measured when it was trained: stored in the file, or for
    files written before the engine stored it, from its run folder's config.yaml (written as the run started) to
    the file's trained_at."""
    import datetime
    import json

    from studio.adapters import read_adapter

    if not path.is_file():
        return None
    file = read_adapter(path)
    cfg = json.loads(file.metadata.get("training_config", "{}"))
    if (file.method != method or cfg.get("steps") != steps or cfg.get("batch_size") != batch_size
            or cfg.get("lr") != lr or cfg.get("data") != str(images)
            or any(cfg.get(k) != v for k, v in settings.items())
            or any(file.config.get(k) != v for k, v in adapter.items())):
        return None
    # files written before the engine kept the count: every tensor (a bias-tuned file holds more than it trained)
    params = int(file.metadata.get("trainable_parameters", 0)) or sum(t.numel() for t in file.tensors.values())
    if "training_seconds" in file.metadata:
        return params, float(file.metadata["training_seconds"]), " (earlier run)"
    started = (path.parent / "config.yaml").stat().st_mtime
    ended = datetime.datetime.fromisoformat(file.metadata["trained_at"]).replace(
        tzinfo=datetime.timezone.utc).timestamp()
    return params, ended - started, " (earlier run; from its files' times)"


def _train_or_reuse(path: Path, method: str, images: Path, conditions: Path, steps: int, batch_size: int, lr: float,
                    settings: dict[str, Any], adapter: dict[str, Any], reuse: bool) -> tuple[int, float, str]:
    """Train the control adapter `path` (its folder is the run folder), or with `reuse` take the one already
    there if it was trained with these settings. (trainable parameters, training seconds, note)."""
    from studio.training.engine import train

    trained = _reusable(path, method, steps, batch_size, lr, images, settings, adapter) if reuse else None
    if trained is not None:
        return trained
    result = train(method=method, data=str(images), control_data=str(conditions), name=path.stem,
                   output_dir=str(path.parent), steps=steps, batch_size=batch_size, lr=lr, lr_scheduler="constant",
                   lr_warmup_steps=0, preview_every=0, checkpoint_every=steps, progress_bar=False, tensorboard=False,
                   adapter=adapter, **settings)
    return result.trainable_parameters, result.seconds, ""


def _trained_as(path: Path) -> str:
    """A trained adapter file described from its metadata: name, method, steps x batch, lr, training time."""
    import json

    from studio.adapters import read_adapter

    file = read_adapter(path)
    cfg = json.loads(file.metadata.get("training_config", "{}"))
    if not cfg:
        return path.name
    seconds = float(file.metadata.get("training_seconds", 0))
    time = f", {seconds / 60:.1f} min" if seconds else ""
    start = f", from {Path(file.config['init_from']).stem}" if file.config.get("init_from") else ""
    run = f"{cfg.get('steps')} x {cfg.get('batch_size')}, lr {cfg.get('lr'):g}"
    return f"{path.stem}: {file.method} ({run}{start}{time})"


def bench_control(methods: list[str], condition: str = "mask", n: int = 64, examples: int = 512, steps: int = 400,
                  batch_size: int = 8, lr: dict[str, float] | None = None, out: str | Path = "runs/bench_control",
                  eval_steps: int = 25, write: bool = True, reuse: bool = False,
                  settings: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, log=None) -> str:
    """`settings`: training settings for every method, over the control methods' timestep defaults
    (LAYOUT_TIMESTEPS; `{"timestep_bias": "none", "x0_weighting": False}` is the plain objective);
    `adapter`: method settings."""
    from studio.adapters.control.method import LAYOUT_TIMESTEPS
    from studio.shapes.conditions import write_control_set
    from studio.shapes.judge import load_judge
    from studio.loading import load_pipeline

    log = log or (lambda line: print(line, flush=True))
    settings = {**LAYOUT_TIMESTEPS, **(settings or {})}
    out = Path(out)
    judge = load_judge()
    images, conditions = write_control_set(out / f"data_{condition}", condition, examples)
    held_out = control_dataset(condition, n, seed=B5_SEED, heldout=True)
    rows = []
    base = evaluate_control(load_pipeline("shapes"), judge, held_out, None, steps=eval_steps)
    log(f"no control: {base}")
    rows.append(["none (caption only)", "-", "-", "-", *_score_cells(base)])
    lrs = {**METHOD_LR, **(lr or {})}
    for method in methods:
        name = f"{method}_{condition}"
        path = out / name / f"{name}.safetensors"
        params, seconds, note = _train_or_reuse(path, method, images, conditions, steps, batch_size, lrs[method],
                                                settings, {"condition": condition, **(adapter or {})}, reuse)
        log(f"{method}: {steps} steps in {seconds:.0f} s{note}")
        pipe = load_pipeline("shapes", adapters={path: 1.0})
        r = evaluate_control(pipe, judge, held_out, name, steps=eval_steps)
        log(f"{method}: {r}")
        extra = "".join(f", {k} {v}" for k, v in {**settings, **(adapter or {})}.items())
        rows.append([method, f"{params:,}", f"{steps} x {batch_size}, lr {lrs[method]:g}{extra}",
                     f"{seconds / 60:.1f} min{note}", *_score_cells(r)])
    header = ["method", "trainable params", "training (steps x batch)", "training time", "mask IoU",
              "images with IoU >= 0.8", "colour accuracy"]
    title = (f"B5 control ({condition} condition; {examples} rendered training pairs; {n} held-out renders, "
             f"{eval_steps} steps, guidance 5)")
    return record(title, header, rows, write=write)


def bench_few_shot(method: str = "t2i_adapter", seen: str = "mask,edges", new: str = "box", shots: int = 30,
                   examples: int = 512, source_steps: int = 1200, steps: int = 400, batch_size: int = 8,
                   lr: float = 1e-3, bias_lr: float = 1e-2, n: int = 64, eval_steps: int = 25,
                   out: str | Path = "runs/bench_fewshot", write: bool = True, reuse: bool = False, log=None) -> str:
    """Few-shot control: an adapter trained on the `seen` condition kinds (UFC: meta-trained on episodes of each)
    adapts to the `new` kind from `shots` pairs by tuning only its task parameters (its biases; UFC's label-encoder
    biases and matching modules); beside it the same method trained from scratch on those pairs (all parameters),
    the adapter fine-tuned whole on them, the adapter used on the new kind unchanged, and the method fully
    supervised on `examples` pairs of the new kind. Mask IoU
    and colour accuracy on `n` held-out renders with the new kind's condition."""
    from studio.adapters.control.method import LAYOUT_TIMESTEPS
    from studio.adapters import get_method
    from studio.shapes.conditions import (ConditionError, check_kind, condition_kinds, write_control_set,
                                          write_training_set)
    from studio.shapes.judge import load_judge
    from studio.loading import load_pipeline

    log = log or (lambda line: print(line, flush=True))
    if check_kind(new) in condition_kinds(seen):
        raise ConditionError(f"the new condition kind {new!r} is one of the seen kinds ({seen})")
    out = Path(out)
    judge = load_judge()
    settings = dict(LAYOUT_TIMESTEPS)
    episodic = get_method(method).episodic  # UFC meta-trains on episodes of one kind
    seen_images, seen_conditions = write_training_set(out / "data_seen", seen, examples, episodic=episodic)
    # the few shots: renders the seen-kind training set does not contain (another seed)
    shot_images, shot_conditions = write_control_set(out / f"data_{new}_{shots}", new, shots, seed=FEW_SHOT_SEED)
    held_out = control_dataset(new, n, seed=B5_SEED, heldout=True)

    def evaluate(path: Path | None) -> dict[str, float]:
        pipe = load_pipeline("shapes", adapters={path: 1.0}) if path else load_pipeline("shapes")
        return evaluate_control(pipe, judge, held_out, path.stem if path else None, steps=eval_steps)

    def row(what: str, params: str, training: str, seconds: str, r: dict[str, float]) -> list[str]:
        log(f"{what}: {r}")
        return [what, params, training, seconds, *_score_cells(r)]

    rows = [row("none (caption only)", "-", "-", "-", evaluate(None))]
    source = out / f"{method}_seen" / f"{method}_seen.safetensors"
    params, seconds, note = _train_or_reuse(source, method, seen_images, seen_conditions, source_steps, batch_size,
                                            lr, settings, {"condition": seen}, reuse)
    rows.append(row(f"trained on {seen} ({examples} pairs), used on {new} as is", f"{params:,}",
                    f"{source_steps} x {batch_size}, lr {lr:g}", f"{seconds / 60:.1f} min{note}", evaluate(source)))
    few = ("its task parameters tuned (label-encoder biases and matching)" if episodic else "its biases tuned")
    runs = [(f"few-shot: {few}", "bias", bias_lr, {"init_from": str(source), "tune": "bias"}),
            ("few-shot: all of it fine-tuned", "all", lr, {"init_from": str(source)}),
            ("from scratch on the same pairs", "scratch", lr, {})]
    for what, tag, run_lr, extra in runs:
        path = out / f"{method}_{new}_{tag}" / f"{method}_{new}_{tag}.safetensors"
        params, seconds, note = _train_or_reuse(path, method, shot_images, shot_conditions, steps, batch_size,
                                                run_lr, settings, {"condition": new, **extra}, reuse)
        rows.append(row(what, f"{params:,}", f"{steps} x {batch_size} on {shots} pairs, lr {run_lr:g}",
                        f"{seconds / 60:.1f} min{note}", evaluate(path)))
    # the paper's reference: fully supervised on the new kind, as many pairs and steps as the source had
    full_images, full_conditions = write_control_set(out / f"data_{new}_full", new, examples)
    path = out / f"{method}_{new}_supervised" / f"{method}_{new}_supervised.safetensors"
    params, seconds, note = _train_or_reuse(path, method, full_images, full_conditions, source_steps, batch_size, lr,
                                            settings, {"condition": new}, reuse)
    rows.append(row(f"fully supervised on {new} ({examples} pairs)", f"{params:,}",
                    f"{source_steps} x {batch_size}, lr {lr:g}", f"{seconds / 60:.1f} min{note}", evaluate(path)))
    header = ["adapter", "trainable params", "training (steps x batch)", "training time", "mask IoU",
              "images with IoU >= 0.8", "colour accuracy"]
    title = (f"B5 few-shot control ({method}; unseen condition {new} from {shots} pairs; {n} held-out renders, "
             f"{eval_steps} steps, guidance 5)")
    return record(title, header, rows, write=write)


def _half(position: str) -> tuple[slice, slice]:
    middle = world.IMAGE_SIZE // 2
    return {"left": (slice(None), slice(0, middle)), "right": (slice(None), slice(middle, None)),
            "top": (slice(0, middle), slice(None)), "bottom": (slice(middle, None), slice(None))}[position]


def evaluate_two_conditions(pipe, inputs: list[tuple[str, torch.Tensor]], scenes, scale: float = 1.0,
                            steps: int = 25, guidance: float = 5.0, batch: int = 16) -> np.ndarray:
    """Per two-shape scene (specs, seed, caption), the IoU of each shape in its half of the generated image, with
    the control `inputs` (adapter name, one condition image per scene) summed at `scale`. Shape n x 2."""
    from studio.adapters.control import set_control
    from studio.bench.evaluate import generate_images

    scores = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        set_control(pipe, [{"adapter": name, "image": images[i:i + batch], "scale": scale} for name, images in inputs])
        generated = generate_images(pipe, [c[2] for c in chunk], [c[1] for c in chunk], steps, guidance, batch=batch)
        for image, (specs, seed, _) in zip(generated, chunk):
            found = generated_mask(image)
            halves = [_half(spec.position) for spec in specs]
            scores.append([iou(found[h], world.render_mask(spec, seed)[h]) for spec, h in zip(specs, halves)])
    set_control(pipe, None)
    return np.array(scores)


def bench_multi_condition(adapter: str | Path | None = None, also: list[str | Path] = (), first_kind: str = "mask",
                          second_kind: str = "edges", n: int = 32, scale: float = 1.0, method: str = "t2i_adapter",
                          examples: int = 512, two_shapes: float = 0.5, steps: int = 1200, batch_size: int = 8,
                          lr: float | None = None, separate: bool = False, init_from: str | Path | None = None,
                          eval_steps: int = 25, guidance: float = 5.0, out: str | Path = "runs/bench_multicontrol",
                          reuse: bool = False, write: bool = True, log=None) -> str:
    """Two conditions at once: the `first_kind` condition of one shape and the `second_kind` condition of another
    shape in the opposite half, as two control inputs summed, on `n` two-shape scenes of held-out attribute
    combinations. Each shape's IoU is measured in its half, with both inputs, with each alone and with the caption
    alone. `adapter`: the control adapter given both inputs; None trains one of `method` (`examples` pairs of
    both kinds, a `two_shapes` fraction of them two-shape scenes; with `separate`, a scene's two conditions are two
    inputs summed, as at generation, not one overlaid image; `init_from`: a trained adapter of `method` it starts
    from). `also`: more adapters measured the same way."""
    import random

    from studio.adapters.control.method import LAYOUT_TIMESTEPS
    from studio.shapes.conditions import world_condition, write_control_set
    from studio.loading import load_pipeline

    log = log or (lambda line: print(line, flush=True))
    out = Path(out)
    rows, what_trained = [], {}
    if adapter is None:
        kinds = f"{first_kind},{second_kind}"
        tag = ("_separate" if separate else "") + (f"_from_{Path(init_from).stem}" if init_from else "")
        start = {"init_from": str(init_from)} if init_from else {}
        images, conditions = write_control_set(out / f"data_scenes{tag}", kinds, examples, two_shapes=two_shapes,
                                               separate=separate)
        adapter = out / f"{method}_scenes{tag}" / f"{method}_scenes{tag}.safetensors"
        lr = lr or METHOD_LR[method]
        params, seconds, note = _train_or_reuse(adapter, method, images, conditions, steps, batch_size, lr,
                                                dict(LAYOUT_TIMESTEPS), {"condition": kinds, **start}, reuse)
        inputs = "as two summed inputs" if separate else "overlaid in one image"
        origin = f", from {Path(init_from).stem}," if init_from else ""
        what_trained[Path(adapter)] = (f"{method}{origin} trained on {examples} {kinds} pairs, {100 * two_shapes:.0f}% "
                                       f"two-shape scenes, their conditions {inputs} ({steps} x {batch_size}, "
                                       f"lr {lr:g}, {seconds / 60:.1f} min{note})")
    rng = random.Random(B5_SEED + 1)
    scenes = []
    for _ in range(n):
        specs = world.random_pair(rng, heldout=True)
        scenes.append((specs, rng.randrange(2**31), world.scene_caption(specs)))

    def conditions_of(kind: str, k: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(world_condition(kind, specs[k], seed)).permute(2, 0, 1).float() / 255
                            for specs, seed, _ in scenes])

    firsts, seconds_ = conditions_of(first_kind, 0), conditions_of(second_kind, 1)
    for path in [Path(adapter)] + [Path(a) for a in also]:
        pipe = load_pipeline("shapes", adapters={path: 1.0})
        name = path.stem
        variants = {"caption only": [], f"{first_kind} only": [(name, firsts)],
                    f"{second_kind} only": [(name, seconds_)],
                    f"{first_kind} + {second_kind}": [(name, firsts), (name, seconds_)]}
        for what, inputs in variants.items():
            s = evaluate_two_conditions(pipe, inputs, scenes, scale, eval_steps, guidance)
            both = float(np.mean((s >= 0.6).all(axis=1)))
            log(f"{path.name} {what}: first {s[:, 0].mean():.3f}, second {s[:, 1].mean():.3f}, both >= 0.6 {both:.2f}")
            rows.append([what_trained.get(path) or _trained_as(path), what, f"{s[:, 0].mean():.3f}",
                         f"{s[:, 1].mean():.3f}", f"{100 * both:.0f}%"])
    header = ["adapter", "control inputs", f"IoU of the {first_kind}-conditioned shape",
              f"IoU of the {second_kind}-conditioned shape", "scenes with both IoU >= 0.6"]
    title = (f"B5 multi-condition ({n} two-shape scenes of held-out combinations, each shape's condition a separate "
             f"input at scale {scale:g}, IoU in its half; {eval_steps} steps, guidance {guidance:g})")
    return record(title, header, rows, write=write)
