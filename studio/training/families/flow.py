"""What the rectified-flow families (SD3, Flux) share: noisy = (1 − σ)·x0 + σ·ε, the target ε − x0, σ drawn by
the SD3 paper's densities (diffusers' `training_utils`), latents shifted and scaled by the VAE's factors."""

from __future__ import annotations

from typing import Any

import torch

from studio.adapters.base import transformer_family
from studio.training.families.base import Family, FamilyError, Teacher
from studio.training.objectives import flow_matching_loss, flow_timestep_indices

# the DDPM-only settings, refused rather than ignored on a flow model
_DDPM_ONLY = {"snr_gamma": None, "x0_weighting": False, "timestep_bias": "none"}


def t5_states(tokenizer, encoder, captions: list[str], length: int, device) -> torch.Tensor:
    """T5's last hidden states of the captions padded to `length` tokens, as the SD3 and Flux pipelines take them."""
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device))[0]


class FlowFamily(Family):
    denoiser = "transformer"

    def __init__(self, pipe, config) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipe, config)
        for name, off in _DDPM_ONLY.items():
            if getattr(config, name) != off:
                raise FamilyError(f"{name} is a weighting of DDPM-style models; {self.name} trains by flow matching "
                                  "(set flow_timesteps, flow_logit_mean / _std instead)")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    @classmethod
    def claims(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return transformer is not None and transformer_family(transformer) == cls.name

    def default_resolution(self) -> int:
        return int(self.pipe.transformer.config.get("sample_size", 128)) * self.pipe.vae_scale_factor

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae.config
        return (latents - (vae.shift_factor or 0.0)) * vae.scaling_factor

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        return flow_timestep_indices(self.scheduler.config.num_train_timesteps, n, generator, cfg.flow_timesteps,
                                     cfg.flow_logit_mean, cfg.flow_logit_std, cfg.flow_mode_scale)

    def loss(self, model, batch: dict[str, Any], inputs: dict[str, Any], teacher: Teacher | None = None,
             reference: Teacher | None = None) -> torch.Tensor:
        index = batch["timesteps"].cpu()
        sigmas = self.scheduler.sigmas[index].to(batch["latents"])
        timesteps = self.scheduler.timesteps[index].to(batch["latents"].device)

        def at_t(predict):
            return None if predict is None else (lambda noisy: predict(noisy, timesteps, inputs))

        return flow_matching_loss(lambda noisy: self.forward(model, noisy, timesteps, inputs), batch["latents"],
                                  batch["noise"], sigmas, at_t(teacher), self.config.flow_timesteps,
                                  at_t(reference), getattr(self.config, "dco_beta", 0.0))
