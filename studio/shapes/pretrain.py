"""`studio pretrain`: the seeded recipe that trains the embedded "shapes" model and its judge.

Stages, each reading the previous one's output:
1. vae   - AutoencoderKL on renders of every shape (an autoencoder, like SD's, knows no concepts)
2. judge - the attribute classifier, on augmented renders of every shape
3. unet  - UNet2DConditionModel and CLIPTextModel together, on cached latents of base shapes only
           (held-out shapes and held-out attribute combinations never appear), with EMA weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.shapes import embedded, world
from studio.utils.files import atomic_dir
from studio.loading import StudioError


@dataclass
class PretrainConfig:
    seed: int = 0
    device: str = "cpu"
    vae_images: int = 20_000
    vae_steps: int = 6_000
    vae_batch: int = 64
    judge_images: int = 40_000
    judge_steps: int = 4_000
    judge_test_images: int = 2_000
    unet_images: int = 60_000
    unet_steps: int = 20_000
    unet_batch: int = 256
    unet_lr: float = 3e-4
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    max_minutes: float = 0.0  # per stage; 0 = no limit. A stage stopped early saves what it has.
    unet_minutes: float = 0.0  # time budget of the unet stage: its LR schedule then follows elapsed time
    unet_warmup: int = 500
    # Layout samples: this fraction of each batch is drawn at t >= layout_t_min with captions that name the
    # position, and weighted in x0 space (1/SNR, normalised). Epsilon loss at high noise barely rewards
    # putting the shape in the right place; the x0-space loss does.
    layout_fraction: float = 0.0
    layout_t_min: int = 600
    init_from: str = ""  # a shapes pipeline folder whose UNet and text encoder the unet stage continues from


def _render_chunk(args: tuple[list[world.Spec], list[int]]) -> np.ndarray:
    specs, seeds = args
    return np.stack([world.render(s, seed) for s, seed in zip(specs, seeds)])


def render_set(specs: list[world.Spec], seeds: list[int], workers: int | None = None) -> np.ndarray:
    """Render many specs in parallel; NxHxWx3 uint8."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(specs) < 256:
        return _render_chunk((specs, seeds))
    step = math.ceil(len(specs) / (workers * 4))
    chunks = [(specs[i:i + step], seeds[i:i + step]) for i in range(0, len(specs), step)]
    import multiprocessing

    # spawn, not fork: forking a process that has started CUDA or thread pools can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_render_chunk, chunks)))


def world_sample(n: int, seed: int, shapes: tuple[str, ...], heldout: bool | None
                 ) -> tuple[list[world.Spec], list[int]]:
    rng = random.Random(seed)
    specs = [world.random_spec(rng, shapes, heldout=heldout) for _ in range(n)]
    seeds = [rng.randrange(2**31) for _ in range(n)]
    return specs, seeds


def _deadline(cfg: PretrainConfig) -> float:
    return time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")


