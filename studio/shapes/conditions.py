"""Control conditions: what a control adapter is steered by.

- `mask`, `edges` and `box` come exactly from the shapes world's renderer for a (spec, seed): the shape's filled
  mask, its outline (the mask minus its erosion, about 2 px wide), and the outline of its bounding box (2 px);
  white on black. `scribble`: three random strokes drawn inside the shape (as a user scribbles over it). `box`
  and `scribble` are the kinds the few-shot benchmark holds out (`studio bench fewshot`).
- `canny` and `lineart` are controlnet-aux annotators that need no weights (Canny, lineart-standard) run on an
  image. Annotators that need downloaded weights are refused with a one-line reason.

A control dataset (renders, their condition images and captions) is generated procedurally: no files needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from studio.shapes import world
from studio.loading import StudioError

WORLD_CONDITIONS = ("mask", "edges", "box", "scribble")   # exact, from the renderer
ANNOTATORS = ("canny", "lineart")             # controlnet-aux, no weights
CONDITIONS = WORLD_CONDITIONS + ANNOTATORS
# controlnet-aux annotators that load weights from the hub (lllyasviel/Annotators and others)
NEEDS_WEIGHTS = ("hed", "pidinet", "mlsd", "midas", "depth", "zoe", "leres", "normalbae", "normal", "lineart_coarse",
                 "lineart_anime", "openpose", "pose", "sam", "teed", "anyline", "dwpose")
CONTROL_SEED = 20_261_126


class ConditionError(StudioError):
    """A condition kind or control image that cannot be used."""


def check_kind(kind: str) -> str:
    if kind in CONDITIONS:
        return kind
    if kind.lower() in NEEDS_WEIGHTS:
        raise ConditionError(f"condition {kind!r} needs an annotator with downloaded weights, which studio does not "
                             f"fetch; use one of {', '.join(CONDITIONS)}, or give your own control images")
    raise ConditionError(f"unknown condition {kind!r}; available: {', '.join(CONDITIONS)}")


def condition_kinds(text: str) -> list[str]:
    """"mask" -> ["mask"]; "mask,edges" -> ["mask", "edges"] (a training set alternating between kinds)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds:
        raise ConditionError("no condition kind given")
    return [check_kind(k) for k in kinds]


def _rgb(gray: np.ndarray) -> np.ndarray:
    """A HxW bool/uint8 map -> HxWx3 uint8 white-on-black image."""
    g = gray.astype(np.uint8) * 255 if gray.dtype == bool else gray.astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        p = np.pad(out, 1, constant_values=False)
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def _box_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The outline (`width` px, inside) of the bounding box of a boolean mask."""
    out = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return out
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    out[top:bottom, left:right] = True
    out[top + width:bottom - width, left + width:right - width] = False
    return out


def _scribble(mask: np.ndarray, seed: int, strokes: int = 3, segments: int = 10, step: float = 4.0) -> np.ndarray:
    """`strokes` random walks inside a boolean mask (away from its edge), drawn 3 px wide; fixed by the seed."""
    rng = np.random.default_rng(seed + 104_729)
    inner = _erode(mask, 3)
    inside = inner if inner.any() else mask
    ys, xs = np.nonzero(inside)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for _ in range(strokes):
        i = rng.integers(len(ys))
        y, x = float(ys[i]), float(xs[i])
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(segments):
            for _ in range(8):  # a turn that stays inside, else the stroke ends here
                turn = heading + rng.normal(0, 0.8)
                ny, nx = y + step * np.sin(turn), x + step * np.cos(turn)
                if 0 <= ny < h and 0 <= nx < w and inside[int(ny), int(nx)]:
                    break
            else:
                break
            for t in np.linspace(0, 1, 6):
                py, px = int(round(y + t * (ny - y))), int(round(x + t * (nx - x)))
                out[max(py - 1, 0):py + 2, max(px - 1, 0):px + 2] = True
            y, x, heading = ny, nx, turn
    return out & mask


def shape_mask(spec: world.Spec, seed: int) -> np.ndarray:
    """The shape's boolean mask for render(spec, seed)."""
    return world.render_mask(spec, seed)


def world_condition(kind: str, spec: world.Spec, seed: int) -> np.ndarray:
    """The condition image (HxWx3 uint8) of render(spec, seed): exact for mask/edges, annotated otherwise."""
    kind = check_kind(kind)
    if kind == "mask":
        return _rgb(shape_mask(spec, seed))
    if kind == "edges":
        mask = shape_mask(spec, seed)
        return _rgb(mask & ~_erode(mask, 2))
    if kind == "box":
        return _rgb(_box_outline(shape_mask(spec, seed), 2))
    if kind == "scribble":
        return _rgb(_scribble(shape_mask(spec, seed), seed))
    return annotate(kind, world.render(spec, seed))


_DETECTORS: dict[str, object] = {}


def _detector(kind: str):
    if kind not in _DETECTORS:
        import warnings

        try:
            warnings.filterwarnings("ignore", module="controlnet_aux|timm")  # its package import is noisy
            if kind == "canny":
                from controlnet_aux import CannyDetector as cls
            else:
                from controlnet_aux import LineartStandardDetector as cls
        except ImportError as e:
            raise ConditionError(f"the {kind} annotator needs controlnet-aux (pip install controlnet-aux): {e}") \
                from None
        _DETECTORS[kind] = cls()
    return _DETECTORS[kind]


