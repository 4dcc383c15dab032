"""The one-step schedule: the UNet is called once, on pure noise, at the last training timestep T (a flow model's
transformer at σ = 1, which its own Euler scheduler does with one step).

With SD's default "leading" spacing and steps_offset=1 a one-step schedule would call the UNet at t=1 on pure
noise; "trailing" spacing (or `timesteps=[T]`) gives t=T. The student and the pipeline use the same T, and
since SD's schedule has alpha_bar(T) > 0, x0 = (z - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) amplifies the
noise prediction's errors about 15x: what the adaptor learns to correct."""

from __future__ import annotations

import torch


def last_timestep(scheduler_config) -> int:
    return int(scheduler_config["num_train_timesteps"]) - 1


def one_step_timestep(pipe) -> int:
    """The timestep of the one call: a DDPM-style model's last training timestep T, or on a flow model
    σ = 1 on the 0–1000 scale (what a one-step Euler schedule runs first)."""
    from studio.adapters.sampling import is_flow

    config = pipe.scheduler.config
    return int(config["num_train_timesteps"]) if is_flow(pipe) else last_timestep(config)


def one_step_scheduler(scheduler_config):
    """diffusers' LCM scheduler: one inference step runs at t = T and returns the x0 of `predicted_x0` (its
    boundary term adds c_skip ~ 1e-9 of the noise), and it takes the SD-Turbo-style `timesteps=[T]`. (Euler
    with trailing spacing starts from sigma_max * z instead of sqrt(sigma_max^2 + 1) * z: a 0.2% mismatch
    with what the student is trained on.)"""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler_config, timestep_spacing="trailing")


def predicted_x0(model_output: torch.Tensor, noisy: torch.Tensor, alpha_bar_t: float,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """x0 from one model call at a timestep with cumulative alpha `alpha_bar_t`."""
    a, s = alpha_bar_t ** 0.5, (1 - alpha_bar_t) ** 0.5
    if prediction_type == "epsilon":
        return (noisy - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * noisy - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction type {prediction_type!r}")
