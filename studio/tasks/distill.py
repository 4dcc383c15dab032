"""`studio distill`: teacher pairs (cached), then the one-step HiPA adaptor trained on them through the training
engine. The pieces are in studio/adapters/hipa; this picks the prompts, and gives the perceptual term and the
discriminator the model's own frozen VAE encoder as their feature network (never the benchmarks' judge).

Checkpoints and logs of a run writing OUT.safetensors go to OUT_run/ beside it; resume="latest" resumes the
newest checkpoint there (or any checkpoint folder given by path). The teacher pairs are made (or read from
their cache) before the loop, so a resumed run reads them from the cache."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from studio.adapters.base import AdapterError, base_fingerprint, denoiser
from studio.adapters.hipa.config import DistillSettings, HipaConfig
from studio.adapters.hipa.distill import (TRAINING_NAME, Perceptual, TeacherPairs, check_distill, discriminator_step,
                                          encode_prompts, lr_factor, make_discriminator, make_teacher_pairs,
                                          pair_indices, student_loss)
from studio.adapters.hipa.adversarial import Features
from studio.adapters.hipa.features import feature_distance, vae_stage_features
from studio.adapters.hipa.model import HipaMethod
from studio.loading import StudioError
from studio.tasks.runs import checked_file, loop_settings, run_folder, split_settings
from studio.training import AdapterOutput, Engine, LoopSettings, Recipe, Share, Trainables, TrainingError, TrainResult

PROMPT_SEED = 20_261_125
SETTINGS = DistillSettings  # the `settings` distill takes: front ends generate their fields from it


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


class DistillRecipe(Recipe):
    """The HiPA adaptor on `pipe` (left attached under TRAINING_NAME), trained on `pairs`; with EMA the file and the
    pipeline hold the average; with the adversarial term a discriminator trains beside it (one process only)."""

    method = "hipa"
    label = "distill"

    def __init__(self, pipe, config: HipaConfig, settings: DistillSettings, pairs: TeacherPairs, *,
                 perceptual: Perceptual | None = None, features: Features | None = None) -> None:
        check_distill(pipe, config, settings, pairs, features)
        self.pipe, self.config, self.settings, self.pairs = pipe, config, settings, pairs
        self.perceptual, self.features = perceptual, features
        self.n = min(settings.pairs, len(pairs.prompts))
        self.base = base_fingerprint(pipe)
        run = {k: v for k, v in asdict(settings).items() if k != "steps"}
        self.identity = {"method": "hipa", "adapter": config.to_dict(), "settings": run, "base": self.base,
                         "teacher": [pairs.steps, pairs.guidance, pairs.prompts[:self.n]]}
        self.ema = self.disc = self.disc_optimizer = None

    def setup(self, accelerator) -> Trainables:
        pipe, settings = self.pipe, self.settings
        if settings.adversarial_weight and accelerator.num_processes > 1:
            raise TrainingError("the adversarial term's discriminator trains on one process: run without "
                                "accelerate launch, or set adversarial_weight=0")
        pipe.to(accelerator.device)
        self.adaptor = HipaMethod()
        with torch.random.fork_rng():  # the adaptor's initial down-projections come from the seed
            torch.manual_seed(settings.seed)
            self.adaptor.attach(pipe, self.config, TRAINING_NAME)
        self.params = self.adaptor.trainable_parameters(pipe, TRAINING_NAME)
        self.denoiser_name, model = denoiser(pipe)
        for name in (self.denoiser_name, "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.embeds = encode_prompts(pipe, self.pairs.prompts[:self.n])
        if settings.adversarial_weight:
            self.disc, self.disc_optimizer = make_discriminator(pipe, settings, self.pairs, self.features,
                                                                self.embeds.hidden.shape[-1])
        if settings.ema_decay:  # (its decay warms up as (1 + step) / (10 + step) until it reaches ema_decay)
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=settings.ema_decay, foreach=True)
        model.train()
        return Trainables(self.params, {self.denoiser_name: model}, lr_lambda=lr_factor(settings))

    def prepared(self, modules: dict[str, torch.nn.Module]) -> None:
        self.model = modules[self.denoiser_name]

    def loss(self, step: int, share: Share, generator: torch.Generator) -> torch.Tensor:
        idx = pair_indices(self.n, share.batch, self.settings.seed, step)[share.rows]
        loss, self.seen = student_loss(self.pipe, self.model, self.config, self.settings, self.pairs, self.embeds, idx,
                                       perceptual=self.perceptual, features=self.features, discriminator=self.disc)
        return loss * len(share) / share.batch

    def after_step(self, step: int, optimizer) -> str | None:
        if self.ema is not None:
            self.ema.step(self.params)
        if self.disc is not None:  # then the discriminator, on the same batch
            discriminator_step(self.disc, self.disc_optimizer, self.features, self.seen)
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.ema is not None:
            out.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
            out["ema_steps"] = torch.tensor(self.ema.optimization_step)
        if self.disc is not None:
            out.update({f"disc.{k}": v for k, v in self.disc.state_dict().items()})
            for pid, entries in self.disc_optimizer.state_dict()["state"].items():
                out.update({f"disc_opt.{pid}.{k}": torch.as_tensor(v) for k, v in entries.items()})
        return out

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for i, p in enumerate(self.ema.shadow_params):
                    p.copy_(tensors[f"ema.{i}"])
            self.ema.optimization_step = int(tensors["ema_steps"])
        if self.disc is not None:
            self.disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("disc_opt."):
                    _, pid, name = key.split(".", 2)
                    state.setdefault(int(pid), {})[name] = value
            groups = self.disc_optimizer.state_dict()["param_groups"]
            self.disc_optimizer.load_state_dict({"state": state, "param_groups": groups})

    def checkpoint_file(self) -> AdapterOutput:
        s, pairs = self.settings, self.pairs
        return AdapterOutput("hipa", self.config, self.adaptor.state_dict(self.pipe, TRAINING_NAME), self.base,
                             {"teacher_steps": str(pairs.steps), "teacher_guidance": str(pairs.guidance),
                              "high_frequency_loss": str(s.high_frequency).lower(),
                              "distill_settings": json.dumps(s.__dict__, sort_keys=True),
                              "adversarial_term": str(bool(s.adversarial_weight)).lower()})

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.adaptor.set_state(self.pipe, TRAINING_NAME, tensors)

    def finish(self) -> None:
        denoiser(self.pipe)[1].eval()
        for p in self.params:
            p.requires_grad_(False)
        if self.ema is not None and self.ema.optimization_step:
            self.ema.copy_to(self.params)  # what the file holds and the pipeline keeps


def _engine(settings: DistillSettings, out: Path | None, loop: LoopSettings | None, on_event, on_step, should_stop,
            progress: bool) -> Engine:
    loop = loop or loop_settings(settings, progress_bar=progress)

    def events(event: dict) -> None:
        if on_step is not None and event["kind"] == "step":
            on_step(event["step"], event["loss"])
        if on_event is not None:
            on_event(event)

    return Engine(loop, adapter_path=out, training_config={**asdict(loop), **asdict(settings)}, on_event=events,
                  should_stop=should_stop)


def distill_adaptor(pipe, config: HipaConfig, settings: DistillSettings, pairs: TeacherPairs,
                    out: str | Path | None = None, *, perceptual: Perceptual | None = None,
                    features: Features | None = None, progress: bool = False,
                    on_step: Callable[[int, float], None] | None = None, should_stop=None,
                    loop: LoopSettings | None = None, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the adaptor on `pipe` (left attached under TRAINING_NAME) through the engine and, with `out`, write
    it (method "hipa"). `features` (a frozen network's stage activations) is what the adversarial term's
    discriminator reads. `loop`: the engine's settings (default: from `settings`, no checkpoints)."""
    recipe = DistillRecipe(pipe, config, settings, pairs, perceptual=perceptual, features=features)
    return _engine(settings, Path(out) if out else None, loop, on_event, on_step, should_stop, progress).run(recipe)


