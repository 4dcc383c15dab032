"""`studio bench onestep` (B4): the HiPA adaptor at one step against the 25-step teacher and the base model at
1 and 4 steps, with the adaptor trained without the high-frequency loss as an ablation. Prompt accuracy and
FD on the B1 prompts; images per second end to end (VAE decoding included) and UNet-only."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from studio.bench.recorder import record


@contextmanager
def unet_seconds(pipe):
    """Accumulates the time spent inside the UNet's forward calls into the yielded list's first item."""
    total = [0.0]
    start: list[float] = []

    def pre(module, args, kwargs):
        start.append(time.perf_counter())

    def post(module, args, kwargs, output):
        total[0] += time.perf_counter() - start.pop()

    handles = [pipe.unet.register_forward_pre_hook(pre, with_kwargs=True),
               pipe.unet.register_forward_hook(post, with_kwargs=True)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def _row(label: str, steps: int, guidance: float, r, unet_s: float, teacher_ips: float | None,
         teacher_unet_ips: float | None, extra: str = "") -> list[str]:
    heads = list(r.accuracy)
    mean = sum(r.accuracy.values()) / len(heads)
    unet_ips = r.n / unet_s
    speedup = (f"{r.images_per_second / teacher_ips:.1f}x / {unet_ips / teacher_unet_ips:.1f}x" if teacher_ips
               else "1x / 1x")
    return [label, str(steps), f"{guidance:g}", *(f"{100 * r.accuracy[h]:.1f}%" for h in heads), f"{100 * mean:.1f}%",
            f"{100 * r.all_correct:.1f}%", f"{r.fd:.2f}", f"{r.images_per_second:.2f}", f"{unet_ips:.1f}", speedup,
            extra]


def _trained_before(path: Path, settings):
    """The TrainResult of an adaptor this benchmark wrote earlier with the same distill settings (`--reuse`),
    its training time as measured then; None when there is none."""
    import json

    from studio.adapters import read_adapter
    from studio.adapters.hipa.config import DistillSettings
    from studio.training import TrainResult

    if not path.is_file():
        return None
    meta = read_adapter(path).metadata
    if "training_seconds" not in meta or "distill_settings" not in meta:
        return None
    # a setting added since the file was written had its default then
    then = {**DistillSettings().__dict__, **json.loads(meta["distill_settings"])}
    if then != settings.__dict__:
        return None
    return TrainResult(path, int(meta["steps"]), float("nan"), float(meta["training_seconds"]),
                       int(meta["trainable_parameters"]))


def bench_onestep(n: int = 256, out: str | Path = "runs/bench_onestep", settings: dict | None = None,
                  write: bool = True, concept: bool = True, reuse: bool = False, adversarial: float = 0.0,
                  log=print) -> str:
    """The teacher, the base model at 1 and 4 steps, HiPA and its ablation without the high-frequency loss,
    and with `adversarial` > 0 a third adaptor: HiPA plus the (not HiPA) adversarial term at that weight."""
    from studio.adapters.hipa.config import DistillSettings
    from studio.tasks.distill import run_distill
    from studio.bench.evaluate import run_b1
    from studio.shapes.judge import load_judge
    from studio.loading import load_pipeline
    from diffusers import DDIMScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_judge()
    base = DistillSettings(**(settings or {}))
    cache = out / "teacher_pairs.safetensors"
    trained = {}
    variants = [("HiPA", {}, "hipa"),
                ("HiPA without high-frequency loss", {"fourier_weight": 0.0, "edge_weight": 0.0}, "hipa_no_hf")]
    if adversarial:
        variants.append((f"HiPA + adversarial term (weight {adversarial:g})", {"adversarial_weight": adversarial},
                         "hipa_adversarial"))
    for label, extra, name in variants:
        run = DistillSettings(**{**base.__dict__, **extra})
        pipe = load_pipeline("shapes")
        path = out / f"{name}.safetensors"
        result = _trained_before(path, run) if reuse else None
        note = " (earlier run)" if result else ""
        if result is None:
            result = run_distill(pipe, run, path, cache=cache, log=log)
        log(f"{label}: {result.steps} steps in {result.seconds:.0f} s{note}, "
            f"{result.trainable_parameters:,} parameters")
        unet_params = sum(p.numel() for n_, p in pipe.unet.named_parameters() if "lora_" not in n_)
        trained[label] = (path, result, unet_params, note)

    rows = []

    def measure(label: str, pipe, steps: int, guidance: float, teacher=None, extra: str = ""):
        with unet_seconds(pipe) as unet_s:
            r = run_b1(pipe, judge, n=n, steps=steps, guidance=guidance)
        rows.append(_row(label, steps, guidance, r, unet_s[0], *(teacher or (None, None)), extra))
        log(" | ".join(rows[-1]))
        return r.images_per_second, r.n / unet_s[0]

    teacher = measure("teacher (base, DDIM)", load_pipeline("shapes"), base.teacher_steps, base.teacher_guidance)
    few_step_base = load_pipeline("shapes")
    few_step_base.scheduler = DDIMScheduler.from_config(few_step_base.scheduler.config, timestep_spacing="trailing")
    for steps in (1, 4):
        measure("base, DDIM trailing", few_step_base, steps, base.teacher_guidance, teacher)
    for label, (path, result, unet_params, note) in trained.items():
        pipe = load_pipeline("shapes", one_step=path)
        extra = (f"{result.trainable_parameters:,} params ({100 * result.trainable_parameters / unet_params:.2f}% of "
                 f"the UNet), {result.steps} steps, {result.seconds / 60:.1f} min{note}")
        measure(label, pipe, 1, 0.0, teacher, extra)
    if concept:
        rows_c = _concept_rows(out, trained["HiPA"][0], judge, base, log)
    header = ["model", "steps", "guidance", "shape", "colour", "background", "size", "position", "mean", "all", "FD",
              "img/s", "UNet img/s", "speed vs teacher (end to end / UNet)", "adaptor"]
    title = (f"B4 one-step ({n} B1 prompts; teacher pairs {base.pairs}, student {base.steps} steps batch "
             f"{base.batch} lr {base.lr:g})")
    table = record(title, header, rows, write=write)
    if concept:
        table += "\n\n" + record("B4 one-step with a concept adapter (B2 star as 'sks', LoRA quick preset; 64 B2 "
                                  "prompts)", ["model", "steps", "guidance", "fidelity (star)", "editability"],
                                  rows_c, write=write)
    return table


def _concept_rows(out: Path, one_step: Path, judge, base, log) -> list[list[str]]:
    """Does a concept adapter survive one step? The B2 LoRA at 25 guided steps, and beside the adaptor at 1."""
    import numpy as np

    from studio.bench.evaluate import generate_images, b2_prompt_text, b2_prompts, write_b2_training_set, B2_SHAPE
    from studio.shapes.judge import judge_images
    from studio.loading import load_pipeline
    from studio.pipelines.one_step import use_one_step
    from studio.training.engine import train

    data = out / "b2_data"
    write_b2_training_set(data)
    run = train(preset="quick", method="lora", data=str(data), trigger="sks", name="star", output_dir=str(out / "b2"),
                preview_prompts=[], progress_bar=False, tensorboard=False)
    log(f"B2 LoRA: {run.steps} steps in {run.seconds:.0f} s")
    pairs = b2_prompts(64)
    specs = [s for s, _ in pairs]
    rows = []
    concept_pipe = load_pipeline("shapes", adapters={run.adapter_path: 1.0})
    one_step_concept = load_pipeline("shapes", adapters={run.adapter_path: 1.0}, one_step=one_step)
    for label, pipe, steps, guidance in (
            ("B2 LoRA (teacher settings)", concept_pipe, base.teacher_steps, base.teacher_guidance),
            ("B2 LoRA + HiPA", one_step_concept, 1, 0.0),
            ("B2 LoRA, one-step schedule, no adaptor", use_one_step(load_pipeline(
                "shapes", adapters={run.adapter_path: 1.0})), 1, 0.0)):
        images = generate_images(pipe, [b2_prompt_text(s) for s in specs], [sd for _, sd in pairs], steps, guidance)
        preds = judge_images(judge, images)[1]
        fidelity = float(np.mean([p == B2_SHAPE for p in preds["shape"]]))
        edit = float(np.mean([preds["colour"][i] == s.colour and preds["background"][i] == s.background
                              for i, s in enumerate(specs)]))
        rows.append([label, str(steps), f"{guidance:g}", f"{100 * fidelity:.1f}%", f"{100 * edit:.1f}%"])
        log(" | ".join(rows[-1]))
    return rows
