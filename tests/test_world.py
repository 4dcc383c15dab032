import hashlib
import random

import numpy as np
import pytest

from studio.shapes import world
from studio.bench.evaluate import B1_SEED, b1_prompts
from studio.shapes.renders import world_sample


def test_render_is_deterministic_and_seed_dependent():
    spec = world.Spec("triangle", "red", "gray", "large", "left")
    a, b = world.render(spec, 5), world.render(spec, 5)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render(spec, 6))


@pytest.mark.parametrize("shape", world.ALL_SHAPES)
def test_every_shape_is_drawn_in_its_colour_where_the_spec_says(shape):
    spec = world.Spec(shape, "blue", "yellow", "large", "right")
    img = world.render(spec, 1, jitter_colour=False)
    mask = world.render_mask(spec, 1)
    area = mask.mean()
    assert 0.04 < area < 0.25, area
    ys, xs = np.nonzero(mask)
    assert xs.mean() > 80  # on the right
    coverage = world.shape_coverage(shape, *world.layout(spec, 1))
    assert np.abs(img[coverage >= 0.999].astype(int) - world.COLOURS["blue"]).max() <= 1
    assert np.abs(img[coverage <= 0.001].astype(int) - world.BACKGROUNDS["yellow"]).max() <= 1


def test_sizes_and_positions_differ():
    small = world.render_mask(world.Spec("circle", "red", "gray", "small", "top"), 0)
    large = world.render_mask(world.Spec("circle", "red", "gray", "large", "bottom"), 0)
    assert large.sum() > 2.5 * small.sum()
    assert np.nonzero(small)[0].mean() < 50 < 78 < np.nonzero(large)[0].mean()


def test_caption_round_trip():
    rng = random.Random(0)
    for _ in range(50):
        spec = world.random_spec(rng, world.SHAPES, heldout=None)
        assert world.parse_caption(world.caption(spec)) == spec
    assert world.caption(world.Spec("circle", "red", "gray", "small", "top")) == \
        "a small red circle at the top on a gray background"


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        world.Spec("pentagon", "red", "gray")  # (hexagon is a world v2 shape)
    with pytest.raises(ValueError, match="invisible"):
        world.Spec("circle", "red", "red")


def test_b1_prompts_use_only_heldout_combinations_of_base_shapes():
    pairs = b1_prompts(256)
    assert len(pairs) == 256 and pairs == b1_prompts(256)
    assert all(s.shape in world.BASE_SHAPES and world.is_heldout_combo(s.shape, s.colour, s.background)
               for s, _ in pairs)
    rng = random.Random(1)
    train = [world.random_spec(rng) for _ in range(500)]
    assert not any(world.is_heldout_combo(s.shape, s.colour, s.background) for s in train)
    seen = b1_prompts(64, combos="seen")  # the diagnostic set: pretraining combinations only
    assert not any(world.is_heldout_combo(s.shape, s.colour, s.background) for s, _ in seen)


# ---------------------------------------------------------------------------
# World v1 is pinned: these digests were computed from the code before world v2 was added


def _digest(value) -> str:
    return hashlib.sha256(value if isinstance(value, bytes) else repr(value).encode()).hexdigest()[:16]


V1_RENDERS = {  # shape: (large blue on yellow on the right, seed 1; small white on black at the top, seed 7, no jitter)
    "circle": ("31c7231d65bd37b3", "b4eae6cabc3cf7ff"), "square": ("97b999dec9f7b582", "d1dbcc273142c218"),
    "triangle": ("1e9792819c28976d", "b0a366fa92ae67ed"), "star": ("04dfbfe043418871", "1d808a6d8842f0fe"),
    "heart": ("80f2dce7e6c38907", "04dfda3e036fc0ee"), "cross": ("3cb0f83a1a1efc45", "6931b0d182238574"),
}


