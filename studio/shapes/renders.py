"""The shapes world's samples for pretraining and the judge, rendered in parallel processes; the unet stage's
cache of their VAE latents."""

from __future__ import annotations

import json
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from studio.shapes import world


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


def _render_scene_chunk(items: list[tuple[tuple[world.Spec, ...], bool, int]]) -> np.ndarray:
    return np.stack([world.render_outlier(specs[0], seed) if outlier else world.render_scene(list(specs), seed)
                     for specs, outlier, seed in items])


def render_scenes(items: list[tuple[tuple[world.Spec, ...], bool, int]], workers: int | None = None) -> np.ndarray:
    """render_set for (specs, outlier, seed) items: a shape or a scene, or an outlier at the first spec's layout."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) < 256:
        return _render_scene_chunk(items)
    step = math.ceil(len(items) / (workers * 4))
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_render_scene_chunk, [items[i:i + step] for i in range(0, len(items),
                                                                                                     step)])))


def judge_items(shapes_world: world.World, n: int, seed: int, outliers: float = 0.0, scenes: float = 0.0
                ) -> list[tuple[tuple[world.Spec, ...], bool, int]]:
    """What the judge of a world sees: every shape of the world (held-out ones too) in any combination, an
    `outliers` share of shapes of no world and a `scenes` share of two-shape scenes."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        r = rng.random()
        if r < scenes:
            specs = tuple(world.random_pair(rng, None, shapes_world.shapes))
        else:
            specs = (world.random_spec(rng, shapes_world.shapes, heldout=None),)
        out.append((specs, scenes <= r < scenes + outliers, rng.randrange(2**31)))
    return out


def world_sample(n: int, seed: int, shapes: tuple[str, ...], heldout: bool | None
                 ) -> tuple[list[world.Spec], list[int]]:
    rng = random.Random(seed)
    specs = [world.random_spec(rng, shapes, heldout=heldout) for _ in range(n)]
    seeds = [rng.randrange(2**31) for _ in range(n)]
    return specs, seeds


# the unet stage's cache of its rendered images' VAE latents

def latent_key(cfg, vae) -> str:
    """What the cached latents depend on: the stream (world, seed, count) and the VAE's weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return json.dumps({"world": cfg.world, "seed": cfg.seed, "images": cfg.unet_images,
                       "vae": digest.hexdigest()[:16]}, sort_keys=True)


def cached_latents(cache: Path | None, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    if cache is None or not cache.is_file():
        return None
    try:
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("latents")
    except Exception:  # a damaged cache is made again
        return None


def write_latents(cache: Path, key: str, latents: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from studio.utils.files import atomic_path

    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({"latents": latents.cpu().contiguous()}, str(tmp), metadata={"key": key})
