"""The shapes world's samples for pretraining and the judge, rendered in parallel processes."""

from __future__ import annotations

import math
import os
import random
from concurrent.futures import ProcessPoolExecutor

import numpy as np

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
