"""The "shapes" world: a deterministic renderer from (spec, seed) to a 128x128 RGB image and its caption.

Every attribute a caption names can be read back exactly from the spec, which is
what makes the embedded model and every method on it measurable offline.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType

import numpy as np

from studio.shapes.geometry import IMAGE_SIZE, RING_INNER, polygon_coverage, shape_coverage  # noqa: F401 (re-exported)

BASE_SHAPES = ("circle", "square", "triangle")
HELDOUT_SHAPES = ("star", "heart", "cross")
SHAPES = BASE_SHAPES + HELDOUT_SHAPES
# world v2 (see World below) pretrains on eleven shapes; a Spec may name any shape of either world
V2_BASE_SHAPES = BASE_SHAPES + ("diamond", "hexagon", "octagon", "oval", "ring", "semicircle", "arrow", "trapezoid")
ALL_SHAPES = V2_BASE_SHAPES + HELDOUT_SHAPES
# plain-English words for each shape, the canonical name first (v2 captions pick one per image)
SYNONYMS = MappingProxyType({
    "circle": ("circle", "disc", "round shape"), "square": ("square", "box"),
    "triangle": ("triangle", "triangular shape"), "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon", "hexagonal shape"), "octagon": ("octagon", "octagonal shape"),
    "oval": ("oval", "ellipse"), "ring": ("ring", "hoop"), "semicircle": ("semicircle", "dome"),
    "arrow": ("arrow", "pointer"), "trapezoid": ("trapezoid", "trapezium"),
    "star": ("star",), "heart": ("heart",), "cross": ("cross",),
})

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
            (self.shape, ALL_SHAPES, "shape"),
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
    return _parse(text.lower().replace(",", " ").split(), SHAPES)


def _parse(words: list[str], shapes: tuple[str, ...]) -> Spec | None:
    found: dict[str, str] = {}
    for w in words:
        if w in shapes:
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


def random_pair(rng: random.Random, heldout: bool | None = False, shapes: tuple[str, ...] = BASE_SHAPES) -> list[Spec]:
    """Two different base shapes of one colour in opposite halves (left/right or top/bottom), on one background;
    heldout as in random_spec (for both shapes' combinations)."""
    while True:
        a, b = rng.sample(shapes, 2)
        colour = rng.choice(list(COLOURS))
        background = rng.choice([c for c in BACKGROUNDS if c != colour])
        if heldout is not None and any(is_heldout_combo(s, colour, background) != heldout for s in (a, b)):
            continue
        pa, pb = rng.choice(OPPOSITE_HALVES)
        return [Spec(a, colour, background, rng.choice(SIZES), pa), Spec(b, colour, background, rng.choice(SIZES), pb)]


OUTLIER_MAX_IOU = 0.6  # an outlier overlaps no world shape more than this at the same layout


def outlier_coverage(spec: Spec, seed: int) -> np.ndarray:
    """Coverage of a shape of no world at spec's layout (its shape is ignored): a random star-convex polygon
    whose mask overlaps no world shape's (at the same centre, radius and rotation) by more than
    OUTLIER_MAX_IOU. The judge learns to call such shapes "none of the known"."""
    cx, cy, radius, angle = layout(spec, seed)
    rng = np.random.default_rng(seed + 104_729)
    known = [shape_coverage(s, cx, cy, radius, angle) >= 0.5 for s in ALL_SHAPES]
    while True:
        n = int(rng.integers(6, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(0.3, 1.15, n)
        verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1) * radius + np.array([cx, cy])
        coverage = polygon_coverage(verts)
        mask = coverage >= 0.5
        if mask.sum() < 1.0 * radius ** 2:  # about as large as the world's shapes (a triangle is ~1.6 r^2)
            continue
        if max((mask & k).sum() / (mask | k).sum() for k in known) <= OUTLIER_MAX_IOU:
            return coverage


def render_outlier(spec: Spec, seed: int = 0) -> np.ndarray:
    """render(spec, seed) with the shape replaced by outlier_coverage's polygon (same colours and jitter)."""
    rng = np.random.default_rng(seed + 7_919)
    fg = np.array(COLOURS[spec.colour], dtype=np.float64) + rng.uniform(-8, 8, 3)
    img = np.array(BACKGROUNDS[spec.background], dtype=np.float64) + rng.uniform(-8, 8, 3)
    alpha = outlier_coverage(spec, seed)[..., None]
    return np.clip(np.rint(alpha * fg + (1 - alpha) * img), 0, 255).astype(np.uint8)


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


# ---------------------------------------------------------------------------
# World versions: which shapes pretraining draws and holds out, and the words captions use for them


@dataclass(frozen=True)
class Scene:
    """One image of a data stream: one shape or a two-shape scene, and the seed that lays it out."""

    specs: tuple[Spec, ...]
    seed: int

    def render(self) -> np.ndarray:
        return render_scene(list(self.specs), self.seed)


@dataclass(frozen=True)
class World:
    """A version of the world: the shapes pretraining draws and holds out, the words captions use for a shape
    (one picked per caption from the seed), "an" before a vowel or not, and the share of two-shape scenes in
    pretraining. Shapes look the same in every version. V1 is what the shipped model and judge learnt; the
    module's functions are V1's."""

    version: int
    base_shapes: tuple[str, ...]
    heldout_shapes: tuple[str, ...]
    synonyms: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    two_shape_fraction: float = 0.0
    articles: bool = False

    def __post_init__(self) -> None:
        if unknown := [s for s in self.shapes + tuple(self.synonyms) if s not in ALL_SHAPES]:
            raise ValueError(f"unknown shapes {unknown}; known: {', '.join(ALL_SHAPES)}")
        if both := set(self.base_shapes) & set(self.heldout_shapes):
            raise ValueError(f"shapes both pretrained and held out: {sorted(both)}")
        if not 0.0 <= self.two_shape_fraction <= 1.0:
            raise ValueError(f"two_shape_fraction is between 0 and 1, not {self.two_shape_fraction}")
        object.__setattr__(self, "synonyms", MappingProxyType(dict(self.synonyms)))

    @property
    def shapes(self) -> tuple[str, ...]:
        return self.base_shapes + self.heldout_shapes

    def words(self, shape: str) -> tuple[str, ...]:
        """The words captions of this world use for a shape, its canonical name first."""
        if shape not in self.shapes:
            raise ValueError(f"{shape!r} is not a shape of world v{self.version}; known: {', '.join(self.shapes)}")
        return self.synonyms.get(shape, (shape,))

    def shape_word(self, shape: str, seed: int | None = None, salt: int = 0) -> str:
        """The word one caption uses: the canonical name without a seed, else one the (seed, salt) picks."""
        words = self.words(shape)
        if seed is None or len(words) == 1:
            return words[0]
        digest = hashlib.sha256(f"{shape}|{seed}|{salt}".encode()).digest()
        return words[int.from_bytes(digest[:4], "big") % len(words)]

    def caption(self, spec: Spec, seed: int | None = None, *, size: bool = True, position: bool = True,
                background: bool = True, variant: int = 0) -> str:
        return self.scene_caption([spec], seed, size=size, position=position, background=background, variant=variant)

    def scene_caption(self, specs: list[Spec] | tuple[Spec, ...], seed: int | None = None, *, size: bool = True,
                      position: bool = True, background: bool = True, variant: int = 0) -> str:
        """One shape's or a scene's caption (V1's are caption's and scene_caption's)."""
        text = " and ".join(caption(s, size=size, position=position, background=False, shape_word=self.shape_word(
            s.shape, seed, 2 * variant + k)) for k, s in enumerate(specs))
        if background:
            text += f" on a {specs[0].background} background"
        return re.sub(r"\ba (?=[aeiou])", "an ", text) if self.articles else text

    def caption_variants(self, specs: list[Spec] | tuple[Spec, ...], seed: int | None = None) -> list[str]:
        """Eight captions, variant i naming size if bit 0, position if bit 1, background if bit 2 (as
        caption_variants); with a seed each variant picks its own shape words."""
        return [self.scene_caption(specs, seed, size=bool(i & 1), position=bool(i & 2), background=bool(i & 4),
                                   variant=i) for i in range(8)]

    def _canonical(self, text: str) -> str:
        """The text with every shape word replaced by its shape's canonical name, longest phrase first."""
        text = " ".join(text.lower().replace(",", " ").split())
        names = {w: s for s in self.shapes for w in self.words(s)}
        if not (phrases := sorted((w for w, s in names.items() if w != s), key=len, reverse=True)):
            return text
        return re.sub(r"\b(" + "|".join(map(re.escape, phrases)) + r")\b", lambda m: names[m.group(1)], text)

    def parse_caption(self, text: str) -> Spec | None:
        """parse_caption for this world: any of a shape's words gives its canonical name in the spec."""
        return _parse(self._canonical(text).split(), self.shapes)

    def parse_scene(self, text: str) -> list[Spec] | None:
        """Every shape a scene caption names ("... and ... on a blue background"), None if one is incomplete."""
        parts = self._canonical(text).split(" and ")
        if (tail := re.search(r"\bon an? (\w+) background$", parts[-1])) is None:
            return None
        parts[-1] = parts[-1][:tail.start()]
        specs = [_parse(f"{p} on a {tail.group(1)} background".split(), self.shapes) for p in parts]
        return None if None in specs else specs

    def random_spec(self, rng: random.Random, heldout: bool | None = False) -> Spec:
        return random_spec(rng, self.base_shapes, heldout)

    def random_pair(self, rng: random.Random, heldout: bool | None = False) -> list[Spec]:
        return random_pair(rng, heldout, self.base_shapes)

    def pretraining_scenes(self, n: int, seed: int, *, two_shape_fraction: float | None = None,
                           heldout: bool | None = False) -> list[Scene]:
        """The pretraining stream: base shapes only, combinations as `heldout` (False: pretraining ones), a
        two_shape_fraction (default the world's) of two-shape scenes. With none, V1's stream is the specs and
        seeds renders.world_sample(n, seed, BASE_SHAPES, False) draws."""
        if two_shape_fraction is not None:  # replace() checks it
            return replace(self, two_shape_fraction=two_shape_fraction).pretraining_scenes(n, seed, heldout=heldout)
        rng, fraction = random.Random(seed), self.two_shape_fraction
        specs = [self.random_pair(rng, heldout) if fraction and rng.random() < fraction
                 else [self.random_spec(rng, heldout)] for _ in range(n)]
        return [Scene(tuple(s), rng.randrange(2**31)) for s in specs]

    def prompt_specs(self, n: int, seed: int, combos: str = "heldout") -> list[tuple[Spec, int]]:
        """B1's (spec, seed) pairs: base shapes in combinations never in the pretraining captions, or with
        combos="seen" in them; V1's are bench.evaluate.b1_prompts(n, seed, combos)."""
        if combos not in ("heldout", "seen"):
            raise ValueError(f"combos is 'heldout' or 'seen', not {combos!r}")
        rng = random.Random(seed)
        return [(self.random_spec(rng, combos == "heldout"), rng.randrange(2**31)) for _ in range(n)]

    def vocabulary(self) -> list[str]:
        """Every word a caption of this world can contain: V1's list first, in its order (token ids follow it)."""
        words = vocabulary()
        if self.version == 1:
            return words
        extra = ["and", "an"][:1 + self.articles] + [w for s in self.shapes for p in self.words(s) for w in p.split()]
        return words + [w for w in dict.fromkeys(extra) if w not in words]


V1 = World(1, BASE_SHAPES, HELDOUT_SHAPES)
V2 = World(2, V2_BASE_SHAPES, HELDOUT_SHAPES, SYNONYMS, two_shape_fraction=0.2, articles=True)
WORLDS = {1: V1, 2: V2}


def get_world(version: int) -> World:
    if version not in WORLDS:
        raise ValueError(f"unknown world version {version!r}; known: {', '.join(map(str, WORLDS))}")
    return WORLDS[version]


def synonyms(shape: str) -> tuple[str, ...]:
    """The plain-English words for a shape, its canonical name first (v2 captions use them all)."""
    if shape not in SYNONYMS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")
    return SYNONYMS[shape]
