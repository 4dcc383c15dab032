"""Training data: a folder of images with same-name `.txt` captions (or one instance prompt with a trigger
word), every file checked up front, and aspect-ratio buckets."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from studio.loading import StudioError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
MAX_PIXELS = 64_000_000  # a larger upload is refused rather than decoded (decompression bombs)


class DataError(StudioError):
    """A training image or caption that cannot be used."""


@dataclass
class Example:
    path: Path
    caption: str
    image: Image.Image  # RGB, fully decoded


def read_caption(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: caption is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save it as UTF-8") from None
    return " ".join(text.split())


def open_image(path: Path, min_size: int) -> Image.Image:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    too_large = f"{path}: the image is too large (more than {MAX_PIXELS // 1_000_000} megapixels)"
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{too_large[:-1]}: {width}x{height})")
            probe.verify()
        with Image.open(path) as im:
            image = im.convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(too_large) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if min(image.size) < min_size:
        raise DataError(f"{path}: {image.size[0]}x{image.size[1]} is too small (the shorter side must be at least "
                        f"{min_size} px)")
    return image


def caption_for(image_path: Path, trigger: str | None, instance_prompt: str | None) -> str:
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    text = read_caption(caption_path) if caption_path.is_file() else ""
    if not text:
        text = instance_prompt or trigger or ""
    if not text:
        raise DataError(f"{image_path}: no caption ({caption_path.name} is missing or empty) and neither an instance "
                        "prompt nor a trigger word was given")
    if trigger:
        text = text.replace("[trigger]", trigger)
    return text


def load_examples(images: list[Path], *, trigger: str | None = None, instance_prompt: str | None = None,
                  min_size: int = 64, skip_bad: bool = False, warn=None) -> list[Example]:
    """Check and decode every image and its caption; a bad one raises DataError naming it, or is skipped
    with a warning when `skip_bad`."""
    examples = []
    for path in images:
        try:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'} "
                                f"(training images are {' '.join(IMAGE_SUFFIXES)})")
            image = open_image(path, min_size)
            examples.append(Example(path, caption_for(path, trigger, instance_prompt), image))
        except DataError as exc:
            if not skip_bad:
                raise
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(f"skipped {exc}")
    if not examples:
        raise DataError("no usable training images" + (" (every image was skipped)" if images else ""))
    return examples


def scan_folder(folder: str | Path, **kwargs) -> list[Example]:
    """All images of a folder (not recursive) with their captions; other files except captions are refused
    (or skipped with `skip_bad`), so a typo'd extension is not silently left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"training data folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() != CAPTION_SUFFIX]
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in candidates):
        raise DataError(f"no images in {folder} (looked for {' '.join(IMAGE_SUFFIXES)})")
    return load_examples(candidates, **kwargs)


def _control_file(folder: Path, stem: str, size: tuple[int, int]) -> Image.Image | None:
    """The image `folder/stem.*` (any image type), checked to have the aspect ratio of `size`; None if absent."""
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            image = open_image(candidate, 8)
            if abs(image.width / image.height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
                raise DataError(f"{candidate}: the control image is {image.width}x{image.height}, its training image "
                                f"{size[0]}x{size[1]}: their aspect ratios differ")
            return image
    return None


def control_images(image_path: Path, folder: str | Path, size: tuple[int, int]) -> list[Image.Image]:
    """The control inputs of a training image of `size` (w, h): the file of the same name (any image type) in
    `folder`, then `NAME.2.*`, `NAME.3.*`, … while they exist (further inputs, summed with the first at training
    as several inputs are at generation); each of the same aspect ratio."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"control image folder not found: {folder}")
    stem = Path(image_path).stem
    first = _control_file(folder, stem, size)
    if first is None:
        raise DataError(f"{image_path}: no control image named {stem}.* in {folder}")
    images = [first]
    while (more := _control_file(folder, f"{stem}.{len(images) + 1}", size)) is not None:
        images.append(more)
    return images


def control_inputs(examples: list[Example], folder: str | Path) -> list[list[Image.Image]]:
    """`control_images` of every training example; a training image named as another's further input
    (`NAME.2` beside `NAME`) is refused rather than silently paired."""
    stems = {ex.path.stem for ex in examples}
    for ex in examples:
        first, dot, number = ex.path.stem.rpartition(".")
        if dot and number.isdigit() and first in stems:
            raise DataError(f"{ex.path}: named as the control input {number} of {first}; rename it "
                            f"(NAME.2, NAME.3, … in the control folder are further inputs of NAME)")
    return [control_images(ex.path, folder, ex.image.size) for ex in examples]


# ---- aspect-ratio buckets ----

def bucket_size(width: int, height: int, resolution: int, step: int = 64, max_ratio: float = 2.0) -> tuple[int, int]:
    """The (width, height) of the bucket for an image: about resolution² pixels, sides multiples of `step`,
    aspect ratio kept within `max_ratio`, never more pixels than the image has."""
    ratio = min(max(width / height, 1 / max_ratio), max_ratio)
    area = min(resolution * resolution, width * height)
    w = max(step, int(math.sqrt(area * ratio) // step * step))
    h = max(step, int(math.sqrt(area / ratio) // step * step))
    return w, h


def cover_crop(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How `to_bucket` fits an image of `image_size` (width, height) to the bucket `size`: the size it is resized
    to, covering the bucket, and the (left, top) of the centred crop in the resized image."""
    (width, height), (w, h) = image_size, size
    scale = max(w / width, h / height)
    resized = (max(w, round(width * scale)), max(h, round(height * scale)))
    return resized, ((resized[0] - w) // 2, (resized[1] - h) // 2)


def to_bucket(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover the bucket, centre-crop, and return a [-1, 1] CHW tensor."""
    w, h = size
    resized_size, (left, top) = cover_crop(image.size, size)
    resized = image.resize(resized_size, Image.BICUBIC)
    arr = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def batch_plan(buckets: list[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch as a list of global batches of exactly `batch` indices, each batch from one bucket
    (a short last batch of a bucket is filled by wrapping around it). Deterministic in (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    groups: dict[int, list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    plan = []
    for bucket in sorted(groups):
        members = groups[bucket]
        order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            while len(chunk) < batch:
                chunk.append(order[(start + len(chunk)) % len(order)])
            plan.append(chunk)
    return [plan[i] for i in torch.randperm(len(plan), generator=g).tolist()]


def batches_per_epoch(buckets: list[int], batch: int) -> int:
    counts: dict[int, int] = {}
    for bucket in buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    return sum(math.ceil(c / batch) for c in counts.values())
