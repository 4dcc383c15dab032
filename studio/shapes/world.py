"""The "shapes" world: a deterministic renderer from (spec, seed) to a 128x128 RGB image and its caption.

Every attribute a caption names can be read back exactly from the spec, which is
what makes the embedded model and every method on it measurable offline.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, replace

import numpy as np

IMAGE_SIZE = 128

BASE_SHAPES = ("circle", "square", "triangle")
HELDOUT_SHAPES = ("star", "heart", "cross")
SHAPES = BASE_SHAPES + HELDOUT_SHAPES

COLOURS = {
    "red": (215, 38, 38),
    "orange": (243, 138, 28),
    "yellow": (238, 214, 40),
    "green": (44, 160, 64),
    "blue": (40, 78, 214),
    "purple": (136, 48, 176),
    "white": (244, 244, 244),
    "black": (22, 22, 22),
}
BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

POSITION_CENTRES = {
    "left": (34.0, 64.0),
    "right": (94.0, 64.0),
    "top": (64.0, 34.0),
    "bottom": (64.0, 94.0),
    "center": (64.0, 64.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SIZE_RADII = {"small": 14.0, "large": 25.0}


@dataclass(frozen=True)
class Spec:
    """One filled shape on a flat background."""

    shape: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.background, BACKGROUNDS, "background"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background is invisible")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def caption(spec: Spec, *, size: bool = True, position: bool = True, background: bool = True,
            shape_word: str | None = None) -> str:
    """Plain-English caption; parts can be left out (training uses partial captions)."""
    words = ["a"]
    if size:
        words.append(spec.size)
    words += [spec.colour, shape_word or spec.shape]
    if position:
        words.append(POSITION_PHRASES[spec.position])
    if background:
        words.append(f"on a {spec.background} background")
    return " ".join(words)


def caption_variants(spec: Spec) -> list[str]:
    """All eight captions of a spec: every subset of (size, position, background) named."""
    return [caption(spec, size=bool(i & 1), position=bool(i & 2), background=bool(i & 4)) for i in range(8)]


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain."""
    words: list[str] = []
    for spec_words in (
        ["a", "at", "the", "on", "in", "background"],
        list(SHAPES), list(BACKGROUNDS), list(SIZES),
        [w for phrase in POSITION_PHRASES.values() for w in phrase.split()],
    ):
        for w in spec_words:
            if w not in words:
                words.append(w)
    return words


# ---------------------------------------------------------------------------
# Which attribute combinations the base model never sees (B1 prompts use them)


def is_heldout_combo(shape: str, colour: str, background: str) -> bool:
    """About a fifth of (shape, colour, background) triples are kept out of pretraining captions."""
    digest = hashlib.sha256(f"{shape}|{colour}|{background}".encode()).digest()
    return digest[0] % 5 == 0


def random_spec(rng: random.Random, shapes: tuple[str, ...] = BASE_SHAPES, heldout: bool | None = False) -> Spec:
    """A random spec. heldout=False keeps to pretraining combos, True to held-out ones, None to any."""
    while True:
        shape = rng.choice(shapes)
        colour = rng.choice(list(COLOURS))
        background = rng.choice(list(BACKGROUNDS))
        if colour == background:
            continue
        if heldout is not None and is_heldout_combo(shape, colour, background) != heldout:
            continue
        return Spec(shape, colour, background, rng.choice(SIZES), rng.choice(POSITIONS))


def parse_caption(text: str) -> Spec | None:
    """Read a full caption back into a spec (None when it names less than shape, colour and background)."""
    words = text.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for w in words:
        if w in SHAPES:
            found.setdefault("shape", w)
        elif w in SIZES:
            found.setdefault("size", w)
    for i, w in enumerate(words):
        if w in COLOURS and "colour" not in found and i + 1 < len(words) and words[i + 1] != "background":
            found["colour"] = w
        if w == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            found["background"] = words[i - 1]
    for pos, phrase in POSITION_PHRASES.items():
        if phrase in " ".join(words):
            found["position"] = pos
    if not {"shape", "colour", "background"} <= found.keys():
        return None
    return Spec(found["shape"], found["colour"], found["background"], found.get("size", "large"),
                found.get("position", "center"))


# ---------------------------------------------------------------------------
# Rendering


def _heart_polygon(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    pts[:, 1] += (1 - pts[:, 1].max() - (-1 - pts[:, 1].min())) / 2  # centre vertically
    return pts


def _cross_polygon(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], dtype=np.float64)


