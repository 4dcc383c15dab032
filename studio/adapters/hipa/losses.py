"""HiPA's losses between the one-step student's image and the teacher's: a spatial term (pixels, plus an
optional perceptual network) and a high-frequency term (Fourier high-pass and Sobel edge maps). Plain
functions on Bx3xHxW tensors in [0, 1]."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def high_pass(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Re F^-1(M F x): the image with every frequency below `radius` (cycles per pixel, in (0, 0.5)) removed."""
    h, w = images.shape[-2:]
    fy = torch.fft.fftfreq(h, device=images.device)
    fx = torch.fft.fftfreq(w, device=images.device)
    keep = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() >= radius
    return torch.fft.ifft2(torch.fft.fft2(images.float()) * keep).real


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude per channel (replicate padding, so flat borders have no edge)."""
    c = images.shape[1]
    kx = _SOBEL_X.to(images.device, torch.float32)
    kernels = torch.stack([kx, kx.T])[:, None].repeat(c, 1, 1, 1)  # (2c, 1, 3, 3): x and y per channel
    grads = F.conv2d(F.pad(images.float(), (1, 1, 1, 1), mode="replicate"), kernels, groups=c)
    gx, gy = grads[:, 0::2], grads[:, 1::2]
    return (gx ** 2 + gy ** 2 + 1e-12).sqrt()


def high_frequency_loss(student: torch.Tensor, teacher: torch.Tensor, *, radius: float = 0.1,
                        fourier_weight: float = 1.0, edge_weight: float = 1.0) -> torch.Tensor:
    """L1 between high-passed images plus L1 between edge maps: zero for identical images, and larger the more
    of the teacher's fine detail (edges, texture) the student's image lacks."""
    loss = student.new_zeros((), dtype=torch.float32)
    if fourier_weight:
        loss = loss + fourier_weight * F.l1_loss(high_pass(student, radius), high_pass(teacher, radius))
    if edge_weight:
        loss = loss + edge_weight * F.l1_loss(edge_map(student), edge_map(teacher))
    return loss


def spatial_loss(student: torch.Tensor, teacher: torch.Tensor, *, pixel_weight: float = 1.0,
                 perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 perceptual_weight: float = 1.0) -> torch.Tensor:
    """MSE of pixels plus, with a perceptual network, its feature distance."""
    loss = pixel_weight * F.mse_loss(student.float(), teacher.float())
    if perceptual is not None and perceptual_weight:
        loss = loss + perceptual_weight * perceptual(student, teacher)
    return loss
