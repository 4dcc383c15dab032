"""Training a membrane, data-free: latents the model denoises itself, a negative-guidance target
eps(sur) - eta * (eps(tar) - eps(sur)) from the frozen model, and Latent Anchoring. These are the step's
pieces (its random draws and its loss); the loop is the training engine's (studio.tasks.erase runs it). The
same loss trains the ESD-style baseline (cross-attention fine-tuned directly, no anchors).

On the rectified-flow families (SD3, Flux) the predictions are velocities ε − x0 and the latents come from the
pipeline's Euler schedule; the target is the same combination of predictions: at a fixed x_t a velocity is an
affine function of the predicted noise, so negative guidance in velocity is negative guidance in noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from studio.adapters.base import AdapterError
from studio.adapters.prompts import embed_prompts
from studio.adapters.sampling import Schedule, sampling_schedule
from studio.adapters.spm.config import EraseSettings, SpmConfig
from studio.utils.settings import from_values

TRAINING_NAME = "membrane"


def random_anchors(target: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Points of text-embedding space away from the target: a random direction (kept with probability
    1 - cos to the target), scaled to the target's norm times U(0.8, 1.2)."""
    out = []
    flat = target.flatten().float()
    while len(out) < count:
        n = torch.randn(flat.shape, generator=generator)
        n = n / n.norm()
        cos = float(n @ flat / flat.norm())
        if float(torch.rand((), generator=generator)) > cos:
            scale = 0.8 + 0.4 * float(torch.rand((), generator=generator))
            out.append((scale * flat.norm() * n).view_as(target).to(target.dtype))
    return torch.stack(out)


@dataclass
class EraseTargets:
    """What every erase step reads: the embedded target prompts, surrogate and empty prompt, and the few-step
    schedule the training latents are drawn along (DDIM, or the flow families' Euler schedule)."""

    target: torch.Tensor
    surrogate: torch.Tensor
    empty: torch.Tensor
    schedule: Schedule
    latent_shape: tuple[int, int, int]
    pixels: int  # the side of the images the latents stand for (SDXL's size conditioning reads it)
    pooled: dict[str, torch.Tensor] | None = None  # SDXL, SD3, Flux: "target" (N, d), "surrogate", "empty" (d)


@dataclass
class EraseDraw:
    """One step's randomness for its whole (global) batch: the prompt of each row, the DDIM step k the latents
    stop at, the starting noise, and the anchors (with the row whose latents each one reads)."""

    chosen: list[int]
    k: int
    noise: torch.Tensor
    anchors: torch.Tensor | None
    anchor_rows: list[int]
    anchors_pooled: torch.Tensor | None = None  # each anchor's pooled embedding, where the family reads one


def erase_targets(pipe, config: SpmConfig, settings: EraseSettings) -> EraseTargets:
    from studio.adapters.base import denoiser

    prompts = config.target_prompts()
    if not prompts:
        raise AdapterError("nothing to erase: name at least one concept (or target prompt)")
    # the pipeline's native size: SDXL, SD3 and Flux pipelines keep it, SD 1.x reads the UNet's config
    native = getattr(pipe, "default_sample_size", None) or denoiser(pipe)[1].config.sample_size
    pixels = settings.resolution or native * pipe.vae_scale_factor
    size = pixels // pipe.vae_scale_factor
    schedule = sampling_schedule(pipe, settings.denoise_steps, size)
    (target, target_pooled), (surrogate, surrogate_pooled), (empty, empty_pooled) = (
        embed_prompts(pipe, prompts), embed_prompts(pipe, [config.surrogate]), embed_prompts(pipe, [""]))
    pooled = None
    if target_pooled is not None:
        pooled = {"target": target_pooled, "surrogate": surrogate_pooled[0], "empty": empty_pooled[0]}
    return EraseTargets(target, surrogate[0], empty[0], schedule, (pipe.vae.config.latent_channels, size, size),
                        pixels, pooled)


def erase_draw(targets: EraseTargets, config: SpmConfig, batch: int, generator: torch.Generator, *,
               anchors: bool) -> EraseDraw:
    """Every random draw of a step, from `generator` alone (so a step is a function of its generator)."""
    n_prompts, steps = len(targets.target), len(targets.schedule.timesteps)
    chosen = torch.randint(0, n_prompts, (batch,), generator=generator).tolist()
    k = int(torch.randint(1, steps, (), generator=generator))
    noise = torch.randn((batch, *targets.latent_shape), generator=generator)
    parts, rows, pooled_parts = [], [], []
    if anchors and config.anchor_weight > 0:
        # `anchors` per step whatever the batch: anchor j reads the latents of row j mod batch (with batch 1, as
        # the sd15 preset trains, all three anchors read the one row); where the family reads a pooled embedding,
        # each also gets a random one, drawn the same way around the target's
        for j in range(config.anchors):
            row = j % batch
            parts.append(random_anchors(targets.target[chosen[row]].cpu(), 1, generator))
            if targets.pooled is not None:
                pooled_parts.append(random_anchors(targets.pooled["target"][chosen[row]].cpu(), 1, generator))
            rows.append(row)
        if config.anchor_empty:
            parts.append(targets.empty.cpu()[None])
            if targets.pooled is not None:
                pooled_parts.append(targets.pooled["empty"].cpu()[None])
            rows.append(len(rows) % batch)
    return EraseDraw(chosen, k, noise, torch.cat(parts) if parts else None, rows,
                     torch.cat(pooled_parts) if pooled_parts else None)


