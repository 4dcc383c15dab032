"""`studio erase`: a membrane (SPM) trained through the training engine, data-free, on latents the model
denoises itself (any family: SD 1.x/2.x, SDXL, SD3, Flux); and the ESD-style baseline on the same loss (a UNet's
cross-attention).

    erase(["circle"], "runs/no_circle.safetensors", settings={"steps": 200, "checkpoint_every": 20})

Checkpoints and logs of a run writing OUT.safetensors go to OUT_run/ beside it; resume="latest" resumes the
newest checkpoint there (or any checkpoint folder given by path)."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from studio.adapters.base import base_fingerprint, denoiser, require_unet
from studio.adapters.denoise import denoiser_call, guidance_distilled
from studio.adapters.spm.config import EraseSettings, SpmConfig
from studio.adapters.spm.erase import (TRAINING_NAME, erase_config, erase_draw, erase_loss,
                                       erase_targets)
from studio.adapters.spm.model import SpmMethod
from studio.tasks.runs import checked_file, loop_settings, run_folder, split_settings
from studio.training import AdapterOutput, Engine, LoopSettings, Recipe, Share, Trainables, TrainResult

SETTINGS = EraseSettings  # the `settings` erase takes: front ends generate their fields from it


def default_prompts(pipe, concepts: list[str], n: int = 64, seed: int = 0) -> list[str]:
    """What the membrane is trained on when no prompts are given: on the embedded model, captions of its
    world that name each concept (a shape or colour); otherwise the concepts themselves (as the paper)."""
    if getattr(pipe, "studio_architecture", "") == "shapes":
        from studio.shapes import world

        prompts = [p for i, c in enumerate(concepts) for p in world.prompts_naming(c, n // len(concepts), seed + i)]
        if prompts:
            return prompts
    return list(concepts)


class EraseRecipe(Recipe):
    """A membrane on `pipe` (left attached under TRAINING_NAME) or, with `esd`, the UNet's cross-attention
    itself (fine-tuned in place, no anchors, no file)."""

    label = "erase"

    def __init__(self, pipe, config: SpmConfig, settings: EraseSettings, *, esd: bool = False) -> None:
        if esd:
            require_unet(pipe, "the ESD-x baseline (it fine-tunes a UNet's cross-attention)")
        self.pipe, self.config, self.settings, self.esd = pipe, config, settings, esd
        self.method = "esd" if esd else "spm"
        self.base = base_fingerprint(pipe)
        run = {k: v for k, v in asdict(settings).items() if k != "steps"}
        self.identity = {"method": self.method, "adapter": config.to_dict(), "settings": run, "base": self.base}

    def setup(self, accelerator) -> Trainables:
        pipe = self.pipe
        self.denoiser_name, model = denoiser(pipe)
        pipe.to(accelerator.device)
        self.was_training = model.training
        model.requires_grad_(False)
        if self.esd:
            self.frozen_unet = copy.deepcopy(model).eval()
            self.named = {n: p for n, p in model.named_parameters() if ".attn2." in n}
            params = list(self.named.values())
            for p in params:
                p.requires_grad_(True)
        else:
            self.membrane = SpmMethod()
            with torch.random.fork_rng():  # the membrane's initial down-projection comes from the seed
                torch.manual_seed(self.settings.seed)
                self.membrane.attach(pipe, self.config, TRAINING_NAME)
            params = self.membrane.trainable_parameters(pipe, TRAINING_NAME)
        self.params = params
        self.targets = erase_targets(pipe, self.config, self.settings)
        model.train()
        warmup = max(self.settings.warmup, 1)
        return Trainables(params, {self.denoiser_name: model}, lr_lambda=lambda step: min(1.0, step / warmup))

    def prepared(self, modules: dict[str, torch.nn.Module]) -> None:
        pipe, pixels = self.pipe, self.targets.pixels
        trained = denoiser_call(pipe, modules[self.denoiser_name], pixels)
        plain = denoiser_call(pipe, denoiser(pipe)[1], pixels)

        def student(x, t, text, pooled=None, grad: bool = True):  # DDP's forward only where gradients flow
            return (trained if grad else plain)(x, t, text, pooled)

        self.student = student
        if self.esd:
            self.frozen = denoiser_call(pipe, self.frozen_unet, pixels)
        else:
            def frozen(x, t, text, pooled=None):
                with self.membrane.disabled(self.pipe):
                    return plain(x, t, text, pooled)
            self.frozen = frozen

    def loss(self, step: int, share: Share, generator: torch.Generator) -> torch.Tensor:
        draw = erase_draw(self.targets, self.config, share.batch, generator, anchors=not self.esd)
        return erase_loss(self.student, self.frozen, self.targets, self.config, self.settings, draw, share.indices())

    def checkpoint_file(self) -> AdapterOutput:
        if self.esd:
            return AdapterOutput("esd", {}, {n: p.detach() for n, p in self.named.items()}, self.base)
        return AdapterOutput("spm", self.config, self.membrane.state_dict(self.pipe, TRAINING_NAME), self.base,
                             {"concepts": ", ".join(self.config.concepts)})

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.esd:
            with torch.no_grad():
                for name, p in self.named.items():
                    p.copy_(tensors[name])
        else:
            self.membrane.set_state(self.pipe, TRAINING_NAME, tensors)

    def finish(self) -> None:
        if self.esd:
            self.pipe.unet.eval().requires_grad_(False)
        else:
            denoiser(self.pipe)[1].train(self.was_training)
            for p in self.params:
                p.requires_grad_(False)

    def result_file(self) -> AdapterOutput | None:
        return None if self.esd else self.checkpoint_file()


def _engine(settings: EraseSettings, out: Path | None, loop: LoopSettings | None, on_event, on_step, should_stop,
            progress: bool) -> Engine:
    loop = loop or loop_settings(settings, progress_bar=progress)

    def events(event: dict) -> None:
        if on_step is not None and event["kind"] == "step":
            on_step(event["step"], event["loss"])
        if on_event is not None:
            on_event(event)

    return Engine(loop, adapter_path=out, training_config={**asdict(loop), **asdict(settings)}, on_event=events,
                  should_stop=should_stop)


def train_membrane(pipe, config: SpmConfig, settings: EraseSettings | None = None, out: str | Path | None = None,
                   *, progress: bool = False, on_step: Callable[[int, float], None] | None = None, should_stop=None,
                   loop: LoopSettings | None = None, on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train one membrane on `pipe` (which it leaves attached under TRAINING_NAME) through the engine and, with
    `out`, write it (method "spm"). `loop`: the engine's settings (default: from `settings`, no checkpoints)."""
    from studio.adapters.base import AdapterError

    settings = settings or EraseSettings()
    if not config.concepts:
        raise AdapterError("a membrane needs the concepts it erases (they set its per-prompt strength)")
    engine = _engine(settings, Path(out) if out else None, loop, on_event, on_step, should_stop, progress)
    return engine.run(EraseRecipe(pipe, config, settings))


