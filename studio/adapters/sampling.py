"""The few-step samplers that methods driving the denoiser themselves run (SPM's data-free training latents): DDIM
for the UNet families, the Euler step of rectified flow for the diffusion transformers, each on the timesteps the
family's own pipeline would use. Plain functions of tensors, as k-diffusion's samplers are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# (prediction, index, x) -> x one step further along the schedule
Step = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


@dataclass
class Schedule:
    """`timesteps[i]` is what the denoiser reads at step i (0–1000 scale), `step` moves x from step i to i + 1,
    and the starting noise is scaled by `init_sigma`."""

    timesteps: torch.Tensor
    step: Step
    init_sigma: float


def is_flow(pipe) -> bool:
    """Whether the pipeline samples by rectified flow (SD3, Flux) rather than a DDPM-style schedule."""
    return getattr(pipe, "transformer", None) is not None


def ddim_schedule(pipe, steps: int) -> Schedule:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)

    def step(pred: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return scheduler.step(pred, scheduler.timesteps[i], x).prev_sample

    return Schedule(scheduler.timesteps, step, float(scheduler.init_noise_sigma))


def flow_schedule(pipe, steps: int, latent_size: int) -> Schedule:
    """The flow-matching Euler schedule as the family's pipeline sets it: FluxPipeline's sigmas 1 → 1/steps, SD3's
    `set_timesteps(steps)`; each shifted as the scheduler's config says (statically, or by the image's token count
    where the shift is dynamic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = scheduler.config
    flux = isinstance(pipe, FluxPipeline)
    patch = 2 if flux else pipe.transformer.config.patch_size  # Flux packs 2×2 latent patches into one token
    mu = calculate_shift((latent_size // patch) ** 2, config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    if flux:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        scheduler.set_timesteps(steps, mu=mu if config.use_dynamic_shifting else None)
    sigmas = scheduler.sigmas

    def step(pred: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return x + (sigmas[i + 1] - sigmas[i]).to(x) * pred  # prediction = velocity ε − x0

    return Schedule(scheduler.timesteps, step, 1.0)


def sampling_schedule(pipe, steps: int, latent_size: int) -> Schedule:
    """The family's few-step schedule for `steps` steps on `latent_size`-square latents."""
    return flow_schedule(pipe, steps, latent_size) if is_flow(pipe) else ddim_schedule(pipe, steps)
