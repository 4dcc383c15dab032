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


# B3's paraphrase set, version 1 (2026-12-03): prompts that name the circle without the word "circle", by the
# words world v2's captions also use for it. The membrane is trained on prompts with the word "circle" only.
PARAPHRASES = {"circle": ("disc", "round shape")}


def paraphrase_sets(n: int, concept: str = "circle") -> tuple[dict[str, list[tuple[str, int]]], list]:
    """{"circle": [(prompt, seed)], "disc": [...], ...} on the same n circle specs and seeds (paired), and n
    (spec, seed) pairs of world v2's other base shapes named by their canonical words (the collateral set)."""
    import random

    from studio.bench.evaluate import B3_SEED
    from studio.shapes import world

    v2, rng = world.V2, random.Random(B3_SEED + 200)
    named = [(world.with_shape(v2.random_spec(rng, heldout=None), concept), rng.randrange(2**31)) for _ in range(n)]
    sets = {word: [(v2.caption(spec).replace(concept, word), seed) for spec, seed in named]
            for word in (concept, *PARAPHRASES[concept])}
    others = []
    while len(others) < n:
        spec, seed = v2.random_spec(rng, heldout=None), rng.randrange(2**31)
        if spec.shape != concept:
            others.append((spec, seed))
    return sets, others


def bench_paraphrase(model: str, judge_path: str, n: int = 64, out: str | Path = "runs/bench_erase",
                     settings: dict | None = None, write: bool = True, log=print) -> str:
    """B3 paraphrase: the circle membrane (trained on prompts with the word "circle") on prompts naming the circle
    by its other words, on a world-v2 model whose base model draws a circle for them; collateral on the other
    base shapes. Facilitated Transport with the default metric, beside no transport."""
    from studio.bench.evaluate import generate_images
    from studio.loading import load_pipeline
    from studio.pipelines.membranes import use_membranes
    from studio.shapes import world
    from studio.shapes.judge import accuracy, judge_images, load_judge

    judge = load_judge(judge_path)
    if judge.version != 2:
        raise ValueError(f"the paraphrase set needs a world-v2 judge; {judge_path} reads world v{judge.version}")
    sets, others = paraphrase_sets(n)
    other_prompts = [(world.V2.caption(spec), seed) for spec, seed in others]

    def measure(pipe) -> list[str]:
        cells = []
        for pairs in sets.values():
            images = generate_images(pipe, [p for p, _ in pairs], [s for _, s in pairs], 25, 5.0)
            cells.append(f"{100 * sum(p == 'circle' for p in judge_images(judge, images)[1]['shape']) / n:.1f}%")
        images = generate_images(pipe, [p for p, _ in other_prompts], [s for _, s in other_prompts], 25, 5.0)
        acc = accuracy(judge_images(judge, images)[1], [spec for spec, _ in others])
        return cells + [float(sum(acc.values()) / len(acc))]

    base = measure(load_pipeline(model))
    membrane = _train(load_pipeline(model), ["circle"], settings or {}, Path(out) / "circle_v2.safetensors", log)
    pipe = load_pipeline(model, membranes=[membrane.path])
    with_transport = measure(pipe)
    use_membranes(pipe, None)
    without = measure(pipe)
    rows = []
    for name, transport, cells in (("base model", "—", base), ("SPM circle", "yes", with_transport),
                                   ("SPM circle", "no", without)):
        rows.append([name, transport, *cells[:-1], f"{100 * cells[-1]:.1f}%", f"{100 * (cells[-1] - base[-1]):+.1f}"])
        log(" | ".join(rows[-1]))
    header = ["model", "transport", *(f"read as circle: '{w}' prompts" for w in sets),
              "other shapes: mean attribute accuracy", "collateral (pts)"]
    return record(f"B3 paraphrase set v1 ({Path(model).name}, n={n} prompts per set, 25 DDIM steps, guidance 5)",
                  header, rows, write=write)
