"""Training a membrane, data-free: latents the model denoises itself, a negative-guidance target
eps(sur) - eta * (eps(tar) - eps(sur)) from the frozen model, and Latent Anchoring. The same loop trains
the ESD-style baseline (cross-attention fine-tuned directly, no anchors)."""

from __future__ import annotations

import copy

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from studio.adapters.base import AdapterError, base_fingerprint, optimizer_step, save_adapter, token_ids
from studio.adapters.spm.config import EraseSettings, SpmConfig
from studio.adapters.spm.model import SpmMethod
from studio.utils.settings import from_values

TRAINING_NAME = "membrane"


@dataclass
class EraseResult:
    path: Path | None
    steps: int
    seconds: float
    trainable_parameters: int
    last_loss: float


def _embed(pipe, texts: list[str]) -> torch.Tensor:
    ids = token_ids(pipe, texts).to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


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


def _check_architecture(pipe) -> None:
    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        raise AdapterError("membrane training supports SD 1.x/2.x-style UNets (and the embedded model); SDXL "
                           "needs pooled embeddings and time ids, which this trainer does not build yet")


def _erase_loop(pipe, config: SpmConfig, settings: EraseSettings, student, frozen, params, *, anchors: bool,
                progress: bool, on_step: Callable[[int, float], None] | None, should_stop) -> tuple[int, float]:
    """Shared loop: `student(x, t, text)` is the model being trained, `frozen(x, t, text)` the original."""
    from diffusers import DDIMScheduler

    device = pipe.unet.device
    prompts = config.target_prompts()
    if not prompts:
        raise AdapterError("nothing to erase: name at least one concept (or target prompt)")
    target_emb = _embed(pipe, prompts)
    surrogate_emb = _embed(pipe, [config.surrogate])[0]
    empty_emb = _embed(pipe, [""])[0]
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.denoise_steps)
    size = (settings.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    lr_at = lambda step: min(1.0, step / max(settings.warmup, 1))  # noqa: E731
    scheduler_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    last = float("nan")
    bar = tqdm(range(1, settings.steps + 1), desc="erase", disable=not progress)
    step = 0
    for step in bar:
        if should_stop is not None and should_stop():
            break
        b = settings.batch
        chosen = [rng.randrange(len(prompts)) for _ in range(b)]
        cond = target_emb[chosen]
        k = rng.randrange(1, settings.denoise_steps)
        x = torch.randn((b, channels, size, size), generator=generator).to(device) * scheduler.init_noise_sigma
        with torch.no_grad():
            uncond = empty_emb.expand(b, -1, -1)
            for t in scheduler.timesteps[:k]:
                u, c = student(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
                x = scheduler.step(u + settings.sample_guidance * (c - u), t, x).prev_sample
            t = scheduler.timesteps[k]  # the timestep the DDIM schedule actually reached at x_k
            anchor_emb = None
            if anchors and config.anchor_weight > 0:
                parts = [random_anchors(target_emb[i], 1, generator) for i in chosen[:config.anchors]]
                if config.anchor_empty:
                    parts.append(empty_emb[None])
                anchor_emb = torch.cat(parts) if parts else None
            texts = [cond, surrogate_emb.expand(b, -1, -1)]
            latents = [x, x]
            if anchor_emb is not None:
                texts.append(anchor_emb)
                latents.append(x[torch.arange(len(anchor_emb)) % b])
            base = frozen(torch.cat(latents), t, torch.cat(texts))
            e_tar, e_sur = base[:b], base[b:2 * b]
            goal = e_sur - config.eta * (e_tar - e_sur)
        inputs = [x] + (latents[2:] if anchor_emb is not None else [])
        conds = [cond] + (texts[2:] if anchor_emb is not None else [])
        pred = student(torch.cat(inputs), t, torch.cat(conds))
        loss = F.mse_loss(pred[:b].float(), goal.float())
        if anchor_emb is not None:
            loss = loss + config.anchor_weight * F.mse_loss(pred[b:].float(), base[2 * b:].float())
        last = optimizer_step(loss, optimizer, scheduler_lr, step=step, what="erase",
                              remedy=f"lower the learning rate (now {settings.lr:g}) or the anchor weight "
                                     f"(now {config.anchor_weight:g})")
        bar.set_postfix(loss=f"{last:.4f}")
        if on_step is not None:
            on_step(step, last)
    return step, last


def _unet_call(unet):
    def call(x, t, text):
        return unet(x, t, encoder_hidden_states=text).sample
    return call


def train_membrane(pipe, config: SpmConfig, settings: EraseSettings | None = None, out: str | Path | None = None,
                   *, progress: bool = False, on_step=None, should_stop=None) -> EraseResult:
    """Train one membrane on `pipe` (which it leaves with the membrane attached under TRAINING_NAME) and,
    with `out`, write it as a .safetensors adapter (method "spm")."""
    _check_architecture(pipe)
    settings = settings or EraseSettings()
    if not config.concepts:
        raise AdapterError("a membrane needs the concepts it erases (they set its per-prompt strength)")
    method = SpmMethod()
    with torch.random.fork_rng():  # the membrane's initial down-projection comes from the seed, not the process
        torch.manual_seed(settings.seed)
        method.attach(pipe, config, TRAINING_NAME)
    params = method.trainable_parameters(pipe, TRAINING_NAME)
    unet = pipe.unet
    student = _unet_call(unet)

    def frozen(x, t, text):
        with method.disabled(pipe):
            return student(x, t, text)

    was_training = unet.training
    unet.train()
    start = time.perf_counter()
    try:
        steps, last = _erase_loop(pipe, config, settings, student, frozen, params, anchors=True, progress=progress,
                                  on_step=on_step, should_stop=should_stop)
    finally:
        unet.train(was_training)
        for p in params:
            p.requires_grad_(False)
    seconds = time.perf_counter() - start
    path = None
    if out is not None:
        path = save_adapter(out, "spm", config, method.state_dict(pipe, TRAINING_NAME), base_fingerprint(pipe),
                            extra={"concepts": ", ".join(config.concepts), "steps": str(steps)})
    return EraseResult(path, steps, seconds, sum(p.numel() for p in params), last)


def erase_esd(pipe, config: SpmConfig, settings: EraseSettings | None = None, *, progress: bool = False,
              on_step=None, should_stop=None) -> EraseResult:
    """The ESD-x baseline: fine-tune every cross-attention parameter of the UNet (in place) on the same
    erase target, without anchors and without per-prompt strength."""
    _check_architecture(pipe)
    settings = settings or EraseSettings()
    unet = pipe.unet
    original = copy.deepcopy(unet).eval().requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if ".attn2." in n]
    if not params:
        raise AdapterError("the UNet has no cross-attention (attn2) layers to fine-tune")
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    unet.train()
    start = time.perf_counter()
    try:
        steps, last = _erase_loop(pipe, config, settings, _unet_call(unet), _unet_call(original), params,
                                  anchors=False, progress=progress, on_step=on_step, should_stop=should_stop)
    finally:
        unet.eval().requires_grad_(False)
    return EraseResult(None, steps, time.perf_counter() - start, sum(p.numel() for p in params), last)


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
