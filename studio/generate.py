"""Text-to-image generation on any loaded pipeline, with validated settings and PNGs that carry them."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from studio.utils.files import atomic_path
from studio.loading import StudioError

# (SD3 and Flux: their pipelines' own default, 1024 for the released models)
DEFAULT_SIZES = {"shapes": 128, "sd1": 512, "sd2": 768, "sdxl": 1024}


def family_steps_and_guidance(pipe) -> tuple[int, float]:
    """Each family's usual sampling: 25 steps at guidance 5 (SD 1.x/2.x, SDXL, the embedded model); SD3 28 at 7;
    Flux-dev 28 at its distilled guidance 3.5 (an input of the transformer, not classifier-free guidance);
    Flux-schnell (no guidance input) 4 at 0."""
    architecture = getattr(pipe, "studio_architecture", "")
    if architecture == "sd3":
        return 28, 7.0
    if architecture == "flux":
        return (28, 3.5) if pipe.transformer.config.guidance_embeds else (4, 0.0)
    return 25, 5.0


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    batch: int = 1
    height: int | None = None
    width: int | None = None

    def validate(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise StudioError("the prompt is empty; say what to draw, e.g. \"a red circle on a gray background\"")
        if self.steps <= 0:
            raise StudioError(f"steps must be at least 1 (got {self.steps})")
        if self.batch <= 0:
            raise StudioError(f"batch must be at least 1 (got {self.batch})")
        if self.guidance < 0:
            raise StudioError(f"guidance must be >= 0 (got {self.guidance})")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise StudioError(f"{name} must be a positive multiple of 8 (got {v})")


def generate(pipe, settings: GenerationSettings) -> list[Image.Image]:
    """Images for the settings; image i of a batch uses seed + i, so any one can be remade alone."""
    settings.validate()
    size = DEFAULT_SIZES.get(getattr(pipe, "studio_architecture", ""), None)
    generators = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in range(settings.batch)]
    out = pipe(
        [settings.prompt] * settings.batch,
        negative_prompt=[settings.negative_prompt] * settings.batch if settings.negative_prompt else None,
        num_inference_steps=settings.steps, guidance_scale=settings.guidance, generator=generators,
        height=settings.height or size, width=settings.width or size,
    )
    return out.images


def png_info(settings: GenerationSettings, model: str, index: int = 0,
             extra: dict | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    meta = {**asdict(settings), "seed": settings.seed + index, "batch": 1, "model": model, **(extra or {})}
    info.add_text("parameters", json.dumps(meta))
    return info


def output_paths(out: str | Path, count: int) -> list[Path]:
    """img.png for one image, img-0.png, img-1.png, ... for several; the folder must be writable."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise StudioError(f"{out}: the output must be a .png path")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise StudioError(f"{out}: {parent} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StudioError(f"{out}: cannot create the folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise StudioError(f"{out}: the folder {parent} is not writable")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_images(images: list[Image.Image], paths: list[Path], settings: GenerationSettings, model: str,
                extra: dict | None = None) -> None:
    """Write PNGs carrying their settings (and `extra`, e.g. the adapters used) in a `parameters` chunk."""
    for i, (img, path) in enumerate(zip(images, paths)):
        try:
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG", pnginfo=png_info(settings, model, i, extra))
        except OSError as e:
            raise StudioError(f"{path}: cannot write ({e.strerror or e})") from None
