"""The concept recipe: an adapter trained on images and captions (and control images for control methods),
with the denoising objective, optional prior preservation and a trainable trigger token."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from studio import data
from studio.adapters.base import text_encoder_names
from studio.adapters.prompts import time_ids
from studio.adapters.trigger import (TRIGGER_KEYS, attach_trigger_embedding, detach_trigger_embedding,
                                    trigger_tensors, training_trigger)
from studio.training.conditioning import PromptEncoding, text_encoders
from studio.training.config import TrainConfig, TrainingError
from studio.training.families import FamilyError, family_for
from studio.training.recipe import AdapterOutput, Recipe, Share, Trainables
from studio.utils.files import atomic_path


def _example_time_ids(image_size: tuple[int, int], bucket: tuple[int, int]) -> torch.Tensor:
    """SDXL's time ids of an image of `image_size` (width, height) trained in `bucket`: its original size, the
    crop `data.to_bucket` takes (in the resized image, as diffusers' SDXL scripts count it) and the bucket."""
    _, (left, top) = data.cover_crop(image_size, bucket)
    return time_ids((image_size[1], image_size[0]), (top, left), (bucket[1], bucket[0]))


def episode_kind(path: Path) -> str:
    """The kind of a control training pair, for episodic methods: its file name's part before the last "_"
    (`mask_00012.png` -> "mask"; a name without "_" is of the one unnamed kind)."""
    return Path(path).stem.rpartition("_")[0]


def global_batch(buckets: list[int], batch: int, seed: int, step: int) -> list[int]:
    per_epoch = data.batches_per_epoch(buckets, batch)
    epoch, index = divmod(step - 1, per_epoch)
    return data.batch_plan(buckets, batch, seed, epoch)[index]


class ConceptRecipe(Recipe):
    """`config`'s method attached to its model, trained on its images; `log(message)` reports data warnings."""

    label = "training"

    def __init__(self, config: TrainConfig, log: Callable[[str], None]) -> None:
        from studio.adapters import get_method

        self.config = config
        self.log = log
        self.method_impl = get_method(config.method)
        self.method = config.method
        self.label = f"training {config.name}"
        self.trigger = config.trigger or ""
        self.identity = {"method": config.method, "adapter": config.adapter, "model": config.model}
        self.out = Path(config.output_dir)

    # -- data --

    def _examples(self, resolution: int) -> list[data.Example]:
        cfg = self.config
        kwargs = dict(trigger=cfg.trigger, instance_prompt=cfg.instance_prompt, skip_bad=cfg.skip_bad_images,
                      min_size=max(8, resolution // 4), warn=self.log)
        if cfg.images:
            return data.load_examples([Path(p) for p in cfg.images], **kwargs)
        return data.scan_folder(cfg.data, **kwargs)

    def _class_examples(self, acc) -> list[data.Example]:
        """Prior-preservation images: the class prompts drawn in turn by the base model, each saved with its
        caption and kept for reuse (or a folder of class images with captions given by the user)."""
        cfg = self.config
        folder = Path(cfg.class_data_dir) if cfg.class_data_dir else self.out / "class_images"
        folder.mkdir(parents=True, exist_ok=True)
        have = sorted(folder.glob("*.png"))
        missing = cfg.num_class_images - len(have) if cfg.class_prompts else 0
        if missing > 0 and acc.is_main_process:
            self.log(f"drawing {missing} class images with the base model")
            for i in range(0, missing, 8):
                numbers = range(len(have) + i, len(have) + i + min(8, missing - i))
                prompts = [cfg.class_prompts[k % len(cfg.class_prompts)] for k in numbers]
                images = self.pipe(prompts, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_guidance,
                                   generator=[torch.Generator().manual_seed(cfg.seed * 7919 + k) for k in numbers],
                                   height=self.resolution, width=self.resolution).images
                for k, prompt, image in zip(numbers, prompts, images):
                    with atomic_path(folder / f"class_{k:05d}.txt") as tmp:
                        tmp.write_text(prompt, encoding="utf-8")
                    with atomic_path(folder / f"class_{k:05d}.png") as tmp:
                        image.save(tmp, format="PNG")
        acc.wait_for_everyone()
        paths = sorted(folder.glob("*.png"))[:cfg.num_class_images]
        if not paths:
            raise TrainingError(f"no class images in {folder}")
        fallback = cfg.class_prompts[0] if cfg.class_prompts else None
        return data.load_examples(paths, instance_prompt=fallback, min_size=8)

    @torch.no_grad()
    def _encode(self, examples: list[data.Example], control: bool = False) -> dict[str, Any]:
        """Latent distribution (mean, std), bucket and caption per example (its control image in [0, 1], and on
        SDXL its size/crop time ids)."""
        pipe, resolution = self.pipe, self.resolution
        sizes = [data.bucket_size(*ex.image.size, resolution) if self.config.buckets else (resolution, resolution)
                 for ex in examples]
        # an episodic method (UFC) trains on batches of one kind: a batch is grouped by size and kind
        groups = [(size, episode_kind(ex.path) if self.method_impl.episodic and control else "")
                  for ex, size in zip(examples, sizes)]
        bucket_ids = {group: i for i, group in enumerate(sorted(set(groups)))}
        means, stds = [], []
        for ex, size in zip(examples, sizes):
            pixels = data.to_bucket(ex.image, size).unsqueeze(0).to(self.device, pipe.vae.dtype)
            dist = pipe.vae.encode(pixels).latent_dist
            means.append(dist.mean[0].float().cpu())
            stds.append(dist.std[0].float().cpu())
        out = {"mean": means, "std": stds, "bucket": [bucket_ids[g] for g in groups],
               "captions": [ex.caption for ex in examples]}
        if self.family.reads_time_ids:
            out["time_ids"] = [_example_time_ids(ex.image.size, size) for ex, size in zip(examples, sizes)]
        if control:
            out["control"] = [[(data.to_bucket(image, size) + 1) / 2 for image in images]
                              for images, size in zip(data.control_inputs(examples, self.config.control_data), sizes)]
        return out

    def _embed_all(self, captions: list[str]) -> dict[str, PromptEncoding]:
        out = {}
        with torch.no_grad():
            for i in range(0, len(captions), 64):
                part = captions[i:i + 64]
                encoded = self.family.encode(part, self.device)
                out.update((c, encoded.row(k)) for k, c in enumerate(part))
        return out

    # -- set-up --

    def _load(self, acc) -> None:
        from studio.loading import load_pipeline

        cfg = self.config
        self.device = acc.device
        self.pipe = pipe = load_pipeline(cfg.model, device="cpu")
        try:
            self.family = family_for(pipe, cfg)
        except FamilyError as e:
            raise TrainingError(str(e)) from None
        self.resolution = cfg.resolution or self.family.default_resolution()
        examples = self._examples(self.resolution)  # before any long work: bad data fails fast
        if acc.is_main_process:
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(cfg.to_yaml(), encoding="utf-8")
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        for module in (self._denoiser(), pipe.vae, *(getattr(pipe, name) for name in text_encoder_names(pipe))):
            module.requires_grad_(False)
        class_examples = self._class_examples(acc) if cfg.prior_preservation else []
        self.cache = self._encode(examples, control=bool(cfg.control_data))
        self.class_cache = self._encode(class_examples) if class_examples else None

    def setup(self, acc) -> Trainables:
        from studio.adapters import base_fingerprint

        cfg, method = self.config, self.method_impl
        self._load(acc)
        pipe = self.pipe
        self.base = base_fingerprint(pipe)
        self.adapter_config = method.config_class.from_dict(cfg.adapter).for_run(cfg.steps)
        torch.manual_seed(cfg.seed)  # the adapter's initial weights depend on the seed only
        method.attach(pipe, self.adapter_config, cfg.name)
        params = method.trainable_parameters(pipe, cfg.name)
        if not params:
            raise TrainingError(f"the {cfg.method} adapter has no trainable parameters on this model")
        trigger_vectors = self._attach_trigger_token()
        n_trainable = sum(p.numel() for p in [*params, *trigger_vectors])
        self.text_modules = {name: getattr(pipe, name) for name in text_encoder_names(pipe)
                             if any(p.requires_grad for p in getattr(pipe, name).parameters())}
        self.train_text = bool(self.text_modules)
        if not self.train_text:
            captions = self.cache["captions"] + (self.class_cache["captions"] if self.class_cache else [])
            self.text_cache = self._embed_all(captions)
        if cfg.gradient_checkpointing:
            self._denoiser().enable_gradient_checkpointing()
            for encoder in self.text_modules.values():
                encoder.gradient_checkpointing_enable()
        groups = self._parameter_groups(params)  # refuses LoRA+ on a method without B matrices
        optimizer = (method.optimizer(pipe, cfg.name, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      kind=cfg.optimizer) or self._optimizer(groups))
        if trigger_vectors:
            optimizer.add_param_group({"params": trigger_vectors, "lr": cfg.trigger_token_lr or cfg.lr,
                                       "weight_decay": 0.0})
        self.world, self.rank = acc.num_processes, acc.process_index
        self._denoiser().train()
        modules = {self.family.denoiser: self._denoiser(), **self.text_modules}
        return Trainables(params, modules, optimizer, trainable_parameters=n_trainable)

    def _denoiser(self) -> torch.nn.Module:
        """The pipeline's own UNet or transformer (not the engine's prepared copy)."""
        return getattr(self.pipe, self.family.denoiser)

    def prepared(self, modules: dict[str, torch.nn.Module]) -> None:
        self.model = modules[self.family.denoiser]
        self.encoders = text_encoders(self.pipe, modules)

    def _attach_trigger_token(self) -> list[torch.nn.Parameter]:
        """The trigger's trainable vector in each text encoder (none without trigger_token)."""
        from studio.adapters import AdapterError

        if not self.config.trigger_token:
            return []
        if not self.family.trains_trigger_token:
            raise TrainingError(f"trigger_token trains a new token in the text encoders, which {self.family.name} "
                                "does not support yet; use the trigger as a plain word")
        try:
            modules = attach_trigger_embedding(self.pipe, self.config.trigger, self.config.trigger_token_init)
            return [module.vector for module in modules]
        except AdapterError as e:
            raise TrainingError(str(e)) from None

    def _parameter_groups(self, params) -> list[dict]:
        """One group, or with LoRA+ the B matrices apart at `loraplus_ratio` times the learning rate."""
        cfg = self.config
        if cfg.loraplus_ratio == 1.0:
            return [{"params": params}]
        roles = self.method_impl.parameter_roles(self.pipe, cfg.name, params)
        b = [p for p in params if roles.get(id(p)) == "lora_B"]
        if not b:
            raise TrainingError(f"loraplus_ratio sets the learning rate of LoRA's B matrices; the {cfg.method} "
                                "adapter has none (leave it at 1)")
        return [{"params": [p for p in params if roles.get(id(p)) != "lora_B"]},
                {"params": b, "lr": cfg.lr * cfg.loraplus_ratio}]

    def _optimizer(self, groups: list[dict]):
        cfg = self.config
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise TrainingError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
            return bnb.optim.AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # -- the loss --

    def _model_inputs(self, batch: dict) -> dict[str, Any]:
        captions = batch["captions"]
        if self.train_text:
            prompt = self.family.encode(captions, self.device, self.encoders)
        else:
            prompt = PromptEncoding.stack([self.text_cache[c] for c in captions])
        return self.family.inputs(prompt, batch)

    def _base_prediction(self, batch: dict):
        """The frozen model's prediction for `batch`, as prior preservation's teacher and DCO's reference: every
        adapter off, and where text encoders train, the prompts re-encoded by them with their adapters off too."""
        def predict(noisy, timesteps, inputs: dict[str, Any]):
            with self.method_impl.disabled(self.pipe):
                if self.train_text:
                    inputs = self._model_inputs(batch)
                return self.family.forward(self.model, noisy, timesteps, inputs)
        return predict

    def _batch(self, source: dict, indices: list[int], gen: torch.Generator, share: Share, step: int) -> dict:
        # the step's randomness is drawn for the whole batch and the share's rows sliced from it: a micro-batch or
        # a process trains exactly as its part of the whole batch at once
        mean = torch.stack([source["mean"][i] for i in indices])
        std = torch.stack([source["std"][i] for i in indices])
        eps = torch.randn(mean.shape, generator=gen)
        if not self.config.vae_sample:
            eps.zero_()
        noise = torch.randn(mean.shape, generator=gen)
        timesteps = self.family.draw_timesteps(len(indices), gen)
        rows, device = share.rows, self.device
        latents = self.family.scale_latents(mean + std * eps)[rows].to(device)
        batch = {"latents": latents, "noise": noise[rows].to(device), "timesteps": timesteps[rows].to(device),
                 "captions": [source["captions"][i] for i in indices[rows]], "step": step}
        if "time_ids" in source:
            batch["time_ids"] = torch.stack([source["time_ids"][i] for i in indices[rows]]).to(device)
        if "control" in source:
            inputs = [source["control"][i] for i in indices[rows]]
            batch["control"] = torch.stack([own[0] for own in inputs]).to(device)
            # further inputs (summed with the first), with a 0/1 scale per example: present or not
            batch["control_more"] = [
                (torch.stack([own[k] if k < len(own) else torch.zeros_like(own[0]) for own in inputs]).to(device),
                 torch.tensor([float(k < len(own)) for own in inputs], device=device))
                for k in range(1, max(len(own) for own in inputs))]
        return batch

    def _batch_loss(self, source: dict, indices: list[int], gen: torch.Generator, share: Share, step: int,
                    to_base: bool = False) -> torch.Tensor:
        """The objective on one batch; `to_base`: towards the frozen model's prediction (prior preservation)."""
        batch = self._batch(source, indices, gen, share, step)

        def default(b):
            base = self._base_prediction(b)
            teacher = base if to_base else None
            reference = base if self.config.dco_beta and not to_base else None
            return self.family.loss(self.model, b, self._model_inputs(b), teacher, reference)

        return default(batch) if to_base else self.method_impl.training_loss(self.pipe, batch, default)

    def loss(self, step: int, share: Share, generator: torch.Generator) -> torch.Tensor:
        from studio.training.engine import step_generator

        cfg = self.config
        indices = global_batch(self.cache["bucket"], cfg.batch_size, cfg.seed, step)
        loss = self._batch_loss(self.cache, indices, generator, share, step)
        if self.class_cache:
            class_indices = global_batch(self.class_cache["bucket"], cfg.batch_size, cfg.seed + 1, step)
            loss = loss + cfg.prior_loss_weight * self._batch_loss(
                self.class_cache, class_indices, step_generator(cfg.seed, step, 1000), share, step,
                to_base=cfg.prior_target == "base")
        return loss * len(share) / share.batch  # the rows' mean -> their part of the global batch's mean

    def after_step(self, step: int, optimizer) -> str | None:
        return self.method_impl.after_step(self.pipe, self.config.name, step, optimizer)

    # -- state and results --

    def checkpoint_file(self) -> AdapterOutput:
        tensors = {**self.method_impl.state_dict(self.pipe, self.config.name), **trigger_tensors(self.pipe)}
        return AdapterOutput(self.method, self.adapter_config, tensors, self.base)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        vectors = [tensors.pop(key) for key in TRIGGER_KEYS if key in tensors]
        modules = training_trigger(self.pipe)
        if len(vectors) != len(modules):
            raise TrainingError("the checkpoint and this run differ in trigger_token; start a new output folder")
        with torch.no_grad():
            for module, vector in zip(modules, vectors):
                module.vector.copy_(vector.reshape(-1))
        if set(self.method_impl.state_dict(self.pipe, self.config.name)) != set(tensors):
            raise TrainingError("the checkpoint holds different adapter tensors than this run creates")
        self.method_impl.set_state(self.pipe, self.config.name, tensors)

    def finish(self) -> None:
        self._denoiser().eval()

    def result_file(self) -> AdapterOutput:
        from studio.loading import architecture

        output = self.checkpoint_file()
        detach_trigger_embedding(self.pipe)
        output.extra = {"base_model_name": self.config.model, "architecture": architecture(self.pipe),
                        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return output

    @torch.no_grad()
    def preview(self, step: int) -> tuple[list[str], list[Any]]:
        cfg, pipe = self.config, self.pipe
        prompts = cfg.preview_prompts or [cfg.instance_prompt or self.cache["captions"][0]]
        denoiser = self._denoiser()
        was_training = denoiser.training
        denoiser.eval()
        images = pipe(prompts, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_guidance,
                      generator=[torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))],
                      height=self.resolution, width=self.resolution).images
        denoiser.train(was_training)
        return prompts, images


__all__ = ["ConceptRecipe", "global_batch"]
