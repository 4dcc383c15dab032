"""B1, base quality (`studio eval`): per-attribute prompt accuracy read by the judge, and the
Fréchet distance of judge features between generated images and renders, beside its floor."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from studio.shapes import world
from studio.shapes.judge import ATTRIBUTES, Judge, accuracy, judge_images, to_tensor

B1_SEED = 20_261_122


def b1_prompts(n: int = 256, seed: int = B1_SEED, combos: str = "heldout") -> list[tuple[world.Spec, int]]:
    """Fixed (spec, seed) pairs from attribute combinations never in the pretraining captions (B1), or with
    `combos="seen"` from those in them (a diagnostic: what the model does on what it was trained on)."""
    if combos not in ("heldout", "seen"):
        raise ValueError(f"combos is 'heldout' or 'seen', not {combos!r}")
    rng = random.Random(seed)
    heldout = combos == "heldout"
    return [(world.random_spec(rng, world.BASE_SHAPES, heldout=heldout), rng.randrange(2**31)) for _ in range(n)]


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
    misreadings: dict[str, Counter] = field(default_factory=dict)  # attribute -> (prompted, read) -> count


def pil_to_tensor(images) -> torch.Tensor:
    return to_tensor(np.stack([np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE,) * 2)) for im in images]))


def run_b1(pipe, judge: Judge, *, n: int = 256, steps: int = 25, guidance: float = 5.0, batch: int = 16,
           progress=None, combos: str = "heldout") -> B1Result:
    """B1 in the judge's world: V1's prompts for a V1 judge; a v2 judge's prompts draw v2's eleven base shapes,
    named by their canonical words, and its count head adds the share of images read as one object."""
    shapes_world = world.get_world(judge.version)
    pairs = b1_prompts(n, combos=combos) if judge.version == 1 else shapes_world.prompt_specs(n, B1_SEED, combos)
    specs = [s for s, _ in pairs]
    generated = []
    seconds = 0.0
    for i in range(0, n, batch):
        chunk = pairs[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        t = time.perf_counter()
        out = pipe([shapes_world.caption(s) for s, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE).images
        seconds += time.perf_counter() - t
        generated.append(pil_to_tensor(out))
        if progress:
            progress(min(i + batch, n), n)
    feats, preds = judge_images(judge, torch.cat(generated))
    acc = accuracy(preds, specs)
    if "count" in preds:
        acc["count"] = float(np.mean([c == "one" for c in preds["count"]]))
    all_ok = float(np.mean([all(preds[k][j] == getattr(s, k) for k in ATTRIBUTES) and preds.get("count", ["one"] * n)[j]
                            == "one" for j, s in enumerate(specs)]))
    rng = random.Random(B1_SEED + 1)
    ref = render_features(judge, specs, [rng.randrange(2**31) for _ in specs])
    ref2 = render_features(judge, specs, [rng.randrange(2**31) for _ in specs])
    misreadings = {k: Counter((getattr(s, k), preds[k][j]) for j, s in enumerate(specs) if preds[k][j] != getattr(s, k))
                   for k in ATTRIBUTES}
    if "count" in preds:
        misreadings["count"] = Counter(("one", c) for c in preds["count"] if c != "one")
    return B1Result(acc, all_ok, frechet_distance(feats, ref), frechet_distance(ref2, ref), n / seconds, n, steps,
                    guidance, misreadings)


# ---- B2: teaching a concept ----

B2_SEED = 20_261_123
B2_SHAPE = "star"
B2_TRIGGER = "sks"


def b2_training_specs(seed: int = B2_SEED) -> list[tuple[world.Spec, int]]:
    """The 8 renders the concept is taught from: the held-out star, one in each colour, with varied
    backgrounds, sizes and positions."""
    rng = random.Random(seed)
    out = []
    for colour in world.COLOURS:
        background = rng.choice([b for b in world.BACKGROUNDS if b != colour])
        spec = world.Spec(B2_SHAPE, colour, background, rng.choice(world.SIZES), rng.choice(world.POSITIONS))
        out.append((spec, rng.randrange(2**31)))
    return out


def write_b2_training_set(folder, shapes_world: world.World = world.V1) -> list:
    """Write the 8 renders with same-name captions that call the shape by the trigger word (in the world's
    caption style: v2 writes "an" before a vowel)."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (spec, seed) in enumerate(b2_training_specs()):
        path = folder / f"{B2_SHAPE}_{i}.png"
        Image.fromarray(world.render(spec, seed)).save(path)
        text = world.caption(spec, shape_word=B2_TRIGGER)
        path.with_suffix(".txt").write_text(_articles(text, shapes_world), encoding="utf-8")
        paths.append(path)
    return paths


