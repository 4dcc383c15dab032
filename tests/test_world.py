import random

import numpy as np
import pytest

from studio.shapes import world
from studio.bench.evaluate import b1_prompts


def test_render_is_deterministic_and_seed_dependent():
    spec = world.Spec("triangle", "red", "gray", "large", "left")
    a, b = world.render(spec, 5), world.render(spec, 5)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render(spec, 6))


@pytest.mark.parametrize("shape", world.SHAPES)
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
        world.Spec("hexagon", "red", "gray")
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
