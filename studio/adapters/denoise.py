"""One call of a pipeline's denoiser as the pipeline itself makes it, for the methods that drive the denoiser
themselves (SPM's erase loss, HiPA's one-step student) and the training families: a UNet's keyword inputs (SDXL:
the pooled prompt and size ids), SD3's transformer on latents, Flux's on 2×2-packed latents with position ids and
its distilled guidance."""

from __future__ import annotations

from typing import Any, Callable

import torch

from studio.adapters.prompts import unet_conditioning

FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the value a guidance-distilled Flux reads as input

# (x, t, hidden, pooled) -> the prediction for x (noise or velocity), shaped as x
Call = Callable[..., torch.Tensor]


def guidance_distilled(pipe) -> bool:
    """Whether the denoiser reads the guidance scale as an input (Flux dev) instead of running CFG."""
    return bool(getattr(getattr(pipe, "transformer", None), "config", {}).get("guidance_embeds", False))


def packed_prediction(model, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict[str, Any],
                      guidance: float | None, vae_scale: int) -> torch.Tensor:
    """Flux's transformer on `noisy` (B×C×H×W latents) as FluxPipeline runs it: packed 2×2 with the image's
    position ids, `timesteps` on the 0–1000 scale (the transformer reads σ), the guidance value for a
    guidance-distilled model (None: schnell); the prediction unpacked to `noisy`'s shape."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    if guidance is not None:
        guidance = torch.full((b,), float(guidance), device=noisy.device)
    pred = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, img_ids=image_ids, **inputs,
                 return_dict=False)[0]
    return FluxPipeline._unpack_latents(pred, h * vae_scale, w * vae_scale, vae_scale)


def flux_text_ids(hidden: torch.Tensor) -> torch.Tensor:
    """Flux's position ids of the text tokens: zeros, one row per token."""
    return torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)


def denoiser_call(pipe, model, pixels: int, flux_guidance: float = FLUX_GUIDANCE) -> Call:
    """(x, t, hidden, pooled) -> `model`'s prediction (the pipeline's denoiser or a prepared copy of it) at the
    timestep t (a number or a tensor of one per row, on the 0–1000 scale), with the family's conditioning; `pixels`:
    the side of the image the latents stand for (SDXL's size ids read it)."""
    from diffusers import FluxPipeline

    if getattr(pipe, "unet", None) is not None:
        def unet_call(x, t, hidden, pooled=None, grad: bool = True):
            return model(x, t, **unet_conditioning(hidden, pooled, pixels)).sample
        return unet_call

    flux = isinstance(pipe, FluxPipeline)
    guidance = flux_guidance if guidance_distilled(pipe) else None

    def transformer_call(x, t, hidden, pooled=None, grad: bool = True):
        timesteps = torch.as_tensor(t, device=x.device).float().expand(len(x))
        inputs = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        if flux:
            return packed_prediction(model, x, timesteps, {**inputs, "txt_ids": flux_text_ids(hidden)}, guidance,
                                     pipe.vae_scale_factor)
        return model(hidden_states=x, timestep=timesteps, **inputs, return_dict=False)[0]
    return transformer_call
