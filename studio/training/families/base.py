"""The interface every model family gives the concept recipe."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from studio.training.conditioning import PromptEncoding

# teacher(noisy, timesteps, inputs) -> the prediction a student is trained towards (prior preservation's base
# model); the same signature as Family.forward without the model
Teacher = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


class FamilyError(ValueError):
    """A setting or model that this family cannot train; the message says why."""


class Family:
    """One model family's training side. Built per run: it holds the run's noise schedule."""

    name: ClassVar[str]
    # the pipeline attribute of the denoiser ("unet" or "transformer")
    denoiser: ClassVar[str]
    # whether the trigger can be trained as a new token of the text encoders
    trains_trigger_token: ClassVar[bool] = True
    # the per-example extra inputs cached beside the latents ("time_ids": SDXL's micro-conditioning)
    reads_time_ids: ClassVar[bool] = False

    def __init__(self, pipe, config) -> None:
        self.pipe = pipe
        self.config = config

    @classmethod
    def claims(cls, pipe) -> bool:
        raise NotImplementedError

    def default_resolution(self) -> int:
        raise NotImplementedError

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them."""
        return latents * self.pipe.vae.config.scaling_factor

    def encode(self, captions: list[str], device, encoders=None) -> PromptEncoding:
        """The captions' encoding, one row each; `encoders` are the (tokenizer, encoder) pairs to run (the
        engine's prepared copies where text encoders train)."""
        raise NotImplementedError

    def inputs(self, prompt: PromptEncoding, batch: dict[str, Any]) -> dict[str, Any]:
        """The denoiser's keyword inputs besides the noisy latents and timesteps."""
        raise NotImplementedError

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` training timesteps (indices into the training schedule) drawn as the family trains."""
        raise NotImplementedError

    def forward(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction, shaped as `noisy`."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any], inputs: dict[str, Any], teacher: Teacher | None = None,
             reference: Teacher | None = None) -> torch.Tensor:
        """The objective on `batch` (latents, noise, timesteps); towards `teacher`'s prediction where given; with
        `reference` (the base model) and the config's `dco_beta`, the consistency loss against it."""
        raise NotImplementedError
