"""`studio bench generate`: pipeline load time and images per second on this machine."""

from __future__ import annotations

import random
import time

import torch

from studio import world
from studio.benchmarks import record


def bench_generation(model: str = "shapes", batch: int = 8, steps: int = 25, guidance: float = 5.0,
                     repeats: int = 3, write: bool = True) -> str:
    from studio.loading import load_pipeline

    t = time.perf_counter()
    pipe = load_pipeline(model)
    load_s = time.perf_counter() - t
    prompts = [world.caption(world.random_spec(random.Random(i))) for i in range(batch)]
    size = world.IMAGE_SIZE if pipe.studio_architecture == "shapes" else None
    pipe(prompts[:1], num_inference_steps=2, height=size, width=size)  # warm-up
    times = []
    for r in range(repeats):
        gens = [torch.Generator().manual_seed(r * batch + i) for i in range(batch)]
        t = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size, width=size)
        times.append(time.perf_counter() - t)
    best = min(times)
    header = ["model", "load (s)", "batch", "steps", "guidance", "s/batch (best of %d)" % repeats, "img/s",
              "threads"]
    row = [model, f"{load_s:.2f}", str(batch), str(steps), f"{guidance:g}", f"{best:.2f}", f"{batch / best:.2f}",
           str(torch.get_num_threads())]
    return record("Generation speed", header, [row], write=write)


def bench_judge(n: int = 1000, seed: int = 3, write: bool = True) -> str:
    """Judge accuracy on fresh renders and after the shipped VAE (encode->decode)."""
    from studio.judge import HEADS, load_judge
    from studio.loading import load_pipeline
    from studio.pretrain import judge_report

    report = judge_report(load_judge(), load_pipeline("shapes").vae, n, seed)
    rows = [[name, str(n), *(f"{100 * acc[h]:.2f}%" for h in HEADS)] for name, acc in report.items()]
    return record("Judge accuracy", ["images", "n", *HEADS], rows, write=write)