def test_world_v1_renders_captions_and_random_specs_are_unchanged():
    for shape, (large, small) in V1_RENDERS.items():
        assert _digest(world.render(world.Spec(shape, "blue", "yellow", "large", "right"), 1).tobytes()) == large
        assert _digest(world.render(world.Spec(shape, "white", "black", "small", "top"), 7,
                                    jitter_colour=False).tobytes()) == small
    pair = world.random_pair(random.Random(3))
    assert _digest(world.render_scene(pair, 11).tobytes()) == "45b3ae3ef7a7a6c6"
    assert world.scene_caption(pair) == ("a small purple circle on the left and a large purple triangle on the right "
                                         "on a gray background")
    rng = random.Random(0)
    specs = [world.random_spec(rng) for _ in range(300)]
    assert _digest(specs) == "38dde88b1f56f8fd"
    assert _digest([c for s in specs for c in world.caption_variants(s)]) == "6b7462fe9c5001ba"
    rng = random.Random(0)
    assert _digest([world.random_pair(rng, None) for _ in range(100)]) == "f499a9aa8e03c0f5"
    assert _digest(b1_prompts(256)) == "74eed3960bf9114a"
    assert _digest(b1_prompts(64, combos="seen")) == "630353d1eedb6ebf"
    assert _digest(world.vocabulary()) == "b75b0d72242ffb09"
    assert _digest(world.prompts_naming("circle") + world.prompts_naming("red")) == "00c91cb420a55933"


def test_the_v1_world_object_is_the_module_functions():
    v1 = world.V1
    assert v1.shapes == world.SHAPES and v1.vocabulary() == world.vocabulary()
    assert v1.prompt_specs(256, B1_SEED) == b1_prompts(256)
    assert v1.prompt_specs(64, B1_SEED, "seen") == b1_prompts(64, combos="seen")
    scenes = v1.pretraining_scenes(300, 5)
    assert ([s.specs[0] for s in scenes], [s.seed for s in scenes]) == world_sample(300, 5, world.BASE_SHAPES, False)
    rng = random.Random(2)
    for _ in range(50):
        spec, seed = world.random_spec(rng, world.SHAPES, heldout=None), rng.randrange(1000)
        assert v1.caption_variants([spec], seed) == world.caption_variants(spec)
        assert v1.caption(spec, seed) == world.caption(spec)
        assert v1.parse_caption(world.caption(spec)) == world.parse_caption(world.caption(spec)) == spec
    pair = v1.random_pair(random.Random(3))
    assert pair == world.random_pair(random.Random(3)) and v1.scene_caption(pair, 4) == world.scene_caption(pair)
    assert world.get_world(1) is v1 and world.get_world(2) is world.V2
    with pytest.raises(ValueError, match="unknown world version 3"):
        world.get_world(3)


# ---------------------------------------------------------------------------
# World v2

V2 = world.V2
NEW_SHAPES = ("diamond", "hexagon", "octagon", "oval", "ring", "semicircle", "arrow", "trapezoid")


def test_v2_shapes_and_synonyms():
    assert V2.base_shapes == world.BASE_SHAPES + NEW_SHAPES and V2.heldout_shapes == ("star", "heart", "cross")
    assert world.synonyms("circle") == ("circle", "disc", "round shape")
    assert world.synonyms("square") == ("square", "box") and world.synonyms("star") == ("star",)
    for shape in V2.shapes:
        assert world.synonyms(shape)[0] == shape and V2.words(shape) == world.synonyms(shape)
        assert 2 <= len(V2.words(shape)) <= 3 if shape in V2.base_shapes else len(V2.words(shape)) == 1
    assert all(world.V1.words(shape) == (shape,) for shape in world.SHAPES)
    every_word = [w for s in V2.shapes for w in V2.words(s)]
    assert len(every_word) == len(set(every_word))  # no word names two shapes
    with pytest.raises(ValueError, match="unknown shape 'pentagon'"):
        world.synonyms("pentagon")
    with pytest.raises(ValueError, match="not a shape of world v1"):
        world.V1.words("hexagon")
    with pytest.raises(ValueError, match="both pretrained and held out"):
        world.World(3, ("circle", "star"), ("star",))
    with pytest.raises(ValueError, match="between 0 and 1"):
        world.World(3, ("circle",), (), two_shape_fraction=1.5)


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_v2_renders_are_deterministic_per_spec_and_seed(shape):
    spec = world.Spec(shape, "green", "white", "small", "bottom")
    a = world.render(spec, 9)
    assert np.array_equal(a, world.render(spec, 9)) and np.array_equal(a, world.Scene((spec,), 9).render())
    assert not np.array_equal(a, world.render(spec, 10))


