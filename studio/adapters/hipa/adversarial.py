"""An optional adversarial term for the one-step student, after ADD (Sauer et al., 2023): the discriminator is
a set of small trainable heads on the stages of a frozen feature network, conditioned on the prompt by
projection, trained with hinge losses against the teacher's images. Not part of HiPA: its regression losses
pull the student towards the average of what the teacher might draw near a given noise, and a discriminator
that knows the prompt pushes it back onto one of those images instead. Off unless `adversarial_weight` > 0."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Features = Callable[[torch.Tensor], list[torch.Tensor]]  # images (B×3×H×W in [0, 1]) → stage activations


class FeatureDiscriminator(nn.Module):
    """One head per feature stage: conv, norm, LeakyReLU, then a per-position logit plus the projection of the
    head's features on the prompt's embedding (a projection discriminator). Returns one logit per image."""

    def __init__(self, channels: list[int], text_dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(1, c), nn.LeakyReLU(0.2))
                                   for c in channels)
        self.logits = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in channels)
        self.embed = nn.ModuleList(nn.Linear(text_dim, c) for c in channels)

    def forward(self, features: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        out = []
        for f, head, logit, embed in zip(features, self.heads, self.logits, self.embed):
            h = head(f)
            match = (h * embed(text)[:, :, None, None]).sum(1, keepdim=True) / h.shape[1] ** 0.5
            out.append((logit(h) + match).mean((1, 2, 3)))
        return torch.stack(out, 1).sum(1)


def pooled_text(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """B×tokens×D → B×D: the prompt embedding the discriminator is conditioned on (mean over tokens)."""
    return prompt_embeds.float().mean(1)


def discriminator_loss(disc: FeatureDiscriminator, real: list[torch.Tensor], fake: list[torch.Tensor],
                       text: torch.Tensor) -> torch.Tensor:
    """Hinge loss: the teacher's image with its own prompt is real; the student's image, and the teacher's image
    under another prompt of the batch (so the heads must read the prompt), are fake."""
    loss = F.relu(1 - disc(real, text)).mean() + 0.5 * F.relu(1 + disc(fake, text)).mean()
    if text.shape[0] > 1:
        loss = loss + 0.5 * F.relu(1 + disc(real, text.roll(1, 0))).mean()
    return loss


def generator_loss(disc: FeatureDiscriminator, fake: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    return -disc(fake, text).mean()
