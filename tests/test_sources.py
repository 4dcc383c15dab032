"""Every model source, with tiny random SD 1.x and SDXL pipelines built here (nothing is downloaded)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from studio import StudioError, load_pipeline
from studio.shapes import embedded
from studio.generate import GenerationSettings, generate


def test_embedded_model_is_recognised():
    assert load_pipeline("shapes").studio_architecture == "shapes"


def test_sd1_folder_loads_and_generates(sd1_folder):
    pipe = load_pipeline(str(sd1_folder))
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.studio_architecture == "sd1"
    img = generate(pipe, GenerationSettings("a red circle", steps=2, height=32, width=32))[0]
    assert np.asarray(img).shape == (32, 32, 3)


def test_sdxl_folder_loads_and_generates(sdxl_folder):
    pipe = load_pipeline(str(sdxl_folder))
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.studio_architecture == "sdxl"
    img = generate(pipe, GenerationSettings("a red circle", steps=2, height=32, width=32))[0]
    assert np.asarray(img).shape == (32, 32, 3)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(StudioError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))


def test_truncated_single_file_is_named(tmp_path):
    src = embedded.SHAPES_DIR / "vae" / "diffusion_pytorch_model.safetensors"
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(src.read_bytes()[:-1000])
    with pytest.raises(StudioError, match="truncated"):
        load_pipeline(str(bad))


def test_single_file_round_trip_of_the_embedded_model(tmp_path):
    from studio.single_file import save_single_file

    pipe = load_pipeline("shapes")
    path = save_single_file(pipe, tmp_path / "shapes.safetensors")
    again = load_pipeline(str(path))  # its configs ship with studio: loads offline with no --config
    assert again.studio_architecture == "shapes"
    settings = GenerationSettings("a large blue square on a yellow background", steps=5, seed=1)
    a = np.asarray(generate(pipe, settings)[0])
    b = np.asarray(generate(again, settings)[0])
    assert np.array_equal(a, b)


def test_sd1_single_file_loads_with_its_config_folder(sd1_folder, tmp_path):
    from studio.single_file import save_single_file

    pipe = load_pipeline(str(sd1_folder))
    path = save_single_file(pipe, tmp_path / "tiny-sd1.safetensors")
    again = load_pipeline(str(path), config=str(sd1_folder))
    assert again.studio_architecture == "sd1"
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_single_file_without_configs_offline_says_so(sd1_folder, tmp_path):
    from studio.single_file import save_single_file

    path = save_single_file(load_pipeline(str(sd1_folder)), tmp_path / "tiny-sd1.safetensors")
    with pytest.raises(StudioError, match="cache|network|offline"):
        load_pipeline(str(path), offline=True)
