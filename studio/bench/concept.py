"""`studio bench generate`: pipeline load time and images per second on this machine."""

from __future__ import annotations

import random
import time

import torch

from studio.shapes import world
from studio.bench.recorder import record


def bench_generation(model: str = "shapes", batch: int = 8, steps: int = 25, guidance: float = 5.0,
                     repeats: int = 3, write: bool = True, fast_decoder: str | None = None) -> str:
    """Load time and images per second; with `fast_decoder`, a second row with the VAE swapped for it, the two
    timed in turn in one run (these machines drift: compare the rows' ratio)."""
    from studio.loading import load_pipeline

    t = time.perf_counter()
    pipes = {model: load_pipeline(model)}
    load_s = time.perf_counter() - t
    if fast_decoder:
        pipes[f"{model}, fast decoder {fast_decoder}"] = load_pipeline(model, fast_decoder=fast_decoder)
    prompts = [world.caption(world.random_spec(random.Random(i))) for i in range(batch)]
    size = world.IMAGE_SIZE if pipes[model].studio_architecture == "shapes" else None
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for pipe in pipes.values():
        pipe(prompts[:1], num_inference_steps=2, height=size, width=size)  # warm-up
    for r in range(repeats):
        for name, pipe in pipes.items():
            gens = [torch.Generator().manual_seed(r * batch + i) for i in range(batch)]
            t = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size,
                 width=size)
            times[name].append(time.perf_counter() - t)
    header = ["model", "load (s)", "batch", "steps", "guidance", "s/batch (best of %d)" % repeats, "img/s",
              "threads"]
    rows = [[name, f"{load_s:.2f}" if name == model else "-", str(batch), str(steps), f"{guidance:g}",
             f"{min(ts):.2f}", f"{batch / min(ts):.2f}", str(torch.get_num_threads())] for name, ts in times.items()]
    return record("Generation speed", header, rows, write=write)