def _cosine_lr(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Warm-up then cosine decay to 10%; with a time budget, progress is the larger of steps and time."""
    if step < warmup:
        return (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------


def train_vae(cfg: PretrainConfig, log=print):
    from diffusers import AutoencoderKL

    dev = cfg.device
    specs, seeds = world_sample(cfg.vae_images, cfg.seed + 1, world.SHAPES, heldout=None)
    images = torch.from_numpy(render_set(specs, seeds)).to(dev)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**embedded.VAE_CONFIG).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=4e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    deadline = _deadline(cfg)
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = 4e-4 * _cosine_lr(step, cfg.vae_steps, 200)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen).to(dev)
        x = images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.startswith("cuda")):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.1f}")
        if time.time() > deadline:
            log(f"vae stopped by the time limit at step {step}")
            break
    vae.eval()
    # Scale latents to unit variance, as SD's scaling_factor does.
    with torch.no_grad():
        x = images[:2048].permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        vae.register_to_config(scaling_factor=float(1 / z.float().std()))
    return vae.cpu()


def vae_roundtrip(vae, images_uint8: torch.Tensor, device: str, batch: int = 128) -> torch.Tensor:
    """uint8 NxHxWx3 -> float Nx3xHxW in [0,1] after encode->decode."""
    outs = []
    vae = vae.to(device)
    with torch.no_grad():
        for i in range(0, len(images_uint8), batch):
            x = images_uint8[i:i + batch].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            outs.append(((rec.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(outs)


def train_judge_stage(cfg: PretrainConfig, vae, log=print):
    from studio.shapes.judge import train_judge

    specs, seeds = world_sample(cfg.judge_images, cfg.seed + 2, world.SHAPES, heldout=None)
    images = torch.from_numpy(render_set(specs, seeds)).to(cfg.device)
    judge = train_judge(images, specs, steps=cfg.judge_steps, seed=cfg.seed, device=cfg.device, log=log)
    report = judge_report(judge, vae, cfg.judge_test_images, cfg.seed + 3, cfg.device)
    log(f"judge accuracy {json.dumps(report)}")
    return judge.cpu(), report


def judge_report(judge, vae, n: int, seed: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Judge accuracy per attribute on n fresh renders of all shapes, and on the same renders after the VAE."""
    from studio.shapes.judge import accuracy, judge_images, to_tensor

    specs, seeds = world_sample(n, seed, world.SHAPES, heldout=None)
    test = torch.from_numpy(render_set(specs, seeds))
    return {
        "fresh_renders": accuracy(judge_images(judge, to_tensor(test))[1], specs),
        "vae_roundtrip": accuracy(judge_images(judge, vae_roundtrip(vae, test, device))[1], specs),
    }


def _unet_components(cfg: PretrainConfig, log) -> dict:
    comps = embedded.new_components(cfg.seed)
    if cfg.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        comps["unet"] = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet")
        comps["text_encoder"] = CLIPTextModel.from_pretrained(Path(cfg.init_from) / "text_encoder")
        log(f"unet: continuing from {cfg.init_from}")
    return comps


def _caption_data(cfg: PretrainConfig, vae, tokenizer, dev: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The cached VAE latents of `unet_images` renders, the token ids of their 8 caption variants each (image i's
    variant v at i * 8 + v) and the index of the empty caption (for caption dropout)."""
    specs, seeds = world_sample(cfg.unet_images, cfg.seed + 4, world.BASE_SHAPES, heldout=False)
    images = torch.from_numpy(render_set(specs, seeds))
    with torch.no_grad():
        latents = torch.cat([
            vae.encode(images[i:i + 256].to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
            for i in range(0, len(images), 256)]) * vae.config.scaling_factor
    captions = [c for s in specs for c in world.caption_variants(s)] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=embedded.MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids.to(dev)
    return latents, ids, len(captions) - 1


def _unet_loss(cfg: PretrainConfig, unet, text_encoder, noise_sched, data, snr, layout_norm, gen) -> torch.Tensor:
    """One batch's loss: min-SNR-5 weighting, and the layout part of the batch (`layout_fraction`, captions naming
    the position, t >= layout_t_min) weighted in x0 space (1/SNR, normalised)."""
    latents, ids, empty_id = data
    dev, b = latents.device, cfg.unet_batch
    idx = torch.randint(0, len(latents), (b,), device=dev, generator=gen)
    variant = torch.randint(0, 8, (b,), device=dev, generator=gen)
    n_layout = int(b * cfg.layout_fraction)
    variant[:n_layout] |= 2  # bit 1 of the variant index names the position
    cap = idx * 8 + variant
    cap = torch.where(torch.rand(b, device=dev, generator=gen) < cfg.caption_dropout,
                      torch.full_like(cap, empty_id), cap)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, device=dev, generator=gen)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), device=dev, generator=gen)
    t[:n_layout] = torch.randint(cfg.layout_t_min, noise_sched.config.num_train_timesteps, (n_layout,),
                                 device=dev, generator=gen)
    xt = noise_sched.add_noise(x0, noise, t)
    with torch.autocast("cuda", torch.bfloat16, enabled=str(dev).startswith("cuda")):
        emb = text_encoder(ids[cap])[0]
        pred = unet(xt, t, emb).sample.float()
    weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
    weight[:n_layout] = (1 / snr[t[:n_layout]]) / layout_norm
    return (weight * ((pred - noise) ** 2).mean((1, 2, 3))).mean()


def train_unet(cfg: PretrainConfig, vae, log=print):
    """Text encoder and UNet trained together on base shapes with EMA, min-SNR weighting."""
    from diffusers import DDPMScheduler

    from studio.training.objectives import signal_to_noise

    dev = cfg.device
    comps = _unet_components(cfg, log)
    tokenizer, text_encoder, unet = comps["tokenizer"], comps["text_encoder"].to(dev), comps["unet"].to(dev)
    noise_sched = DDPMScheduler.from_config(comps["scheduler"].config)
    vae = vae.to(dev)
    data = _caption_data(cfg, vae, tokenizer, dev)
    log(f"unet: {len(data[0])} cached latents, std {data[0].std().item():.3f}")

    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    snr = signal_to_noise(noise_sched).to(dev)
    layout_norm = (1 / snr[cfg.layout_t_min:]).mean()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    minutes = cfg.unet_minutes or cfg.max_minutes
    deadline = time.time() + minutes * 60 if minutes > 0 else float("inf")
    t0 = time.time()
    for step in range(cfg.unet_steps):
        time_progress = (time.time() - t0) / (minutes * 60) if minutes > 0 else 0.0
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _cosine_lr(step, cfg.unet_steps, cfg.unet_warmup, time_progress)
        loss = _unet_loss(cfg, unet, text_encoder, noise_sched, data, snr, layout_norm, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        if step % 500 == 0 or step == cfg.unet_steps - 1:
            rate = (step + 1) / (time.time() - t0)
            log(f"unet step {step} loss {loss.item():.4f} ({rate:.1f} steps/s)")
        if time.time() > deadline:
            log(f"unet stopped by the time limit at step {step}")
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    comps.update(vae=vae.cpu(), unet=unet.cpu().eval(), text_encoder=text_encoder.cpu().eval())
    return comps, step + 1


def save_pipeline(components: dict, out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def pretrain(cfg: PretrainConfig, out: Path, stages: tuple[str, ...] = ("vae", "judge", "unet"), log=print) -> dict:
    """Run the stages into `out` (a folder holding shapes/ and judge.safetensors); returns a report."""
    from diffusers import AutoencoderKL

    from studio.shapes.judge import save_judge

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": asdict(cfg), "seconds": {}}
    vae_dir = out / "vae_stage"
    if "vae" in stages:
        t = time.time()
        vae = train_vae(cfg, log)
        with atomic_dir(vae_dir) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        report["seconds"]["vae"] = time.time() - t
    candidates = [vae_dir, out / "shapes" / "vae"] + ([Path(cfg.init_from) / "vae"] if cfg.init_from else [])
    found = [c for c in candidates if (c / "config.json").is_file()]
    if not found:
        raise StudioError(f"{out}: no trained VAE (run the vae stage first, or set init_from to a shapes folder)")
    vae = AutoencoderKL.from_pretrained(found[0])
    if "judge" in stages:
        t = time.time()
        judge, report["judge_accuracy"] = train_judge_stage(cfg, vae, log)
        save_judge(judge, out / "judge.safetensors")
        report["seconds"]["judge"] = time.time() - t
    if "unet" in stages:
        t = time.time()
        comps, steps = train_unet(cfg, vae, log)
        save_pipeline(comps, out / "shapes")
        report["unet_steps_done"] = steps
        report["seconds"]["unet"] = time.time() - t
    report["device"] = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"
    (out / f"pretrain_report_{'_'.join(stages)}.json").write_text(json.dumps(report, indent=2))
    return report
