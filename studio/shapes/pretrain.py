"""`studio pretrain`: the seeded recipe that trains the embedded "shapes" model and its judge.

Stages, each reading the previous one's output:
1. vae   - AutoencoderKL on renders of every shape (an autoencoder, like SD's, knows no concepts)
2. judge - the attribute classifier, on augmented renders of every shape
3. unet  - UNet2DConditionModel and CLIPTextModel together, on cached latents of base shapes only
           (held-out shapes and held-out attribute combinations never appear), with EMA weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.shapes import embedded, world
from studio.shapes.renders import (cached_latents, judge_items, latent_key, render_scenes, render_set,
                                   world_sample, write_latents)
from studio.training.recipe import AdapterOutput, Recipe, Trainables
from studio.utils.files import atomic_dir
from studio.utils.schedules import warmup_cosine
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
    judge_batch: int = 256
    judge_lr: float = 2e-3
    judge_init: str = ""  # a judge file the judge stage continues from (extended to `world`'s heads)
    judge_outliers: float = 0.08  # world v2: share of judge images whose shape is of no world (read as "none")
    judge_scenes: float = 0.15  # world v2: share of two-shape scenes (the count head)
    judge_vae_fraction: float = 0.0  # share of the judge's images seen after the VAE round trip (what it will read)
    judge_blur: float = 1.6  # the judge's blur augmentation: sigma up to this many pixels
    world: int = 1  # the world version the judge reads and the unet stage pretrains on
    bf16: bool = False  # autocast the judge and unet stages to bf16 (always on CUDA; 1.4-2.8x on a recent CPU)
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
    # (a kept folder below, without a VAE, continues with the shipped VAE: pretraining never changes it)
    keep_to: str = ""  # also write the unet stage's result there as kept weights (fp16, no VAE): small enough to
    # commit, so a run spanning sessions continues from it with init_from
    unet_checkpoint_every: int = 1000  # the unet stage's checkpoints (in <out>/unet_stage/checkpoints)
    resume: str = ""  # "latest" (or a checkpoint folder): continue the unet stage from its checkpoint
    decoder_images: int = 4_000  # the fast_decoder stage: renders of every shape, and its steps (batch 16 crops)
    decoder_steps: int = 1_500
    decoder_width: int = 64  # its AutoencoderTiny: TAESD's width and blocks a level (32 and 1 gave 21 dB, not shipped)
    decoder_blocks: int = 3


def _deadline(cfg: PretrainConfig) -> float:
    return time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")


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
            group["lr"] = 4e-4 * warmup_cosine(step, cfg.vae_steps, 200)
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
    from studio.shapes.judge import heads_for, load_judge, scene_labels, train_judge

    dev, version = cfg.device, cfg.world
    init = load_judge(cfg.judge_init) if cfg.judge_init else None
    if version == 1:
        specs, seeds = world_sample(cfg.judge_images, cfg.seed + 2, world.SHAPES, heldout=None)
        images, labels = torch.from_numpy(render_set(specs, seeds)).to(dev), specs
    else:
        items = judge_items(world.get_world(version), cfg.judge_images, cfg.seed + 2, cfg.judge_outliers,
                            cfg.judge_scenes)
        images = torch.from_numpy(render_scenes(items))
        labels = scene_labels([(list(specs), outlier) for specs, outlier, _ in items], heads_for(version))
    images = _some_through_the_vae(images, vae, cfg.judge_vae_fraction, cfg.seed, dev).to(dev)
    judge = train_judge(images, labels, steps=cfg.judge_steps, batch=cfg.judge_batch, lr=cfg.judge_lr, seed=cfg.seed,
                        device=dev, version=version, init=init, bf16=cfg.bf16 or dev.startswith("cuda"),
                        blur=cfg.judge_blur, log=log)
    report = judge_report(judge, vae, cfg.judge_test_images, cfg.seed + 3, dev)
    log(f"judge accuracy {json.dumps(report)}")
    return judge.cpu(), report


def _some_through_the_vae(images: torch.Tensor, vae, fraction: float, seed: int, device: str) -> torch.Tensor:
    """uint8 NxHxWx3 images with a `fraction` of them (drawn from the seed) replaced by their VAE round trip."""
    if fraction <= 0:
        return images
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:int(fraction * len(images))]
    decoded = vae_roundtrip(vae, images[chosen], device)
    images = images.clone()
    images[chosen] = (decoded.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    return images


def judge_report(judge, vae, n: int, seed: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Judge accuracy per attribute on n fresh renders of every shape of the judge's world, and on the same renders
    after the VAE; for a v2 judge also how often it reads n/4 outliers as none and n/4 scenes as two objects."""
    from studio.shapes.judge import NONE, accuracy, judge_images, to_tensor

    w = world.get_world(judge.version)
    specs, seeds = world_sample(n, seed, w.shapes, heldout=None)
    test = torch.from_numpy(render_set(specs, seeds))
    fresh = judge_images(judge, to_tensor(test))[1]
    report = {
        "fresh_renders": accuracy(fresh, specs),
        "vae_roundtrip": accuracy(judge_images(judge, vae_roundtrip(vae, test, device))[1], specs),
    }
    if judge.version > 1:
        report["fresh_renders"]["count"] = float(np.mean([c == "one" for c in fresh["count"]]))
        outliers = judge_items(w, n // 4, seed + 1, outliers=1.0)
        scenes = judge_items(w, n // 4, seed + 2, scenes=1.0)
        report["outliers"] = {"read_none": float(np.mean([p == NONE for p in judge_images(
            judge, to_tensor(render_scenes(outliers)))[1]["shape"]]))}
        report["scenes"] = {"read_two": float(np.mean([p == "two" for p in judge_images(
            judge, to_tensor(render_scenes(scenes)))[1]["count"]]))}
    return report


def _unet_components(cfg: PretrainConfig, log) -> dict:
    shapes_world = world.get_world(cfg.world)
    comps = embedded.new_components(cfg.seed, shapes_world)
    if cfg.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        # fp32 whatever the folder stores (kept weights are fp16)
        comps["unet"] = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(Path(cfg.init_from) / "text_encoder", dtype=torch.float32)
        old_tokenizer = CLIPTokenizer.from_pretrained(Path(cfg.init_from) / "tokenizer")
        comps["text_encoder"] = extend_text_encoder(text_encoder, old_tokenizer, comps["tokenizer"], shapes_world)
        log(f"unet: continuing from {cfg.init_from} (world v{cfg.world}, {len(comps['tokenizer'])} tokens)")
    return comps


def extend_text_encoder(text_encoder, old_tokenizer, tokenizer, shapes_world: world.World):
    """The text encoder with an embedding row for each token `tokenizer` has beyond `old_tokenizer` (whose ids
    it keeps): a one-word synonym of a shape the encoder knows starts as that shape's word, any other new word
    as the mean of the known words' rows. Unchanged when there is nothing new."""
    old_vocab, new_vocab = old_tokenizer.get_vocab(), tokenizer.get_vocab()
    if any(new_vocab.get(t) != i for t, i in old_vocab.items()):
        raise StudioError("the new tokenizer does not keep the old one's token ids; cannot extend the text encoder")
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return text_encoder
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    words = {w: old_vocab[w + "</w>"] for w in world.vocabulary() if w + "</w>" in old_vocab}
    canonical = {syn: shape for shape in shapes_world.shapes for syn in shapes_world.words(shape) if " " not in syn}
    with torch.no_grad():
        mean = weight[list(words.values())].mean(0)
        for token, i in new_vocab.items():
            if i < rows:
                continue
            shape = canonical.get(token.removesuffix("</w>"))
            weight[i] = weight[words[shape]] if shape in words else mean
    return text_encoder


def _caption_data(cfg: PretrainConfig, vae, tokenizer, dev: str, cache: Path | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The cached VAE latents of `unet_images` renders of the world's pretraining stream, the token ids of their 8
    caption variants each (image i's variant v at i * 8 + v) and the index of the empty caption (for caption
    dropout). With `cache` (a file), the latents are read from it when it was written for the same stream and
    VAE, else computed and written there: a resumed run does not render its images again."""
    shapes_world = world.get_world(cfg.world)
    scenes = shapes_world.pretraining_scenes(cfg.unet_images, cfg.seed + 4)
    key = latent_key(cfg, vae) if cache is not None else ""
    latents = cached_latents(cache, key)
    if latents is None:
        images = torch.from_numpy(render_scenes([(s.specs, False, s.seed) for s in scenes]))
        with torch.no_grad():
            latents = torch.cat([
                vae.encode(images[i:i + 256].to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
                for i in range(0, len(images), 256)]) * vae.config.scaling_factor
        if cache is not None:
            write_latents(cache, key, latents)
    latents = latents.contiguous().to(dev)  # (the encoder's output is channels-last: cached or not, one layout)
    captions = [c for s in scenes for c in shapes_world.caption_variants(s.specs, s.seed)] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=embedded.MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids.to(dev)
    return latents, ids, len(captions) - 1


def _unet_loss(cfg: PretrainConfig, unet, text_encoder, noise_sched, data, snr, layout_norm, gen: torch.Generator,
               rows: slice | None = None) -> torch.Tensor:
    """The mean loss of `rows` of one batch (all of it by default): min-SNR-5 weighting, and the layout part of the
    batch (`layout_fraction`, captions naming the position, t >= layout_t_min) weighted in x0 space (1/SNR,
    normalised). The whole batch is drawn from `gen` (on the CPU) and the rows sliced from it, so a batch split
    over micro-batches or processes trains as the whole."""
    latents, ids, empty_id = data
    dev, b, num_t = latents.device, cfg.unet_batch, noise_sched.config.num_train_timesteps
    idx = torch.randint(0, len(latents), (b,), generator=gen)
    variant = torch.randint(0, 8, (b,), generator=gen)
    n_layout = int(b * cfg.layout_fraction)
    variant[:n_layout] |= 2  # bit 1 of the variant index names the position
    cap = idx * 8 + variant
    cap = torch.where(torch.rand(b, generator=gen) < cfg.caption_dropout, torch.full_like(cap, empty_id), cap)
    noise = torch.randn((b, *latents.shape[1:]), generator=gen)
    t = torch.randint(0, num_t, (b,), generator=gen)
    t[:n_layout] = torch.randint(cfg.layout_t_min, num_t, (n_layout,), generator=gen)
    weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
    weight[:n_layout] = (1 / snr[t[:n_layout]]) / layout_norm
    rows = rows or slice(0, b)
    idx, cap, noise, t, weight = (x[rows].to(dev) for x in (idx, cap, noise, t, weight))
    xt = noise_sched.add_noise(latents[idx], noise, t)
    emb = text_encoder(ids[cap])[0]
    pred = unet(xt, t, emb).sample.float()
    return (weight * ((pred - noise) ** 2).mean((1, 2, 3))).mean()


class UNetPretrainRecipe(Recipe):
    """The unet stage as a recipe of the training engine (checkpoints, exact resume, Ctrl+C, NaN stop, several
    processes): the UNet and the text encoder trained together on cached latents of base shapes, AdamW with
    warm-up and cosine decay, gradient clipping at 1, EMA weights (kept in checkpoints, put in place at the end).
    The run's file is the pipeline folder `pretrain` writes, not an adapter."""

    label = "pretraining the UNet"

    def __init__(self, cfg: PretrainConfig, vae, log=print, latent_cache: Path | None = None) -> None:
        self.cfg, self.vae, self.log, self.latent_cache = cfg, vae, log, latent_cache
        self.identity = {"stage": "unet", "seed": cfg.seed, "unet_images": cfg.unet_images,
                         "init_from": cfg.init_from, **({"world": cfg.world} if cfg.world > 1 else {})}
        self.started = time.time()

    def setup(self, acc) -> Trainables:
        from diffusers import DDPMScheduler

        from studio.training.objectives import signal_to_noise

        cfg, dev = self.cfg, acc.device
        self.comps = comps = _unet_components(cfg, self.log)
        # channels-last convolutions: a batch-32 step 14% faster on this CPU (1.08 s against 1.25 s, 2 threads)
        self.unet = comps["unet"].to(dev, memory_format=torch.channels_last)
        self.text_encoder = comps["text_encoder"].to(dev)
        self.noise_sched = DDPMScheduler.from_config(comps["scheduler"].config)
        self.vae = self.vae.to(dev)
        self.data = _caption_data(cfg, self.vae, comps["tokenizer"], dev, self.latent_cache)
        self.log(f"unet: {len(self.data[0])} cached latents, std {self.data[0].std().item():.3f}")
        self.started = time.time()  # the time budget's schedule counts training, not rendering
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.ema = [p.detach().clone().float() for p in self.params]
        self.snr = signal_to_noise(self.noise_sched).cpu()
        self.layout_norm = (1 / self.snr[cfg.layout_t_min:]).mean()
        self.unet.train()
        self.text_encoder.train()
        optimizer = torch.optim.AdamW(self.params, lr=cfg.unet_lr, weight_decay=0.01)
        return Trainables(self.params, {"unet": self.unet, "text_encoder": self.text_encoder}, optimizer,
                          lr_lambda=self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        minutes = self.cfg.unet_minutes or self.cfg.max_minutes
        time_progress = (time.time() - self.started) / (minutes * 60) if minutes > 0 else 0.0
        return warmup_cosine(step, self.cfg.unet_steps, self.cfg.unet_warmup, time_progress)

    def prepared(self, modules) -> None:
        self.model_unet, self.model_text = modules["unet"], modules["text_encoder"]

    def loss(self, step: int, share, generator: torch.Generator) -> torch.Tensor:
        loss = _unet_loss(self.cfg, self.model_unet, self.model_text, self.noise_sched, self.data, self.snr,
                          self.layout_norm, generator, share.rows)
        return loss * len(share) / share.batch

    def after_step(self, step: int, optimizer) -> str | None:
        decay = min(self.cfg.ema_decay, step / (9 + step))  # (1 + i) / (10 + i) for the 0-based step i
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - decay)
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": e for i, e in enumerate(self.ema)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, e in enumerate(self.ema):
            e.copy_(tensors[f"ema.{i}"])

    def checkpoint_file(self) -> AdapterOutput:
        tensors = {**{f"unet.{k}": v for k, v in self.unet.state_dict().items()},
                   **{f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}}
        return AdapterOutput("", {}, tensors, {})

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def finish(self) -> None:
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        self.unet.to(memory_format=torch.contiguous_format)  # what safetensors writes
        self.unet.eval()
        self.text_encoder.eval()

    def result_file(self) -> AdapterOutput | None:
        return None


def train_unet(cfg: PretrainConfig, vae, log=print, out: Path | None = None):
    """The unet stage through the training engine; checkpoints go to `out` / checkpoints (resume with
    `cfg.resume`). A time budget (`unet_minutes`, else `max_minutes`) stops it, saving what it has."""
    from studio.training import LoopSettings
    from studio.training.engine import Engine

    minutes = cfg.unet_minutes or cfg.max_minutes
    bf16 = cfg.bf16 or cfg.device.startswith("cuda")
    settings = LoopSettings(steps=cfg.unet_steps, batch_size=cfg.unet_batch, lr=cfg.unet_lr, max_grad_norm=1.0,
                            seed=cfg.seed, mixed_precision="bf16" if bf16 else "no",
                            device=cfg.device, output_dir=str(out) if out else None,
                            checkpoint_every=cfg.unet_checkpoint_every, resume=cfg.resume or None,
                            tensorboard=False, progress_bar=False)

    def on_event(event: dict) -> None:
        if event["kind"] == "log":
            log(event["message"])
        elif event["kind"] == "step" and (event["step"] % 500 == 1 or event["step"] == cfg.unet_steps):
            log(f"unet step {event['step']} loss {event['loss']:.4f}")

    recipe = UNetPretrainRecipe(cfg, vae, log, Path(out) / "latents.safetensors" if out else None)
    # the time budget counts training from the end of the data caching, as the learning-rate schedule does
    result = Engine(settings, on_event=on_event,
                    should_stop=lambda: minutes > 0 and time.time() > recipe.started + minutes * 60).run(recipe)
    if result.stopped:
        log(f"unet stopped by the time limit at step {result.steps}")
    comps = recipe.comps
    comps.update(vae=recipe.vae.cpu(), unet=recipe.unet.cpu().eval(), text_encoder=recipe.text_encoder.cpu().eval())
    return comps, result.steps


def save_pipeline(components: dict, out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def keep_weights(pipeline: Path, folder: Path) -> None:
    """Write a shapes pipeline's UNet and text encoder in fp16, with its tokenizer and scheduler, to `folder`: the
    trained part of a pretraining run in about 11 MB (the VAE is the shipped one), for `init_from` to continue
    from in a later session. Continuing from fp16 weights is a restart with a fresh optimizer, not an exact
    resume (that needs the run's checkpoints)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline = Path(pipeline)
    with atomic_dir(Path(folder)) as tmp:
        UNet2DConditionModel.from_pretrained(pipeline / "unet", torch_dtype=torch.float16).save_pretrained(
            tmp / "unet", safe_serialization=True)
        CLIPTextModel.from_pretrained(pipeline / "text_encoder", dtype=torch.float16).save_pretrained(
            tmp / "text_encoder", safe_serialization=True)
        CLIPTokenizer.from_pretrained(pipeline / "tokenizer").save_pretrained(tmp / "tokenizer")
        shutil.copytree(pipeline / "scheduler", tmp / "scheduler")


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
    candidates = [vae_dir, out / "shapes" / "vae"] + (
        [Path(cfg.init_from) / "vae", embedded.SHAPES_DIR / "vae"] if cfg.init_from else [])
    found = [c for c in candidates if (c / "config.json").is_file()]
    if not found:
        raise StudioError(f"{out}: no trained VAE (run the vae stage first, or set init_from to a shapes folder)")
    vae = AutoencoderKL.from_pretrained(found[0])
    if "fast_decoder" in stages:
        from studio.shapes.fast_decoder import distill_fast_decoder, tiny_config

        specs, seeds = world_sample(cfg.decoder_images, cfg.seed + 5, world.V2.shapes, heldout=None)
        tiny, report["fast_decoder"] = distill_fast_decoder(
            vae, torch.from_numpy(render_set(specs, seeds)), steps=cfg.decoder_steps, seed=cfg.seed,
            minutes=cfg.max_minutes, config=tiny_config(cfg.decoder_width, cfg.decoder_blocks), log=log)
        with atomic_dir(out / "fast_decoder") as tmp:
            tiny.save_pretrained(tmp, safe_serialization=True)
        report["seconds"]["fast_decoder"] = report["fast_decoder"]["seconds"]
    if "judge" in stages:
        t = time.time()
        judge, report["judge_accuracy"] = train_judge_stage(cfg, vae, log)
        save_judge(judge, out / "judge.safetensors")
        report["seconds"]["judge"] = time.time() - t
    if "unet" in stages:
        t = time.time()
        comps, steps = train_unet(cfg, vae, log, out / "unet_stage")
        save_pipeline(comps, out / "shapes")
        if cfg.keep_to:
            keep_weights(out / "shapes", Path(cfg.keep_to))
        report["unet_steps_done"] = steps
        report["seconds"]["unet"] = time.time() - t
    report["device"] = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"
    (out / f"pretrain_report_{'_'.join(stages)}.json").write_text(json.dumps(report, indent=2))
    return report
