"""The training engine, shared by every adapter method (it knows none by name): data checked and cached,
accelerate for devices, precision and processes, previews, atomic checkpoints and exact resume.

Randomness is a function of (seed, step): the batch order, the noise, the timesteps and the global RNG
(dropout) are re-derived at every step, so a resumed run and a run split over processes draw exactly
what an uninterrupted single-process run draws."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml

from studio import data
from studio.adapters.base import token_ids
from studio.adapters.trigger import (TRIGGER_KEY, TriggerEmbedding, attach_trigger_embedding,
                                    detach_trigger_embedding, trigger_tensors)
from studio.utils.files import atomic_dir, atomic_path
from studio.loading import StudioError

CHECKPOINT_PREFIX = "step_"


class TrainingError(StudioError):
    """Training cannot go on; the message says why and what was kept."""


@dataclass
class TrainConfig:
    # what to train
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)  # the method's settings, e.g. {"rank": 8}
    model: str = "shapes"
    name: str = "concept"
    output_dir: str = "runs/concept"
    # data
    data: str | None = None
    images: list[str] = field(default_factory=list)  # explicit image files instead of a folder
    trigger: str | None = None
    instance_prompt: str | None = None
    # pivotal tuning: the trigger becomes a new token whose embedding trains beside the adapter
    trigger_token: bool = False
    trigger_token_lr: float | None = None    # None: lr
    trigger_token_init: str | None = None    # words whose mean embedding starts it; None: the trigger's old tokens
    skip_bad_images: bool = False
    control_data: str | None = None  # control images named as the training images (control methods)
    resolution: int | None = None   # None: the model's native size
    buckets: bool = True
    # prior preservation
    prior_preservation: bool = False
    class_prompts: list[str] = field(default_factory=list)  # drawn in turn by the base model
    class_data_dir: str | None = None
    num_class_images: int = 32
    prior_loss_weight: float = 1.0
    prior_target: str = "noise"     # noise (DreamBooth) | base: match the base model's own prediction
    # optimisation
    steps: int = 400
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"        # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None  # Min-SNR weighting (Hang et al. 2023)
    x0_weighting: bool = False      # weight each sample by its error in x0 space (1/SNR), normalised to mean 1
    # timestep sampling, as diffusers' train scripts: "later"/"earlier" favour the last/first `portion` of the
    # timesteps, "range" the timesteps begin..end-1; the favoured ones are drawn `multiplier` times as often
    timestep_bias: str = "none"     # none | later | earlier | range
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    seed: int = 0
    # machinery
    mixed_precision: str = "no"     # no | fp16 | bf16
    gradient_checkpointing: bool = False
    vae_sample: bool = False        # train on latent_dist samples instead of its mean (what the base model saw)
    device: str | None = None       # None: what accelerate picks
    # previews, checkpoints, logs
    preview_every: int = 100
    preview_prompts: list[str] = field(default_factory=list)
    preview_steps: int = 20
    preview_guidance: float = 5.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str | None = None       # "latest" or a checkpoint folder
    tensorboard: bool = True
    progress_bar: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        from studio.utils.settings import from_values

        return from_values(cls, values, TrainingError, "training")

    @classmethod
    def read_yaml(cls, path: str | Path) -> dict[str, Any]:
        """The settings a YAML config names (only those: the rest keep their defaults or the preset's)."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise TrainingError(f"{path}: not a readable YAML config ({exc})") from None
        if not isinstance(values, dict):
            raise TrainingError(f"{path}: a training config is a mapping of setting: value")
        cls.from_dict(values)  # unknown or ill-typed settings are named now
        return values

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        return cls.from_dict({**cls.read_yaml(path), **overrides})

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def validate(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "preview_steps", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise TrainingError(f"lr must be a positive number, got {self.lr}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.prior_target not in ("noise", "base"):
            raise TrainingError(f"prior_target must be noise or base, got {self.prior_target!r}")
        if self.timestep_bias not in ("none", "later", "earlier", "range"):
            raise TrainingError(f"timestep_bias must be none, later, earlier or range, got {self.timestep_bias!r}")
        if self.timestep_bias != "none":
            if not self.timestep_bias_multiplier > 0:
                raise TrainingError(f"timestep_bias_multiplier must be positive, got {self.timestep_bias_multiplier}")
            if not 0 < self.timestep_bias_portion <= 1:
                raise TrainingError(f"timestep_bias_portion must be in (0, 1], got {self.timestep_bias_portion}")
            if self.timestep_bias == "range" and not 0 <= self.timestep_bias_begin < self.timestep_bias_end:
                raise TrainingError(f"timestep_bias_begin..end must be a non-empty range of timesteps, got "
                                    f"{self.timestep_bias_begin}..{self.timestep_bias_end}")
        if self.x0_weighting and self.snr_gamma:
            raise TrainingError("x0_weighting and snr_gamma are two loss weightings: choose one")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise TrainingError(f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        from studio.adapters import AdapterError, get_method

        try:
            trainer = get_method(self.method).trained_by
        except AdapterError as e:
            raise TrainingError(str(e)) from None
        if trainer:
            raise TrainingError(f"{self.method} adapters are not concept adapters: train them with `{trainer}`")
        if not self.data and not self.images:
            raise TrainingError("no training data: give a folder (--data) or image files")
        conditioned = get_method(self.method).conditioned
        if conditioned and not self.control_data:
            raise TrainingError(f"{self.method} trains on control images: give their folder (--control-data), "
                                "one image named as each training image")
        if self.control_data and not conditioned:
            raise TrainingError(f"{self.method} adapters take no control images; --control-data is for control methods")
        if self.trigger_token and not self.trigger:
            raise TrainingError("trigger_token trains the trigger word as a new token: give the trigger (--trigger sks)")
        if self.prior_preservation and not self.class_prompts and not self.class_data_dir:
            raise TrainingError("prior preservation needs class prompts (--class-prompts 'a photo of a dog') "
                                "or a folder of class images (--class-data-dir)")


# Presets hold what a newcomer should not have to choose. Tuned on the embedded model with `studio bench concept`.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"steps": 300, "batch_size": 4, "lr_scheduler": "cosine", "lr_warmup_steps": 20,
              "preview_every": 100, "checkpoint_every": 100},
    "standard": {"steps": 1000, "batch_size": 4, "lr_scheduler": "cosine", "lr_warmup_steps": 50,
                 "preview_every": 250, "checkpoint_every": 250},
}  # each method adds its own part (learning rate, adapter size): AdapterMethod.presets


def config_with_preset(preset: str | None, **values) -> TrainConfig:
    """Preset values first (the engine's, then the method's), then every explicitly given value on top."""
    from studio.adapters import AdapterError, get_method

    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise TrainingError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        try:
            method = get_method(values.get("method") or TrainConfig.method)
        except AdapterError as e:
            raise TrainingError(str(e)) from None
        for part in (PRESETS[preset], method.presets.get(preset, {})):
            merged.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in part.items()})
    for key, value in values.items():
        if key == "adapter" and isinstance(value, dict):
            merged["adapter"] = {**merged.get("adapter", {}), **value}
        else:
            merged[key] = value
    return TrainConfig.from_dict(merged)


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    final_loss: float
    seconds: float
    trainable_parameters: int
    stopped: bool = False


