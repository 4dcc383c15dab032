"""Flux.1: an MMDiT with single-stream blocks reading CLIP-L's pooled output and T5's states, on 2×2-packed
latents with 3-axis position ids, and (dev) a distilled guidance value as an input; rectified flow."""

from __future__ import annotations

from typing import Any


from studio.adapters.base import tokenizer_ids
from studio.adapters.denoise import flux_text_ids, packed_prediction
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
        return {"encoder_hidden_states": prompt.hidden, "pooled_projections": prompt.pooled,
                "txt_ids": flux_text_ids(prompt.hidden)}

    def forward(self, model, noisy, timesteps, inputs):
        guidance = self.config.flow_guidance if self.pipe.transformer.config.guidance_embeds else None
        return packed_prediction(model, noisy, timesteps, inputs, guidance, self.pipe.vae_scale_factor)

