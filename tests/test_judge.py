import torch

from studio.shapes import world
from studio.bench.evaluate import frechet_distance
from studio.shapes.judge import accuracy, judge_images, to_tensor
from studio.shapes.pretrain import render_set, vae_roundtrip, world_sample


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