@pytest.mark.parametrize("size, areas", [("large", (0.04, 0.14)), ("small", (0.012, 0.045))])
def test_every_v2_shape_has_a_plausible_area_and_differs_from_every_other(size, areas):
    for seed in range(3):
        masks = {s: world.render_mask(world.Spec(s, "red", "gray", size, "center"), seed) for s in V2.shapes}
        for shape, mask in masks.items():
            assert areas[0] < mask.mean() < areas[1], (shape, mask.mean())
        for i, a in enumerate(V2.shapes):
            for b in V2.shapes[i + 1:]:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.92, (a, b, iou)  # the closest pairs: circle/octagon, hexagon/octagon (about 0.9)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def _halves(mask: np.ndarray, axis: int) -> float:
    """The mask's area in the far half of its bounding box (bottom, or right for axis 1) over the near half's."""
    profile = mask.sum(1 - axis)
    filled = np.nonzero(profile)[0]
    middle = (filled[0] + filled[-1] + 1) / 2
    index = np.arange(len(profile))
    return profile[index >= middle].sum() / profile[index < middle].sum()


@pytest.mark.parametrize("size", world.SIZES)
def test_v2_shapes_have_their_defining_features(size):
    def mask(shape):  # upright (the layout's rotation jitter left out), centred
        return world.shape_coverage(shape, 64.0, 64.0, world.SIZE_RADII[size]) >= 0.5

    assert not mask("ring")[64, 64] and mask("circle")[64, 64]  # the ring has a hole
    assert mask("ring").sum() < 0.8 * mask("circle").sum()
    width, height = _extent(mask("oval"))
    assert width > 1.5 * height  # an oval is wider than tall
    width, height = _extent(mask("diamond"))
    assert height > 1.3 * width
    assert _halves(mask("semicircle"), 0) > 1.4  # flat side down: more of it in the lower half
    assert _halves(mask("trapezoid"), 0) > 1.35  # the wider base at the bottom
    assert _halves(mask("arrow"), 1) > 1.15  # the head on the right
    assert all(0.8 < _halves(mask(s), axis) < 1.25 for s in ("circle", "square", "hexagon", "octagon", "oval", "ring")
               for axis in (0, 1))  # the symmetric ones


def test_v2_captions_name_shapes_by_every_synonym_and_parse_back():
    rng = random.Random(4)
    for shape in V2.shapes:
        seen = set()
        for seed in range(40):
            spec = world.with_shape(V2.random_spec(rng, heldout=None), shape)
            text = V2.caption(spec, seed)
            assert text == V2.caption(spec, seed) and V2.parse_caption(text) == spec, text
            seen |= {w for w in V2.words(shape) if f" {w} " in f" {text} "}
            assert V2.parse_caption(text.upper().replace(" ", "  ")) == spec
        assert seen == set(V2.words(shape)), (shape, seen)
        assert f" {shape} " in f" {V2.caption(spec)} " and V2.parse_caption(V2.caption(spec)) == spec  # no seed
    spec = world.Spec("oval", "orange", "gray", "large", "left")
    assert {V2.caption(spec, s, size=False) for s in range(20)} == {"an orange oval on the left on a gray background",
                                                          "an orange ellipse on the left on a gray background"}
    assert V2.caption(spec) == "a large orange oval on the left on a gray background"
    assert V2.parse_caption("a small blue round shape at the top on a white background") == \
        world.Spec("circle", "blue", "white", "small", "top")
    assert V2.parse_caption("a box on a red background") is None  # no colour
    assert world.parse_caption("a red disc on a gray background") is None  # v1 knows no synonyms


def test_v2_scene_captions_vary_the_words_across_variants_and_parse_back():
    scenes = V2.pretraining_scenes(200, 3, two_shape_fraction=0.5)
    words_per_variant = set()
    for scene in scenes:
        variants = V2.caption_variants(scene.specs, scene.seed)
        assert len(variants) == 8 and variants == V2.caption_variants(scene.specs, scene.seed)
        assert V2.parse_scene(variants[7]) == list(scene.specs)
        assert (" and " in variants[0]) == (len(scene.specs) == 2)
        words_per_variant.add(len({v.split(" on ")[0].split(" and ")[0].split()[-1] for v in variants[:2]}))
    assert words_per_variant == {1, 2}  # some images get two words for their shape among its captions
    assert V2.parse_scene("a red circle and a blue box") is None


