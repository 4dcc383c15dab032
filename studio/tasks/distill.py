"""`studio distill`: teacher pairs (cached), then the one-step HiPA adaptor trained on them. The pieces are
in adapters/hipa; this picks the prompts and the perceptual network for the model at hand."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

from studio.adapters.base import AdapterError
from studio.adapters.hipa.config import DistillSettings, HipaConfig
from studio.adapters.hipa.distill import DistillResult, TeacherPairs, make_teacher_pairs
from studio.adapters.hipa.distill import distill as distill_adaptor
from studio.loading import StudioError
from studio.training.engine import TrainResult

SETTINGS = DistillSettings
PROMPT_SEED = 20_261_125


def distill_prompts(pipe, n: int, prompts_file: str | Path | None = None, seed: int = PROMPT_SEED) -> list[str]:
    """The teacher's prompts: lines of `prompts_file` (cycled to n), or on the embedded model n captions of
    its world (pretraining attribute combinations; B4 judges held-out ones)."""
    if prompts_file:
        path = Path(prompts_file)
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except FileNotFoundError:
            raise StudioError(f"{path}: no such prompts file") from None
        except UnicodeDecodeError as e:
            raise StudioError(f"{path}: not UTF-8 text (byte {e.start}); save the prompts as UTF-8") from None
        if not lines:
            raise StudioError(f"{path}: no prompts in the file (one per line)")
        return [lines[i % len(lines)] for i in range(n)]
    if getattr(pipe, "studio_architecture", "") != "shapes":
        raise StudioError("distilling this model needs prompts: pass --prompts FILE (one prompt per line)")
    from studio.shapes import world

    rng = random.Random(seed)
    return [world.caption(world.random_spec(rng)) for _ in range(n)]


def judge_for(pipe):
    """The network the losses read on the embedded model: its judge (for the LPIPS-style perceptual distance,
    and the optional adversarial term's discriminator features). None elsewhere: no such network ships that
    runs offline on real images, so the spatial term is pixels only and the adversarial term is refused."""
    if getattr(pipe, "studio_architecture", "") != "shapes":
        return None
    from studio.shapes.judge import load_judge

    return load_judge()


def teacher_pairs(pipe, settings: DistillSettings, prompts: list[str], cache: str | Path | None = None, *,
                  progress: bool = False, log=print, on_batch=None) -> TeacherPairs:
    """Load the cached pairs when they were made by this model with these teacher settings, else make them
    (and cache them)."""
    if cache and Path(cache).is_file():
        try:
            pairs = TeacherPairs.load(cache)
        except AdapterError as e:
            log(f"{e}; making them again")
        else:
            if pairs.fits(pipe, settings) and pairs.prompts[:settings.pairs] == prompts[:settings.pairs]:
                log(f"teacher pairs: {settings.pairs} from {cache}")
                return pairs
            log(f"{cache}: made by another model, teacher setting or prompt list; making them again")
    pairs = make_teacher_pairs(pipe, prompts[:settings.pairs], settings, progress=progress, on_batch=on_batch)
    if cache:
        pairs.save(cache)
    return pairs


def run_distill(pipe, settings: DistillSettings, out: str | Path, *, rank: int = 4, prompts_file=None,
                cache: str | Path | None = None, progress: bool = False, log=print, on_teacher=None, on_step=None,
                should_stop=None) -> DistillResult:
    """Teacher pairs (from `cache` when they fit), then the adaptor written to `out`. `on_teacher(done, total)`
    reports the teacher's images, `on_step(step, loss)` the student's steps."""
    from studio.adapters.hipa.schedule import last_timestep

    settings.validate()
    prompts = distill_prompts(pipe, settings.pairs, prompts_file)
    pairs = teacher_pairs(pipe, settings, prompts, cache, progress=progress, log=log, on_batch=on_teacher)
    config = HipaConfig(rank=rank, timestep=last_timestep(pipe.scheduler.config))
    judge = judge_for(pipe)
    perceptual = features = None
    if judge is not None:
        from studio.shapes.judge import perceptual_distance, stage_features

        perceptual = perceptual_distance(judge)
        features = stage_features(judge) if settings.adversarial_weight else None
    return distill_adaptor(pipe, config, settings, pairs, out, perceptual=perceptual, features=features, progress=progress,
                   on_step=on_step, should_stop=should_stop)


def distill(out: str | Path, *, model: str = "shapes", settings: dict[str, Any] | None = None, rank: int = 4,
            prompts_file: str | Path | None = None, cache: str | Path | None = None, resume: str | None = None,
            on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
            progress_bar: bool = False) -> TrainResult:
    """Train a one-step adaptor for `model` and write it to `out`; the teacher pairs are cached in `cache`
    (default: <out>.teacher.safetensors). `settings`: DistillSettings values. Events as the engine's, plus
    {"kind": "phase", "message"} while the teacher draws."""
    from studio.adapters.hipa.config import DistillSettings
    from studio.loading import load_pipeline
    from studio.utils.settings import from_values

    on_event = on_event or (lambda event: None)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: a one-step adaptor is written as a .safetensors file")
    if resume:
        raise StudioError("distill cannot resume yet")  # the engine move brings it
    run = from_values(DistillSettings, dict(settings or {}), StudioError, "distill")
    cache = Path(cache) if cache else out.with_name(f"{out.stem}.teacher.safetensors")
    started: list[float] = []

    def on_teacher(done: int, total: int) -> None:
        on_event({"kind": "phase", "message": f"teacher images {done}/{total}"})

    def on_step(step: int, loss: float) -> None:
        started.append(time.perf_counter()) if not started else None
        eta = (time.perf_counter() - started[0]) / step * (run.steps - step)
        on_event({"kind": "step", "step": step, "steps": run.steps, "loss": loss, "eta_seconds": eta})

    result = run_distill(load_pipeline(model), run, out, rank=rank, prompts_file=prompts_file, cache=cache,
                         progress=progress_bar, log=lambda message: on_event({"kind": "log", "message": message}),
                         on_teacher=on_teacher, on_step=on_step, should_stop=should_stop)
    stopped = result.steps < run.steps
    on_event({"kind": "done", "step": result.steps, "adapter": str(out), "stopped": stopped})
    return TrainResult(out, result.steps, result.last_loss, result.seconds, result.trainable_parameters, stopped)
