"""B1, base quality (`studio eval`): per-attribute prompt accuracy read by the judge, and the
Fréchet distance of judge features between generated images and renders, beside its floor."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from studio import world
from studio.judge import HEADS, Judge, accuracy, judge_images, to_tensor

B1_SEED = 20_261_122


def b1_prompts(n: int = 256, seed: int = B1_SEED) -> list[tuple[world.Spec, int]]:
    """Fixed (spec, seed) pairs from attribute combinations never in the pretraining captions."""
    rng = random.Random(seed)
    return [(world.random_spec(rng, world.BASE_SHAPES, heldout=True), rng.randrange(2**31)) for _ in range(n)]


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a64.mean(0), b64.mean(0)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    # tr(sqrt(s1 s2)) = sum of sqrt of eigenvalues of s1 s2 (real, >= 0 up to round-off)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def render_features(judge: Judge, specs: list[world.Spec], seeds: list[int]) -> torch.Tensor:
    images = to_tensor(np.stack([world.render(s, seed) for s, seed in zip(specs, seeds)]))
    return judge_images(judge, images)[0]


@dataclass
class B1Result:
    accuracy: dict[str, float]
    all_correct: float
    fd: float
    fd_floor: float
    images_per_second: float
    n: int
    steps: int
    guidance: float


def pil_to_tensor(images) -> torch.Tensor:
    return to_tensor(np.stack([np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE,) * 2)) for im in images]))


def run_b1(pipe, judge: Judge, *, n: int = 256, steps: int = 25, guidance: float = 5.0, batch: int = 16,
           progress=None) -> B1Result:
    pairs = b1_prompts(n)
    specs = [s for s, _ in pairs]
    generated = []
    seconds = 0.0
    for i in range(0, n, batch):
        chunk = pairs[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        t = time.perf_counter()
        out = pipe([world.caption(s) for s, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE).images
        seconds += time.perf_counter() - t
        generated.append(pil_to_tensor(out))
        if progress:
            progress(min(i + batch, n), n)
    feats, preds = judge_images(judge, torch.cat(generated))
    acc = accuracy(preds, specs)
    all_ok = float(np.mean([all(preds[k][j] == getattr(s, k) for k in HEADS) for j, s in enumerate(specs)]))
    rng = random.Random(B1_SEED + 1)
    ref = render_features(judge, specs, [rng.randrange(2**31) for _ in specs])
    ref2 = render_features(judge, specs, [rng.randrange(2**31) for _ in specs])
    return B1Result(acc, all_ok, frechet_distance(feats, ref), frechet_distance(ref2, ref), n / seconds, n, steps,
                    guidance)