def test_held_out_shapes_never_appear_in_the_v2_pretraining_stream():
    scenes = V2.pretraining_scenes(2000, 0)
    specs = [s for scene in scenes for s in scene.specs]
    assert {s.shape for s in specs} == set(V2.base_shapes)
    assert not any(world.is_heldout_combo(s.shape, s.colour, s.background) for s in specs)
    text = " ".join(V2.scene_caption(scene.specs, scene.seed) for scene in scenes)
    assert not {"star", "heart", "cross"} & set(text.split())
    assert scenes == V2.pretraining_scenes(2000, 0) and scenes != V2.pretraining_scenes(2000, 1)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_the_two_shape_fraction_is_honoured(fraction):
    world_ = world.World(2, V2.base_shapes, V2.heldout_shapes, V2.synonyms, two_shape_fraction=fraction)
    for scenes in (world_.pretraining_scenes(2000, 7), V2.pretraining_scenes(2000, 7, two_shape_fraction=fraction)):
        pairs = [s for s in scenes if len(s.specs) == 2]
        assert abs(len(pairs) / 2000 - fraction) < 0.035
        for a, b in (p.specs for p in pairs):
            assert a.shape != b.shape and a.colour == b.colour and a.background == b.background
    assert abs(sum(len(s.specs) == 2 for s in V2.pretraining_scenes(2000, 7)) / 2000 - 0.2) < 0.035
    with pytest.raises(ValueError, match="between 0 and 1"):
        V2.pretraining_scenes(10, 0, two_shape_fraction=-0.1)


def test_v2_b1_prompts_are_held_out_combinations_of_all_eleven_base_shapes():
    pairs = V2.prompt_specs(512, B1_SEED)
    assert pairs == V2.prompt_specs(512, B1_SEED) and len(pairs) == 512
    assert {s.shape for s, _ in pairs} == set(V2.base_shapes)
    assert all(world.is_heldout_combo(s.shape, s.colour, s.background) for s, _ in pairs)
    seen = V2.prompt_specs(256, B1_SEED, combos="seen")
    assert not any(world.is_heldout_combo(s.shape, s.colour, s.background) for s, _ in seen)
    trained = {(s.shape, s.colour, s.background) for sc in V2.pretraining_scenes(4000, 0) for s in sc.specs}
    assert not trained & {(s.shape, s.colour, s.background) for s, _ in pairs}
    with pytest.raises(ValueError, match="combos is"):
        V2.prompt_specs(4, 0, combos="all")


def test_v2_vocabulary_holds_every_caption_word_after_v1_s():
    vocab = V2.vocabulary()
    assert vocab[:len(world.vocabulary())] == world.vocabulary() and len(vocab) == len(set(vocab))
    words = {w for sc in V2.pretraining_scenes(500, 2, two_shape_fraction=0.5)
             for c in V2.caption_variants(sc.specs, sc.seed) for w in c.split()}
    words |= {w for s, seed in V2.prompt_specs(256, 1) for w in V2.caption(s, seed).split()}
    assert words <= set(vocab) and {"an", "and", "disc", "hoop", "trapezium", "octagonal"} <= words


def test_b2_prior_pictures_are_drawn_from_the_judges_world(tmp_path):
    """B2's regularization set on world v2 draws v2's base shapes (and the 8 training renders redrawn as each of
    the eleven) with v2's articles; on v1 it keeps to v1's three shapes."""
    from studio.bench.evaluate import write_b2_prior_set

    v2 = write_b2_prior_set(tmp_path / "v2", 24, paired=True, shapes_world=world.V2)
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in v2]
    assert len(v2) == 24 + 8 * len(world.V2.base_shapes)
    named = {shape for shape in world.V2.base_shapes for c in captions if f" {shape} " in f" {c} "}
    assert named == set(world.V2.base_shapes)
    assert any(" an " in f" {c} " for c in captions) and not any(" a o" in c for c in captions)
    v1 = write_b2_prior_set(tmp_path / "v1", 24)
    assert all(any(f" {s} " in f" {p.with_suffix('.txt').read_text(encoding='utf-8')} " for s in world.BASE_SHAPES)
               for p in v1)