# ---- randomness as a function of (seed, step) ----

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def global_batch(buckets: list[int], batch: int, seed: int, step: int) -> list[int]:
    per_epoch = data.batches_per_epoch(buckets, batch)
    epoch, index = divmod(step - 1, per_epoch)
    return data.batch_plan(buckets, batch, seed, epoch)[index]


# ---- the denoising objective ----

def timestep_weights(config: TrainConfig, num_timesteps: int) -> torch.Tensor | None:
    """Relative probability of each timestep under `config`'s timestep bias (None: uniform)."""
    if config.timestep_bias == "none" or config.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps)
    portion = max(1, round(num_timesteps * config.timestep_bias_portion))
    favoured = {"later": slice(num_timesteps - portion, None), "earlier": slice(0, portion),
                "range": slice(config.timestep_bias_begin, min(config.timestep_bias_end, num_timesteps))}
    weights[favoured[config.timestep_bias]] *= config.timestep_bias_multiplier
    return weights / weights.sum()


def sample_timesteps(weights: torch.Tensor | None, num_timesteps: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if weights is None:
        return torch.randint(0, num_timesteps, (n,), generator=gen)
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def signal_to_noise(scheduler) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for every training timestep of a DDPM-style scheduler."""
    alphas = scheduler.alphas_cumprod.float()
    return alphas / (1 - alphas)


def x0_weights(scheduler, timesteps: torch.Tensor, probabilities: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss weights that turn the noise (or velocity) error into the x0 error: 1/SNR (1/(SNR+1) for v),
    divided by its mean under the timestep distribution, so the loss keeps its scale."""
    snr = signal_to_noise(scheduler)
    weight = 1 / (snr + (scheduler.config.prediction_type == "v_prediction"))
    mean = weight.mean() if probabilities is None else (weight * probabilities).sum()
    return (weight / mean).to(timesteps.device)[timesteps]


def denoising_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, snr_gamma: float | None = None, teacher=None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE to the noise (or velocity) target; with `teacher` (a callable like the UNet's forward), to the
    teacher's prediction at the same noisy latents instead. `weights`: per-sample loss weights (x0_weights)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
    if teacher is not None:
        with torch.no_grad():
            target = teacher(noisy, timesteps, text)
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = signal_to_noise(scheduler).to(timesteps.device)[timesteps]
        weight = torch.clamp(snr, max=snr_gamma) / (snr + (scheduler.config.prediction_type == "v_prediction"))
        per_sample = per_sample * weight
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


# ---- checkpoints ----

def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                   and (p / "state.json").is_file()), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in info["plain"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


class Trainer:
    """One training run. `on_event` receives dicts: {"kind": "step"|"preview"|"checkpoint"|"log"|"done", ...};
    `should_stop()` is polled every step (the UI's Stop button): the run then checkpoints and returns."""

    def __init__(self, config: TrainConfig, on_event: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        config.validate()
        self.config = config
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        self.out = Path(config.output_dir)

    # -- set-up --

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        log_with = None
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401

                log_with = "tensorboard"
            except ImportError:
                pass
        cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
        # one process may run many trainings (the UI, tests): the precision is per run, the process group is kept
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, log_with=log_with,
                           project_config=ProjectConfiguration(project_dir=str(self.out),
                                                               logging_dir=str(self.out / "logs")))

    def _examples(self, resolution: int) -> list[data.Example]:
        cfg = self.config
        kwargs = dict(trigger=cfg.trigger, instance_prompt=cfg.instance_prompt, skip_bad=cfg.skip_bad_images,
                      min_size=max(8, resolution // 4),
                      warn=lambda message: self.on_event({"kind": "log", "message": message}))
        if cfg.images:
            return data.load_examples([Path(p) for p in cfg.images], **kwargs)
        return data.scan_folder(cfg.data, **kwargs)

    def _class_examples(self, pipe, resolution: int, device) -> list[data.Example]:
        """Prior-preservation images: the class prompts drawn in turn by the base model, each saved with its
        caption and kept for reuse (or a folder of class images with captions given by the user)."""
        cfg = self.config
        folder = Path(cfg.class_data_dir) if cfg.class_data_dir else self.out / "class_images"
        folder.mkdir(parents=True, exist_ok=True)
        have = sorted(folder.glob("*.png"))
        missing = cfg.num_class_images - len(have) if cfg.class_prompts else 0
        if missing > 0 and self.accelerator.is_main_process:
            self.on_event({"kind": "log", "message": f"drawing {missing} class images with the base model"})
            start = len(have)
            for i in range(0, missing, 8):
                numbers = range(start + i, start + i + min(8, missing - i))
                prompts = [cfg.class_prompts[k % len(cfg.class_prompts)] for k in numbers]
                images = pipe(prompts, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_guidance,
                              generator=[torch.Generator().manual_seed(cfg.seed * 7919 + k) for k in numbers],
                              height=resolution, width=resolution).images
                for k, prompt, image in zip(numbers, prompts, images):
                    with atomic_path(folder / f"class_{k:05d}.txt") as tmp:
                        tmp.write_text(prompt, encoding="utf-8")
                    with atomic_path(folder / f"class_{k:05d}.png") as tmp:
                        image.save(tmp, format="PNG")
        self.accelerator.wait_for_everyone()
        paths = sorted(folder.glob("*.png"))[:cfg.num_class_images]
        if not paths:
            raise TrainingError(f"no class images in {folder}")
        fallback = cfg.class_prompts[0] if cfg.class_prompts else None
        return data.load_examples(paths, instance_prompt=fallback, min_size=8)

    @torch.no_grad()
    def _encode(self, pipe, examples: list[data.Example], resolution: int, device, control: bool = False
                ) -> dict[str, Any]:
        """Latent distribution (mean, std), bucket and caption per example (and its control image in [0, 1])."""
        sizes = [data.bucket_size(*ex.image.size, resolution) if self.config.buckets else (resolution, resolution)
                 for ex in examples]
        bucket_ids = {size: i for i, size in enumerate(sorted(set(sizes)))}
        means, stds = [], []
        for ex, size in zip(examples, sizes):
            pixels = data.to_bucket(ex.image, size).unsqueeze(0).to(device, pipe.vae.dtype)
            dist = pipe.vae.encode(pixels).latent_dist
            means.append(dist.mean[0].float().cpu())
            stds.append(dist.std[0].float().cpu())
        out = {"mean": means, "std": stds, "bucket": [bucket_ids[s] for s in sizes],
               "captions": [ex.caption for ex in examples]}
        if control:
            out["control"] = [[(data.to_bucket(image, size) + 1) / 2 for image in images]
                              for images, size in zip(data.control_inputs(examples, self.config.control_data), sizes)]
        return out

    # -- the run --

    def run(self) -> TrainResult:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from tqdm.auto import tqdm

        from studio.adapters import base_fingerprint, get_method, save_adapter
        from studio.loading import architecture, load_pipeline

        cfg = self.config
        started = time.perf_counter()
        self.accelerator = acc = self._accelerator()
        device = acc.device
        world = acc.num_processes
        if cfg.batch_size % world:
            raise TrainingError(f"batch_size {cfg.batch_size} does not split over {world} processes")
        method = get_method(cfg.method)
        adapter_config = method.config_class.from_dict(cfg.adapter)

        pipe = load_pipeline(cfg.model, device="cpu")
        resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        examples = self._examples(resolution)  # before any long work: bad data fails fast
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(cfg.to_yaml(), encoding="utf-8")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        class_examples = self._class_examples(pipe, resolution, device) if cfg.prior_preservation else []

        cache = self._encode(pipe, examples, resolution, device, control=bool(cfg.control_data))
        self.first_caption = cache["captions"][0]
        class_cache = self._encode(pipe, class_examples, resolution, device) if class_examples else None

        base = base_fingerprint(pipe)
        torch.manual_seed(cfg.seed)  # the adapter's initial weights depend on the seed only
        method.attach(pipe, adapter_config, cfg.name)
        params = method.trainable_parameters(pipe, cfg.name)
        if not params:
            raise TrainingError(f"the {cfg.method} adapter has no trainable parameters on this model")
        n_trainable = sum(p.numel() for p in params)
        trigger_vector = self._attach_trigger_token(pipe)
        n_trainable += trigger_vector.numel() if trigger_vector is not None else 0
        train_text = any(p.requires_grad for p in pipe.text_encoder.parameters())
        if not train_text:
            with torch.no_grad():
                text_cache = {c: e for c, e in zip(cache["captions"], self._embed_all(pipe, cache["captions"], device))}
                if class_cache:
                    text_cache.update(zip(class_cache["captions"], self._embed_all(pipe, class_cache["captions"], device)))
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if train_text:
                pipe.text_encoder.gradient_checkpointing_enable()

        optimizer = (method.optimizer(pipe, cfg.name, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      kind=cfg.optimizer) or self._optimizer(params))
        if trigger_vector is not None:
            optimizer.add_param_group({"params": [trigger_vector], "lr": cfg.trigger_token_lr or cfg.lr,
                                       "weight_decay": 0.0})
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.steps)
        unet = acc.prepare(pipe.unet)
        text_encoder = acc.prepare(pipe.text_encoder) if train_text else pipe.text_encoder
        optimizer = acc.prepare(optimizer)  # the LR schedule is stepped by hand: once per global step
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        t_weights = timestep_weights(cfg, noise_scheduler.config.num_train_timesteps)

        start_step = 0
        resume_from = self._resume_dir()
        if resume_from is not None:
            start_step = self._load_checkpoint(resume_from, pipe, method, optimizer, lr_scheduler)
        if cfg.tensorboard and acc.log_with:
            acc.init_trackers("studio", config={k: v for k, v in asdict(cfg).items()
                                                if isinstance(v, (int, float, str, bool))})

        def encode_text(captions: list[str]) -> torch.Tensor:
            if train_text:
                return text_encoder(token_ids(pipe, captions).to(device))[0]
            return torch.stack([text_cache[c] for c in captions])

        def base_prediction(noisy, timesteps, text):
            with method.disabled(pipe):
                return unet(noisy, timesteps, encoder_hidden_states=text).sample

        def batch_loss(source: dict, indices: list[int], gen: torch.Generator, teacher=None,
                       part: slice = slice(None)) -> torch.Tensor:
            # the step's randomness is drawn for the whole batch and `part` (a micro-batch) sliced from it:
            # accumulating micro-batches trains exactly as the whole batch at once
            mean = torch.stack([source["mean"][i] for i in indices])
            std = torch.stack([source["std"][i] for i in indices])
            eps = torch.randn(mean.shape, generator=gen)
            if not cfg.vae_sample:
                eps.zero_()
            noise = torch.randn(mean.shape, generator=gen)
            timesteps = sample_timesteps(t_weights, noise_scheduler.config.num_train_timesteps, len(indices), gen)
            mean, std, eps, noise, timesteps = mean[part], std[part], eps[part], noise[part], timesteps[part]
            indices = indices[part]
            lo, hi = acc.process_index * len(indices) // world, (acc.process_index + 1) * len(indices) // world
            latents = ((mean + std * eps) * pipe.vae.config.scaling_factor)[lo:hi].to(device)
            captions = [source["captions"][i] for i in indices[lo:hi]]
            batch = {"latents": latents, "noise": noise[lo:hi].to(device), "timesteps": timesteps[lo:hi].to(device),
                     "captions": captions, "step": step}
            if "control" in source:
                inputs = [source["control"][i] for i in indices[lo:hi]]
                batch["control"] = torch.stack([own[0] for own in inputs]).to(device)
                # further inputs (summed with the first), with a 0/1 scale per example: present or not
                batch["control_more"] = [
                    (torch.stack([own[k] if k < len(own) else torch.zeros_like(own[0]) for own in inputs]).to(device),
                     torch.tensor([float(k < len(own)) for own in inputs], device=device))
                    for k in range(1, max(len(own) for own in inputs))]

            def default(b):
                weights = x0_weights(noise_scheduler, b["timesteps"], t_weights) if cfg.x0_weighting else None
                return denoising_loss(unet, noise_scheduler, b["latents"], encode_text(b["captions"]), b["noise"],
                                      b["timesteps"], cfg.snr_gamma, teacher, weights)

            return default(batch) if teacher else method.training_loss(pipe, batch, default)

        progress = tqdm(total=cfg.steps, initial=start_step, desc=f"training {cfg.name}", unit="step",
                        disable=not (cfg.progress_bar and acc.is_local_main_process), dynamic_ncols=True)
        unet.train()
        loss_value, stopped, step, completed = float("nan"), False, start_step, start_step
        last_good = resume_from
        run_started = time.perf_counter()
        try:
            for step in range(start_step + 1, cfg.steps + 1):
                torch.manual_seed((cfg.seed * 1_000_003 + step) * world + acc.process_index)  # dropout etc.
                indices = global_batch(cache["bucket"], cfg.batch_size, cfg.seed, step)
                class_indices = (global_batch(class_cache["bucket"], cfg.batch_size, cfg.seed + 1, step)
                                 if class_cache else None)
                micro = max(1, cfg.batch_size // cfg.grad_accum)
                total = torch.zeros((), device=device)
                for chunk_start in range(0, cfg.batch_size, micro):
                    last = chunk_start + micro >= cfg.batch_size
                    part = slice(chunk_start, chunk_start + micro)
                    chunk = indices[part]
                    with acc.autocast(), (acc.no_sync(unet) if not last else nullcontext()):
                        loss = batch_loss(cache, indices, step_generator(cfg.seed, step, 0), part=part)
                        if class_indices is not None:
                            loss = loss + cfg.prior_loss_weight * batch_loss(
                                class_cache, class_indices, step_generator(cfg.seed, step, 1000),
                                base_prediction if cfg.prior_target == "base" else None, part=part)
                        loss = loss * len(chunk) / cfg.batch_size
                        if not torch.isfinite(acc.reduce(loss.detach(), "sum")):
                            raise TrainingError(self._nan_message(step, last_good))
                        acc.backward(loss)
                    total = total + loss.detach()
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                note = method.after_step(pipe, cfg.name, step, optimizer)
                if note:
                    self.on_event({"kind": "log", "message": note})
                lr_scheduler.step()
                completed = step
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(acc.reduce(total, "mean"))
                elapsed = time.perf_counter() - run_started
                eta = elapsed / (step - start_step) * (cfg.steps - step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                acc.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
                self.on_event({"kind": "step", "step": step, "steps": cfg.steps, "loss": loss_value,
                               "eta_seconds": eta})
                if cfg.preview_every and step % cfg.preview_every == 0 and step < cfg.steps:
                    self._preview(pipe, step, resolution)
                stop_now = self.should_stop()
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_now:
                    last_good = self._save_checkpoint(step, pipe, method, optimizer, lr_scheduler, base)
                if stop_now and step < cfg.steps:
                    stopped = True
                    break
        except KeyboardInterrupt:
            # keep every finished step: the weights and optimizer now are those after `completed` steps
            if completed > start_step and (last_good is None or last_good.name != f"{CHECKPOINT_PREFIX}{completed:07d}"):
                self._save_checkpoint(completed, pipe, method, optimizer, lr_scheduler, base)
            raise TrainingError(f"interrupted; progress is kept in {self.out / 'checkpoints'} "
                                "(resume with --resume latest)") from None
        finally:
            progress.close()

        unet.eval()
        adapter_path = self.out / f"{cfg.name}.safetensors"
        tensors = {**method.state_dict(pipe, cfg.name), **trigger_tensors(pipe)}
        detach_trigger_embedding(pipe)
        if acc.is_main_process and not stopped:
            self._preview(pipe, step, resolution)
            extra = {"base_model_name": cfg.model, "architecture": architecture(pipe), "trigger": cfg.trigger or "",
                     "steps": str(step), "training_config": json.dumps(asdict(cfg), sort_keys=True),
                     "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "training_seconds": f"{time.perf_counter() - started:.1f}",
                     "trainable_parameters": str(n_trainable)}
            save_adapter(adapter_path, cfg.method, adapter_config, tensors, base, extra)
        acc.wait_for_everyone()
        acc.end_training()
        result = TrainResult(adapter_path, step, loss_value, time.perf_counter() - started, n_trainable, stopped)
        self.on_event({"kind": "done", "step": step, "adapter": str(adapter_path), "stopped": stopped})
        return result

    def _attach_trigger_token(self, pipe) -> torch.nn.Parameter | None:
        from studio.adapters import AdapterError

        if not self.config.trigger_token:
            return None
        try:
            return attach_trigger_embedding(pipe, self.config.trigger, self.config.trigger_token_init).vector
        except AdapterError as e:
            raise TrainingError(str(e)) from None

    def _embed_all(self, pipe, captions: list[str], device) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(captions), 64):
            out.extend(pipe.text_encoder(token_ids(pipe, captions[i:i + 64]).to(device))[0])
        return out

    def _optimizer(self, params):
        cfg = self.config
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise TrainingError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _nan_message(self, step: int, last_good: Path | None) -> str:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
        return (f"the loss became NaN/inf at step {step} (lr {self.config.lr:g}); training stopped and {kept}; "
                "try a lower learning rate or mixed_precision 'no'")

    # -- previews --

    @torch.no_grad()
    def _preview(self, pipe, step: int, resolution: int) -> None:
        cfg = self.config
        if not self.accelerator.is_main_process:
            return
        prompts = cfg.preview_prompts or [cfg.instance_prompt or self.first_caption]
        was_training = pipe.unet.training
        pipe.unet.eval()
        images = pipe(prompts, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_guidance,
                      generator=[torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))],
                      height=resolution, width=resolution).images
        pipe.unet.train(was_training)
        folder = self.out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(images):
            path = folder / f"step_{step:07d}_{i}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(str(path))
        self.on_event({"kind": "preview", "step": step, "paths": paths, "prompts": prompts})

    # -- checkpoints --

    def _save_checkpoint(self, step: int, pipe, method, optimizer, lr_scheduler, base) -> Path:
        from safetensors.torch import save_file

        from studio.adapters import save_adapter

        acc = self.accelerator
        final = self.out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
        if acc.is_main_process:
            opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(final) as tmp:
                save_adapter(tmp / "adapter.safetensors", self.config.method,
                             method.config_class.from_dict(self.config.adapter),
                             {**method.state_dict(pipe, self.config.name), **trigger_tensors(pipe)}, base,
                             {"trigger": self.config.trigger or ""})
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                state = {"step": step, "optimizer": opt_info, "lr_scheduler": lr_scheduler.state_dict(),
                         "config": asdict(self.config), "world_size": acc.num_processes}
                (tmp / "state.json").write_text(json.dumps(state, default=_json_default), encoding="utf-8")
            for old in checkpoint_dirs(self.out)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.on_event({"kind": "checkpoint", "step": step, "path": str(final)})
        acc.wait_for_everyone()
        return final

    def _resume_dir(self) -> Path | None:
        resume = self.config.resume
        if not resume:
            return None
        if resume == "latest":
            found = checkpoint_dirs(self.out)
            return found[-1] if found else None  # nothing yet: a fresh start
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise TrainingError(f"{path} is not a training checkpoint (no state.json)")
        return path

    def _load_checkpoint(self, path: Path, pipe, method, optimizer, lr_scheduler) -> int:
        from safetensors.torch import load_file

        from studio.adapters import read_adapter

        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        saved = state["config"]
        for key in ("method", "adapter", "model"):
            if saved.get(key) != getattr(self.config, key):
                raise TrainingError(f"{path} was trained with {key}={saved.get(key)!r}, this run has "
                                    f"{getattr(self.config, key)!r}; start a new output folder")
        if state["step"] > self.config.steps:
            raise TrainingError(f"{path} is at step {state['step']}, beyond this run's {self.config.steps} steps")
        tensors = read_adapter(path / "adapter.safetensors").tensors
        vector = tensors.pop(TRIGGER_KEY, None)
        module = pipe.text_encoder.get_input_embeddings()
        if (vector is None) != (not isinstance(module, TriggerEmbedding)):
            raise TrainingError(f"{path} and this run differ in trigger_token; start a new output folder")
        if vector is not None:
            with torch.no_grad():
                module.vector.copy_(vector.reshape(-1))
        current = method.state_dict(pipe, self.config.name)
        if set(current) != set(tensors):
            raise TrainingError(f"{path} holds different adapter tensors than this run creates")
        method.set_state(pipe, self.config.name, tensors)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                       state["optimizer"]))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.on_event({"kind": "log", "message": f"resumed from {path} at step {state['step']}"})
        return int(state["step"])


def _json_default(value):
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def train(config: TrainConfig | None = None, *, preset: str | None = None, on_event=None, should_stop=None,
          **settings) -> TrainResult:
    """`studio.training.engine(data="photos/", trigger="sks", preset="quick")` -> TrainResult (the adapter file and figures)."""
    if config is None:
        config = config_with_preset(preset, **settings)
    return Trainer(config, on_event, should_stop).run()
