"""Stable Diffusion 3 / 3.5: an MMDiT reading CLIP-L and CLIP-G (penultimate states side by side, both pooled
outputs) and T5 (optional: zeros without it), trained by rectified flow with SD3's shifted schedule."""

from __future__ import annotations

from typing import Any

from studio.training.conditioning import PromptEncoding
from studio.training.families.flow import FlowFamily


class SD3Family(FlowFamily):
    name = "sd3"

    @classmethod
    def claims(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    def encode(self, captions: list[str], device, encoders=None) -> PromptEncoding:
        hidden, _, pooled, _ = self.pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                                       do_classifier_free_guidance=False)
        return PromptEncoding(hidden, pooled)

    def inputs(self, prompt: PromptEncoding, batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": prompt.hidden, "pooled_projections": prompt.pooled}

    def forward(self, model, noisy, timesteps, inputs):
        return model(hidden_states=noisy, timestep=timesteps, **inputs, return_dict=False)[0]
