import numpy as np
import torch

from studio.shapes import world
from studio.bench.evaluate import frechet_distance
from studio.shapes.judge import accuracy, judge_images, to_tensor
from studio.shapes.pretrain import vae_roundtrip
from studio.shapes.renders import render_set, world_sample


def _sample(n, seed):
    specs, seeds = world_sample(n, seed, world.SHAPES, heldout=None)
    return specs, render_set(specs, seeds, workers=1)


def test_judge_reads_fresh_renders(judge):
    specs, images = _sample(300, 11)
    acc = accuracy(judge_images(judge, to_tensor(images))[1], specs)
    assert min(acc.values()) >= 0.99, acc


def test_judge_reads_renders_after_the_vae(judge, shapes_pipe):
    specs, images = _sample(96, 12)
    decoded = vae_roundtrip(shapes_pipe.vae, torch.from_numpy(images), "cpu", batch=32)
    acc = accuracy(judge_images(judge, decoded)[1], specs)
    assert min(acc.values()) >= 0.95, acc


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g)
    b = torch.randn(2000, 8, generator=g)
    assert frechet_distance(a, a) < 1e-6
    assert frechet_distance(a, b) < 0.1
    assert abs(frechet_distance(a, b + 2.0) - 32.0) < 1.0  # shifted means: |mu1-mu2|^2 = 8 * 4


def test_v2_labels_say_none_for_outliers_and_count_scenes():
    from studio.shapes.judge import IGNORE, NONE, heads_for, scene_labels

    heads = heads_for(2)
    assert heads["shape"] == world.V2.shapes + (NONE,) and heads["count"] == ("one", "two")
    a = world.Spec("hexagon", "red", "gray", "small", "left")
    b = world.Spec("star", "red", "gray", "large", "right")
    labels = scene_labels([([a], False), ([a], True), ([a, b], False)], heads)
    assert labels["shape"].tolist() == [heads["shape"].index("hexagon"), heads["shape"].index(NONE), IGNORE]
    assert labels["size"].tolist() == [0, 0, IGNORE] and labels["count"].tolist() == [0, 0, 1]
    assert labels["colour"].tolist() == [heads["colour"].index("red")] * 3


def test_a_v2_judge_extended_from_v1_reads_v1_classes_as_v1_did(judge):
    from studio.shapes.judge import extend_judge

    v2 = extend_judge(judge, 2)
    specs, images = _sample(16, 13)
    x = to_tensor(images)
    with torch.no_grad():
        f1, l1 = judge(x)
        f2, l2 = v2(x)
    assert torch.equal(f1, f2) and torch.equal(l1["colour"], l2["colour"])
    rows = [v2.classes["shape"].index(s) for s in judge.classes["shape"]]
    torch.testing.assert_close(l2["shape"][:, rows], l1["shape"])  # (a wider matmul rounds differently)


def test_outliers_are_deterministic_and_unlike_every_world_shape():
    spec = world.Spec("circle", "blue", "white", "large", "center")
    cov = world.outlier_coverage(spec, 5)
    assert np.array_equal(cov, world.outlier_coverage(spec, 5))
    assert np.array_equal(world.render_outlier(spec, 5), world.render_outlier(spec, 5))
    mask = cov >= 0.5
    cx, cy, radius, angle = world.layout(spec, 5)
    for shape in world.ALL_SHAPES:
        known = world.shape_coverage(shape, cx, cy, radius, angle) >= 0.5
        assert (mask & known).sum() / (mask | known).sum() <= world.OUTLIER_MAX_IOU
