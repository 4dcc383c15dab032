"""Flux.1: an MMDiT with single-stream blocks reading CLIP-L's pooled output and T5's states, on 2×2-packed
latents with 3-axis position ids, and (dev) a distilled guidance value as an input; rectified flow."""

from __future__ import annotations

from typing import Any

import torch

from studio.adapters.base import tokenizer_ids
from studio.training.conditioning import PromptEncoding, text_encoders
from studio.training.families.flow import FlowFamily, t5_states

T5_TOKENS = 512  # FluxPipeline's max_sequence_length


class FluxFamily(FlowFamily):
    name = "flux"

    def encode(self, captions: list[str], device, encoders=None) -> PromptEncoding:
        """As `FluxPipeline.encode_prompt` encodes a prompt (a test compares them): CLIP-L's pooled output and
        T5's last states, through `encoders` (the engine's prepared copies where CLIP-L trains)."""
        (clip_tokenizer, clip), (t5_tokenizer, t5) = (encoders or text_encoders(self.pipe))[:2]
        pooled = clip(tokenizer_ids(clip_tokenizer, captions).to(device), output_hidden_states=False).pooler_output
        return PromptEncoding(t5_states(t5_tokenizer, t5, captions, T5_TOKENS, device), pooled)

    def inputs(self, prompt: PromptEncoding, batch: dict[str, Any]) -> dict[str, Any]:
        text_ids = torch.zeros(prompt.hidden.shape[1], 3, device=prompt.hidden.device, dtype=prompt.hidden.dtype)
        return {"encoder_hidden_states": prompt.hidden, "pooled_projections": prompt.pooled, "txt_ids": text_ids}

    def forward(self, model, noisy, timesteps, inputs):
        guidance = self.config.flow_guidance if self.pipe.transformer.config.guidance_embeds else None
        return packed_prediction(model, noisy, timesteps, inputs, guidance, self.pipe.vae_scale_factor)


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
