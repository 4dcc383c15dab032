"""A fast decoder for the embedded model: diffusers' `AutoencoderTiny` (TAESD's architecture) distilled from the
shapes VAE, for one-step generation, where the VAE's decoder costs more than the one UNet call.

It reads and writes latents as the UNet sees them (the VAE's latents times its scaling factor), as TAESD does for
SD, so it replaces `pipe.vae` in any pipeline (`load_pipeline(..., fast_decoder=...)`). Both halves are trained
to match the VAE: the decoder its decoded images, the encoder its latent means. Training runs on random crops
(both halves are convolutional), 4x cheaper than whole images on the CPU."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from studio.utils.schedules import warmup_cosine


def tiny_config(width: int = 32, blocks: int = 1) -> dict:
    """diffusers' AutoencoderTiny layout at `width` channels with `blocks` blocks a level (TAESD itself is 64 and
    3; the first level of the encoder and the last of the decoder keep one block, as in TAESD)."""
    return {"encoder_block_out_channels": (width,) * 4, "decoder_block_out_channels": (width,) * 4,
            "num_encoder_blocks": (1, blocks, blocks, blocks), "num_decoder_blocks": (blocks, blocks, blocks, 1),
            "latent_channels": 4}


# one block a level and 32 channels: 0.14M decoder parameters, a third of the shapes VAE decoder's time on the
# CPU (batch 8, one thread, timed in python: 0.34 s against 1.02 s); the first distillation's size
TINY_CONFIG = tiny_config(32, 1)


def vae_targets(vae, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latents (mean, scaled) of `images` (uint8, N x H x W x 3) and its decoding of them in [-1, 1]."""
    latents, decoded = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].permute(0, 3, 1, 2).float() / 127.5 - 1
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            latents.append(z)
            decoded.append(vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1).half())
    return torch.cat(latents), torch.cat(decoded)


def distill_fast_decoder(vae, images: torch.Tensor, *, steps: int = 1500, batch: int = 16, lr: float = 1e-3,
                         crop: int = 8, seed: int = 0, minutes: float = 0.0, config: dict | None = None, log=print):
    """An AutoencoderTiny (`config`, default TINY_CONFIG) trained to match `vae` on `images` (uint8 renders):
    decoder MSE to the VAE's decoding, encoder MSE to its latents, on crop x crop latent crops, the learning rate
    decaying by a cosine over the steps or the time budget, whichever ends first. Returns (model, report)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(**(config or TINY_CONFIG))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != 8 or vae.config.latent_channels != tiny.config.latent_channels:
        raise ValueError(f"the fast decoder fits a VAE of {tiny.config.latent_channels} latent channels and factor "
                         f"8, not {vae.config.latent_channels} and {factor}")
    held = min(256, len(images) // 8)
    latents, decoded = vae_targets(vae, images)
    pixels = images.permute(0, 3, 1, 2)
    train_idx = len(images) - held
    opt = torch.optim.AdamW(tiny.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    started, size = time.time(), latents.shape[-1]
    done = 0
    for step in range(steps):
        spent = (time.time() - started) / (minutes * 60) if minutes else 0.0
        if spent > 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, 50, spent)
        idx = torch.randint(0, train_idx, (batch,), generator=gen)
        corners = torch.randint(0, size - crop + 1, (batch, 2), generator=gen).tolist()  # in latent cells
        z, target, x_in = [], [], []
        for i, (r, c) in zip(idx.tolist(), corners):
            rows, cols = slice(r * factor, (r + crop) * factor), slice(c * factor, (c + crop) * factor)
            z.append(latents[i, :, r:r + crop, c:c + crop])
            target.append(decoded[i, :, rows, cols].float())
            x_in.append(pixels[i, :, rows, cols].float() / 127.5 - 1)
        z, target, x_in = torch.stack(z), torch.stack(target), torch.stack(x_in)
        loss = F.mse_loss(tiny.decode(z).sample, target) + F.mse_loss(tiny.encode(x_in).latents, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if step % 250 == 0:
            log(f"fast decoder step {step} loss {loss.item():.4f}")
    tiny.eval()
    return tiny, {"steps": done, "seconds": time.time() - started,
                  **fast_decoder_report(tiny, latents[train_idx:], decoded[train_idx:], images[train_idx:])}


def fast_decoder_report(tiny, latents: torch.Tensor, decoded: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """On held-out renders (`images`, uint8 N x H x W x 3, with the VAE's `latents` and `decoded` images of them):
    the PSNR of the fast decoding against the VAE's (images in [0, 1]) and the RMSE of the fast encoder's latents
    of the renders against the VAE's."""
    with torch.no_grad():
        fast = tiny.decode(latents).sample.clamp(-1, 1)
        mse = F.mse_loss((fast + 1) / 2, (decoded.float() + 1) / 2).item()
        pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        latent_rmse = F.mse_loss(tiny.encode(pixels).latents, latents).sqrt().item()
    return {"psnr_vs_vae_db": float(10 * np.log10(1 / max(mse, 1e-12))), "encoder_latent_rmse": latent_rmse}
