"""SD 1.x / 2.x, SDXL and the embedded model: a UNet trained to predict the noise (or the velocity) of a
DDPM-style schedule."""

from __future__ import annotations

from typing import Any

import torch

from studio.adapters.prompts import reads_time_ids
from studio.training.conditioning import encode_prompts, text_encoders, unet_inputs
from studio.training.families.base import Family, Teacher
from studio.training.objectives import denoising_loss, sample_timesteps, timestep_weights, x0_weights


class UNetFamily(Family):
    name = "unet"
    denoiser = "unet"

    def __init__(self, pipe, config) -> None:
        from diffusers import DDPMScheduler

        super().__init__(pipe, config)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        self.t_weights = timestep_weights(config, self.num_timesteps)
        self.reads_time_ids = reads_time_ids(pipe.unet)

    @classmethod
    def claims(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None

    def default_resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def encode(self, captions: list[str], device, encoders=None):
        return encode_prompts(encoders or text_encoders(self.pipe), captions, device)

    def inputs(self, prompt, batch: dict[str, Any]) -> dict[str, Any]:
        return unet_inputs(prompt, batch.get("time_ids"))

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(self.t_weights, self.num_timesteps, n, generator)

    def forward(self, model, noisy, timesteps, inputs):
        return model(noisy, timesteps, **inputs).sample

    def loss(self, model, batch, inputs, teacher: Teacher | None = None, reference: Teacher | None = None
             ) -> torch.Tensor:
        cfg = self.config
        weights = x0_weights(self.scheduler, batch["timesteps"], self.t_weights) if cfg.x0_weighting else None
        return denoising_loss(model, self.scheduler, batch["latents"], inputs, batch["noise"], batch["timesteps"],
                              cfg.snr_gamma, teacher, weights, reference, getattr(cfg, "dco_beta", 0.0))
