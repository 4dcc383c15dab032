"""`studio bench erase` (B3): erase "circle" with a membrane, with and without Facilitated Transport, beside
the ESD-style baseline; "circle" + "red" stacked; the membranes moved to a B2-fine-tuned checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from studio.bench.recorder import record

CIRCLE = {"shape": "circle"}
STACKED = {"shape": "circle", "colour": "red"}
ESD_LRS = (1e-3, 1e-4)


def _train(pipe, concepts: list[str], settings: dict, out: Path, log):
    from studio.adapters.spm.erase import erase_config
    from studio.tasks.erase import default_prompts, train_membrane

    config, run = erase_config(concepts, "shapes", settings=settings)
    config.prompts = default_prompts(pipe, concepts, seed=run.seed)
    result = train_membrane(pipe, config, run, out)
    log(f"membrane {concepts}: {result.steps} steps in {result.seconds:.0f} s")
    return result


def _fine_tuned_checkpoint(out: Path, log):
    """The B2 concept (star as 'sks', LoRA quick preset) merged into the base weights."""
    from studio.adapters import merge_adapters
    from studio.bench.evaluate import write_b2_training_set
    from studio.loading import load_pipeline
    from studio.training.engine import train

    data = out / "b2_data"
    write_b2_training_set(data)
    run = train(preset="quick", method="lora", data=str(data), trigger="sks", name="star", output_dir=str(out / "b2"),
                preview_prompts=[], progress_bar=False, tensorboard=False)
    log(f"B2 LoRA: {run.steps} steps in {run.seconds:.0f} s")
    pipe = load_pipeline("shapes", adapters={run.adapter_path: 1.0})
    merge_adapters(pipe)
    return pipe


def bench_permeability(n: int = 64, write: bool = True) -> str:
    """The strength each metric gives the circle membrane on prompts naming circle and on prompts that do
    not (its floor), on the embedded model's text encoder."""
    from studio.shapes import world
    from studio.adapters.spm.transport import METRICS, permeability
    from studio.bench.evaluate import b3_prompts
    from studio.loading import load_pipeline

    pipe = load_pipeline("shapes")
    sets = {"naming circle": [world.caption(s) for s, _ in b3_prompts(lambda s: s.shape == "circle", n)],
            "other shapes": [world.caption(s) for s, _ in b3_prompts(lambda s: s.shape != "circle", n, 7)]}
    rows = []
    for metric in METRICS:
        row = [metric]
        for prompts in sets.values():
            g = permeability(pipe, prompts, ["circle"], metric)
            row.append(f"{g.min():.2f} / {g.mean():.2f} / {g.max():.2f}")
        rows.append(row)
    header = ["metric", *(f"γ on {n} prompts {name} (min / mean / max)" for name in sets)]
    return record("B3 permeability: the circle membrane's strength per metric", header, rows, write=write)


def bench_erase(n: int = 64, out: str | Path = "runs/bench_erase", settings: dict | None = None,
                write: bool = True, log=print) -> str:
    from studio.adapters.spm.erase import erase_config
    from studio.tasks.erase import default_prompts, erase_esd
    from studio.bench.evaluate import run_b3
    from studio.shapes.judge import load_judge
    from studio.loading import load_pipeline
    from studio.pipelines.membranes import load_membranes, use_membranes

    out = Path(out)
    settings = settings or {}
    judge = load_judge()
    rows = []

    def add(name: str, transport: str, result, base, trained=None):
        residual = {k: f"{100 * v:.1f}%" for k, v in result.residual.items()}
        rows.append([name, transport, residual.get("shape=circle", "—"), residual.get("colour=red", "—"),
                     f"{100 * (result.accuracy - base.accuracy):+.1f}",
                     f"{100 * (result.shape_accuracy - base.shape_accuracy):+.1f}",
                     f"{result.fd:.1f} ({result.fd - base.fd:+.1f})",
                     f"{trained.seconds:.0f}" if trained else "—",
                     f"{trained.trainable_parameters:,}" if trained else "—",
                     f"{os.path.getsize(trained.path) / 1024:.0f}" if trained and trained.path else "—"])
        log(" | ".join(rows[-1]))

    pipe = load_pipeline("shapes")
    base_one, base_two = run_b3(pipe, judge, CIRCLE, n=n), run_b3(pipe, judge, STACKED, n=n)
    add("base model", "—", base_one, base_one)
    add("base model", "—", base_two, base_two)

    circle = _train(load_pipeline("shapes"), ["circle"], settings, out / "circle.safetensors", log)
    pipe = load_pipeline("shapes", membranes=[circle.path])
    add("SPM circle", "yes", run_b3(pipe, judge, CIRCLE, n=n), base_one, circle)
    use_membranes(pipe, None)
    add("SPM circle", "no", run_b3(pipe, judge, CIRCLE, n=n), base_one, circle)

    for lr in ESD_LRS:  # the membrane's lr is far too high for full cross-attention weights: two of its own
        pipe = load_pipeline("shapes")
        config, run = erase_config(["circle"], "shapes", settings={**settings, "lr": lr})
        config.prompts = default_prompts(pipe, ["circle"], seed=run.seed)
        esd = erase_esd(pipe, config, run)
        log(f"ESD-x lr {lr:g}: {esd.steps} steps in {esd.seconds:.0f} s")
        add(f"ESD-x (cross-attention fine-tuned, lr {lr:g})", "n/a", run_b3(pipe, judge, CIRCLE, n=n), base_one, esd)

    red = _train(load_pipeline("shapes"), ["red"], settings, out / "red.safetensors", log)
    pipe = load_pipeline("shapes", membranes=[circle.path, red.path])
    add("SPM circle + red", "yes", run_b3(pipe, judge, STACKED, n=n), base_two, red)
    use_membranes(pipe, None)
    add("SPM circle + red", "no", run_b3(pipe, judge, STACKED, n=n), base_two, red)

    tuned = _fine_tuned_checkpoint(out, log)
    tuned_base = run_b3(tuned, judge, CIRCLE, n=n)
    add("B2-fine-tuned checkpoint", "—", tuned_base, tuned_base)
    load_membranes(tuned, [circle.path])
    add("  + SPM circle from the base model", "yes", run_b3(tuned, judge, CIRCLE, n=n), tuned_base)

    header = ["model", "transport", "circle residual", "red residual", "collateral (pts, mean attr.)",
              "collateral (pts, shape)", "FD (Δ)", "train (s)", "trainable params", "file (KB)"]
    return record(f"B3 erase (n={n} prompts per set, 25 DDIM steps, guidance 5)", header, rows, write=write)
