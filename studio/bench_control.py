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

from studio import world
from studio.benchmarks import record
from studio.conditions import CONTROL_SEED, control_dataset

B5_SEED = CONTROL_SEED + 1


def generated_mask(image: np.ndarray) -> np.ndarray:
    """The shape's mask in a generated image (HxWx3 uint8): pixels far in colour from the background, whose
    colour is the median of the border pixels."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(img - background, axis=2)
    threshold = max(40.0, 0.5 * float(np.percentile(distance, 99)))
    return distance > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def evaluate_control(pipe, judge, examples, adapter: str | None, *, steps: int = 25, guidance: float = 5.0,
                     scale: float = 1.0, batch: int = 16) -> dict[str, float]:
    """Mean IoU and colour accuracy of `pipe` on `examples` (ControlExample), controlled by `adapter` (None: no
    control) with each example's condition image."""
    from studio.adapters.control import set_control
    from studio.evaluate import generate_images
    from studio.judge import judge_images

    ious, colours = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        if adapter:
            cond = torch.from_numpy(np.stack([e.condition for e in chunk])).permute(0, 3, 1, 2).float() / 255
            set_control(pipe, [{"adapter": adapter, "image": cond, "scale": scale}])
        images = generate_images(pipe, [e.caption for e in chunk], [e.seed for e in chunk], steps, guidance, batch=batch)
        preds = judge_images(judge, images)[1]
        for j, e in enumerate(chunk):
            generated = (images[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            ious.append(iou(generated_mask(generated), world.render_mask(e.spec, e.seed)))
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
    params = sum(t.numel() for t in file.tensors.values())
    if "training_seconds" in file.metadata:
        return params, float(file.metadata["training_seconds"]), " (earlier run)"
    started = (path.parent / "config.yaml").stat().st_mtime
    ended = datetime.datetime.fromisoformat(file.metadata["trained_at"]).replace(
        tzinfo=datetime.timezone.utc).timestamp()
    return params, ended - started, " (earlier run; from its files' times)"


def bench_control(methods: list[str], condition: str = "mask", n: int = 64, examples: int = 512, steps: int = 400,
                  batch_size: int = 8, lr: dict[str, float] | None = None, out: str | Path = "runs/bench_control",
                  eval_steps: int = 25, write: bool = True, reuse: bool = False,
                  settings: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, log=None) -> str:
    """`settings`: training settings for every method, over the control methods' timestep defaults
    (LAYOUT_TIMESTEPS; `{"timestep_bias": "none", "x0_weighting": False}` is the plain objective);
    `adapter`: method settings."""
    from studio.adapters.control.method import LAYOUT_TIMESTEPS
    from studio.conditions import write_control_set
    from studio.judge import load_judge
    from studio.loading import load_pipeline
    from studio.train import train

    log = log or (lambda line: print(line, flush=True))
    settings = {**LAYOUT_TIMESTEPS, **(settings or {})}
    out = Path(out)
    judge = load_judge()
    images, conditions = write_control_set(out / f"data_{condition}", condition, examples)
    held_out = control_dataset(condition, n, seed=B5_SEED, heldout=True)
    rows = []
    base = evaluate_control(load_pipeline("shapes"), judge, held_out, None, steps=eval_steps)
    log(f"no control: {base}")
    rows.append(["none (caption only)", "-", "-", "-", f"{base['iou']:.3f}", f"{100 * base['iou_08']:.0f}%",
                 f"{100 * base['colour']:.1f}%"])
    lrs = {"controlnext": 1e-3, "controlnet": 5e-4, "t2i_adapter": 1e-3, **(lr or {})}
    for method in methods:
        name = f"{method}_{condition}"
        path = out / name / f"{name}.safetensors"
        adapter_settings = {"condition": condition, **(adapter or {})}
        trained = (_reusable(path, method, steps, batch_size, lrs[method], images, settings, adapter_settings)
                   if reuse else None)
        if trained is None:
            result = train(method=method, data=str(images), control_data=str(conditions), name=name,
                           output_dir=str(out / name), steps=steps, batch_size=batch_size, lr=lrs[method],
                           lr_scheduler="constant", lr_warmup_steps=0, preview_every=0, checkpoint_every=steps,
                           progress_bar=False, tensorboard=False, adapter=adapter_settings, **settings)
            trained = (result.trainable_parameters, result.seconds, "")
        params, seconds, note = trained
        log(f"{method}: {steps} steps in {seconds:.0f} s{note}")
        pipe = load_pipeline("shapes", adapters={path: 1.0})
        r = evaluate_control(pipe, judge, held_out, name, steps=eval_steps)
        log(f"{method}: {r}")
        extra = "".join(f", {k} {v}" for k, v in {**settings, **(adapter or {})}.items())
        rows.append([method, f"{params:,}", f"{steps} x {batch_size}, lr {lrs[method]:g}{extra}",
                     f"{seconds / 60:.1f} min{note}", f"{r['iou']:.3f}", f"{100 * r['iou_08']:.0f}%",
                     f"{100 * r['colour']:.1f}%"])
    header = ["method", "trainable params", "training (steps x batch)", "training time", "mask IoU",
              "images with IoU >= 0.8", "colour accuracy"]
    title = (f"B5 control ({condition} condition; {examples} rendered training pairs; {n} held-out renders, "
             f"{eval_steps} steps, guidance 5)")
    return record(title, header, rows, write=write)