def _articles(text: str, shapes_world: world.World) -> str:
    import re

    return re.sub(r"\ba (?=[aeiou])", "an ", text) if shapes_world.articles else text


B2_PRIOR_SEED = 7


def write_b2_prior_set(folder, n: int = 64, paired: bool = False, shapes_world: world.World = world.V1) -> list:
    """Regularization pictures for B2's prior preservation: n renders of the world's base shapes (any attributes)
    with their full captions, as a user's own class images would be (`--class-data-dir`). `paired`: also each
    training render redrawn as every base shape (same colour, background, size, position and seed), so the
    shape word is all that tells the trigger's pictures from the regularization ones."""
    import dataclasses
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(B2_PRIOR_SEED)
    drawn = [(f"p{i:03d}", world.random_spec(rng, shapes_world.base_shapes, heldout=None), rng.randrange(2**31))
             for i in range(n)]
    if paired:
        twins = [(dataclasses.replace(spec, shape=shape), seed) for spec, seed in b2_training_specs()
                 for shape in shapes_world.base_shapes]
        drawn += [(f"q{k:03d}", spec, seed) for k, (spec, seed) in enumerate(twins)]
    paths = []
    for stem, spec, seed in drawn:
        path = folder / f"{stem}.png"
        Image.fromarray(world.render(spec, seed)).save(path)
        path.with_suffix(".txt").write_text(_articles(world.caption(spec), shapes_world), encoding="utf-8")
        paths.append(path)
    return paths


def b2_prompts(n: int = 64, seed: int = B2_SEED + 1) -> list[tuple[world.Spec, int]]:
    """'a {colour} sks on a {bg} background' for colour/background pairs absent from the training renders."""
    seen = {(s.colour, s.background) for s, _ in b2_training_specs()}
    pairs = [(c, b) for c in world.COLOURS for b in world.BACKGROUNDS if c != b and (c, b) not in seen]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    return [(world.Spec(B2_SHAPE, c, b, "large", "center"), rng.randrange(2**31)) for c, b in
            (pairs[i % len(pairs)] for i in range(n))]


def b2_prompt_text(spec: world.Spec, shapes_world: world.World = world.V1) -> str:
    return _articles(f"a {spec.colour} {B2_TRIGGER} on a {spec.background} background", shapes_world)