def denoise(student, schedule: Schedule, x: torch.Tensor, steps: int, cond: tuple, uncond: tuple,
            guidance: float) -> torch.Tensor:
    """`x` after the first `steps` steps of `schedule`, the prediction guided from `uncond` to `cond` (each a
    (text, pooled) pair; pooled None where the family reads none) by classifier-free guidance; with guidance 1
    the conditional prediction alone (Flux: its distilled guidance is an input)."""
    def both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.cat([a, b])

    for i, t in enumerate(schedule.timesteps[:steps]):
        if guidance == 1:
            guided = student(x, t, *cond, grad=False)
        else:
            u, c = student(torch.cat([x, x]), t, both(uncond[0], cond[0]), both(uncond[1], cond[1]),
                           grad=False).chunk(2)
            guided = u + guidance * (c - u)
        x = schedule.step(guided, i, x)
    return x


def erase_loss(student, frozen, targets: EraseTargets, config: SpmConfig, settings: EraseSettings,
               draw: EraseDraw, rows: range) -> torch.Tensor:
    """The negative-guidance loss of the batch rows `rows` (plus Latent Anchoring on the anchors those rows
    own), as their part of the whole batch's loss: summed over them and divided by the batch's counts.
    `student(x, t, text, pooled)` is the model being trained, `frozen(x, t, text, pooled)` the original (pooled:
    the pooled embeddings where the family reads them, else None)."""
    device, schedule, b = targets.target.device, targets.schedule, len(draw.chosen)
    rows = list(rows)
    n = len(rows)
    cond = targets.target[[draw.chosen[r] for r in rows]]
    pooled = targets.pooled
    x = draw.noise[rows].to(device) * schedule.init_sigma
    owned = [j for j, r in enumerate(draw.anchor_rows) if r in rows]

    def pooled_of(*parts: torch.Tensor | None) -> torch.Tensor | None:  # pooled rows beside the texts
        return None if pooled is None else torch.cat(parts)

    with torch.no_grad():
        uncond = targets.empty.expand(n, -1, -1)
        cond_pooled = uncond_pooled = anchor_pooled = sur_pooled = None
        if pooled is not None:
            cond_pooled = pooled["target"][[draw.chosen[r] for r in rows]]
            uncond_pooled, sur_pooled = pooled["empty"].expand(n, -1), pooled["surrogate"].expand(n, -1)
            anchor_pooled = draw.anchors_pooled[owned].to(device) if owned else cond_pooled[:0]
        x = denoise(student, schedule, x, draw.k, (cond, cond_pooled), (uncond, uncond_pooled),
                    settings.sample_guidance)
        t = schedule.timesteps[draw.k]  # the timestep the schedule actually reached at x_k
        anchor_emb = draw.anchors[owned].to(device) if owned else cond[:0]
        anchor_x = x[[rows.index(draw.anchor_rows[j]) for j in owned]] if owned else x[:0]
        base = frozen(torch.cat([x, x, anchor_x]), t,
                      torch.cat([cond, targets.surrogate.expand(n, -1, -1), anchor_emb]),
                      pooled_of(cond_pooled, sur_pooled, anchor_pooled))
        e_tar, e_sur = base[:n], base[n:2 * n]
        goal = e_sur - config.eta * (e_tar - e_sur)
    pred = student(torch.cat([x, anchor_x]), t, torch.cat([cond, anchor_emb]),
                   pooled_of(cond_pooled, anchor_pooled), grad=True)
    per_row = x[0].numel()
    loss = F.mse_loss(pred[:n].float(), goal.float(), reduction="sum") / (per_row * b)
    if draw.anchors is not None:
        anchored = F.mse_loss(pred[n:].float(), base[2 * n:].float(), reduction="sum")
        loss = loss + config.anchor_weight * anchored / (per_row * len(draw.anchors))
    return loss


def erase_config(concepts: list[str], preset: str = "shapes", *, settings: dict | None = None,
                 adapter: dict | None = None) -> tuple[SpmConfig, EraseSettings]:
    """A membrane's config and training settings: the preset's, then the given overrides."""
    from studio.adapters.spm.config import PRESETS

    if preset not in PRESETS:
        raise AdapterError(f"unknown erase preset {preset!r}; use one of {', '.join(PRESETS)}")
    cfg = SpmConfig.from_dict({**PRESETS[preset]["adapter"], **(adapter or {}), "concepts": list(concepts)})
    run = from_values(EraseSettings, {**PRESETS[preset]["settings"], **(settings or {})}, AdapterError, "erase")
    if run.steps < 1 or run.lr <= 0 or run.batch < 1 or run.denoise_steps < 2:
        raise AdapterError("erase needs steps >= 1, lr > 0, batch >= 1 and denoise_steps >= 2")
    return cfg, run