_POLYGONS = {
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": np.array([(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)]),
    "star": _star_polygon(),
    "heart": _heart_polygon(),
    "cross": _cross_polygon(),
}

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside), vectorised over pixels."""
    d = np.full(px.shape, np.inf)
    sign = np.ones(px.shape)
    n = len(verts)
    for i in range(n):
        (x0, y0), (x1, y1) = verts[i], verts[i - 1]
        ex, ey = x1 - x0, y1 - y0
        wx, wy = px - x0, py - y0
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d = np.minimum(d, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        c1 = py >= y0
        c2 = py < y1
        c3 = ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign = np.where(flip, -sign, sign)
    return sign * np.sqrt(d)


def shape_coverage(shape: str, cx: float, cy: float, radius: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, as a float array of IMAGE_SIZE x IMAGE_SIZE."""
    if shape == "circle":
        sdf = np.hypot(_XX - cx, _YY - cy) - radius
    else:
        c, s = np.cos(angle), np.sin(angle)
        verts = _POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * radius + np.array([cx, cy])
        sdf = _polygon_sdf(_XX, _YY, verts)
    return np.clip(0.5 - sdf, 0.0, 1.0)


def layout(spec: Spec, seed: int) -> tuple[float, float, float, float]:
    """The jittered centre, radius and rotation (radians) the seed picks for a spec."""
    rng = np.random.default_rng(seed)
    cx, cy = POSITION_CENTRES[spec.position]
    radius = SIZE_RADII[spec.size] * rng.uniform(0.92, 1.08)
    limit = 4.0 if spec.size == "large" else 7.0
    cx += rng.uniform(-limit, limit)
    cy += rng.uniform(-limit, limit)
    angle = np.deg2rad(rng.uniform(-10, 10))
    return cx, cy, radius, angle


def render(spec: Spec, seed: int = 0, *, jitter_colour: bool = True) -> np.ndarray:
    """Render a spec to an HxWx3 uint8 image; the same (spec, seed) always gives the same pixels."""
    return render_scene([spec], seed, jitter_colour=jitter_colour)


def render_scene(specs: list[Spec], seed: int = 0, *, jitter_colour: bool = True) -> np.ndarray:
    """Several shapes on the first one's background, drawn in order, each laid out by layout(spec, seed)."""
    rng = np.random.default_rng(seed + 7_919)
    img = np.array(BACKGROUNDS[specs[0].background], dtype=np.float64)
    for k, spec in enumerate(specs):
        fg = np.array(COLOURS[spec.colour], dtype=np.float64)
        if jitter_colour:  # drawn in this order (first colour, background, further colours): render() as it was
            fg = fg + rng.uniform(-8, 8, 3)
            if k == 0:
                img = img + rng.uniform(-8, 8, 3)
        cx, cy, radius, angle = layout(spec, seed)
        alpha = shape_coverage(spec.shape, cx, cy, radius, angle)[..., None]
        img = alpha * fg + (1 - alpha) * img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def scene_caption(specs: list[Spec]) -> str:
    """"a large red circle on the left and a small red square on the right on a blue background"."""
    if len(specs) == 1:
        return caption(specs[0])
    return " and ".join(caption(s, background=False) for s in specs) + f" on a {specs[0].background} background"


OPPOSITE_HALVES = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))


def random_pair(rng: random.Random, heldout: bool | None = False) -> list[Spec]:
    """Two different base shapes of one colour in opposite halves (left/right or top/bottom), on one background;
    heldout as in random_spec (for both shapes' combinations)."""
    while True:
        a, b = rng.sample(BASE_SHAPES, 2)
        colour = rng.choice(list(COLOURS))
        background = rng.choice([c for c in BACKGROUNDS if c != colour])
        if heldout is not None and any(is_heldout_combo(s, colour, background) != heldout for s in (a, b)):
            continue
        pa, pb = rng.choice(OPPOSITE_HALVES)
        return [Spec(a, colour, background, rng.choice(SIZES), pa), Spec(b, colour, background, rng.choice(SIZES), pb)]


def render_mask(spec: Spec, seed: int = 0) -> np.ndarray:
    """The shape's boolean mask for the same layout as render(spec, seed)."""
    cx, cy, radius, angle = layout(spec, seed)
    return shape_coverage(spec.shape, cx, cy, radius, angle) >= 0.5


def with_shape(spec: Spec, shape: str) -> Spec:
    return replace(spec, shape=shape)


def prompts_naming(word: str, n: int = 64, seed: int = 0) -> list[str]:
    """n captions of random specs that name `word` (a shape or a colour), partial captions included: the
    prompts a membrane erasing `word` is trained on with the embedded model. Empty for other words."""
    if word not in SHAPES and word not in COLOURS:
        return []
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        spec = random_spec(rng, BASE_SHAPES, heldout=None)
        if word in SHAPES:
            spec = with_shape(spec, word)
        elif spec.background != word:
            spec = Spec(spec.shape, word, spec.background, spec.size, spec.position)
        else:
            continue
        out.append(caption(spec, size=rng.random() < 0.5, position=rng.random() < 0.5,
                           background=rng.random() < 0.5))
    return out