def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    batch: int = 16) -> torch.Tensor:
    """One image per (prompt, seed) at the shapes world's size, as a uint8 tensor batch for the judge."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        images = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      height=world.IMAGE_SIZE, width=world.IMAGE_SIZE).images
        out.append(pil_to_tensor(images))
    return torch.cat(out)


def mean_attribute_accuracy(preds: dict[str, list[str]], specs: list[world.Spec]) -> float:
    return float(np.mean(list(accuracy(preds, specs).values())))


@dataclass
class B2Result:
    fidelity: float
    editability: float
    preservation: float       # points of mean per-attribute accuracy, adapted minus base (0 is perfect)
    leak: float
    base_accuracy: float
    adapted_accuracy: float
    n: int


def run_b2(pipe, judge: Judge, set_adapter, *, n: int = 64, steps: int = 25, guidance: float = 5.0) -> B2Result:
    """`set_adapter(on: bool)` switches the trained adapter on and off inside `pipe`. Prompts and captions are
    in the judge's world (a v2 judge: base prompts over v2's eleven shapes)."""
    shapes_world = world.get_world(judge.version)
    concept = b2_prompts(n)
    specs = [s for s, _ in concept]
    set_adapter(True)
    _, preds = judge_images(judge, generate_images(pipe, [b2_prompt_text(s, shapes_world) for s in specs],
                                                   [sd for _, sd in concept], steps, guidance))
    fidelity = float(np.mean([p == B2_SHAPE for p in preds["shape"]]))
    editability = float(np.mean([preds["colour"][i] == s.colour and preds["background"][i] == s.background
                                 for i, s in enumerate(specs)]))
    leak_rng = random.Random(B2_SEED + 2)
    leak_colours = [leak_rng.choice(list(world.COLOURS)) for _ in range(n)]
    leak_seeds = [leak_rng.randrange(2**31) for _ in range(n)]
    leak_images = generate_images(pipe, [f"a {c} circle" for c in leak_colours], leak_seeds, steps, guidance)
    _, leak_preds = judge_images(judge, leak_images)
    leak = float(np.mean([p == B2_SHAPE for p in leak_preds["shape"]]))
    base = b1_prompts(n) if judge.version == 1 else shapes_world.prompt_specs(n, B1_SEED)
    base_specs = [s for s, _ in base]

    def base_accuracy() -> float:
        images = generate_images(pipe, [shapes_world.caption(s) for s in base_specs], [sd for _, sd in base], steps,
                                 guidance)
        return mean_attribute_accuracy(judge_images(judge, images)[1], base_specs)

    adapted = base_accuracy()
    set_adapter(False)
    original = base_accuracy()
    return B2Result(fidelity, editability, 100 * (adapted - original), leak, original, adapted, n)


# ---- B3: erasing a concept ----

B3_SEED = 20_261_124


def b3_prompts(keep, n: int = 64, seed: int = B3_SEED) -> list[tuple[world.Spec, int]]:
    """n (spec, seed) pairs of base shapes, any attribute combination, for which keep(spec) holds."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        spec = world.random_spec(rng, world.BASE_SHAPES, heldout=None)
        seed_ = rng.randrange(2**31)
        if keep(spec):
            out.append((spec, seed_))
    return out


@dataclass
class B3Result:
    residual: dict[str, float]     # "attribute=value" -> share of its prompts' images still judged so
    accuracy: float                # mean per-attribute accuracy on prompts naming none of the erased values
    shape_accuracy: float
    fd: float                      # judge-feature FD of those images to renders of their specs
    n: int


def run_b3(pipe, judge: Judge, erased: dict[str, str], *, n: int = 64, steps: int = 25, guidance: float = 5.0
           ) -> B3Result:
    """`erased`: attribute -> value, e.g. {"shape": "circle", "colour": "red"}."""
    residual = {}
    for i, (attr, value) in enumerate(erased.items()):
        pairs = b3_prompts(lambda s: getattr(s, attr) == value, n, B3_SEED + i)
        images = generate_images(pipe, [world.caption(s) for s, _ in pairs], [sd for _, sd in pairs], steps, guidance)
        preds = judge_images(judge, images)[1][attr]
        residual[f"{attr}={value}"] = float(np.mean([p == value for p in preds]))
    # prompts that name none of the erased values anywhere ("on a red background" names red)
    others = b3_prompts(lambda s: not set(erased.values()) & set(world.caption(s).split()), n, B3_SEED + 100)
    specs = [s for s, _ in others]
    images = generate_images(pipe, [world.caption(s) for s in specs], [sd for _, sd in others], steps, guidance)
    feats, preds = judge_images(judge, images)
    rng = random.Random(B3_SEED + 101)
    ref = render_features(judge, specs, [rng.randrange(2**31) for _ in specs])
    return B3Result(residual, mean_attribute_accuracy(preds, specs), accuracy(preds, specs)["shape"],
                    frechet_distance(feats, ref), n)
