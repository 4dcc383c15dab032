"""Stable Diffusion 3 / 3.5: an MMDiT reading CLIP-L and CLIP-G (penultimate states side by side, both pooled
outputs) and T5 (optional: zeros without it), trained by rectified flow with SD3's shifted schedule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from studio.training.conditioning import PromptEncoding, text_encoders
from studio.training.families.flow import FlowFamily, t5_states
from studio.adapters.base import tokenizer_ids

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length


class SD3Family(FlowFamily):
    name = "sd3"

    def encode(self, captions: list[str], device, encoders=None) -> PromptEncoding:
        """As `StableDiffusion3Pipeline.encode_prompt` encodes a prompt (a test compares them), through
        `encoders` (the engine's prepared copies where the CLIP encoders train)."""
        encoders = encoders or text_encoders(self.pipe)
        hidden, pooled = [], []
        for tokenizer, encoder in encoders[:2]:
            out = encoder(tokenizer_ids(tokenizer, captions).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        if len(encoders) > 2:
            t5 = t5_states(*encoders[2], captions, T5_TOKENS, device)
        else:
            width = self.pipe.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(captions), T5_TOKENS, width, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEncoding(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def inputs(self, prompt: PromptEncoding, batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": prompt.hidden, "pooled_projections": prompt.pooled}

    def forward(self, model, noisy, timesteps, inputs):
        return model(hidden_states=noisy, timestep=timesteps, **inputs, return_dict=False)[0]
