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


def bench_concept(method: str = "lora", preset: str = "quick", n: int = 64, out: str = "runs/bench_concept",
                  adapter: dict | None = None, steps: int | None = None, write: bool = True, log=print) -> str:
    """B2: teach the held-out star under 'sks' from 8 renders, then judge fidelity, editability,
    preservation and leak on the embedded model."""
    import os
    from pathlib import Path

    from studio.adapters import set_adapter_weights
    from studio.evaluate import run_b2, write_b2_training_set
    from studio.judge import load_judge
    from studio.train import train

    data_dir = Path(out) / "data"
    write_b2_training_set(data_dir)
    settings = {"adapter": adapter or {}}
    if steps:
        settings["steps"] = steps
    run = train(preset=preset, method=method, data=str(data_dir), trigger="sks", name=f"star_{method}",
                output_dir=str(Path(out) / method), preview_prompts=["a red sks on a blue background"],
                progress_bar=log is print, tensorboard=False, **settings)
    log(f"trained {run.steps} steps in {run.seconds:.0f} s")
    from studio.loading import load_pipeline
    from studio.adapters import load_adapters

    pipe = load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    name = load_adapters(pipe, {run.adapter_path: 1.0})[0]
    r = run_b2(pipe, load_judge(), lambda on: set_adapter_weights(pipe, {name: 1.0} if on else {}), n=n)
    header = ["method", "preset", "steps", "train time (s)", "trainable params", "file (KB)", "fidelity",
              "editability", "preservation (pts)", "leak", "base acc", "adapted acc"]
    row = [method, preset, str(run.steps), f"{run.seconds:.0f}", f"{run.trainable_parameters:,}",
           f"{os.path.getsize(run.adapter_path) / 1024:.0f}", f"{100 * r.fidelity:.1f}%", f"{100 * r.editability:.1f}%",
           f"{r.preservation:+.1f}", f"{100 * r.leak:.1f}%", f"{100 * r.base_accuracy:.1f}%",
           f"{100 * r.adapted_accuracy:.1f}%"]
    return record("B2 concept (star as 'sks', 8 renders)", header, [row], write=write)
