"""One-step adaptor settings (stored in the file) and distillation settings (not stored)."""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters.base import AdapterConfig, AdapterError
from studio.utils.settings import setting

# the attention projections of every transformer block (attn1 and attn2 q/k/v/out): the brief's reading
# of HiPA's 3.3M parameters as a rank-16 attention LoRA on SD 2.1; on SD3 / Flux the joint blocks' attention (both
# streams) and Flux's single blocks' q/k/v
ATTENTION_PROJECTIONS = [
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
]


@dataclass
class HipaConfig(AdapterConfig):
    """A low-rank adaptor (LoRA through PEFT) with which the denoiser, called once at `timestep` on pure noise,
    predicts noise (a flow model: velocity) whose one-step estimate of x0 looks like the multi-step teacher's
    image."""

    target_modules: list[str] = setting(
        default_factory=lambda: list(ATTENTION_PROJECTIONS), advanced=True,
        help="denoiser modules that carry the adaptor: regexes matching a module path or a dotted suffix of it")
    rank: int = setting(4, help="rank of the adaptor's LoRA (>= 1)")
    timestep: int = setting(999, help="the one timestep the denoiser is called at (the last training timestep: what "
                                      "'trailing' spacing gives one step; SD3 / Flux: 1000, σ = 1)", advanced=True)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"HiPA rank must be at least 1, got {self.rank}")
        if self.timestep < 0:
            raise AdapterError(f"HiPA timestep must be >= 0, got {self.timestep}")


@dataclass
class DistillSettings:
    """How the adaptor is trained: teacher pairs, then the student on them."""

    pairs: int = setting(1024, help="(noise, prompt, teacher image) triplets made by the frozen model (>= 1)")
    teacher_steps: int = setting(25, help="sampling steps of the multi-step teacher (>= 1)")
    teacher_guidance: float = setting(5.0, help="classifier-free guidance of the teacher (Flux: the distilled "
                                                "guidance it reads as input)")
    resolution: int | None = setting(None, help="image side in pixels of the teacher pairs; empty: the model's "
                                                "native size", advanced=True)
    steps: int = setting(800, help="optimizer steps of the student (>= 1)")
    lr: float = setting(1e-3, help="learning rate of the adaptor (AdamW, > 0)")
    batch: int = setting(8, help="teacher pairs per step (>= 1)")
    warmup: int = setting(50, help="learning-rate warm-up steps (linear from 0)", advanced=True)
    latent_weight: float = setting(1.0, help="weight of the MSE of the x0 latents (spatial loss, >= 0)")
    pixel_weight: float = setting(10.0, help="weight of the MSE of the decoded pixels (spatial loss, >= 0)")
    perceptual_weight: float = setting(1.0, help="weight of the LPIPS-style distance on the model's own VAE "
                                                 "encoder stages (>= 0)", advanced=True)
    fourier_weight: float = setting(1.0, help="weight of the L1 of Fourier high-passed images (high-frequency "
                                              "loss, >= 0)")
    edge_weight: float = setting(1.0, help="weight of the L1 of Sobel edge maps (high-frequency loss, >= 0)")
    radius: float = setting(0.1, help="the high-pass removes frequencies below this fraction of the sampling rate, "
                                      "in (0, 0.5)", advanced=True)
    adversarial_weight: float = setting(0.0, help="weight of an ADD-style discriminator term (not HiPA; 0 is off)",
                                        advanced=True)
    discriminator_lr: float = setting(2e-4, help="learning rate of the discriminator (> 0)", advanced=True)
    ema_decay: float = setting(0.0, help="in [0, 1): > 0 saves an exponential moving average of the adaptor's "
                                         "weights", advanced=True)
    seed: int = setting(0, help="random seed of the noise, prompts and teacher pairs")

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
        if self.resolution is not None and self.resolution < 8:
            raise AdapterError(f"resolution must be at least 8 pixels, got {self.resolution}")
        if self.discriminator_lr <= 0:
            raise AdapterError(f"discriminator_lr must be > 0, got {self.discriminator_lr:g}")

    @property
    def high_frequency(self) -> bool:
        return self.fourier_weight > 0 or self.edge_weight > 0
