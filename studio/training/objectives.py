"""The denoising objectives as plain functions on tensors: timestep weights and sampling, SNR weightings and
the DDPM loss; the flow-matching timestep densities and loss (SD3, Flux)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def timestep_weights(config, num_timesteps: int) -> torch.Tensor | None:
    """Relative probability of each timestep under `config`'s timestep bias (None: uniform). `config` has the
    TrainConfig fields timestep_bias, timestep_bias_multiplier, _portion, _begin and _end."""
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


def consistency_loss(errors: torch.Tensor, reference_errors: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct Consistency Optimization (Lee et al. 2024), the loss SODA's official code trains with: each sample's
    error is rewarded only for how far it falls below the reference model's on the same noisy input,
    −log σ(−β (e_θ − e_ref)), so the model learns the concept while staying consistent with the reference."""
    return -F.logsigmoid(-beta * (errors - reference_errors)).mean()


def denoising_loss(unet, scheduler, latents: torch.Tensor, conditioning: torch.Tensor | dict, noise: torch.Tensor,
                   timesteps: torch.Tensor, snr_gamma: float | None = None, teacher=None,
                   weights: torch.Tensor | None = None, reference=None, dco_beta: float = 0.0) -> torch.Tensor:
    """MSE to the noise (or velocity) target; with `teacher(noisy, timesteps, conditioning)`, to the teacher's
    prediction at the same noisy latents instead. `conditioning`: the encoder hidden states, or the UNet's keyword
    inputs (`conditioning.unet_inputs`: SDXL's pooled prompt and time ids). `weights`: per-sample loss weights.
    With `reference` (called as a teacher is) and `dco_beta` > 0: the consistency loss of the two errors."""
    inputs = conditioning if isinstance(conditioning, dict) else {"encoder_hidden_states": conditioning}
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, **inputs).sample
    if teacher is not None:
        with torch.no_grad():
            target = teacher(noisy, timesteps, conditioning)
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    scale = torch.ones_like(per_sample)
    if snr_gamma:
        snr = signal_to_noise(scheduler).to(timesteps.device)[timesteps]
        scale = scale * torch.clamp(snr, max=snr_gamma) / (snr + (scheduler.config.prediction_type == "v_prediction"))
    if weights is not None:
        scale = scale * weights
    if reference is not None and dco_beta > 0:
        with torch.no_grad():
            ref = reference(noisy, timesteps, conditioning)
        ref_per_sample = F.mse_loss(ref.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return consistency_loss(per_sample * scale, ref_per_sample * scale, dco_beta)
    return (per_sample * scale).mean()


FLOW_TIMESTEPS = ("logit_normal", "mode", "uniform")


def flow_timestep_indices(num_timesteps: int, n: int, gen: torch.Generator, scheme: str = "logit_normal",
                          logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """Indices into a flow-matching training schedule, drawn by the SD3 paper's density `scheme` (diffusers'
    `compute_density_for_timestep_sampling`, as its SD3 and Flux scripts draw them)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(scheme, n, logit_mean, logit_std, mode_scale, generator=gen)
    return (u * num_timesteps).long().clamp(0, num_timesteps - 1)


def flow_matching_loss(predict, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, teacher=None,
                       scheme: str = "logit_normal", reference=None, dco_beta: float = 0.0) -> torch.Tensor:
    """Rectified flow: noisy = (1 − σ)·x0 + σ·ε and the velocity target ε − x0 (or `teacher(noisy)`), weighted as
    diffusers' `compute_loss_weighting_for_sd3` weights `scheme` (1 for the densities above). With
    `reference(noisy)` and `dco_beta` > 0: the consistency loss of the two errors."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1 - s) * latents + s * noise
    pred = predict(noisy)
    if teacher is not None:
        with torch.no_grad():
            target = teacher(noisy)
    else:
        target = noise - latents
    weight = compute_loss_weighting_for_sd3(scheme, sigmas).float()
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if reference is not None and dco_beta > 0:
        with torch.no_grad():
            ref = reference(noisy)
        ref_per_sample = F.mse_loss(ref.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        return consistency_loss(per_sample * weight, ref_per_sample * weight, dco_beta)
    return (per_sample * weight).mean()
