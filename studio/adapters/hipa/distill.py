"""Training the one-step adaptor: teacher pairs (noise, prompt, the frozen model's multi-step image from that
noise), then the student (base denoiser + adaptor, one call at T) trained so its decoded image matches the
teacher's under the spatial and high-frequency losses, back-propagated through the frozen VAE decoder. These
are the pieces (pairs, the step's batch, its loss); the loop is the training engine's (studio.tasks.distill).

On the rectified-flow families (SD3, Flux) the student's one call is one Euler step from pure noise (σ = 1) to
x0 = z − v, which is what the pipeline runs with one inference step; the teacher is the pipeline's own multi-step
sampler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from studio.adapters.base import AdapterError, base_fingerprint, denoiser
from studio.adapters.denoise import denoiser_call
from studio.adapters.files import write_safetensors
from studio.adapters.hipa.adversarial import (Features, FeatureDiscriminator, discriminator_loss,
                                              generator_loss, pooled_text)
from studio.adapters.hipa.config import DistillSettings, HipaConfig
from studio.adapters.hipa.losses import high_frequency_loss, spatial_loss
from studio.adapters.hipa.schedule import one_step_timestep, predicted_x0
from studio.adapters.prompts import embed_prompts
from studio.adapters.sampling import is_flow
from studio.utils.schedules import warmup_cosine

TRAINING_NAME = "one_step"
Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TeacherPairs:
    """What the student learns from: noise z (N x C x h x w), prompts, and the teacher's output from z: its
    final latents (N x C x h x w) and their decoded images (N x 3 x H x W, uint8)."""

    noise: torch.Tensor
    prompts: list[str]
    latents: torch.Tensor
    images: torch.Tensor
    steps: int
    guidance: float
    base: dict

    def save(self, path: str | Path) -> Path:
        meta = {"format": "studio-teacher-pairs", "prompts": json.dumps(self.prompts), "steps": str(self.steps),
                "guidance": str(self.guidance), "base_model": json.dumps(self.base, sort_keys=True)}
        return write_safetensors(path, {"noise": self.noise, "latents": self.latents, "images": self.images}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherPairs":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "studio-teacher-pairs":
                    raise AdapterError(f"{path}: not a teacher-pairs file")
                return cls(f.get_tensor("noise"), json.loads(meta["prompts"]), f.get_tensor("latents"),
                           f.get_tensor("images"),
                           int(meta["steps"]), float(meta["guidance"]), json.loads(meta["base_model"]))
        except AdapterError:
            raise
        except Exception as e:
            raise AdapterError(f"{path}: cannot read teacher pairs ({type(e).__name__}: {e})") from None

    def fits(self, pipe, settings: DistillSettings) -> bool:
        return (self.base == base_fingerprint(pipe) and self.steps == settings.teacher_steps
                and self.guidance == settings.teacher_guidance and len(self.prompts) >= settings.pairs
                and tuple(self.noise.shape[1:]) == latent_shape(pipe, settings.resolution))


def latent_shape(pipe, resolution: int | None = None) -> tuple[int, int, int]:
    """(channels, h, w) of the latents of a `resolution`-pixel square image (None: the pipeline's native size)."""
    native = getattr(pipe, "default_sample_size", None) or denoiser(pipe)[1].config.sample_size
    size = (resolution or native * pipe.vae_scale_factor) // pipe.vae_scale_factor
    return pipe.vae.config.latent_channels, size, size


def _pipeline_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the pipeline takes them: FluxPipeline packs 2×2 patches into tokens."""
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        return FluxPipeline._pack_latents(latents, *latents.shape)
    return latents


def _image_latents(pipe, latents: torch.Tensor, pixels: int) -> torch.Tensor:
    """The pipeline's latent output as B×C×h×w latents (Flux returns them packed)."""
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        return FluxPipeline._unpack_latents(latents, pixels, pixels, pipe.vae_scale_factor)
    return latents


def make_teacher_pairs(pipe, prompts: list[str], settings: DistillSettings, *, batch: int = 16,
                       progress: bool = False, on_batch: Callable[[int, int], None] | None = None) -> TeacherPairs:
    """Run the frozen model (its own scheduler, `teacher_steps` steps, guidance `teacher_guidance`: CFG, or on Flux
    the distilled guidance it reads) from seeded noise; image i is the teacher's output from noise[i] and
    prompts[i]."""
    if not prompts:
        raise AdapterError("the teacher needs prompts to draw")
    generator = torch.Generator().manual_seed(settings.seed)
    shape = latent_shape(pipe, settings.resolution)
    noise = torch.randn((len(prompts), *shape), generator=generator)
    pixels = shape[-1] * pipe.vae_scale_factor
    latents, images = [], []
    dtype = denoiser(pipe)[1].dtype
    for i in tqdm(range(0, len(prompts), batch), desc="teacher", disable=not progress):
        out = pipe(prompts[i:i + batch], latents=_pipeline_latents(pipe, noise[i:i + batch].to(pipe.device, dtype)),
                   height=pixels, width=pixels, num_inference_steps=settings.teacher_steps,
                   guidance_scale=settings.teacher_guidance, output_type="latent").images
        out = _image_latents(pipe, out, pixels)
        with torch.no_grad():
            image = decode(pipe, out)
        latents.append(out.float().cpu())
        images.append((image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        if on_batch is not None:
            on_batch(min(i + batch, len(prompts)), len(prompts))
    return TeacherPairs(noise, list(prompts), torch.cat(latents), torch.cat(images), settings.teacher_steps,
                        settings.teacher_guidance, base_fingerprint(pipe))


@dataclass
class PromptEmbeds:
    """The encoded prompts the student reads, one row per prompt; `pooled` where the family reads one (SDXL, SD3,
    Flux)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, idx) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden[idx], None if self.pooled is None else self.pooled[idx])


def encode_prompts(pipe, prompts: list[str], batch: int = 64) -> PromptEmbeds:
    parts = [embed_prompts(pipe, prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    pooled = None if parts[0][1] is None else torch.cat([p for _, p in parts])
    return PromptEmbeds(torch.cat([h for h, _ in parts]), pooled)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] (not clamped, so gradients pass everywhere); the VAE's scale undone, and its
    shift where it has one (SD3, Flux)."""
    config = pipe.vae.config
    return pipe.vae.decode(latents / config.scaling_factor + (config.get("shift_factor") or 0.0)).sample / 2 + 0.5


def one_step_latents(pipe, noise: torch.Tensor, prompts: PromptEmbeds, timestep: int, *,
                     model=None) -> torch.Tensor:
    """The student's x0: one call of the denoiser (`model`, default the pipeline's) at `timestep` on `noise`, with
    the conditioning the pipeline generates with (SDXL: pooled prompt and time ids). On a flow model the call is at
    σ = 1 and x0 = z − v (one Euler step to σ = 0)."""
    size = noise.shape[-1] * pipe.vae_scale_factor
    call = denoiser_call(pipe, model if model is not None else denoiser(pipe)[1], size)
    if is_flow(pipe):
        return noise - call(noise, float(timestep), prompts.hidden, prompts.pooled)
    t = torch.full((noise.shape[0],), timestep, device=noise.device, dtype=torch.long)
    out = call(noise, t, prompts.hidden, prompts.pooled)
    # the pipeline's scheduler holds alpha_bar of the training schedule (DDIM, LCM, Euler: the same betas)
    return predicted_x0(out, noise, float(pipe.scheduler.alphas_cumprod[timestep]),
                        pipe.scheduler.config.get("prediction_type", "epsilon"))


def one_step_images(pipe, noise: torch.Tensor, prompts: PromptEmbeds, timestep: int) -> torch.Tensor:
    """The student's images: its x0, decoded."""
    return decode(pipe, one_step_latents(pipe, noise, prompts, timestep))


def check_pipeline(pipe, config: HipaConfig) -> None:
    last = one_step_timestep(pipe)
    if config.timestep != last:
        raise AdapterError(f"the one-step timestep must be the model's last training timestep ({last}), "
                           f"got {config.timestep}")


def pair_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The pairs of step `step` (from 1): epochs of shuffled pairs, each epoch's order drawn from (seed, epoch),
    so any step's batch is known without the steps before it."""
    first = (step - 1) * batch
    out = []
    for position in range(first, first + batch):
        epoch, index = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[index]))
    return out


def student_loss(pipe, student, config: HipaConfig, settings: DistillSettings, pairs: TeacherPairs,
                 embeds: PromptEmbeds, idx: list[int], *, perceptual: Perceptual | None = None,
                 features: Features | None = None, discriminator=None) -> tuple[torch.Tensor, dict]:
    """The student's loss on the pairs `idx` (the mean over them): spatial, high-frequency and (with a
    discriminator) adversarial terms; `student`: the denoiser being trained (the engine's prepared copy). Also
    returns what the discriminator's own step needs."""
    base = denoiser(pipe)[1]
    device, dtype = base.device, base.dtype
    noise = pairs.noise[idx].to(device, dtype)
    teacher = pairs.images[idx].to(device, torch.float32) / 255
    x0 = one_step_latents(pipe, noise, embeds[idx], config.timestep, model=student)
    drawn = decode(pipe, x0).float()
    loss = spatial_loss(drawn, teacher, pixel_weight=settings.pixel_weight, perceptual=perceptual,
                        perceptual_weight=settings.perceptual_weight)
    if settings.latent_weight:
        loss = loss + settings.latent_weight * F.mse_loss(x0.float(), pairs.latents[idx].to(device))
    if settings.high_frequency:
        loss = loss + high_frequency_loss(drawn, teacher, radius=settings.radius,
                                          fourier_weight=settings.fourier_weight, edge_weight=settings.edge_weight)
    seen = {}
    if discriminator is not None:
        text = pooled_text(embeds.hidden[idx])
        student_features = features(drawn)
        loss = loss + settings.adversarial_weight * generator_loss(discriminator, student_features, text)
        seen = {"teacher": teacher, "fake": [f.detach() for f in student_features], "text": text}
    return loss, seen


def discriminator_step(discriminator, optimizer, features: Features, seen: dict) -> None:
    """The discriminator's step on the batch the student just trained on."""
    with torch.no_grad():
        real = features(seen["teacher"])
    optimizer.zero_grad(set_to_none=True)  # (the student's step left gradients here too)
    discriminator_loss(discriminator, real, seen["fake"], seen["text"]).backward()
    optimizer.step()


def make_discriminator(pipe, settings: DistillSettings, pairs: TeacherPairs, features: Features, text_dim: int):
    device = denoiser(pipe)[1].device
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        with torch.no_grad():
            channels = [f.shape[1] for f in features(pairs.images[:1].to(device, torch.float32) / 255)]
        disc = FeatureDiscriminator(channels, text_dim).to(device)
    return disc, torch.optim.AdamW(disc.parameters(), lr=settings.discriminator_lr, betas=(0.0, 0.99),
                                   weight_decay=0.0)


def lr_factor(settings: DistillSettings):
    """Linear warm-up, then cosine down to a tenth (a factor of the step)."""
    return lambda step: warmup_cosine(step, settings.steps, settings.warmup)


def check_distill(pipe, config: HipaConfig, settings: DistillSettings, pairs: TeacherPairs | None,
                  features: Features | None) -> None:
    settings.validate()
    if settings.adversarial_weight and features is None:
        raise AdapterError("the adversarial term needs a feature network for its discriminator (studio distill "
                           "gives the model's own VAE encoder): pass features=, or set adversarial_weight=0")
    check_pipeline(pipe, config)
    if pairs is None or pairs.base != base_fingerprint(pipe):
        raise AdapterError("the teacher pairs were made by another model; make them again for this one")