def run_distill(pipe, settings: DistillSettings, out: str | Path, *, rank: int = 4, prompts_file=None,
                cache: str | Path | None = None, progress: bool = False, log=print, on_teacher=None, on_step=None,
                should_stop=None, loop: LoopSettings | None = None,
                on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Teacher pairs (from `cache` when they fit), then the adaptor written to `out`. `on_teacher(done, total)`
    reports the teacher's images, `on_step(step, loss)` the student's steps."""
    from studio.adapters.hipa.schedule import one_step_timestep

    settings.validate()
    prompts = distill_prompts(pipe, settings.pairs, prompts_file)
    pairs = teacher_pairs(pipe, settings, prompts, cache, progress=progress, log=log, on_batch=on_teacher)
    config = HipaConfig(rank=rank, timestep=one_step_timestep(pipe))
    features = vae_stage_features(pipe.vae)  # the model's own VAE encoder, never the benchmarks' judge
    perceptual = feature_distance(features)
    return distill_adaptor(pipe, config, settings, pairs, out, perceptual=perceptual, features=features,
                           progress=progress, on_step=on_step, should_stop=should_stop, loop=loop, on_event=on_event)


def distill(out: str | Path, *, model: str = "shapes", settings: dict[str, Any] | None = None, rank: int = 4,
            prompts_file: str | Path | None = None, cache: str | Path | None = None, resume: str | None = None,
            on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
            progress_bar: bool = False, load: dict[str, Any] | None = None) -> TrainResult:
    """Train a one-step adaptor for `model` and write it to `out`; the teacher pairs are cached in `cache`
    (default: <out>.teacher.safetensors). `settings`: DistillSettings values and the engine's machinery settings
    (checkpoint_every, keep_checkpoints, mixed_precision, grad_accum, max_grad_norm, tensorboard, device);
    `load`: load_pipeline options (device, dtype, scheduler, config, offline). Checkpoints go to
    <out without suffix>_run/; `resume`: "latest" (that folder's newest; none yet is said with a log event and the
    run starts at step 0) or a checkpoint folder. Events as the engine's, plus
    {"kind": "phase", "message"} while the teacher draws."""
    from studio.loading import load_pipeline
    from studio.utils.settings import from_values

    on_event = on_event or (lambda event: None)
    out = checked_file(out, "a one-step adaptor")
    own, machinery = split_settings(settings, DistillSettings, "distill")
    run = from_values(DistillSettings, own, StudioError, "distill")
    try:
        run.validate()
    except AdapterError as e:
        raise StudioError(str(e)) from None
    loop = loop_settings(run, machinery, output_dir=run_folder(out), resume=resume, progress_bar=progress_bar)
    cache = Path(cache) if cache else out.with_name(f"{out.stem}.teacher.safetensors")

    def on_teacher(done: int, total: int) -> None:
        on_event({"kind": "phase", "message": f"teacher images {done}/{total}"})

    pipe = load_pipeline(model, **(load or {}))
    return run_distill(pipe, run, out, rank=rank, prompts_file=prompts_file, cache=cache,
                       progress=progress_bar, log=lambda message: on_event({"kind": "log", "message": message}),
                       on_teacher=on_teacher, loop=loop, on_event=on_event, should_stop=should_stop)