def bench_judge(n: int = 1000, seed: int = 3, write: bool = True, judge: str | None = None,
                model: str = "shapes") -> str:
    """Judge accuracy on fresh renders and after a shapes model's VAE (encode->decode); a v2 judge's rows also
    give how often it reads outliers (shapes of no world) as none and two-shape scenes as two objects."""
    from studio.loading import load_pipeline
    from studio.shapes.judge import load_judge
    from studio.shapes.pretrain import judge_report

    examiner = load_judge(judge)
    report = judge_report(examiner, load_pipeline(model).vae, n, seed)
    heads = list(report["fresh_renders"])
    rows = [[name, str(n if name in ("fresh_renders", "vae_roundtrip") else n // 4), f"v{examiner.version}",
             *(f"{100 * acc[h]:.2f}%" if h in acc else "" for h in heads),
             ", ".join(f"{100 * v:.2f}%" for k, v in acc.items() if k not in heads)]
            for name, acc in report.items()]
    return record("Judge accuracy", ["images", "n", "judge", *heads, "outliers read none / scenes read two"], rows,
                  write=write)


def bench_concept(method: str = "lora", preset: str = "quick", n: int = 64, out: str = "runs/bench_concept",
                  adapter: dict | None = None, steps: int | None = None, lr: float | None = None, write: bool = True,
                  settings: dict | None = None, prior_renders: int = 0, prior_paired: bool = False,
                  model: str = "shapes", judge: str | None = None, log=print) -> str:
    """B2: teach the held-out star under 'sks' from 8 renders, then judge fidelity, editability,
    preservation and leak on the embedded model. `method`: one method, or several separated by commas,
    trained with the same settings and measured into one table. `prior_renders`: prior preservation on that
    many renders of the base shapes with their captions (regularization pictures); `prior_paired`: and on the
    8 training renders redrawn as each base shape (write_b2_prior_set). `model` / `judge`: another shapes model
    and its judge (world v2's: the judge's version picks the world's prompts)."""
    import os
    from pathlib import Path

    from studio.adapters import load_adapters, set_adapter_weights
    from studio.bench.evaluate import run_b2, write_b2_prior_set, write_b2_training_set
    from studio.shapes.judge import load_judge
    from studio.loading import load_pipeline
    from studio.training.engine import train

    examiner = load_judge(judge)
    data_dir = Path(out) / "data"
    shapes_world = world.get_world(examiner.version)
    write_b2_training_set(data_dir, shapes_world)
    extra = dict(settings or {})
    if prior_paired and not prior_renders:
        raise ValueError("prior_paired adds to the prior renders: give prior_renders too")
    prior = {}
    if prior_renders:
        folder = Path(out) / "prior"
        files = write_b2_prior_set(folder, prior_renders, paired=prior_paired, shapes_world=shapes_world)
        prior = {"prior_preservation": True, "class_data_dir": str(folder), "num_class_images": len(files)}
    settings = {**extra, **prior, "adapter": adapter or {}}
    if steps:
        settings["steps"] = steps
    if lr:
        settings["lr"] = lr
    shown = dict(extra)
    if prior_renders:
        paired = " + the 8 redrawn as each base shape" if prior_paired else ""
        shown["prior"] = f"{prior_renders} base renders{paired}"
    setting = ", ".join(f"{k}={v}" for k, v in {**(adapter or {}), **shown, **({"lr": lr} if lr else {})}.items())
    rows = []
    for one in method.split(","):
        run = train(model=model, preset=preset, method=one, data=str(data_dir), trigger="sks", name=f"star_{one}",
                    output_dir=str(Path(out) / one), preview_prompts=["a red sks on a blue background"],
                    progress_bar=log is print, tensorboard=False, **settings)
        log(f"{one}: trained {run.steps} steps in {run.seconds:.0f} s")
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        name = load_adapters(pipe, {run.adapter_path: 1.0})[0]
        r = run_b2(pipe, examiner, lambda on: set_adapter_weights(pipe, {name: 1.0} if on else {}), n=n)
        rows.append([f"{one} ({setting})" if setting else one, preset, str(run.steps), f"{run.seconds:.0f}",
                     f"{run.trainable_parameters:,}", f"{os.path.getsize(run.adapter_path) / 1024:.0f}",
                     f"{100 * r.fidelity:.1f}%", f"{100 * r.editability:.1f}%", f"{r.preservation:+.1f}",
                     f"{100 * r.leak:.1f}%", f"{100 * r.base_accuracy:.1f}%", f"{100 * r.adapted_accuracy:.1f}%"])
    header = ["method", "preset", "steps", "train time (s)", "trainable params", "file (KB)", "fidelity",
              "editability", "preservation (pts)", "leak", "base acc", "adapted acc"]
    title = "B2 concept (star as 'sks', 8 renders)" + (f", world v{examiner.version}" if examiner.version > 1 else "")
    return record(title, header, rows, write=write)


def bench_ui_first_image(preset: str = "quick", write: bool = True) -> str:
    """Wall time from connecting to a freshly started web UI to the first image of a concept trained there
    with `preset` on the B2 star set (8 uploads), driven through gradio_client as a page would drive it."""
    import tempfile
    from pathlib import Path

    from gradio_client import Client, handle_file

    from studio.bench.evaluate import write_b2_training_set
    from studio.ui.app import serve_in_background  # lazily: the UI sits above the core

    with tempfile.TemporaryDirectory() as tmp:
        images = write_b2_training_set(Path(tmp) / "stars")
        files = [str(p) for p in images] + [str(p.with_suffix(".txt")) for p in images]
        url, app = serve_in_background(Path(tmp) / "workspace")
        try:
            t0 = time.perf_counter()
            client = Client(url, verbose=False)
            client.predict(files=[handle_file(f) for f in files], name="star", trigger="sks", method="lora",
                           preset=preset, captions={"headers": ["image", "caption"], "data": []}, api_name="/train")
            while True:
                status = client.predict(api_name="/job_status")[0]
                if "done" in status or "failed" in status:
                    break
                time.sleep(1)
            if "failed" in status:
                raise RuntimeError(status)
            t_trained = time.perf_counter() - t0
            client.predict(api_name="/library")  # what opening the Generate tab does: the new adapter is listed
            client.predict(model="shapes", prompt="a red sks on a blue background", steps=25, guidance=5.0, seed=0,
                           batch=1, adapters=["star"], weight=1.0, api_name="/generate")
            total = time.perf_counter() - t0
        finally:
            app.close()
    header = ["preset", "page → trained (s)", "page → first image (s)", "target"]
    return record("Web UI: time to a trained concept's first image", header,
                  [[preset, f"{t_trained:.0f}", f"{total:.0f}", "≤ 240 s"]], write=write)
