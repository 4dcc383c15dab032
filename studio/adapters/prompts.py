"""Prompts as a pipeline's denoiser reads them, for the methods that drive the denoiser themselves (SPM's erase
loss, HiPA's one-step student): SD 1.x/2.x read one text encoder's last hidden states; SDXL reads the pipeline's
own `encode_prompt` (both encoders' penultimate states side by side, the second's pooled projection) and six
size/crop numbers per image; SD3 and Flux read their pipeline's `encode_prompt` (hidden states and a pooled
embedding)."""

from __future__ import annotations

from typing import Any

import torch

from studio.adapters.base import token_ids


def reads_time_ids(unet) -> bool:
    """Whether this UNet reads a pooled prompt embedding and size/crop time ids (SDXL)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def reads_pooled(pipe) -> bool:
    """Whether the pipeline's UNet reads a pooled prompt embedding and time ids (SDXL)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and reads_time_ids(unet)


@torch.no_grad()
def embed_prompts(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts' hidden states as the denoiser reads them, and the pooled embedding of the families that read
    one (SDXL, SD3, Flux; None for SD 1.x/2.x)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    device = pipe.text_encoder.device
    if isinstance(pipe, StableDiffusion3Pipeline):
        hidden, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return hidden, pooled
    if isinstance(pipe, FluxPipeline):
        hidden, pooled, _ = pipe.encode_prompt(texts, None, device=device, num_images_per_prompt=1)
        return hidden, pooled
    if reads_pooled(pipe):
        hidden, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return hidden, pooled
    ids = token_ids(pipe, texts).to(device)
    return pipe.text_encoder(ids)[0], None


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
             ) -> torch.Tensor:
    """SDXL's micro-conditioning for one image, each pair as (height, width) / (top, left) in pixels."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def sdxl_time_ids(size: int, device) -> torch.Tensor:
    """SDXL's size/crop conditioning of a generated square image: original = target = size, crop at (0, 0), as
    the SDXL pipeline conditions its own generations."""
    return time_ids((size, size), (0, 0), (size, size)).to(device)


def unet_conditioning(hidden: torch.Tensor, pooled: torch.Tensor | None, size: int) -> dict[str, Any]:
    """Keyword arguments of the UNet's forward for these prompts; on SDXL the pooled rows and the time ids of a
    generated `size`-pixel square image."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
    if pooled is not None:
        ids = sdxl_time_ids(size, pooled.device).to(pooled.dtype).expand(pooled.shape[0], -1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    return kwargs