def erase_esd(pipe, config: SpmConfig, settings: EraseSettings | None = None, *, progress: bool = False,
              on_step=None, should_stop=None) -> TrainResult:
    """The ESD-x baseline: fine-tune every cross-attention parameter of the UNet (in place) on the same
    erase target, without anchors and without per-prompt strength. Writes no file."""
    from studio.adapters.base import AdapterError

    settings = settings or EraseSettings()
    require_unet(pipe, "the ESD-x baseline (it fine-tunes a UNet's cross-attention)")
    if not any(".attn2." in n for n, _ in pipe.unet.named_parameters()):
        raise AdapterError("the UNet has no cross-attention (attn2) layers to fine-tune")
    engine = _engine(settings, None, None, None, on_step, should_stop, progress)
    return engine.run(EraseRecipe(pipe, config, settings, esd=True))


def erase(concepts: list[str], out: str | Path, *, model: str = "shapes", preset: str = "shapes",
          settings: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None, resume: str | None = None,
          on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          progress_bar: bool = False, load: dict[str, Any] | None = None) -> TrainResult:
    """Train a membrane erasing `concepts` on `model` and write it to `out` (a .safetensors file).
    `settings`: EraseSettings values over the preset's, and the engine's machinery settings (checkpoint_every,
    keep_checkpoints, mixed_precision, grad_accum, max_grad_norm, tensorboard, device); `adapter`: SpmConfig
    values; `load`: load_pipeline options (device, dtype, scheduler, config, offline). Checkpoints go to
    <out without suffix>_run/; `resume`: "latest" (that folder's newest; none yet is said with a log event and the
    run starts at step 0) or a checkpoint folder. Events as the engine's."""
    from studio.loading import load_pipeline

    out = checked_file(out, "a membrane")
    own, machinery = split_settings(settings, EraseSettings, "erase")
    config, run = erase_config(list(concepts), preset, settings=own, adapter=adapter)
    loop = loop_settings(run, machinery, output_dir=run_folder(out), resume=resume, progress_bar=progress_bar)
    pipe = load_pipeline(model, **(load or {}))
    if "sample_guidance" not in own and guidance_distilled(pipe):
        run.sample_guidance = 1.0  # Flux reads its guidance as an input; CFG on top is not how it samples
    if not config.prompts:
        config.prompts = default_prompts(pipe, config.concepts, seed=run.seed)
    return train_membrane(pipe, config, run, out, loop=loop, on_event=on_event, should_stop=should_stop)
