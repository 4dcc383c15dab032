"""`studio erase`: what a membrane is trained on when the user names only concepts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from studio.adapters.spm.config import EraseSettings
from studio.training.engine import TrainResult

SETTINGS = EraseSettings


def default_prompts(pipe, concepts: list[str], n: int = 64, seed: int = 0) -> list[str]:
    """What the membrane is trained on when no prompts are given: on the embedded model, captions of its
    world that name each concept (a shape or colour); otherwise the concepts themselves (as the paper)."""
    if getattr(pipe, "studio_architecture", "") == "shapes":
        from studio.shapes import world

        prompts = [p for i, c in enumerate(concepts) for p in world.prompts_naming(c, n // len(concepts), seed + i)]
        if prompts:
            return prompts
    return list(concepts)


def erase(concepts: list[str], out: str | Path, *, model: str = "shapes", preset: str = "shapes",
          settings: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, resume: str | None = None,
          on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          progress_bar: bool = False) -> TrainResult:
    """Train a membrane erasing `concepts` on `model` and write it to `out` (a .safetensors file).
    `settings`: EraseSettings values over the preset's; `adapter`: SpmConfig values. Events as the engine's."""
    from studio.adapters.spm.erase import erase_config, train_membrane
    from studio.loading import StudioError, load_pipeline

    on_event = on_event or (lambda event: None)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: a membrane is written as a .safetensors file")
    if resume:
        raise StudioError("erase cannot resume yet")  # the engine move brings it
    config, run = erase_config(list(concepts), preset, settings=settings, adapter=adapter)
    pipe = load_pipeline(model)
    if not config.prompts:
        config.prompts = default_prompts(pipe, config.concepts, seed=run.seed)
    started = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        eta = (time.perf_counter() - started) / step * (run.steps - step)
        on_event({"kind": "step", "step": step, "steps": run.steps, "loss": loss, "eta_seconds": eta})

    result = train_membrane(pipe, config, run, out, progress=progress_bar, on_step=on_step, should_stop=should_stop)
    stopped = result.steps < run.steps
    on_event({"kind": "done", "step": result.steps, "adapter": str(out), "stopped": stopped})
    return TrainResult(out, result.steps, result.last_loss, result.seconds, result.trainable_parameters, stopped)
