"""One-step adaptor settings (stored in the file) and distillation settings (not stored)."""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.adapters.base import AdapterConfig, AdapterError

# the attention projections of every transformer block (attn1 and attn2 q/k/v/out): the brief's reading
# of HiPA's 3.3M parameters as a rank-16 attention LoRA on SD 2.1
ATTENTION_PROJECTIONS = [r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"]


@dataclass
class HipaConfig(AdapterConfig):
    """A low-rank adaptor (LoRA through PEFT) with which the UNet, called once at `timestep` on pure noise,
    predicts noise whose one-step estimate of x0 looks like the multi-step teacher's image."""

    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    rank: int = 4
    timestep: int = 999            # the last training timestep: what "trailing" spacing gives one step

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"HiPA rank must be at least 1, got {self.rank}")
        if self.timestep < 0:
            raise AdapterError(f"HiPA timestep must be >= 0, got {self.timestep}")


@dataclass
class DistillSettings:
    """How the adaptor is trained: teacher pairs, then the student on them."""

    pairs: int = 1024              # (noise, prompt, teacher image) triplets made by the frozen model
    teacher_steps: int = 25
    teacher_guidance: float = 5.0
    steps: int = 800
    lr: float = 1e-3
    batch: int = 8
    warmup: int = 50
    latent_weight: float = 1.0     # spatial loss: MSE of the x0 latents (cheap, well-conditioned) ...
    pixel_weight: float = 10.0     # ... plus MSE of the decoded pixels ...
    perceptual_weight: float = 1.0  # ... plus a perceptual distance (when a feature network is given)
    fourier_weight: float = 1.0    # high-frequency loss: L1 of Fourier high-passed images ...
    edge_weight: float = 1.0       # ... plus L1 of Sobel edge maps
    radius: float = 0.1            # the high-pass removes frequencies below this fraction of the sampling rate
    adversarial_weight: float = 0.0  # not HiPA: an ADD-style discriminator term (adversarial.py); 0 is off
    discriminator_lr: float = 2e-4
    ema_decay: float = 0.0         # > 0: the file holds an exponential moving average of the adaptor's weights
    seed: int = 0

    def validate(self) -> None:
        if self.pairs < 1 or self.steps < 1 or self.batch < 1 or self.teacher_steps < 1 or self.lr <= 0:
            raise AdapterError("distill needs pairs, steps, batch and teacher_steps >= 1 and lr > 0")
        if min(self.latent_weight, self.pixel_weight, self.perceptual_weight, self.fourier_weight, self.edge_weight,
               self.adversarial_weight) < 0:
            raise AdapterError("distill loss weights must be >= 0")
        if not 0 < self.radius < 0.5:
            raise AdapterError("the high-pass radius is a fraction of the sampling rate in (0, 0.5), "
                               f"got {self.radius}")
        if not 0 <= self.ema_decay < 1:
            raise AdapterError(f"ema_decay must be in [0, 1), got {self.ema_decay:g}")
        if self.discriminator_lr <= 0:
            raise AdapterError(f"discriminator_lr must be > 0, got {self.discriminator_lr:g}")

    @property
    def high_frequency(self) -> bool:
        return self.fourier_weight > 0 or self.edge_weight > 0
