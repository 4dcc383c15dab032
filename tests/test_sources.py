"""Every model source, with tiny random SD 1.x and SDXL pipelines built here (nothing is downloaded)."""

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio import StudioError, embedded, load_pipeline
from studio.generate import GenerationSettings, generate


def _vae():
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)


def _text(tok, cls=CLIPTextModel, width=32):
    return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=embedded.MAX_TOKENS,
                              projection_dim=width, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    torch.manual_seed(0)
    tok = embedded.build_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text(tok), tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = tmp_path_factory.mktemp("sd1")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    torch.manual_seed(0)
    tok = embedded.build_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=2, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=1, projection_class_embeddings_input_dim=80)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text(tok), text_encoder_2=_text(
        tok, CLIPTextModelWithProjection), tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler())
    path = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(path)
    return path


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
