"""What a training run is told: the concept engine's settings (each with its help for generated front ends),
the machinery every run shares (LoopSettings), and the presets a newcomer starts from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from studio.loading import StudioError
from studio.utils.settings import setting


class TrainingError(StudioError):
    """Training cannot go on; the message says why and what was kept."""


@dataclass
class LoopSettings:
    """The engine's own settings, the same for every trained artefact: how long, how fast, on what machinery,
    and where checkpoints and logs go (None: nowhere; no checkpoints, no resume)."""

    steps: int = setting(400, help="optimizer steps")
    batch_size: int = setting(4, help="samples per optimizer step, over all processes")
    grad_accum: int = setting(1, help="micro-batches a step is split into (same result, less memory)")
    lr: float = setting(1e-3, help="learning rate")
    lr_scheduler: str = setting("constant", help="diffusers schedule name (constant, cosine, linear, ...)")
    lr_warmup_steps: int = setting(0, help="steps of linear warm-up")
    weight_decay: float = setting(0.0, help="AdamW weight decay")
    max_grad_norm: float = setting(1.0, help="gradient clipping norm (0: none)")
    seed: int = setting(0, help="the seed every step's randomness is derived from")
    mixed_precision: str = setting("no", help="autocast precision", choices=("no", "fp16", "bf16"))
    device: str | None = setting(None, help="cpu, cuda, ... (None: what accelerate picks)", advanced=True)
    output_dir: str | None = setting(None, help="checkpoints, logs and previews go here")
    preview_every: int = setting(0, help="steps between preview images (0: none)")
    checkpoint_every: int = setting(100, help="steps between checkpoints")
    keep_checkpoints: int = setting(2, help="checkpoints kept (the newest)")
    resume: str | None = setting(None, help="'latest' or a checkpoint folder")
    tensorboard: bool = setting(True, help="write TensorBoard logs (when tensorboard is installed)")
    progress_bar: bool = setting(True, help="show a progress bar on the terminal")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise TrainingError(f"lr must be a positive number, got {self.lr}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.output_dir and Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise TrainingError(f"output folder {self.output_dir} is a file; give a folder")


LOOP_FIELDS = tuple(LoopSettings.__dataclass_fields__)


@dataclass
class TrainConfig:
    """A concept (or control) adapter trained on images and captions."""

    method: str = setting("lora", help="adapter method (see `studio methods`)")
    adapter: dict[str, Any] = setting(default_factory=dict, help="the method's settings, e.g. {'rank': 8}")
    model: str = setting("shapes", help="base model: a name, a diffusers folder or a single file")
    name: str = setting("concept", help="the adapter's name (its file is NAME.safetensors)")
    output_dir: str = setting("runs/concept", help="where the adapter, checkpoints, previews and logs go")
    data: str | None = setting(None, help="a folder of images with captions")
    images: list[str] = setting(default_factory=list, help="explicit image files instead of a folder")
    trigger: str | None = setting(None, help="the word that calls the concept up")
    instance_prompt: str | None = setting(None, help="the caption of images that have none")
    trigger_token: bool = setting(False, help="pivotal tuning: the trigger becomes a new token whose embedding "
                                              "trains beside the adapter", advanced=True)
    trigger_token_lr: float | None = setting(None, help="the trigger token's learning rate (None: lr)",
                                             advanced=True)
    trigger_token_init: str | None = setting(None, help="words whose mean embedding starts the token (None: the "
                                                        "trigger's old tokens)", advanced=True)
    skip_bad_images: bool = setting(False, help="skip unreadable images instead of refusing the folder")
    control_data: str | None = setting(None, help="control images named as the training images (control methods)")
    resolution: int | None = setting(None, help="training size (None: the model's native size)")
    buckets: bool = setting(True, help="aspect-ratio buckets instead of square crops")
    prior_preservation: bool = setting(False, help="train on class images beside the concept's")
    class_prompts: list[str] = setting(default_factory=list, help="drawn in turn by the base model")
    class_data_dir: str | None = setting(None, help="a folder of class images instead of drawing them")
    num_class_images: int = setting(32, help="class images drawn or read")
    prior_loss_weight: float = setting(1.0, help="weight of the class images' loss")
    prior_target: str = setting("noise", help="noise (DreamBooth) | base: match the base model's own prediction",
                                choices=("noise", "base"))
    steps: int = setting(400, help="optimizer steps")
    batch_size: int = setting(4, help="images per step, over all processes")
    grad_accum: int = setting(1, help="micro-batches a step is split into")
    lr: float = setting(1e-3, help="learning rate")
    lr_scheduler: str = setting("constant", help="diffusers schedule name (constant, cosine, linear, ...)")
    lr_warmup_steps: int = setting(0, help="steps of linear warm-up")
    optimizer: str = setting("adamw", help="adamw | adamw8bit (bitsandbytes)", choices=("adamw", "adamw8bit"))
    weight_decay: float = setting(0.0, help="AdamW weight decay")
    loraplus_ratio: float = setting(1.0, help="LoRA+ (Hayou et al. 2024): LoRA's B matrices learn at this multiple "
                                    "of lr (1: off; the paper suggests 16)", advanced=True)
    max_grad_norm: float = setting(1.0, help="gradient clipping norm (0: none)")
    snr_gamma: float | None = setting(None, help="Min-SNR weighting (Hang et al. 2023)", advanced=True)
    dco_beta: float = setting(0.0, help="Direct Consistency Optimization (Lee et al. 2024; SODA's official loss): "
                                        "−log σ(−β(‖ε_θ−ε‖² − ‖ε_ref−ε‖²)) against the base model with the adapter "
                                        "off, at this β (the official SODA recipe: 1000); 0: plain MSE",
                              advanced=True)
    x0_weighting: bool = setting(False, help="weight each sample by its error in x0 space (1/SNR), normalised to "
                                             "mean 1", advanced=True)
    timestep_bias: str = setting("none", help="favour the later/earlier `portion` of the timesteps, or the range "
                                              "begin..end-1", choices=("none", "later", "earlier", "range"),
                                 advanced=True)
    timestep_bias_multiplier: float = setting(1.0, help="how many times as often the favoured timesteps are drawn",
                                              advanced=True)
    timestep_bias_portion: float = setting(0.25, help="the favoured portion (later/earlier)", advanced=True)
    timestep_bias_begin: int = setting(0, help="first favoured timestep (range)", advanced=True)
    timestep_bias_end: int = setting(1000, help="end of the favoured timesteps (range)", advanced=True)
    flow_timesteps: str = setting("logit_normal", help="flow-matching models (SD3, Flux): how σ is drawn "
                                  "(the SD3 paper's logit-normal, its mode density, or uniform)",
                                  choices=("logit_normal", "mode", "uniform"), advanced=True)
    flow_logit_mean: float = setting(0.0, help="flow-matching: the logit-normal's mean", advanced=True)
    flow_logit_std: float = setting(1.0, help="flow-matching: the logit-normal's standard deviation", advanced=True)
    flow_mode_scale: float = setting(1.29, help="flow-matching: the mode density's scale", advanced=True)
    flow_guidance: float = setting(3.5, help="Flux (guidance-distilled): the guidance value the transformer reads "
                                   "while training (diffusers' scripts: 3.5)", advanced=True)
    seed: int = setting(0, help="the seed every step's randomness is derived from")
    mixed_precision: str = setting("no", help="autocast precision", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = setting(False, help="recompute activations to save memory", advanced=True)
    vae_sample: bool = setting(False, help="train on latent_dist samples instead of its mean (what the base model "
                                           "saw)", advanced=True)
    device: str | None = setting(None, help="cpu, cuda, ... (None: what accelerate picks)", advanced=True)
    preview_every: int = setting(100, help="steps between preview images (0: none)")
    preview_prompts: list[str] = setting(default_factory=list, help="what previews draw (default: a caption)")
    preview_steps: int = setting(20, help="sampling steps of a preview")
    preview_guidance: float = setting(5.0, help="guidance scale of a preview")
    checkpoint_every: int = setting(100, help="steps between checkpoints")
    keep_checkpoints: int = setting(2, help="checkpoints kept (the newest)")
    resume: str | None = setting(None, help="'latest' or a checkpoint folder")
    tensorboard: bool = setting(True, help="write TensorBoard logs (when tensorboard is installed)")
    progress_bar: bool = setting(True, help="show a progress bar on the terminal")

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

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(**{name: getattr(self, name) for name in LOOP_FIELDS})

    def validate(self) -> None:
        if self.preview_steps < 1:
            raise TrainingError(f"preview_steps must be at least 1, got {self.preview_steps}")
        self.loop_settings().validate()
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise TrainingError(f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if not (self.loraplus_ratio > 0 and math.isfinite(self.loraplus_ratio)):
            raise TrainingError(f"loraplus_ratio must be a positive number, got {self.loraplus_ratio}")
        if self.prior_target not in ("noise", "base"):
            raise TrainingError(f"prior_target must be noise or base, got {self.prior_target!r}")
        self._validate_timesteps()
        self._validate_data()

    def _validate_timesteps(self) -> None:
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
        if self.dco_beta < 0:
            raise TrainingError(f"dco_beta must be >= 0, got {self.dco_beta}")
        if self.x0_weighting and self.snr_gamma:
            raise TrainingError("x0_weighting and snr_gamma are two loss weightings: choose one")

    def _validate_data(self) -> None:
        from studio.adapters import AdapterError, get_method

        try:
            method = get_method(self.method)
            method.config_class.from_dict(self.adapter)  # the method's settings, checked before any work
        except AdapterError as e:
            raise TrainingError(str(e)) from None
        if method.trained_by:
            raise TrainingError(f"{self.method} adapters are not concept adapters: train them with "
                                f"`{method.trained_by}`")
        if not self.data and not self.images:
            raise TrainingError("no training data: give a folder (--data) or image files")
        conditioned = get_method(self.method).conditioned
        if conditioned and not self.control_data:
            raise TrainingError(f"{self.method} trains on control images: give their folder (--control-data), "
                                "one image named as each training image")
        if self.control_data and not conditioned:
            raise TrainingError(f"{self.method} adapters take no control images; --control-data is for control methods")
        if self.trigger_token and not self.trigger:
            raise TrainingError("trigger_token trains the trigger word as a new token: give the trigger "
                                "(--trigger sks)")
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
