"""The feature network HiPA's perceptual term and the adversarial term's discriminator read: the model's own
frozen VAE encoder, which every latent-diffusion model ships. Its activations after each down block play the role
LPIPS's VGG stages play (and, in ADD/LADD, the frozen network the discriminator heads sit on). No benchmark
judge is read by any training loss: the examiner stays out of the student's objective."""

from __future__ import annotations

import torch

from studio.adapters.hipa.adversarial import Features


def vae_stage_features(vae) -> Features:
    """images (B×3×H×W in [0, 1]) → the encoder's activations after each of its down blocks (the VAE is frozen;
    gradients reach the images)."""
    vae.requires_grad_(False)
    encoder = vae.encoder

    def activations(images: torch.Tensor) -> list[torch.Tensor]:
        x, out = encoder.conv_in((images * 2 - 1).to(encoder.conv_in.weight.dtype)), []
        for block in encoder.down_blocks:
            x = block(x)
            out.append(x)
        return out

    return activations


def feature_distance(features: Features):
    """An LPIPS-style distance on `features`' stages: per stage, channel-normalised activations, squared difference
    summed over channels and averaged over positions; the mean over stages. Differentiable in both images."""

    def normalised(images: torch.Tensor) -> list[torch.Tensor]:
        return [x.float() / (x.float().norm(dim=1, keepdim=True) + 1e-8) for x in features(images)]

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = normalised(a), normalised(b)
        return torch.stack([((x - y) ** 2).sum(1).mean() for x, y in zip(fa, fb)]).mean()

    return distance