def annotate(kind: str, image) -> np.ndarray:
    """Run a weight-free controlnet-aux annotator on an image (PIL or HxWx3 uint8) at its own size."""
    kind = check_kind(kind)
    if kind in WORLD_CONDITIONS:
        raise ConditionError(f"{kind} conditions come from the shapes world's renderer, not from an image")
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ConditionError(f"an annotator takes an RGB image, got an array of shape {arr.shape}")
    h, w = arr.shape[:2]
    det = _detector(kind)
    if kind == "canny":
        out = det(arr, low_threshold=50, high_threshold=120, detect_resolution=min(h, w), image_resolution=min(h, w),
                  output_type="np")
    else:
        out = det(arr, detect_resolution=min(h, w), output_type="np")
    out = np.asarray(out, dtype=np.uint8)
    if out.ndim == 2:
        out = _rgb(out)
    if out.shape[:2] != (h, w):
        out = np.asarray(Image.fromarray(out).resize((w, h), Image.BILINEAR))
    return out


@dataclass
class ControlExample:
    specs: list[world.Spec]  # one shape, or a two-shape scene
    seed: int
    image: np.ndarray       # the render, HxWx3 uint8
    condition: np.ndarray   # its condition image, HxWx3 uint8 (a scene's: its shapes' conditions overlaid)
    caption: str
    parts: list[np.ndarray] = field(default_factory=list)  # a scene's condition image per shape

    @property
    def spec(self) -> world.Spec:
        return self.specs[0]


def control_specs(n: int, seed: int = CONTROL_SEED, heldout: bool | None = False) -> list[tuple[world.Spec, int]]:
    """n (spec, seed) pairs of base shapes (heldout=True: attribute combinations the base model never saw)."""
    rng = random.Random(seed)
    return [(world.random_spec(rng, world.BASE_SHAPES, heldout=heldout), rng.randrange(2**31)) for _ in range(n)]


def control_dataset(kind: str, n: int, seed: int = CONTROL_SEED, heldout: bool | None = False,
                    two_shapes: float = 0.0) -> list[ControlExample]:
    """n renders with their `kind` condition images and full captions ("mask,edges": the kinds in turn). A
    `two_shapes` fraction of them are two-shape scenes (world.random_pair), whose condition image overlays each
    shape's condition (with several kinds, of two kinds)."""
    kinds = condition_kinds(kind)
    pairs = random.Random(seed + 1)
    out = []
    for i, (spec, s) in enumerate(control_specs(n, seed, heldout)):
        specs = world.random_pair(pairs, heldout) if two_shapes and pairs.random() < two_shapes else [spec]
        of_kind = [kinds[(i + k) % len(kinds)] for k in range(len(specs))]
        parts = [world_condition(k, spec, s) for k, spec in zip(of_kind, specs)]
        out.append(ControlExample(specs, s, world.render_scene(specs, s), np.maximum.reduce(parts),
                                  world.scene_caption(specs), parts))
    return out


def write_control_set(folder: str | Path, kind: str, n: int, seed: int = CONTROL_SEED,
                      two_shapes: float = 0.0, separate: bool = False) -> tuple[Path, Path]:
    """Write a control training set: `folder/images/NAME.png` + `NAME.txt`, `folder/conditions/NAME.png`. With
    `separate`, a two-shape scene's conditions are two inputs, summed as at generation: `NAME.png` (the first
    shape's) and `NAME.2.png` (the second's), instead of one overlaid image.
    Returns (images folder, conditions folder), what `studio train --control-data` reads."""
    folder = Path(folder)
    images, conditions = folder / "images", folder / "conditions"
    images.mkdir(parents=True, exist_ok=True)
    conditions.mkdir(parents=True, exist_ok=True)
    prefix = kind.replace(",", "_")
    for stale in conditions.glob(f"{prefix}_{'[0-9]' * 5}*.*.png"):  # further inputs of an earlier set here
        stale.unlink()
    for i, ex in enumerate(control_dataset(kind, n, seed, two_shapes=two_shapes)):
        name = f"{prefix}_{i:05d}"
        Image.fromarray(ex.image).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(ex.caption, encoding="utf-8")
        if separate and len(ex.parts) > 1:
            for k, part in enumerate(ex.parts):
                Image.fromarray(part).save(conditions / (f"{name}.png" if k == 0 else f"{name}.{k + 1}.png"))
        else:
            Image.fromarray(ex.condition).save(conditions / f"{name}.png")
    return images, conditions


def write_training_set(folder: str | Path, kinds: str, n: int, *, episodic: bool = False, two_shapes: float = 0.0,
                       separate: bool = True) -> tuple[Path, Path]:
    """`write_control_set` of `kinds` (comma-separated): one set whose pairs alternate between them, or for an
    episodic method (UFC) one set per kind, n / kinds pairs each, named `KIND_00000…` (the engine reads a pair's
    kind from its name and trains on batches of one kind)."""
    if not episodic:
        return write_control_set(folder, kinds, n, two_shapes=two_shapes, separate=separate)
    names = condition_kinds(kinds)
    for j, kind in enumerate(names):
        images, conditions = write_control_set(folder, kind, max(1, n // len(names)), seed=CONTROL_SEED + j,
                                               two_shapes=two_shapes, separate=separate)
    return images, conditions
