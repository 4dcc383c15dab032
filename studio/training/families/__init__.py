"""What differs between model families when a concept is trained: how captions become the denoiser's
inputs, how VAE latents are scaled, and the objective (DDPM noise/velocity prediction or flow matching). A
family is one small module here; the concept recipe asks `family_for(pipe, config)` and names none.

- `unet`: SD 1.x / 2.x, SDXL and the embedded shapes model (a UNet and a DDPM-style scheduler)
- `sd3`: Stable Diffusion 3 / 3.5 (MMDiT, CLIP-L + CLIP-G + optional T5, rectified flow)
- `flux`: Flux.1 (MMDiT with single-stream blocks, CLIP-L pooled + T5, packed 2×2 latents, rectified flow)

A new family (Qwen-Image, say) is a module with a `Family` subclass and one line in FAMILIES."""

from __future__ import annotations

from studio.training.families.base import Family, FamilyError
from studio.training.families.flux import FluxFamily
from studio.training.families.sd3 import SD3Family
from studio.training.families.unet import UNetFamily

FAMILIES: list[type[Family]] = [SD3Family, FluxFamily, UNetFamily]  # the first that claims a pipeline wins


def family_for(pipe, config) -> Family:
    """The family object for `pipe`, set up for the run's settings `config` (a TrainConfig)."""
    for cls in FAMILIES:
        if cls.claims(pipe):
            return cls(pipe, config)
    raise FamilyError(f"no training family knows a {type(pipe).__name__}")


__all__ = ["FAMILIES", "Family", "FamilyError", "FluxFamily", "SD3Family", "UNetFamily", "family_for"]
