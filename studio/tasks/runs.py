"""What erase and distill share around the engine: the engine's settings from a task's own plus the
machinery settings a user may add (checkpoint_every, mixed_precision, ...), and the run folder beside the file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from studio.loading import StudioError
from studio.training import LoopSettings
from studio.utils.settings import from_values

# what a task's own settings already say, under the engine's names
TASK_NAMES = {"steps": "steps", "lr": "lr", "batch": "batch_size", "seed": "seed", "warmup": "lr_warmup_steps"}
# the engine's defaults for erase and distill: their loops never clipped gradients
TASK_DEFAULTS = {"max_grad_norm": 0.0, "checkpoint_every": 50, "tensorboard": False}
# the engine settings a task's front ends offer beside the task's own (its steps, lr, batch, seed)
MACHINERY_FLAGS = ("checkpoint_every", "keep_checkpoints", "mixed_precision", "grad_accum", "max_grad_norm",
                   "weight_decay", "tensorboard")


def split_settings(values: dict[str, Any] | None, task_class: type, what: str) -> tuple[dict, dict]:
    """`values` as (the task's settings, the engine's machinery settings); unknown names are refused."""
    own = {f.name for f in fields(task_class)}
    # (the task's own schedule and no previews: lr_scheduler and preview_every do not apply)
    machinery = (set(LoopSettings.__dataclass_fields__) - set(TASK_NAMES.values())
                 - {"output_dir", "resume", "progress_bar", "lr_scheduler", "preview_every"})
    values = dict(values or {})
    unknown = sorted(set(values) - own - machinery)
    if unknown:
        raise StudioError(f"unknown {what} setting(s): {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(own | machinery))}")
    return ({k: v for k, v in values.items() if k in own}, {k: v for k, v in values.items() if k not in own})


def loop_settings(task_settings, machinery: dict[str, Any] | None = None, *, output_dir: str | Path | None = None,
                  resume: str | None = None, progress_bar: bool = False) -> LoopSettings:
    """The engine's settings for a task: its steps, lr, batch, seed (and warm-up) under the engine's names."""
    from studio.training import TrainingError

    values = {engine: getattr(task_settings, own) for own, engine in TASK_NAMES.items() if hasattr(task_settings, own)}
    values.update({**TASK_DEFAULTS, "progress_bar": progress_bar, **(machinery or {})})
    values.update(output_dir=str(output_dir) if output_dir else None, resume=resume)
    return from_values(LoopSettings, values, TrainingError, "training")


def run_folder(out: Path) -> Path:
    """Where a task writing `out` (a file) keeps its checkpoints and logs: <out without suffix>_run/ beside it."""
    return out.with_name(f"{out.stem}_run")


def checked_file(out: str | Path, what: str) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: {what} is written as a .safetensors file")
    if out.is_dir():
        raise StudioError(f"{out} is a folder; give the file to write")
    return out
