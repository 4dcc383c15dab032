"""What a UNet reads besides the noisy latents, built the same way for every method: the prompt's encoding and,
on SDXL, the second encoder's pooled output and the size/crop ids ("micro-conditioning").

SD 1.x/2.x read the (one) text encoder's last hidden states. SDXL reads the penultimate hidden states of both
encoders side by side, the second encoder's pooled projection, and six numbers per image: its original size,
the top-left of the crop taken from it, and the target size (as diffusers' SDXL pipeline and training scripts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from studio.adapters.base import pipeline_text_encoders, tokenizer_ids


@dataclass
class PromptEncoding:
    """Encoded prompts, one row per prompt; `pooled` only for models that read it (SDXL)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def row(self, i: int) -> "PromptEncoding":
        return PromptEncoding(self.hidden[i], None if self.pooled is None else self.pooled[i])

    @staticmethod
    def stack(rows: list["PromptEncoding"]) -> "PromptEncoding":
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return PromptEncoding(torch.stack([r.hidden for r in rows]), pooled)


def text_encoders(pipe, modules: dict[str, torch.nn.Module] | None = None) -> list[tuple[Any, torch.nn.Module]]:
    """(tokenizer, encoder) of each text encoder the pipeline has; `modules` replaces encoders by name (the
    training engine's prepared copies)."""
    modules = modules or {}
    return [(tokenizer, modules.get(name, encoder)) for name, tokenizer, encoder in pipeline_text_encoders(pipe)]


def encode_prompts(encoders: list[tuple[Any, torch.nn.Module]], captions: list[str], device) -> PromptEncoding:
    """The prompts as the pipelines encode them: one encoder's last hidden states, or (two encoders, SDXL) both
    penultimate hidden states concatenated and the last encoder's pooled projection."""
    if len(encoders) == 1:
        tokenizer, encoder = encoders[0]
        return PromptEncoding(encoder(tokenizer_ids(tokenizer, captions).to(device))[0])
    hidden, pooled = [], None
    for tokenizer, encoder in encoders:
        out = encoder(tokenizer_ids(tokenizer, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return PromptEncoding(torch.cat(hidden, dim=-1), pooled)


def unet_inputs(prompt: PromptEncoding, ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments of `UNet2DConditionModel.forward` for these prompts (and, on SDXL, their time ids)."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": prompt.hidden}
    if prompt.pooled is not None:
        if ids is None:
            raise ValueError("this UNet reads size/crop time ids with the pooled prompt; none were given")
        kwargs["added_cond_kwargs"] = {"text_embeds": prompt.pooled, "time_ids": ids.to(prompt.pooled)}
    return kwargs


__all__ = ["PromptEncoding", "encode_prompts", "text_encoders", "unet_inputs"]
