import numpy as np
import pytest

from studio import StudioError, load_pipeline
from studio.shapes import world
from studio.bench.evaluate import pil_to_tensor
from studio.generate import GenerationSettings, generate
from studio.shapes.judge import judge_images


def test_python_api_returns_a_diffusers_pipeline(shapes_pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(shapes_pipe, StableDiffusionPipeline)
    assert shapes_pipe.studio_architecture == "shapes"


def test_same_seed_same_image(shapes_pipe):
    s = GenerationSettings("a large blue square on a yellow background", steps=8, seed=3)
    a = np.asarray(generate(shapes_pipe, s)[0])
    b = np.asarray(generate(shapes_pipe, s)[0])
    c = np.asarray(generate(shapes_pipe, GenerationSettings(s.prompt, steps=8, seed=4))[0])
    assert a.shape == (128, 128, 3)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1


def test_batch_image_i_equals_seed_plus_i_alone(shapes_pipe):
    batch = generate(shapes_pipe, GenerationSettings("a red circle", steps=6, seed=10, batch=2))
    alone = generate(shapes_pipe, GenerationSettings("a red circle", steps=6, seed=11))
    assert np.abs(np.asarray(batch[1]).astype(int) - np.asarray(alone[0])).max() <= 2


def test_generated_images_follow_colour_shape_and_background(shapes_pipe, judge):
    spec = world.Spec("square", "blue", "yellow", "large", "center")
    images = generate(shapes_pipe, GenerationSettings(world.caption(spec), steps=25, guidance=5.0, seed=0, batch=4))
    _, preds = judge_images(judge, pil_to_tensor(images))
    assert preds["shape"].count("square") >= 3, preds
    assert preds["colour"].count("blue") >= 3, preds
    assert preds["background"].count("yellow") >= 3, preds


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="  "), "prompt is empty"),
    (dict(prompt="a red circle", steps=0), "steps must be at least 1"),
    (dict(prompt="a red circle", batch=0), "batch must be at least 1"),
    (dict(prompt="a red circle", height=100), "multiple of 8"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(StudioError, match=message):
        GenerationSettings(**kwargs).validate()


def test_unknown_model_is_refused():
    with pytest.raises(StudioError, match="no such"):
        load_pipeline("/nonexistent/folder/model.safetensors")
